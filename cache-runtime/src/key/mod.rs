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
//! The key's other rules have their own modules: the length bound and the digest form of a
//! long key in [`bound`], Redis Cluster hash slots and the auxiliary keys that share a value
//! key's slot in [`slot`]. Their entry points are re-exported here.

mod bound;
mod slot;

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::io;

use serde::Serialize;

use self::bound::bound_buf;
pub(crate) use self::bound::bound_key;
pub(crate) use self::slot::crc16;
pub(crate) use self::slot::key_slot_bytes;
pub use self::slot::{aux_key, key_slot};

/// Appends `c` to `out`, percent-encoded if it is reserved. Returns whether it was encoded
/// (a `%` was written).
#[inline]
fn push_escaped(out: &mut KeyBuf, c: char, extra: &str) -> bool {
    let reserved = matches!(c, '%' | ':' | '{' | '}' | ' ' | '\u{7f}') || (c as u32) < 0x20;
    if reserved || (!extra.is_empty() && extra.contains(c)) {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut buf = [0u8; 4];
        for b in c.encode_utf8(&mut buf).bytes() {
            out.push_ascii(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
        true
    } else {
        out.push(c);
        false
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
    let mut out = KeyBuf::new();
    let mut percent = false;
    let _ = write!(
        Escaper {
            out: &mut out,
            extra: "",
            percent: &mut percent,
        },
        "{value}"
    );
    out.into_string()
}

/// Writes escaped text into a key, noting whether it wrote a `%`.
struct Escaper<'a> {
    out: &'a mut KeyBuf,
    extra: &'static str,
    percent: &'a mut bool,
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
                *self.percent |= push_escaped(self.out, c, self.extra);
            }
        }
        Ok(())
    }
}

/// An `io::Write` that appends escaped UTF-8 (serde_json's output) to a key, noting whether it
/// wrote a `%`.
struct JsonEscaper<'a> {
    out: &'a mut KeyBuf,
    percent: &'a mut bool,
}

impl io::Write for JsonEscaper<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // serde_json writes whole UTF-8 sequences per call.
        let s =
            std::str::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        for c in s.chars() {
            *self.percent |= push_escaped(self.out, c, "");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The most capacity a dropped [`KeyBuf`] gives back for reuse.
const MAX_SPARE: usize = 1024;

thread_local! {
    /// Buffers of the last [`KeyBuf`]s dropped on this thread, for the next ones made here
    /// (two: a Redis lookup has its key and its marker at once).
    static SPARE: [Cell<String>; 2] = const { [Cell::new(String::new()), Cell::new(String::new())] };
}

/// A rendered key. Its buffer is reused: a dropped `KeyBuf` gives it back to its thread, and
/// the next key rendered there takes it, so a call whose key is not kept (a hit) allocates
/// nothing for it. Where a key is kept (a flight that others may join, a write), the buffer
/// goes with it. Used by the code the attributes generate, through [`KeyWriter`] and
/// [`CallKey`].
///
/// (A buffer of inline bytes would need a UTF-8 check each time it is read as a `str`, without
/// `unsafe`; that costs more than the allocation it saves.)
#[doc(hidden)]
pub struct KeyBuf(String);

impl KeyBuf {
    /// An empty key, in a reused buffer if this thread has one.
    #[inline]
    pub fn new() -> Self {
        let mut buf = SPARE
            .try_with(|spare| {
                let first = spare[0].take();
                if first.capacity() > 0 {
                    first
                } else {
                    spare[1].take()
                }
            })
            .unwrap_or_default();
        buf.clear();
        KeyBuf(buf)
    }

    /// The key's text.
    #[inline]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The text as an owned `String` (the buffer goes with it).
    #[inline]
    pub fn into_string(mut self) -> String {
        std::mem::take(&mut self.0)
    }

    /// Appends `s`.
    #[inline]
    pub fn push_str(&mut self, s: &str) {
        self.0.push_str(s);
    }

    /// Appends `c`.
    #[inline]
    pub fn push(&mut self, c: char) {
        self.0.push(c);
    }

    /// Reserves room for `additional` more bytes.
    #[inline]
    fn reserve(&mut self, additional: usize) {
        self.0.reserve(additional);
    }

    /// Appends ASCII bytes.
    #[inline]
    fn push_ascii(&mut self, ascii: &[u8]) {
        for &b in ascii {
            debug_assert!(b.is_ascii());
            self.0.push(char::from(b));
        }
    }
}

impl Drop for KeyBuf {
    #[inline]
    fn drop(&mut self) {
        let capacity = self.0.capacity();
        if capacity == 0 || capacity > MAX_SPARE {
            return;
        }
        let buf = std::mem::take(&mut self.0);
        // After this thread's locals are gone, the buffer is simply freed.
        let _ = SPARE.try_with(|spare| {
            let first = spare[0].take();
            if first.capacity() == 0 {
                spare[0].set(buf);
            } else {
                spare[0].set(first);
                // The older spare, if any, is freed.
                spare[1].set(buf);
            }
        });
    }
}

impl Clone for KeyBuf {
    fn clone(&self) -> Self {
        let mut k = KeyBuf::new();
        k.push_str(self.as_str());
        k
    }
}

impl Default for KeyBuf {
    fn default() -> Self {
        KeyBuf::new()
    }
}

impl From<String> for KeyBuf {
    fn from(s: String) -> Self {
        KeyBuf(s)
    }
}

impl From<&str> for KeyBuf {
    fn from(s: &str) -> Self {
        let mut k = KeyBuf::new();
        k.push_str(s);
        k
    }
}

impl fmt::Write for KeyBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_str(s);
        Ok(())
    }
}

impl fmt::Debug for KeyBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for KeyBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for KeyBuf {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for KeyBuf {}

impl PartialEq<str> for KeyBuf {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for KeyBuf {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
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
    buf: KeyBuf,
    failed: bool,
    args: usize,
    /// Whether a `%` was written: without one the key cannot contain the digest marker, and
    /// `finish` does not look for it.
    percent: bool,
}

impl KeyWriter {
    /// Starts a key in `namespace` (empty: no prefix).
    #[cfg(test)]
    pub(crate) fn new(namespace: &str) -> Self {
        Self::in_namespace(namespace, namespace.contains('%'))
    }

    /// Starts a key in `namespace` (empty: no prefix), told whether it contains a `%` (the
    /// store knows it once for all its keys).
    #[inline]
    pub(crate) fn in_namespace(namespace: &str, percent: bool) -> Self {
        let mut buf = KeyBuf::new();
        buf.reserve(namespace.len() + 48);
        if !namespace.is_empty() {
            buf.push_str(namespace);
            buf.push(':');
        }
        KeyWriter {
            buf,
            failed: false,
            args: 0,
            percent,
        }
    }

    /// Appends literal template text, unescaped.
    #[inline]
    pub fn literal(&mut self, text: &str) -> &mut Self {
        self.buf.push_str(text);
        self.percent |= text.as_bytes().contains(&b'%');
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
            percent: &mut self.percent,
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
            self.percent |= push_escaped(&mut self.buf, '-', extra);
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
        self.buf.push_ascii(&buf[i..]);
        self
    }

    /// Appends one argument of a default key: JSON, escaped, comma separated.
    pub fn arg<T: Serialize + ?Sized>(&mut self, value: &T) -> &mut Self {
        if self.args > 0 {
            self.buf.push(',');
        }
        self.args += 1;
        let mut w = JsonEscaper {
            out: &mut self.buf,
            percent: &mut self.percent,
        };
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
            self.buf.push_str(":v");
            self.uint(u64::from(v));
        }
        CallKey::Key(bound_buf(self.buf, self.percent))
    }
}

impl KeyWriter {
    /// Finishes a tag: like a key without a version; `None` if an argument could not be
    /// rendered.
    pub(crate) fn finish_tag(self) -> Option<String> {
        (!self.failed).then(|| bound_key(self.buf.into_string()))
    }
}

/// The key of one call, or why it has none.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallKey {
    /// The rendered key.
    Key(KeyBuf),
    /// `condition` was false: bypass the cache.
    Condition,
    /// An argument could not be rendered: bypass the cache.
    Unrenderable,
}

impl CallKey {
    #[cfg(test)]
    pub(crate) fn unwrap(self) -> String {
        match self {
            CallKey::Key(k) => k.into_string(),
            other => panic!("no key: {other:?}"),
        }
    }
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
    use super::bound::MAX_KEY_LEN;
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
    fn key_buffers_are_reused_clean() {
        let mut k = KeyBuf::new();
        k.push_str("first:key:zoë");
        k.push('€');
        k.push_ascii(b"42");
        assert_eq!(k.as_str(), "first:key:zoë€42");
        assert_eq!(k.len(), "first:key:zoë€42".len());
        assert_eq!(k.clone(), k);
        drop(k);
        // The next key on this thread takes the buffer back, empty.
        let k = KeyBuf::new();
        assert!(k.is_empty());
        assert!(k.0.capacity() > 0, "the dropped buffer is reused");
        assert_eq!(KeyBuf::from("short").into_string(), "short");
        // Long keys are rendered as into a `String`.
        let long = "v".repeat(2000);
        let rendered = render("ns", |w| {
            w.literal("p:")
                .display(&long, "")
                .literal(":")
                .integer(-7i32, "-");
        });
        assert_eq!(rendered, bound_key(format!("ns:p:{long}:%2D7")));
    }

    #[test]
    fn a_marker_anywhere_is_digested() {
        // In a literal, in the namespace, or split over two pushes: as `bound_key` does.
        for (ns, lit) in [("", "a%#b"), ("n%", "#x"), ("%#", "k")] {
            let k = render(ns, |w| {
                w.literal(lit);
            });
            let full = if ns.is_empty() {
                lit.to_owned()
            } else {
                format!("{ns}:{lit}")
            };
            assert_eq!(k, bound_key(full.clone()), "{full}");
            if full.contains("%#") {
                assert_ne!(k, full);
            }
        }
        // An escaped `%` followed by a literal `#`: escaped values are `%` + two hex digits.
        let k = render("", |w| {
            w.display("%", "").literal("#");
        });
        assert_eq!(k, "%25#");
    }

    #[test]
    fn namespaces_are_checked() {
        assert!(validate_namespace("app:v1").is_ok());
        assert!(validate_namespace("a{b}").is_err());
        assert!(validate_namespace("a b").is_err());
    }
}
