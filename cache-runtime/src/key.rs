//! Key rendering: namespaces, escaped template values, the default key's argument encoding.
//!
//! A rendered key is `<namespace>:<key text>[:v<version>]`. Values substituted into a template
//! are escaped so that they can never produce another key's text:
//!
//! * `%`, `:`, `{`, `}`, space and ASCII control characters are always percent-encoded, so a
//!   value never contains the `:` that separates key parts, nor a brace that would change the
//!   key's Redis Cluster hash slot;
//! * in addition, the first character of every literal run that stands between two
//!   placeholders is encoded (the macro passes these as `extra`), so that within one template
//!   distinct arguments always render distinct keys (`{first}-{last}` escapes `-`).
//!
//! # Long keys
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
//!
//! # Auxiliary keys and hash slots
//!
//! The lease, generation and waiter keys of a value key must be in its Redis Cluster hash
//! slot, because one script touches them all; [`aux_key`] names them, following Redis's
//! hash-tag rule exactly ([`hash_tag`], [`key_slot`]).

use std::fmt::{self, Write as _};
use std::io;
use std::sync::LazyLock;

use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// Appends `c` to `out`, percent-encoded if it is reserved.
#[inline]
fn push_escaped(out: &mut String, c: char, extra: &str) {
    let reserved = matches!(c, '%' | ':' | '{' | '}' | ' ' | '\u{7f}') || (c as u32) < 0x20;
    if reserved || (!extra.is_empty() && extra.contains(c)) {
        let mut buf = [0u8; 4];
        for b in c.encode_utf8(&mut buf).bytes() {
            // `write!` into a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    } else {
        out.push(c);
    }
}

/// Escapes `value` the way key templates escape their placeholders.
///
/// Use it to build, for the manual API, the same key an attribute renders:
/// `#[cached(key = "user:{email}")]` stores `email = "a b@x"` under
/// `format!("user:{}", escape_key_part("a b@x"))`, that is `user:a%20b@x`.
///
/// ```
/// assert_eq!(cache_runtime::escape_key_part("1:admin"), "1%3Aadmin");
/// assert_eq!(cache_runtime::escape_key_part(42), "42");
/// ```
pub fn escape_key_part(value: impl fmt::Display) -> String {
    let mut out = String::new();
    let _ = write!(
        Escaper {
            out: &mut out,
            extra: ""
        },
        "{value}"
    );
    out
}

struct Escaper<'a> {
    out: &'a mut String,
    extra: &'static str,
}

impl fmt::Write for Escaper<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'@' | b'/'))
            && self.extra.is_empty()
        {
            self.out.push_str(s);
        } else {
            for c in s.chars() {
                push_escaped(self.out, c, self.extra);
            }
        }
        Ok(())
    }
}

/// An `io::Write` that appends escaped UTF-8 (serde_json's output) to a `String`.
struct JsonEscaper<'a> {
    out: &'a mut String,
}

impl io::Write for JsonEscaper<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // serde_json writes whole UTF-8 sequences per call.
        let s =
            std::str::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        for c in s.chars() {
            push_escaped(self.out, c, "");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Primitive integers, formatted into keys without `fmt`.
#[doc(hidden)]
pub trait KeyInteger: Copy {
    /// The sign and the magnitude.
    fn split(self) -> (bool, u64);
}

macro_rules! key_integer {
    (unsigned: $($t:ty),*; signed: $($s:ty),*) => {
        $(impl KeyInteger for $t {
            #[inline]
            fn split(self) -> (bool, u64) {
                (false, self as u64)
            }
        })*
        $(impl KeyInteger for $s {
            #[inline]
            fn split(self) -> (bool, u64) {
                (self < 0, (self as i64).unsigned_abs())
            }
        })*
    };
}
key_integer!(unsigned: u8, u16, u32, u64, usize; signed: i8, i16, i32, i64, isize);

/// Builds one rendered key. Used by the code the attributes generate.
#[doc(hidden)]
pub struct KeyWriter {
    buf: String,
    failed: bool,
    args: usize,
}

impl KeyWriter {
    /// Starts a key in `namespace` (empty: no prefix).
    pub(crate) fn new(namespace: &str) -> Self {
        let mut buf = String::with_capacity(namespace.len() + 48);
        if !namespace.is_empty() {
            buf.push_str(namespace);
            buf.push(':');
        }
        KeyWriter {
            buf,
            failed: false,
            args: 0,
        }
    }

    /// Appends literal template text, unescaped.
    #[inline]
    pub fn literal(&mut self, text: &str) -> &mut Self {
        self.buf.push_str(text);
        self
    }

    /// Appends a placeholder's value, formatted with `Display` and escaped.
    #[inline]
    pub fn display<T: fmt::Display + ?Sized>(
        &mut self,
        value: &T,
        extra: &'static str,
    ) -> &mut Self {
        let mut esc = Escaper {
            out: &mut self.buf,
            extra,
        };
        if write!(esc, "{value}").is_err() {
            self.failed = true;
        }
        self
    }

    /// Appends an integer placeholder: the same text `display` would write, without the
    /// `fmt` machinery.
    #[inline]
    pub fn integer<T: KeyInteger>(&mut self, value: T, extra: &'static str) -> &mut Self {
        let (negative, magnitude) = value.split();
        if negative {
            push_escaped(&mut self.buf, '-', extra);
        }
        self.uint(magnitude)
    }

    #[inline]
    fn uint(&mut self, value: u64) -> &mut Self {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        let mut v = value;
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        // Digits are never escaped (separators that need escaping are never digits).
        for &b in &buf[i..] {
            self.buf.push(char::from(b));
        }
        self
    }

    /// Appends one argument of a default key: JSON, escaped, comma separated.
    pub fn arg<T: Serialize + ?Sized>(&mut self, value: &T) -> &mut Self {
        if self.args > 0 {
            self.buf.push(',');
        }
        self.args += 1;
        let mut w = JsonEscaper { out: &mut self.buf };
        if serde_json::to_writer(&mut w, value).is_err() {
            self.failed = true;
        }
        self
    }

    /// Opens the argument list of a default key.
    pub fn open_args(&mut self) -> &mut Self {
        self.buf.push_str(":[");
        self
    }

    /// Closes the argument list of a default key.
    pub fn close_args(&mut self) -> &mut Self {
        self.buf.push(']');
        self
    }

    /// Finishes the key, appending `:v<version>` if a version is set, and bounding its length
    /// (a key longer than 256 bytes is stored under its digest form, see
    /// [`Cache::full_key`](crate::Cache::full_key)). A value that could not be rendered (a
    /// `Display` or `Serialize` implementation failed) makes the call bypass the cache.
    pub fn finish(mut self, version: Option<u32>) -> CallKey {
        if self.failed {
            return CallKey::Unrenderable;
        }
        if let Some(v) = version {
            let _ = write!(self.buf, ":v{v}");
        }
        CallKey::Key(bound_key(self.buf))
    }
}

/// The key of one call, or why it has none.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallKey {
    /// The rendered key.
    Key(String),
    /// `condition` was false: bypass the cache.
    Condition,
    /// An argument could not be rendered: bypass the cache.
    Unrenderable,
}

impl CallKey {
    #[cfg(test)]
    pub(crate) fn unwrap(self) -> String {
        match self {
            CallKey::Key(k) => k,
            other => panic!("no key: {other:?}"),
        }
    }
}

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

/// The number of Redis Cluster hash slots.
pub(crate) const SLOTS: u16 = 16384;

/// The table of CRC16/XMODEM (polynomial 0x1021, initial value 0, not reflected).
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC16/XMODEM of `bytes`, the checksum Redis Cluster hashes keys with.
pub(crate) fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ b)]
    })
}

/// The hash tag of `key` under Redis Cluster's rule: the text between the first `{` and the
/// first `}` after it, if that text is not empty. `None` means the whole key is hashed (no
/// `{`, no `}` after the first `{`, or an empty tag `{}` there; later tags never count).
pub(crate) fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = &key[open + 1..];
    let close = rest.find('}')?;
    (close > 0).then(|| &rest[..close])
}

/// The Redis Cluster hash slot of `key` (what `CLUSTER KEYSLOT` answers): CRC16/XMODEM of
/// its hash tag, or of the whole key if it has none, modulo 16384.
pub fn key_slot(key: &str) -> u16 {
    crc16(hash_tag(key).unwrap_or(key).as_bytes()) % SLOTS
}

/// For every slot, the first alphanumeric string (shortest first) that hashes to it: at most
/// three bytes, stored as `[len, b0, b1, b2]`. Built on first use (about 73 000 checksums of
/// three bytes, well under a millisecond); only keys whose slot no hash tag can name need it.
static SLOT_TAGS: LazyLock<Box<[[u8; 4]]>> = LazyLock::new(|| {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut table = vec![[0u8; 4]; usize::from(SLOTS)].into_boxed_slice();
    let mut missing = usize::from(SLOTS);
    let mut consider = |tag: &[u8]| {
        let entry = &mut table[usize::from(crc16(tag) % SLOTS)];
        if entry[0] == 0 {
            entry[0] = tag.len() as u8;
            entry[1..=tag.len()].copy_from_slice(tag);
            missing -= 1;
        }
        missing == 0
    };
    'done: {
        for &a in ALPHABET {
            if consider(&[a]) {
                break 'done;
            }
        }
        for &a in ALPHABET {
            for &b in ALPHABET {
                if consider(&[a, b]) {
                    break 'done;
                }
            }
        }
        for &a in ALPHABET {
            for &b in ALPHABET {
                for &c in ALPHABET {
                    if consider(&[a, b, c]) {
                        break 'done;
                    }
                }
            }
        }
    }
    // Three alphanumeric bytes cover every slot (a unit test checks it).
    table
});

/// A short alphanumeric hash tag whose slot is `slot` (`slot < 16384`).
fn slot_tag(slot: u16) -> &'static [u8] {
    let entry = &SLOT_TAGS[usize::from(slot % SLOTS)];
    &entry[1..=usize::from(entry[0])]
}

/// The name of an auxiliary key (lease, generation, ...) for `value_key`, in the same Redis
/// Cluster hash slot, so that one script may touch both. `prefix` must not contain braces.
///
/// * `value_key` has a hash tag: `<prefix><value key>` (the tag is still the first one);
/// * it has none and contains no `}`: `<prefix>{<value key>}` (the whole key becomes the tag,
///   and the whole key is what Redis hashes for `value_key`);
/// * it has none but contains a `}` (`a}b`, an empty tag `{}` first, ...), or is empty: no tag
///   can equal it, so its slot is computed and a short tag of that slot is used:
///   `<prefix>{<tag>}<value key>`.
pub fn aux_key(prefix: &str, value_key: &str) -> String {
    debug_assert!(!prefix.contains(['{', '}']), "aux key prefix {prefix:?}");
    let mut out = String::with_capacity(prefix.len() + value_key.len() + 5);
    out.push_str(prefix);
    if hash_tag(value_key).is_some() {
        out.push_str(value_key);
    } else if !value_key.is_empty() && !value_key.contains('}') {
        out.push('{');
        out.push_str(value_key);
        out.push('}');
    } else {
        out.push('{');
        out.extend(slot_tag(key_slot(value_key)).iter().map(|&b| char::from(b)));
        out.push('}');
        out.push_str(value_key);
    }
    out
}

/// Checks a namespace: no braces (they would change hash slots), no spaces or control
/// characters, not longer than 128 bytes.
pub(crate) fn validate_namespace(ns: &str) -> Result<(), String> {
    if ns.len() > 128 {
        return Err(format!(
            "namespace is {} bytes long; the limit is 128",
            ns.len()
        ));
    }
    if let Some(c) = ns
        .chars()
        .find(|c| matches!(c, '{' | '}' | ' ') || c.is_control())
    {
        return Err(format!(
            "namespace {ns:?} contains {c:?}; braces, spaces and control characters are not allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(ns: &str, f: impl FnOnce(&mut KeyWriter)) -> String {
        let mut w = KeyWriter::new(ns);
        f(&mut w);
        w.finish(None).unwrap()
    }

    #[test]
    fn values_cannot_forge_separators() {
        // `{id}` with id = "1:admin" vs `{id}:{role}` with ("1", "admin").
        let a = render("app", |w| {
            w.literal("user:").display("1:admin", "");
        });
        let b = render("app", |w| {
            w.literal("user:")
                .display("1", "")
                .literal(":")
                .display("admin", "");
        });
        assert_ne!(a, b);
        assert_eq!(a, "app:user:1%3Aadmin");
        assert_eq!(b, "app:user:1:admin");
    }

    #[test]
    fn extra_delimiters_are_escaped() {
        let a = render("", |w| {
            w.display("a-b", "-").literal("-").display("c", "-");
        });
        let b = render("", |w| {
            w.display("a", "-").literal("-").display("b-c", "-");
        });
        assert_ne!(a, b);
        assert_eq!(a, "a%2Db-c");
    }

    #[test]
    fn escaping_is_reversible_and_keeps_unicode() {
        assert_eq!(escape_key_part("a b%{x}"), "a%20b%25%7Bx%7D");
        assert_eq!(escape_key_part("zoë"), "zoë");
        assert_eq!(escape_key_part("tab\there"), "tab%09here");
    }

    #[test]
    fn default_key_args_are_json_and_escaped() {
        let k = render("ns", |w| {
            w.literal("crate::get").open_args();
            w.arg(&42u64).arg("a:b").arg(&vec![1, 2]);
            w.close_args();
        });
        assert_eq!(k, r#"ns:crate::get:[42,"a%3Ab",[1,2]]"#);
    }

    #[test]
    fn integers_render_like_display() {
        for v in [0u64, 7, 42, 1_000_000, u64::MAX] {
            let mut a = KeyWriter::new("");
            a.integer(v, "");
            let mut b = KeyWriter::new("");
            b.display(&v, "");
            assert_eq!(a.finish(None), b.finish(None));
        }
        for v in [0i64, -1, 42, i64::MIN, i64::MAX] {
            for extra in ["", "-"] {
                let mut a = KeyWriter::new("");
                a.integer(v, extra);
                let mut b = KeyWriter::new("");
                b.display(&v, extra);
                assert_eq!(a.finish(None), b.finish(None), "{v} with extra {extra:?}");
            }
        }
    }

    #[test]
    fn version_suffix() {
        let mut w = KeyWriter::new("");
        w.literal("user:").display(&7, "");
        assert_eq!(w.finish(Some(3)).unwrap(), "user:7:v3");
    }

    /// `CLUSTER KEYSLOT` answers of a Redis 7.0 node started with `--cluster-enabled yes`.
    const KEYSLOTS: &[(&str, u16)] = &[
        ("123456789", 12739),
        ("", 0),
        ("a", 15495),
        ("foo", 12182),
        ("bar", 5061),
        ("{user1000}.following", 3443),
        ("{}foo", 9500),
        ("foo{}{bar}", 8363),
        ("foo{{bar}}zap", 4015),
        ("foo{bar}{zap}", 5061),
        ("a{b", 13340),
        ("x}y", 8210),
        ("ns:{}:user:7", 12371),
        ("__cr:lease:{ns:{}:user:7}", 8050),
        ("zoë", 6658),
        ("{}", 15257),
        ("}{", 12793),
    ];

    #[test]
    fn crc16_and_key_slot_match_redis() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
        for &(key, slot) in KEYSLOTS {
            assert_eq!(key_slot(key), slot, "CLUSTER KEYSLOT {key:?}");
        }
    }

    #[test]
    fn hash_tags_follow_the_redis_rule() {
        assert_eq!(hash_tag("{user1000}.following"), Some("user1000"));
        assert_eq!(hash_tag("foo{{bar}}zap"), Some("{bar"));
        assert_eq!(hash_tag("foo{bar}{zap}"), Some("bar"));
        assert_eq!(
            hash_tag("foo{}{bar}"),
            None,
            "an empty first tag: the whole key"
        );
        assert_eq!(hash_tag("a{b"), None);
        assert_eq!(hash_tag("a}b{c"), None);
        assert_eq!(hash_tag("a}{b}"), Some("b"));
        assert_eq!(hash_tag("plain"), None);
    }

    #[test]
    fn every_slot_has_a_short_tag() {
        for slot in 0..SLOTS {
            let tag = slot_tag(slot);
            assert!((1..=3).contains(&tag.len()), "slot {slot}");
            assert!(tag.iter().all(u8::is_ascii_alphanumeric), "slot {slot}");
            let tag = std::str::from_utf8(tag).unwrap();
            assert_eq!(key_slot(tag), slot);
        }
    }

    const PREFIXES: [&str; 3] = ["__cr:gen:", "__cr:lease:", "__cr:wait:"];

    fn assert_same_slot(key: &str) {
        for prefix in PREFIXES {
            let aux = aux_key(prefix, key);
            assert!(aux.starts_with(prefix), "{aux:?}");
            assert_eq!(key_slot(&aux), key_slot(key), "{aux:?} for {key:?}");
        }
    }

    #[test]
    fn aux_keys_share_the_slot() {
        // A valid tag is kept as is; a key without one becomes the tag.
        assert_eq!(aux_key("lease:", "app:user:1"), "lease:{app:user:1}");
        assert_eq!(aux_key("lease:", "app:{user:1}:x"), "lease:app:{user:1}:x");
        assert_eq!(aux_key("lease:", "app:{user"), "lease:{app:{user}");
        // `{{{tenant}}}:user:{id}` with an empty tenant: hashed whole, so no tag can name it;
        // `lease:{ns:{}:user:7}` would hash `ns:{`.
        let key = "ns:{}:user:7";
        let aux = aux_key("__cr:lease:", key);
        assert_eq!(key_slot(&aux), 12371);
        assert!(aux.ends_with("}ns:{}:user:7"), "{aux}");
        for key in [
            "ns:{}:user:7",
            "a}b",
            "}",
            "{}",
            "{}{a}",
            "x{}y{z}",
            "{a",
            "}{a}",
            "a}b{c",
            "",
            "{",
            "zoë}",
        ] {
            assert_same_slot(key);
        }
        for &(key, _) in KEYSLOTS {
            assert_same_slot(key);
        }
    }

    #[test]
    fn aux_keys_share_the_slot_for_generated_keys() {
        // Every key of up to six characters over braces and two letters, bare and namespaced.
        const ALPHABET: [char; 4] = ['{', '}', 'a', ':'];
        let mut keys = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..6 {
            last = last
                .iter()
                .flat_map(|k| ALPHABET.iter().map(move |c| format!("{k}{c}")))
                .collect();
            keys.extend(last.iter().cloned());
        }
        assert_eq!(keys.len(), 5461);
        for key in &keys {
            assert_same_slot(key);
            assert_same_slot(&format!("ns:{key}"));
        }
        // Longer pseudo-random keys with braces in odd places (a fixed LCG: reproducible).
        const MIXED: [char; 8] = ['{', '}', 'u', ':', '7', ' ', 'é', '{'];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        for _ in 0..5000 {
            let len = next() % 40;
            let key: String = (0..len).map(|_| MIXED[(next() % 8) as usize]).collect();
            assert_same_slot(&key);
        }
    }

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

    #[test]
    fn rendered_and_manual_long_keys_agree() {
        let long_value = "a b:{c}".repeat(100);
        let rendered = render("ns", |w| {
            w.literal("search:").display(&long_value, "");
        });
        assert!(rendered.len() <= MAX_KEY_LEN);
        let manual = format!("ns:search:{}", escape_key_part(&long_value));
        assert_eq!(rendered, bound_key(manual));
        // The default key and the version suffix count.
        let mut w = KeyWriter::new("ns");
        w.literal("crate::f").open_args();
        w.arg(&"x".repeat(1000));
        w.close_args();
        let k = w.finish(Some(2)).unwrap();
        assert_eq!(k.len(), MAX_KEY_LEN);
        let expected = bound_key(format!("ns:crate::f:[\"{}\"]:v2", "x".repeat(1000)));
        assert_eq!(k, expected);
    }

    #[test]
    fn namespaces_are_checked() {
        assert!(validate_namespace("app:v1").is_ok());
        assert!(validate_namespace("a{b}").is_err());
        assert!(validate_namespace("a b").is_err());
    }
}
