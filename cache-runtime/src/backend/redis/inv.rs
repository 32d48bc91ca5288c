//! The invalidation channel: what a write, an invalidation or a tag invalidation publishes so
//! that other processes' in-process tiers (`local`) drop their copies.
//!
//! Every cache publishes on `__cr:inv:<namespace>` (namespaces contain no braces or spaces, see
//! `key::validate_namespace`), in the same script or pipeline as the write itself: the message
//! is published after the write is applied, and costs no extra round trip. Fills, markers,
//! leases, `REPLACE`, `TAKEOVER` and `PEXPIRE .. GT` publish nothing: they never change what a
//! reader may be served. It publishes whether or not any process subscribes (a `PUBLISH` to a
//! channel without subscribers is a dictionary miss on the server).
//!
//! A message (binary) is one frame:
//!
//! ```text
//! byte  0       kind: b'k' (these keys were written or invalidated)
//!                     b't' (these tags were invalidated)
//!                     b'h' (a heartbeat's echo, on a cluster only; see below)
//! bytes 1..9    origin: 8 random bytes, one value per `RedisBackend` (for diagnostics: receivers
//!               apply their own messages too, see `bus`)
//! then          b'k', b't': names, each a u16 (big-endian) length and that many bytes of
//!               UTF-8: full keys (namespace included) for b'k', full tag names (as
//!               `Backend::invalidate_tags` receives them, not the `__cr:tag:{..}` keys) for b't'
//!               b'h': the heartbeat's sequence number (u64) and the index of the master it was
//!               published on (u16), big-endian
//! ```
//!
//! **Heartbeat frames** (`b'h'`) prove delivery on a Redis Cluster (see `bus`, "Health"): the
//! backend publishes one on every master and waits for all of them to come back through its
//! own subscription. They go on the publisher's own channel, `__cr:hb:<origin in hex>` (see
//! [`heartbeat_channel`]), which only that backend subscribes to: other processes never
//! receive them (a receiver that does, on the invalidation channel, ignores them), and
//! processes of an older version, which would take an unknown kind for lost messages, are not
//! disturbed.
//!
//! A frame without names means "anything may have changed": a name did not fit in a u16 length
//! (keys and tags are bounded far below that; this is a guard). A receiver treats it, and any
//! frame it cannot decode (unknown kind, truncated, not UTF-8), as lost messages.

/// How the channel's name starts; the cache's namespace follows.
const CHANNEL_PREFIX: &str = "__cr:inv:";

/// The invalidation channel of the namespace `namespace`.
pub(super) fn channel(namespace: &str) -> String {
    format!("{CHANNEL_PREFIX}{namespace}")
}

/// A publisher's identity, carried by every frame it publishes.
pub(super) type Origin = [u8; 8];

/// The channel `origin`'s heartbeat frames are published on (on a cluster): `__cr:hb:`, then
/// the origin in hex.
pub(super) fn heartbeat_channel(origin: &Origin) -> String {
    let mut name = String::from("__cr:hb:");
    for b in origin {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

/// A new random origin.
pub(super) fn new_origin() -> Origin {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    RandomState::new()
        .hash_one((std::time::Instant::now(), std::process::id(), n))
        .to_be_bytes()
}

/// What a frame says changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Keys were written or invalidated.
    Keys,
    /// Tags were invalidated.
    Tags,
    /// A heartbeat's echo: names nothing (see [`Frame::heartbeat`]).
    Heartbeat,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Keys => b'k',
            Kind::Tags => b't',
            Kind::Heartbeat => b'h',
        }
    }
}

/// The heartbeat frame number `seq` of `origin`, published on the master of index `master`.
pub(super) fn encode_heartbeat(origin: &Origin, seq: u64, master: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(19);
    frame.push(Kind::Heartbeat.byte());
    frame.extend_from_slice(origin);
    frame.extend_from_slice(&seq.to_be_bytes());
    frame.extend_from_slice(&master.to_be_bytes());
    frame
}

/// The frame announcing that `names` (of `kind`) changed, published by `origin`.
pub(super) fn encode<S: AsRef<str>>(kind: Kind, origin: &Origin, names: &[S]) -> Vec<u8> {
    let len = 9 + names.iter().map(|n| 2 + n.as_ref().len()).sum::<usize>();
    let mut frame = Vec::with_capacity(len);
    frame.push(kind.byte());
    frame.extend_from_slice(origin);
    for name in names {
        let name = name.as_ref().as_bytes();
        let Ok(n) = u16::try_from(name.len()) else {
            // Cannot be framed: say "anything" instead (see the module docs).
            frame.truncate(9);
            return frame;
        };
        frame.extend_from_slice(&n.to_be_bytes());
        frame.extend_from_slice(name);
    }
    frame
}

/// A decoded frame: checked whole before any of its names is handed out.
#[derive(Debug)]
pub(super) struct Frame<'a> {
    pub(super) kind: Kind,
    pub(super) origin: Origin,
    /// The names, already checked (lengths and UTF-8).
    names: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Whether the frame names nothing, which means "anything may have changed".
    pub(super) fn is_everything(&self) -> bool {
        self.kind != Kind::Heartbeat && self.names.is_empty()
    }

    /// The names, in order (none for a heartbeat).
    pub(super) fn names(&self) -> Names<'a> {
        match self.kind {
            Kind::Heartbeat => Names(&[]),
            Kind::Keys | Kind::Tags => Names(self.names),
        }
    }

    /// A heartbeat's sequence number and master index; `None` for other kinds.
    pub(super) fn heartbeat(&self) -> Option<(u64, u16)> {
        if self.kind != Kind::Heartbeat {
            return None;
        }
        let (seq, master) = self.names.split_first_chunk::<8>()?;
        let master = master.first_chunk::<2>()?;
        Some((u64::from_be_bytes(*seq), u16::from_be_bytes(*master)))
    }
}

/// The names of a [`Frame`].
pub(super) struct Names<'a>(&'a [u8]);

impl<'a> Iterator for Names<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let (name, rest) = split_name(self.0)?;
        self.0 = rest;
        // Checked by `decode`.
        std::str::from_utf8(name).ok()
    }
}

/// The first length-prefixed name of `bytes`, and what follows it.
fn split_name(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Undecodable {
    /// Shorter than a kind and an origin.
    Short,
    /// A kind byte other than `k` and `t`.
    Kind(u8),
    /// A name's length runs past the end.
    Truncated,
    /// A name is not UTF-8.
    NotUtf8,
    /// A heartbeat frame of the wrong length.
    Heartbeat,
}

impl std::fmt::Display for Undecodable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Undecodable::Short => f.write_str("shorter than its header"),
            Undecodable::Kind(k) => write!(f, "unknown kind {k:#04x}"),
            Undecodable::Truncated => f.write_str("a name runs past its end"),
            Undecodable::NotUtf8 => f.write_str("a name is not UTF-8"),
            Undecodable::Heartbeat => f.write_str("a heartbeat of the wrong length"),
        }
    }
}

/// Decodes and checks a whole message.
pub(super) fn decode(message: &[u8]) -> Result<Frame<'_>, Undecodable> {
    let (&kind, rest) = message.split_first().ok_or(Undecodable::Short)?;
    let (origin, names) = rest.split_first_chunk::<8>().ok_or(Undecodable::Short)?;
    let kind = match kind {
        b'k' => Kind::Keys,
        b't' => Kind::Tags,
        b'h' if names.len() == 10 => {
            return Ok(Frame {
                kind: Kind::Heartbeat,
                origin: *origin,
                names,
            });
        }
        b'h' => return Err(Undecodable::Heartbeat),
        other => return Err(Undecodable::Kind(other)),
    };
    let mut rest = names;
    while !rest.is_empty() {
        let (name, after) = split_name(rest).ok_or(Undecodable::Truncated)?;
        std::str::from_utf8(name).map_err(|_| Undecodable::NotUtf8)?;
        rest = after;
    }
    Ok(Frame {
        kind,
        origin: *origin,
        names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let origin = *b"ORIGIN!!";
        let frame = encode(Kind::Keys, &origin, &["ns:a", "", "ns:é{x}"]);
        assert_eq!(&frame[..9], b"kORIGIN!!");
        assert_eq!(&frame[9..15], b"\0\x04ns:a");
        let decoded = decode(&frame).unwrap();
        assert_eq!(decoded.kind, Kind::Keys);
        assert_eq!(decoded.origin, origin);
        assert!(!decoded.is_everything());
        assert_eq!(decoded.names().collect::<Vec<_>>(), ["ns:a", "", "ns:é{x}"]);

        let tags = encode(Kind::Tags, &origin, &[String::from("ns:t")]);
        let decoded = decode(&tags).unwrap();
        assert_eq!(decoded.kind, Kind::Tags);
        assert_eq!(decoded.names().collect::<Vec<_>>(), ["ns:t"]);
    }

    #[test]
    fn heartbeats_round_trip() {
        let origin = *b"ORIGIN!!";
        let frame = encode_heartbeat(&origin, 0x0102_0304_0506_0708, 513);
        assert_eq!(frame.len(), 19);
        let decoded = decode(&frame).unwrap();
        assert_eq!(decoded.kind, Kind::Heartbeat);
        assert_eq!(decoded.origin, origin);
        assert_eq!(decoded.heartbeat(), Some((0x0102_0304_0506_0708, 513)));
        assert_eq!(decoded.names().count(), 0);
        assert_eq!(
            decode(&frame[..18]).unwrap_err(),
            Undecodable::Heartbeat,
            "truncated"
        );
        let keys = encode(Kind::Keys, &origin, &["ns:a"]);
        assert_eq!(decode(&keys).unwrap().heartbeat(), None);
        assert_eq!(heartbeat_channel(&[0xab; 8]), "__cr:hb:abababababababab");
    }

    #[test]
    fn an_unframeable_name_makes_an_everything_frame() {
        let long = "x".repeat(usize::from(u16::MAX) + 1);
        let frame = encode(Kind::Keys, &[7; 8], &["ns:a", long.as_str()]);
        assert_eq!(frame.len(), 9);
        let decoded = decode(&frame).unwrap();
        assert!(decoded.is_everything());
        assert_eq!(decoded.names().count(), 0);
    }

    #[test]
    fn garbage_is_undecodable() {
        assert_eq!(decode(b"").unwrap_err(), Undecodable::Short);
        assert_eq!(decode(b"k1234567").unwrap_err(), Undecodable::Short);
        assert_eq!(decode(b"x12345678").unwrap_err(), Undecodable::Kind(b'x'));
        assert_eq!(
            decode(b"k12345678\0\x05abc").unwrap_err(),
            Undecodable::Truncated
        );
        assert_eq!(decode(b"k12345678\0").unwrap_err(), Undecodable::Truncated);
        assert_eq!(
            decode(b"t12345678\0\x02\xff\xfe").unwrap_err(),
            Undecodable::NotUtf8
        );
    }
}
