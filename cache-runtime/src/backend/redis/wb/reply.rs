//! Parsing stream replies (`XRANGE`, `XREADGROUP`, `XLEN`) from `redis::Value`, RESP2 or
//! RESP3, without panicking on an unexpected shape: what cannot be read is left out.

use redis::Value;

/// One entry read from a stream: its id and its fields.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamEntry {
    pub(crate) id: String,
    pub(crate) fields: Vec<(String, Vec<u8>)>,
    /// Deleted since it was delivered (a pending entry whose fields are nil).
    pub(crate) deleted: bool,
    /// Some of its fields did not parse (a name that is not UTF-8, a name without a value,
    /// an unexpected shape): `fields` holds those that did.
    pub(crate) malformed: bool,
}

impl StreamEntry {
    pub(crate) fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| &v[..])
    }

    pub(crate) fn field_str(&self, name: &str) -> Option<&str> {
        self.field(name).and_then(|v| std::str::from_utf8(v).ok())
    }
}

pub(super) fn bytes_of(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

pub(super) fn string_of(v: &Value) -> Option<String> {
    bytes_of(v).and_then(|b| String::from_utf8(b).ok())
}

pub(super) fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// Entries from an `XRANGE`-shaped reply (`[[id, [f, v, ..]], ..]`). An entry deleted since
/// it was delivered (nil fields) is `deleted`; one whose fields do not all parse is
/// `malformed`.
pub(crate) fn parse_entries(v: &Value) -> Vec<StreamEntry> {
    items(v)
        .iter()
        .filter_map(|e| {
            let parts = items(e);
            let id = string_of(parts.first()?)?;
            let mut entry = StreamEntry {
                id,
                ..StreamEntry::default()
            };
            let kv = match parts.get(1) {
                None | Some(Value::Nil) => {
                    entry.deleted = true;
                    return Some(entry);
                }
                Some(Value::Map(m)) => m.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect(),
                Some(other @ (Value::Array(_) | Value::Set(_))) => items(other).to_vec(),
                Some(_) => {
                    entry.malformed = true;
                    return Some(entry);
                }
            };
            for pair in kv.chunks(2) {
                match pair {
                    [k, v] => match (string_of(k), bytes_of(v)) {
                        (Some(k), Some(v)) => entry.fields.push((k, v)),
                        _ => entry.malformed = true,
                    },
                    _ => entry.malformed = true,
                }
            }
            Some(entry)
        })
        .collect()
}

/// The entries of an `XREADGROUP` reply for one stream (`[[stream, entries]]`, or a map).
pub(super) fn parse_read(v: &Value) -> Vec<StreamEntry> {
    match v {
        Value::Nil => Vec::new(),
        Value::Map(m) => m.iter().flat_map(|(_, e)| parse_entries(e)).collect(),
        other => items(other)
            .iter()
            .flat_map(|s| items(s).get(1).map(parse_entries).unwrap_or_default())
            .collect(),
    }
}

/// The consumers of an `XINFO CONSUMERS` reply (a map, or a flat array of name/value pairs,
/// per consumer): each one's name and pending count. A consumer without a name is left out.
pub(super) fn parse_consumers(v: &Value) -> Vec<(String, u64)> {
    items(v)
        .iter()
        .filter_map(|c| {
            let pairs: Vec<(Value, Value)> = match c {
                Value::Map(m) => m.clone(),
                other => items(other)
                    .chunks(2)
                    .filter_map(|p| match p {
                        [k, v] => Some((k.clone(), v.clone())),
                        _ => None,
                    })
                    .collect(),
            };
            let field = |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| string_of(k).as_deref() == Some(name))
                    .map(|(_, v)| v)
            };
            let name = string_of(field("name")?)?;
            let pending = field("pending").map_or(u64::MAX, int_of);
            Some((name, pending))
        })
        .collect()
}

pub(super) fn int_of(v: &Value) -> u64 {
    match v {
        Value::Int(i) => u64::try_from(*i).unwrap_or(0),
        other => string_of(other).and_then(|s| s.parse().ok()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_without_panicking_on_odd_replies() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::BulkString(b"1-0".to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"f".to_vec()),
                    Value::BulkString(b"x".to_vec()),
                    Value::BulkString(b"dangling".to_vec()),
                ]),
            ]),
            Value::Array(vec![Value::BulkString(b"2-0".to_vec()), Value::Nil]),
            Value::Int(3),
        ]);
        let entries = parse_entries(&reply);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].field_str("f"), Some("x"));
        assert!(entries[0].malformed, "a name without a value");
        assert!(!entries[0].deleted);
        assert!(entries[1].fields.is_empty());
        assert!(entries[1].deleted && !entries[1].malformed);
        let bad_name = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"3-0".to_vec()),
            Value::Array(vec![
                Value::BulkString(vec![0xff]),
                Value::BulkString(b"x".to_vec()),
            ]),
        ])]);
        let consumers = Value::Array(vec![
            Value::Array(vec![
                Value::BulkString(b"name".to_vec()),
                Value::BulkString(b"w-1".to_vec()),
                Value::BulkString(b"pending".to_vec()),
                Value::Int(0),
            ]),
            Value::Map(vec![
                (
                    Value::SimpleString("name".into()),
                    Value::BulkString(b"w-2".to_vec()),
                ),
                (Value::SimpleString("pending".into()), Value::Int(3)),
            ]),
            Value::Int(7),
        ]);
        assert_eq!(
            parse_consumers(&consumers),
            vec![("w-1".to_owned(), 0), ("w-2".to_owned(), 3)]
        );
        let entries = parse_entries(&bad_name);
        assert!(entries[0].malformed && !entries[0].deleted);
        assert!(entries[0].fields.is_empty());
        assert!(parse_read(&Value::Nil).is_empty());
    }
}
