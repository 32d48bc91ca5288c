//! Redis Cluster hash slots and auxiliary keys.
//!
//! The lease, generation and waiter keys of a value key must be in its Redis Cluster hash
//! slot, because one script touches them all; [`aux_key`] names them, following Redis's
//! hash-tag rule exactly ([`hash_tag`], [`key_slot`], [`crc16`]).

use std::sync::LazyLock;

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
    key_slot_bytes(key.as_bytes())
}

/// [`key_slot`] of a key given as bytes (a command's argument).
pub(crate) fn key_slot_bytes(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
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

#[cfg(test)]
mod tests {
    use super::*;

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

    const PREFIXES: [&str; 2] = ["__cr:wait:", "__cr:tag:"];

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
}
