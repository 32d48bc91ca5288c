//! The long-key bound and the digest form.
//!
//! A full key (namespace and version suffix included; the manual API's `<namespace>:<key>`
//! alike) longer than [`MAX_KEY_LEN`] = 256 bytes, or containing `%#`, is stored under its
//! *digest form*, at most 256 bytes long:
//!
//! ```text
//! <readable prefix>%#<digest>[{<hash tag>}]
//! ```
//!
//! * `<digest>`: the first 16 bytes of the SHA-256 of the whole full key (UTF-8), as 32
//!   lowercase hex digits. It is stable across processes, platforms and versions (`std::hash`
//!   is not, and is never used for keys).
//! * `<readable prefix>`: the full key's beginning, cut at a character boundary so that the
//!   whole form fits, with `{` and `}` written `%7B` and `%7D` (the prefix neither forms nor
//!   breaks a hash tag).
//! * `%#` separates them. Escaped values never produce it (their `%` is always followed by two
//!   hex digits), and a key that contains it is stored in digest form however short, so a
//!   digest form never equals a key stored as it is, and two full keys share a digest form
//!   only if their SHA-256 digests share 128 bits.
//! * `{<hash tag>}`: the full key's Redis Cluster hash tag, re-appended when it has one of at
//!   most [`MAX_KEPT_HASH_TAG`] = 64 bytes, so the digest form stays in the key's hash slot.
//!   A longer tag is not kept (the digest form is then hashed whole, into some other slot).

use sha2::{Digest as _, Sha256};

use super::KeyBuf;
use super::slot::hash_tag;

/// The longest key, in bytes, stored as it is rendered: the full key, namespace and `:v<version>`
/// suffix included. A longer key is stored under its digest form (see the module docs).
pub(crate) const MAX_KEY_LEN: usize = 256;

/// Separates a long key's kept prefix from its digest. Escaped values never contain it (their
/// `%` is always followed by two hex digits), and a key that contains it is always stored in
/// digest form, so a digest form never equals a key stored as it is.
const DIGEST_MARKER: &str = "%#";

/// The longest hash tag a digest form keeps, in bytes.
pub(crate) const MAX_KEPT_HASH_TAG: usize = 64;

/// Hex digits of the digest in a digest form (the first 16 bytes of the SHA-256).
const DIGEST_HEX: usize = 32;

/// The key stored for the full key `key` (namespace and version included): `key` itself if it
/// is at most [`MAX_KEY_LEN`] bytes long and does not contain `%#`, otherwise its digest form
/// (see the module docs), which is at most [`MAX_KEY_LEN`] bytes long.
pub(crate) fn bound_key(key: String) -> String {
    if key.len() <= MAX_KEY_LEN && !contains_marker(&key) {
        key
    } else {
        digest_form(&key)
    }
}

/// [`bound_key`] for a key rendered into a [`KeyBuf`]; `percent` says whether a `%` may be in
/// it (without one it cannot contain the marker, which is then not looked for).
#[inline]
pub(crate) fn bound_buf(key: KeyBuf, percent: bool) -> KeyBuf {
    let text = key.as_str();
    if text.len() <= MAX_KEY_LEN && !(percent && contains_marker(text)) {
        key
    } else {
        KeyBuf::from(digest_form(text))
    }
}

/// Whether `key` contains [`DIGEST_MARKER`]; cheap for the usual key without a `%`.
#[inline]
fn contains_marker(key: &str) -> bool {
    let bytes = key.as_bytes();
    bytes.contains(&b'%') && bytes.windows(2).any(|w| w == DIGEST_MARKER.as_bytes())
}

/// `<readable prefix>%#<32 hex digits>[{<hash tag>}]`, at most [`MAX_KEY_LEN`] bytes.
fn digest_form(key: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let tag = hash_tag(key).filter(|t| t.len() <= MAX_KEPT_HASH_TAG);
    let suffix = DIGEST_MARKER.len() + DIGEST_HEX + tag.map_or(0, |t| t.len() + 2);
    let budget = MAX_KEY_LEN - suffix;
    let mut out = String::with_capacity(MAX_KEY_LEN);
    // The readable prefix, cut at a character boundary, with its braces encoded: it neither
    // opens a hash tag nor closes the one appended below.
    for c in key.chars() {
        let encoded = match c {
            '{' => "%7B",
            '}' => "%7D",
            _ => "",
        };
        let len = if encoded.is_empty() {
            c.len_utf8()
        } else {
            encoded.len()
        };
        if out.len() + len > budget {
            break;
        }
        if encoded.is_empty() {
            out.push(c);
        } else {
            out.push_str(encoded);
        }
    }
    out.push_str(DIGEST_MARKER);
    let digest = Sha256::digest(key.as_bytes());
    for &b in &digest[..DIGEST_HEX / 2] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    if let Some(tag) = tag {
        out.push('{');
        out.push_str(tag);
        out.push('}');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{escape_key_part, key_slot};

    #[test]
    fn short_keys_are_stored_as_they_are() {
        for key in ["", "app:user:1", "a{b}c", "x}y", "zoë"] {
            assert_eq!(bound_key(key.to_owned()), key);
        }
        let exactly = "k".repeat(MAX_KEY_LEN);
        assert_eq!(bound_key(exactly.clone()), exactly);
        assert_ne!(bound_key(format!("{exactly}k")), format!("{exactly}k"));
    }

    #[test]
    fn long_keys_are_bounded_readable_and_distinct() {
        let long = format!("ns:search:{}", "x".repeat(300));
        let bounded = bound_key(long.clone());
        // The format, pinned: SHA-256 of the full key, first 16 bytes in hex.
        assert_eq!(bounded.len(), MAX_KEY_LEN);
        assert!(bounded.starts_with("ns:search:xxxx"), "{bounded}");
        assert!(
            bounded.ends_with("xxx%#a81a2666ad047622d557209b7ff84621"),
            "{bounded}"
        );
        assert_eq!(bound_key(long.clone()), bounded, "deterministic");
        // Keys that differ only past the cut.
        let mut other = long.clone();
        other.push('y');
        let other = bound_key(other);
        assert_ne!(other, bounded);
        assert_eq!(other[..200], bounded[..200]);
        let mut last = long.clone();
        last.replace_range(long.len() - 1.., "z");
        assert_ne!(bound_key(last), bounded);
        // Multi-byte characters are never cut in half.
        for pad in 0..4 {
            let key = format!("{}{}", "k".repeat(pad), "é€😀".repeat(100));
            let b = bound_key(key);
            assert!(
                b.len() <= MAX_KEY_LEN && b.len() > MAX_KEY_LEN - 40,
                "{}",
                b.len()
            );
        }
        // Huge keys too.
        assert_eq!(bound_key("q".repeat(1 << 20)).len(), MAX_KEY_LEN);
    }

    #[test]
    fn long_keys_keep_short_hash_tags_only() {
        let tagged = format!("ns:{{tenant:9}}:report:{}:{{x}}", "r".repeat(400));
        let b = bound_key(tagged.clone());
        assert!(b.len() <= MAX_KEY_LEN);
        assert!(b.starts_with("ns:%7Btenant:9%7D:report:rrr"), "{b}");
        assert!(b.ends_with("{tenant:9}"), "{b}");
        assert_eq!(hash_tag(&b), Some("tenant:9"));
        assert_eq!(key_slot(&b), key_slot(&tagged));
        // The longest tag that is kept, and one byte more.
        let tag = "t".repeat(MAX_KEPT_HASH_TAG);
        let b = bound_key(format!("{{{tag}}}:{}", "v".repeat(400)));
        assert_eq!(b.len(), MAX_KEY_LEN);
        assert_eq!(hash_tag(&b), Some(tag.as_str()));
        let b = bound_key(format!("{{{tag}t}}:{}", "v".repeat(400)));
        assert!(!b.contains(['{', '}']), "a long tag is not kept: {b}");
        // No valid tag (an empty one first): nothing is appended, the prefix has no brace.
        let b = bound_key(format!("ns:{{}}:{{a}}:{}", "v".repeat(400)));
        assert!(!b.contains(['{', '}']), "{b}");
        assert!(b.starts_with("ns:%7B%7D:%7Ba%7D:vvv"), "{b}");
    }

    #[test]
    fn keys_containing_the_marker_are_digested() {
        // A short key that looks like a digest form is digested too: the two never collide.
        let long = bound_key(format!("ns:{}", "x".repeat(300)));
        assert_ne!(bound_key(long.clone()), long);
        let b = bound_key("a%#b".to_owned());
        assert!(
            b.starts_with("a%#b%#") && b.len() == 4 + 2 + DIGEST_HEX,
            "{b}"
        );
        // Escaped values never produce it.
        assert!(!escape_key_part("%#").contains(DIGEST_MARKER));
    }
}
