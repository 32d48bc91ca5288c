//! The value envelope: what every backend stores under a value key.
//!
//! ```text
//! byte 0        format: 1 (untagged) or 2 (tagged)
//! bytes 1..9    created-at, milliseconds since the Unix epoch, little endian
//! bytes 9..13   compute time of the value, microseconds, little endian (saturating)
//! format 2 only: the tags the value was computed under, with the version each had then
//!   u16 LE      number of tags
//!   per tag     u16 LE name length, name (UTF-8), u8 version length, version
//! then          the payload, JSON
//! ```
//!
//! An untagged value pays nothing for tags: format 1 is the format of every untagged entry.
//!
//! Anything else under a value key (another format version, a truncated header, JSON that does
//! not decode into the expected type, a value written by another program) is treated as a miss
//! and overwritten by the next fill.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::tags::TagSet;

const FORMAT_VERSION: u8 = 1;
const FORMAT_TAGGED: u8 = 2;
pub(crate) const HEADER_LEN: usize = 13;

/// The first [`HEADER_LEN`] bytes of an envelope: format, created-at, compute time. Two
/// envelopes with the same header are, for all purposes, the same fill.
pub(crate) type Header = [u8; HEADER_LEN];

/// The header of an envelope (see [`Header`]), if `bytes` is one.
pub(crate) fn header_of(bytes: &[u8]) -> Option<Header> {
    match bytes.first() {
        Some(&(FORMAT_VERSION | FORMAT_TAGGED)) => bytes.get(..HEADER_LEN)?.try_into().ok(),
        _ => None,
    }
}

/// When the envelope of `header` was written (Unix ms).
pub(crate) fn header_created_at_ms(header: &Header) -> u64 {
    let mut at = [0u8; 8];
    at.copy_from_slice(&header[1..9]);
    u64::from_le_bytes(at)
}

/// How long the value of the envelope of `header` took to compute, in microseconds.
pub(crate) fn header_compute_us(header: &Header) -> u32 {
    let mut us = [0u8; 4];
    us.copy_from_slice(&header[9..13]);
    u32::from_le_bytes(us)
}

/// Why an envelope could not be read.
#[derive(Debug)]
pub(crate) enum DecodeError {
    /// Not an envelope of a format this version understands.
    Format,
    /// The payload is not JSON of the expected type.
    Payload(serde_json::Error),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Format => f.write_str("not a cache envelope of format version 1 or 2"),
            DecodeError::Payload(e) => write!(f, "payload does not decode: {e}"),
        }
    }
}

/// The metadata kept next to a payload.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    /// When the value was stored, milliseconds since the Unix epoch.
    pub(crate) created_at_ms: u64,
    /// How long the function took to compute it.
    pub(crate) compute_us: u32,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// When the envelope was written (Unix ms), if `bytes` is an envelope.
pub(crate) fn created_at_ms(bytes: &[u8]) -> Option<u64> {
    match bytes.first() {
        Some(&(FORMAT_VERSION | FORMAT_TAGGED)) => {
            let at: [u8; 8] = bytes.get(1..9)?.try_into().ok()?;
            Some(u64::from_le_bytes(at))
        }
        _ => None,
    }
}

/// Why a value could not be encoded.
#[derive(Debug)]
pub(crate) enum EncodeError {
    /// The value contains a NaN or an infinite float: JSON writes them as `null`, which never
    /// decodes back into the value (every lookup would miss, fail to decode and rewrite).
    NonFinite,
    /// The value does not serialize to JSON.
    Json(serde_json::Error),
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncodeError::NonFinite => f.write_str(
                "the value contains a NaN or infinite float, which JSON cannot represent",
            ),
            EncodeError::Json(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for EncodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EncodeError::NonFinite => None,
            EncodeError::Json(e) => Some(e),
        }
    }
}

/// Encodes `value` into a new envelope, recording `tags` (names and the versions read before
/// the value was computed) if there are any.
///
/// Fails with [`EncodeError::NonFinite`] if the value contains a NaN or infinite float.
/// serde_json writes those as `null`, so the value is probed for them (a second,
/// allocation-free pass, see [`probe`]) only when its JSON contains `null`.
pub(crate) fn encode<T: Serialize + ?Sized>(
    value: &T,
    compute: Duration,
    tags: Option<&TagSet>,
) -> Result<Bytes, EncodeError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + 128);
    let payload = header(&mut buf, compute, tags);
    serde_json::to_writer(&mut buf, value).map_err(EncodeError::Json)?;
    if contains_null(&buf[payload..]) && !probe::all_finite(value) {
        return Err(EncodeError::NonFinite);
    }
    Ok(Bytes::from(buf))
}

/// Writes the header (and the tags section); returns where the payload starts.
fn header(buf: &mut Vec<u8>, compute: Duration, tags: Option<&TagSet>) -> usize {
    let tags = tags.filter(|t| !t.is_empty());
    buf.push(if tags.is_some() {
        FORMAT_TAGGED
    } else {
        FORMAT_VERSION
    });
    buf.extend_from_slice(&now_ms().to_le_bytes());
    let compute_us = u32::try_from(compute.as_micros()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&compute_us.to_le_bytes());
    if let Some(tags) = tags {
        // Tag names are bounded like keys (256 bytes), versions are short tokens, and a
        // function has a handful of tags: the lengths fit.
        let n = tags.names.len().min(usize::from(u16::MAX));
        buf.extend_from_slice(&(n as u16).to_le_bytes());
        for (name, version) in tags.names.iter().zip(&tags.versions).take(n) {
            let name = &name.as_bytes()[..name.len().min(usize::from(u16::MAX))];
            buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
            buf.extend_from_slice(name);
            let version = &version[..version.len().min(usize::from(u8::MAX))];
            buf.push(version.len() as u8);
            buf.extend_from_slice(version);
        }
    }
    buf.len()
}

/// The tags recorded in an envelope: `(name, version)` pairs, in order.
pub(crate) struct RecordedTags<'a> {
    rest: &'a [u8],
    left: u16,
}

impl<'a> Iterator for RecordedTags<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let (name, rest) = split_len16(self.rest)?;
        let (&vlen, rest) = rest.split_first()?;
        let (version, rest) = split_at_checked(rest, usize::from(vlen))?;
        self.rest = rest;
        Some((name, version))
    }
}

fn split_at_checked(bytes: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    (bytes.len() >= n).then(|| bytes.split_at(n))
}

fn split_len16(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = split_at_checked(bytes, 2)?;
    split_at_checked(rest, usize::from(u16::from_le_bytes([len[0], len[1]])))
}

/// Where the payload starts and the tags section (empty for format 1).
fn layout(bytes: &[u8]) -> Result<(usize, RecordedTags<'_>), DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Format);
    }
    match bytes[0] {
        FORMAT_VERSION => Ok((HEADER_LEN, RecordedTags { rest: &[], left: 0 })),
        FORMAT_TAGGED => {
            let rest = &bytes[HEADER_LEN..];
            let (n, section) = split_at_checked(rest, 2).ok_or(DecodeError::Format)?;
            let n = u16::from_le_bytes([n[0], n[1]]);
            let mut walk = RecordedTags {
                rest: section,
                left: n,
            };
            for _ in 0..n {
                walk.next().ok_or(DecodeError::Format)?;
            }
            let payload = bytes.len() - walk.rest.len();
            Ok((
                payload,
                RecordedTags {
                    rest: section,
                    left: n,
                },
            ))
        }
        _ => Err(DecodeError::Format),
    }
}

/// The tags an envelope records (none for an untagged one, or one that is not an envelope).
pub(crate) fn recorded_tags(bytes: &[u8]) -> RecordedTags<'_> {
    match layout(bytes) {
        Ok((_, tags)) => tags,
        Err(_) => RecordedTags { rest: &[], left: 0 },
    }
}

/// Whether an envelope records tags (format 2): a one-byte test.
#[inline]
pub(crate) fn is_tagged(bytes: &[u8]) -> bool {
    bytes.first() == Some(&FORMAT_TAGGED)
}

/// Whether `json` contains the token `null` (or those letters inside a string: then the
/// probe runs for nothing, which is only slower).
fn contains_null(json: &[u8]) -> bool {
    memchr::memmem::find(json, b"null").is_some()
}

/// Reads the header of an envelope.
#[cfg(test)]
pub(crate) fn meta(bytes: &[u8]) -> Result<Meta, DecodeError> {
    if bytes.len() < HEADER_LEN || !matches!(bytes[0], FORMAT_VERSION | FORMAT_TAGGED) {
        return Err(DecodeError::Format);
    }
    let mut created = [0u8; 8];
    created.copy_from_slice(&bytes[1..9]);
    let mut compute = [0u8; 4];
    compute.copy_from_slice(&bytes[9..13]);
    Ok(Meta {
        created_at_ms: u64::from_le_bytes(created),
        compute_us: u32::from_le_bytes(compute),
    })
}

/// Decodes the payload of an envelope.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let payload = payload_start(bytes)?;
    serde_json::from_slice(&bytes[payload..]).map_err(DecodeError::Payload)
}

/// Where the JSON starts. Non-generic: decoding compiles it once.
fn payload_start(bytes: &[u8]) -> Result<usize, DecodeError> {
    if bytes.first() == Some(&FORMAT_VERSION) && bytes.len() >= HEADER_LEN {
        return Ok(HEADER_LEN);
    }
    layout(bytes).map(|(payload, _)| payload)
}

/// A serializer that writes nothing and fails on a non-finite `f32` or `f64`.
mod probe {
    use std::fmt;

    use serde::Serialize;
    use serde::ser::{self, Serializer};

    /// Whether every float in `value` is finite. A value whose `Serialize` fails here (it
    /// serialized for JSON, so this does not happen with ordinary implementations) counts
    /// as finite: the JSON already written is then kept.
    pub(super) fn all_finite<T: Serialize + ?Sized>(value: &T) -> bool {
        !matches!(value.serialize(Probe), Err(ProbeError::NonFinite))
    }

    #[derive(Debug)]
    pub(super) enum ProbeError {
        NonFinite,
        Custom,
    }

    impl fmt::Display for ProbeError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(match self {
                ProbeError::NonFinite => "non-finite float",
                ProbeError::Custom => "serialization failed",
            })
        }
    }

    impl std::error::Error for ProbeError {}

    impl ser::Error for ProbeError {
        fn custom<T: fmt::Display>(_msg: T) -> Self {
            ProbeError::Custom
        }
    }

    type Result = std::result::Result<(), ProbeError>;

    pub(super) struct Probe;

    impl Serializer for Probe {
        type Ok = ();
        type Error = ProbeError;
        type SerializeSeq = Probe;
        type SerializeTuple = Probe;
        type SerializeTupleStruct = Probe;
        type SerializeTupleVariant = Probe;
        type SerializeMap = Probe;
        type SerializeStruct = Probe;
        type SerializeStructVariant = Probe;

        fn serialize_f32(self, v: f32) -> Result {
            if v.is_finite() {
                Ok(())
            } else {
                Err(ProbeError::NonFinite)
            }
        }
        fn serialize_f64(self, v: f64) -> Result {
            if v.is_finite() {
                Ok(())
            } else {
                Err(ProbeError::NonFinite)
            }
        }

        fn serialize_bool(self, _: bool) -> Result {
            Ok(())
        }
        fn serialize_i8(self, _: i8) -> Result {
            Ok(())
        }
        fn serialize_i16(self, _: i16) -> Result {
            Ok(())
        }
        fn serialize_i32(self, _: i32) -> Result {
            Ok(())
        }
        fn serialize_i64(self, _: i64) -> Result {
            Ok(())
        }
        fn serialize_i128(self, _: i128) -> Result {
            Ok(())
        }
        fn serialize_u8(self, _: u8) -> Result {
            Ok(())
        }
        fn serialize_u16(self, _: u16) -> Result {
            Ok(())
        }
        fn serialize_u32(self, _: u32) -> Result {
            Ok(())
        }
        fn serialize_u64(self, _: u64) -> Result {
            Ok(())
        }
        fn serialize_u128(self, _: u128) -> Result {
            Ok(())
        }
        fn serialize_char(self, _: char) -> Result {
            Ok(())
        }
        fn serialize_str(self, _: &str) -> Result {
            Ok(())
        }
        fn serialize_bytes(self, _: &[u8]) -> Result {
            Ok(())
        }
        fn serialize_none(self) -> Result {
            Ok(())
        }
        fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result {
            value.serialize(Probe)
        }
        fn serialize_unit(self) -> Result {
            Ok(())
        }
        fn serialize_unit_struct(self, _: &'static str) -> Result {
            Ok(())
        }
        fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result {
            Ok(())
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            value: &T,
        ) -> Result {
            value.serialize(Probe)
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            value: &T,
        ) -> Result {
            value.serialize(Probe)
        }
        fn serialize_seq(self, _: Option<usize>) -> std::result::Result<Probe, ProbeError> {
            Ok(Probe)
        }
        fn serialize_tuple(self, _: usize) -> std::result::Result<Probe, ProbeError> {
            Ok(Probe)
        }
        fn serialize_tuple_struct(
            self,
            _: &'static str,
            _: usize,
        ) -> std::result::Result<Probe, ProbeError> {
            Ok(Probe)
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> std::result::Result<Probe, ProbeError> {
            Ok(Probe)
        }
        fn serialize_map(self, _: Option<usize>) -> std::result::Result<Probe, ProbeError> {
            Ok(Probe)
        }
        fn serialize_struct(
            self,
            _: &'static str,
            _: usize,
        ) -> std::result::Result<Probe, ProbeError> {
            Ok(Probe)
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> std::result::Result<Probe, ProbeError> {
            Ok(Probe)
        }
        /// The default formats `value` into a `String`; nothing in it can be a float.
        fn collect_str<T: fmt::Display + ?Sized>(self, _: &T) -> Result {
            Ok(())
        }
    }

    /// The compound serializers: each method serializes its value (a map's key too) with a
    /// fresh `Probe`, skipping the arguments of the types listed before it (field names).
    macro_rules! compound {
        ($($trait:ident { $($method:ident($($skip:ty),*)),+ })*) => {$(
            impl ser::$trait for Probe {
                type Ok = ();
                type Error = ProbeError;
                $(
                    fn $method<T: Serialize + ?Sized>(&mut self, $(_: $skip,)* value: &T) -> Result {
                        value.serialize(Probe)
                    }
                )+
                fn end(self) -> Result {
                    Ok(())
                }
            }
        )*};
    }

    compound! {
        SerializeSeq { serialize_element() }
        SerializeTuple { serialize_element() }
        SerializeTupleStruct { serialize_field() }
        SerializeTupleVariant { serialize_field() }
        SerializeMap { serialize_key(), serialize_value() }
        SerializeStruct { serialize_field(&'static str) }
        SerializeStructVariant { serialize_field(&'static str) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_readers_agree_with_meta() {
        let bytes = encode(&"v", Duration::from_micros(4_321), None).unwrap();
        let header = header_of(&bytes).unwrap();
        let m = meta(&bytes).unwrap();
        assert_eq!(header_created_at_ms(&header), m.created_at_ms);
        assert_eq!(created_at_ms(&bytes), Some(m.created_at_ms));
        assert_eq!(header_compute_us(&header), 4_321);
        assert_eq!(&header[..], &bytes[..HEADER_LEN]);
        assert!(header_of(b"\0crp:marker").is_none());
        assert!(header_of(&bytes[..5]).is_none());
    }

    #[test]
    fn round_trip_keeps_value_and_meta() {
        let bytes = encode(&vec![1u32, 2, 3], Duration::from_millis(12), None).unwrap();
        let v: Vec<u32> = decode(&bytes).unwrap();
        assert_eq!(v, vec![1, 2, 3]);
        let m = meta(&bytes).unwrap();
        assert_eq!(m.compute_us, 12_000);
        assert!(m.created_at_ms > 1_600_000_000_000);
    }

    #[test]
    fn tags_are_recorded_and_the_payload_still_decodes() {
        let tags = TagSet::with_versions(
            vec!["ns:org:1".to_owned(), "ns:users".to_owned()],
            vec![
                Bytes::from_static(b"v1"),
                Bytes::from_static(b"0123456789abcdef"),
            ],
        );
        let bytes = encode(&vec![1u32, 2], Duration::from_millis(3), Some(&tags)).unwrap();
        assert!(is_tagged(&bytes));
        let recorded: Vec<_> = recorded_tags(&bytes).collect();
        assert_eq!(
            recorded,
            vec![
                (&b"ns:org:1"[..], &b"v1"[..]),
                (&b"ns:users"[..], &b"0123456789abcdef"[..])
            ]
        );
        assert_eq!(decode::<Vec<u32>>(&bytes).unwrap(), vec![1, 2]);
        assert_eq!(meta(&bytes).unwrap().compute_us, 3_000);
        // No tags: format 1, byte for byte what an untagged function writes.
        let untagged = encode(&7u8, Duration::ZERO, Some(&TagSet::default())).unwrap();
        assert!(!is_tagged(&untagged));
        assert_eq!(recorded_tags(&untagged).count(), 0);
        // A truncated tags section is not an envelope, never a panic.
        for cut in HEADER_LEN..bytes.len() - 3 {
            assert!(decode::<Vec<u32>>(&bytes[..cut]).is_err(), "cut at {cut}");
            let _ = recorded_tags(&bytes[..cut]).count();
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(decode::<u32>(b""), Err(DecodeError::Format)));
        assert!(matches!(decode::<u32>(b"hello"), Err(DecodeError::Format)));
        assert!(matches!(
            decode::<u32>(b"\x02aaaaaaaaaaaa1"),
            Err(DecodeError::Format)
        ));
        let bytes = encode("text", Duration::ZERO, None).unwrap();
        assert!(matches!(
            decode::<u32>(&bytes),
            Err(DecodeError::Payload(_))
        ));
        let mut truncated = bytes.to_vec();
        truncated.truncate(15);
        assert!(decode::<String>(&truncated).is_err());
    }

    #[derive(serde::Serialize)]
    struct Point {
        x: f64,
        y: f32,
    }

    #[derive(serde::Serialize)]
    enum Shape {
        Empty,
        Radius(f64),
        Pair(u8, f64),
        Rect { w: f64, h: f32 },
    }

    #[derive(serde::Serialize)]
    struct Meters(f64);

    fn non_finite<T: Serialize + ?Sized>(value: &T) -> bool {
        matches!(
            encode(value, Duration::ZERO, None),
            Err(EncodeError::NonFinite)
        )
    }

    #[test]
    fn non_finite_floats_are_refused_wherever_they_are() {
        use std::collections::{BTreeMap, HashMap};
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(non_finite(&bad), "top level {bad}");
            assert!(non_finite(&vec![1.0, bad]), "in a Vec: {bad}");
            assert!(non_finite(&[Some(1.0), Some(bad)]), "in an array: {bad}");
            assert!(non_finite(&(1u8, "x", bad)), "in a tuple: {bad}");
            assert!(non_finite(&Point { x: bad, y: 0.0 }), "struct field: {bad}");
            assert!(non_finite(&Meters(bad)), "newtype struct: {bad}");
            assert!(non_finite(&Some(bad)), "in an Option: {bad}");
            assert!(non_finite(&Some(Some(vec![bad]))), "nested Option: {bad}");
            assert!(non_finite(&Shape::Radius(bad)), "newtype variant: {bad}");
            assert!(non_finite(&Shape::Pair(1, bad)), "tuple variant: {bad}");
            assert!(
                non_finite(&Shape::Rect { w: bad, h: 1.0 }),
                "struct variant: {bad}"
            );
            let map: HashMap<String, f64> = [("a".to_owned(), 1.0), ("b".to_owned(), bad)].into();
            assert!(non_finite(&map), "map value: {bad}");
            let nested: BTreeMap<u32, Vec<Point>> =
                [(1, vec![Point { x: 1.0, y: 2.0 }, Point { x: bad, y: 2.0 }])].into();
            assert!(non_finite(&nested), "map of Vec of structs: {bad}");
            let ok: Result<f64, String> = Ok(bad);
            assert!(non_finite(&ok), "in a Result: {bad}");
        }
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(non_finite(&bad), "top level f32 {bad}");
            assert!(non_finite(&Point { x: 0.0, y: bad }), "f32 field: {bad}");
            assert!(
                non_finite(&Shape::Rect { w: 1.0, h: bad }),
                "f32 variant field: {bad}"
            );
        }
    }

    #[test]
    fn nulls_and_finite_floats_still_encode() {
        let none: Option<f64> = None;
        let bytes = encode(&none, Duration::ZERO, None).unwrap();
        assert_eq!(decode::<Option<f64>>(&bytes).unwrap(), None);
        encode(&(), Duration::ZERO, None).unwrap();
        encode(&vec![None, Some(1.5), None], Duration::ZERO, None).unwrap();
        encode(&Shape::Empty, Duration::ZERO, None).unwrap();
        encode(
            &Point {
                x: f64::MAX,
                y: f32::MIN_POSITIVE,
            },
            Duration::ZERO,
            None,
        )
        .unwrap();
        encode(
            &(-0.0f64, 1e-300f64, "null", None::<u8>),
            Duration::ZERO,
            None,
        )
        .unwrap();
        let bytes = encode(&(f64::MIN, Some(0.25), None::<f64>), Duration::ZERO, None).unwrap();
        assert_eq!(
            decode::<(f64, Option<f64>, Option<f64>)>(&bytes).unwrap(),
            (f64::MIN, Some(0.25), None)
        );
        // A value whose JSON has no `null` is not probed at all.
        assert!(!contains_null(
            &encode(&[1.0, 2.0], Duration::ZERO, None).unwrap()[HEADER_LEN..]
        ));
    }

    #[test]
    fn encode_errors_say_what_went_wrong() {
        let msg = encode(&f64::NAN, Duration::ZERO, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("NaN or infinite"), "{msg}");
        let mut bad_key = std::collections::BTreeMap::new();
        bad_key.insert(vec![1u8], 1u8);
        assert!(matches!(
            encode(&bad_key, Duration::ZERO, None),
            Err(EncodeError::Json(_))
        ));
    }
}
