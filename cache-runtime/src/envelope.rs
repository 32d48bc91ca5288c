//! The value envelope: what every backend stores under a value key.
//!
//! ```text
//! byte 0        format version (currently 1)
//! bytes 1..9    created-at, milliseconds since the Unix epoch, little endian
//! bytes 9..13   compute time of the value, microseconds, little endian (saturating)
//! bytes 13..    the payload, JSON
//! ```
//!
//! Anything else under a value key (another format version, a truncated header, JSON that does
//! not decode into the expected type, a value written by another program) is treated as a miss
//! and overwritten by the next fill.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 13;

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
            DecodeError::Format => f.write_str("not a cache envelope of format version 1"),
            DecodeError::Payload(e) => write!(f, "payload does not decode: {e}"),
        }
    }
}

/// The metadata kept next to a payload.
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

/// Why a value could not be encoded.
pub(crate) type EncodeError = serde_json::Error;

/// Encodes `value` into a new envelope.
pub(crate) fn encode<T: Serialize + ?Sized>(
    value: &T,
    compute: Duration,
) -> Result<Bytes, serde_json::Error> {
    let mut buf = Vec::with_capacity(HEADER_LEN + 128);
    buf.push(FORMAT_VERSION);
    buf.extend_from_slice(&now_ms().to_le_bytes());
    let compute_us = u32::try_from(compute.as_micros()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&compute_us.to_le_bytes());
    serde_json::to_writer(&mut buf, value)?;
    Ok(Bytes::from(buf))
}

/// Reads the header of an envelope.
pub(crate) fn meta(bytes: &[u8]) -> Result<Meta, DecodeError> {
    if bytes.len() < HEADER_LEN || bytes[0] != FORMAT_VERSION {
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
    meta(bytes)?;
    serde_json::from_slice(&bytes[HEADER_LEN..]).map_err(DecodeError::Payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_value_and_meta() {
        let bytes = encode(&vec![1u32, 2, 3], Duration::from_millis(12)).unwrap();
        let v: Vec<u32> = decode(&bytes).unwrap();
        assert_eq!(v, vec![1, 2, 3]);
        let m = meta(&bytes).unwrap();
        assert_eq!(m.compute_us, 12_000);
        assert!(m.created_at_ms > 1_600_000_000_000);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(decode::<u32>(b""), Err(DecodeError::Format)));
        assert!(matches!(decode::<u32>(b"hello"), Err(DecodeError::Format)));
        assert!(matches!(
            decode::<u32>(b"\x02aaaaaaaaaaaa1"),
            Err(DecodeError::Format)
        ));
        let bytes = encode("text", Duration::ZERO).unwrap();
        assert!(matches!(
            decode::<u32>(&bytes),
            Err(DecodeError::Payload(_))
        ));
        let mut truncated = bytes.to_vec();
        truncated.truncate(15);
        assert!(decode::<String>(&truncated).is_err());
    }
}
