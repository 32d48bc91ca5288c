//! Parsing of the attributes' options into [`Args`].
//!
//! Every option is read into a set-once [`Slot`] that remembers its span and reports a second
//! occurrence. Errors are collected, not returned at the first one, so that one compilation
//! shows every mistake in the attribute.

use proc_macro2::{Span, TokenStream};
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Lit, LitStr};

mod duration;
mod messages;

use duration::parse_duration;
use messages::{unknown_message, value_hint};

/// Collects errors; `combine`s them into one `syn::Error` that reports each.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub(crate) fn error(&mut self, span: Span, msg: impl std::fmt::Display) {
        self.push(syn::Error::new(span, msg));
    }

    pub(crate) fn into_result(self) -> Result<(), syn::Error> {
        match self.0 {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// One option: set at most once.
pub(crate) struct Slot<T> {
    name: &'static str,
    value: Option<(Span, T)>,
}

impl<T> Slot<T> {
    fn new(name: &'static str) -> Self {
        Slot { name, value: None }
    }

    fn set(&mut self, span: Span, value: T, errors: &mut Errors) {
        if self.value.is_some() {
            errors.error(span, format_args!("duplicate option `{}`", self.name));
        } else {
            self.value = Some((span, value));
        }
    }

    pub(crate) fn get(&self) -> Option<&T> {
        self.value.as_ref().map(|(_, v)| v)
    }

    pub(crate) fn span(&self) -> Option<Span> {
        self.value.as_ref().map(|(s, _)| *s)
    }
}

/// `refresh` or `refresh = "80%"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refresh {
    /// `refresh = "80%"`: once the entry's age is this share of the TTL (1 to 99).
    Percent(u8),
    /// `refresh`: probabilistic early expiration (XFetch), from the entry's compute time.
    XFetch,
}

/// `cache_none` or `cache_none = <ttl>`.
pub(crate) struct CacheNone {
    pub(crate) ttl_ms: Option<u64>,
}

/// Which attribute the options belong to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Cached,
    Put,
    Evict,
    WriteBehind,
}

impl Kind {
    /// The attribute as written, for messages: `#[cached]`.
    pub(crate) fn attr(self) -> &'static str {
        match self {
            Kind::Cached => "#[cached]",
            Kind::Put => "#[cache_put]",
            Kind::Evict => "#[cache_evict]",
            Kind::WriteBehind => "#[write_behind]",
        }
    }

    /// Whether the attribute takes `option`.
    fn takes(self, option: &str) -> bool {
        OPTIONS
            .iter()
            .any(|(o, kinds)| *o == option && kinds.contains(&self))
    }

    /// The attribute's options, for messages.
    fn options(self) -> impl Iterator<Item = &'static str> {
        OPTIONS
            .iter()
            .filter(move |(_, kinds)| kinds.contains(&self))
            .map(|(o, _)| *o)
    }
}

/// Every option, and the attributes that take it.
const OPTIONS: &[(&str, &[Kind])] = {
    use Kind::{Cached, Evict, Put, WriteBehind};
    &[
        ("key", &[Cached, Put, WriteBehind]),
        ("keys", &[Evict]),
        ("value", &[Put, WriteBehind]),
        ("queue", &[WriteBehind]),
        ("ttl", &[Cached, Put, WriteBehind]),
        ("cache", &[Cached, Put, Evict, WriteBehind]),
        ("condition", &[Cached, Put, Evict, WriteBehind]),
        ("unless", &[Cached, Put]),
        ("cache_none", &[Cached, Put]),
        ("version", &[Cached, Put, Evict, WriteBehind]),
        ("name", &[Cached, Put, Evict, WriteBehind]),
        ("lock", &[Cached]),
        ("local", &[Cached]),
        ("stale", &[Cached]),
        ("refresh", &[Cached]),
        ("tags", &[Cached, Put, Evict, WriteBehind]),
        ("before", &[Evict]),
        ("coalesce", &[WriteBehind]),
    ]
};

/// The options of `#[cached(...)]`, `#[cache_put(...)]`, `#[cache_evict(...)]` or
/// `#[write_behind(...)]`, each with
/// the span it was written at. Options the attribute does not take are rejected while
/// parsing, so the slots of other attributes stay empty.
pub(crate) struct Args {
    pub(crate) kind: Kind,
    pub(crate) key: Slot<LitStr>,
    pub(crate) ttl_ms: Slot<u64>,
    pub(crate) cache: Slot<Expr>,
    pub(crate) condition: Slot<Expr>,
    pub(crate) unless: Slot<Expr>,
    pub(crate) cache_none: Slot<CacheNone>,
    pub(crate) version: Slot<u32>,
    pub(crate) name: Slot<LitStr>,
    /// `lock` / `lock = <lease>`: the lease length in milliseconds.
    pub(crate) lock_ms: Slot<u64>,
    /// `local` / `local = <ttl>`: the in-process copy's TTL in milliseconds (`u64::MAX`: the
    /// entry's own).
    pub(crate) local_ms: Slot<u64>,
    /// `stale = <duration>`: how long a value is kept past its TTL, in milliseconds.
    pub(crate) stale_ms: Slot<u64>,
    /// `refresh` / `refresh = "80%"`: when a hit starts a background reload.
    pub(crate) refresh: Slot<Refresh>,
    /// `tags = ["org:{org}", ..]`.
    pub(crate) tags: Slot<Vec<LitStr>>,
    /// `#[cache_evict(keys = ["user:{id}", ..])]`.
    pub(crate) keys: Slot<Vec<LitStr>>,
    /// `#[cache_put(value = <expr>)]`, `#[write_behind(value = <expr>)]`.
    pub(crate) value: Slot<Expr>,
    /// `#[cache_evict(before)]`.
    pub(crate) before: Slot<()>,
    /// `#[write_behind(queue = "users")]`: the queue's name, checked.
    pub(crate) queue: Slot<LitStr>,
    /// `#[write_behind(coalesce)]`, `coalesce = false`.
    pub(crate) coalesce: Slot<bool>,
    /// The options written, valid or not: a missing option is not reported when it was
    /// written wrong.
    written: Vec<String>,
}

/// The lease of `lock` without a value.
pub(crate) const DEFAULT_LOCK_MS: u64 = 10_000;

impl Args {
    fn new(kind: Kind) -> Self {
        Args {
            kind,
            key: Slot::new("key"),
            ttl_ms: Slot::new("ttl"),
            cache: Slot::new("cache"),
            condition: Slot::new("condition"),
            unless: Slot::new("unless"),
            cache_none: Slot::new("cache_none"),
            version: Slot::new("version"),
            name: Slot::new("name"),
            lock_ms: Slot::new("lock"),
            local_ms: Slot::new("local"),
            stale_ms: Slot::new("stale"),
            refresh: Slot::new("refresh"),
            tags: Slot::new("tags"),
            keys: Slot::new("keys"),
            value: Slot::new("value"),
            before: Slot::new("before"),
            queue: Slot::new("queue"),
            coalesce: Slot::new("coalesce"),
            written: Vec::new(),
        }
    }

    /// Parses the attribute's arguments and checks the rules that involve several options.
    /// Returns the options that parsed, and every error.
    pub(crate) fn parse(kind: Kind, args: TokenStream, errors: &mut Errors) -> Args {
        let mut out = Args::new(kind);
        let parser = syn::meta::parser(|meta| {
            out.option(&meta, errors);
            Ok(())
        });
        if let Err(e) = parser.parse2(args) {
            errors.push(e);
        }
        out.validate(errors);
        out
    }

    fn option(&mut self, meta: &ParseNestedMeta<'_>, errors: &mut Errors) {
        let path = &meta.path;
        let span = path.span();
        let Some(ident) = path.get_ident().map(|i| i.to_string()) else {
            errors.error(
                span,
                unknown_message(&quote::quote!(#path).to_string(), self.kind),
            );
            skip_value(meta, errors);
            return;
        };
        if !self.kind.takes(&ident) {
            errors.error(span, unknown_message(&ident, self.kind));
            skip_value(meta, errors);
            return;
        }
        self.written.push(ident.clone());
        // Options that are flags or take a value.
        match ident.as_str() {
            "cache_none" => {
                if meta.input.peek(syn::Token![=]) {
                    if let Some(expr) = value(meta, errors) {
                        if self.kind == Kind::Put {
                            errors.error(
                                expr.span(),
                                "`#[cache_put]` writes `None` with its `ttl`; write `cache_none` without a value",
                            );
                        } else if let Some(ms) = duration_ms(&expr, "cache_none", errors) {
                            self.cache_none
                                .set(span, CacheNone { ttl_ms: Some(ms) }, errors);
                        }
                    }
                } else {
                    self.cache_none
                        .set(span, CacheNone { ttl_ms: None }, errors);
                }
                return;
            }
            "lock" => {
                if meta.input.peek(syn::Token![=]) {
                    if let Some(expr) = value(meta, errors) {
                        if let Some(ms) = duration_ms(&expr, "lock", errors) {
                            self.lock_ms.set(span, ms, errors);
                        }
                    }
                } else {
                    self.lock_ms.set(span, DEFAULT_LOCK_MS, errors);
                }
                return;
            }
            "local" => {
                if meta.input.peek(syn::Token![=]) {
                    if let Some(expr) = value(meta, errors) {
                        if let Some(ms) = duration_ms(&expr, "local", errors) {
                            self.local_ms.set(span, ms, errors);
                        }
                    }
                } else {
                    self.local_ms.set(span, u64::MAX, errors);
                }
                return;
            }
            "refresh" => {
                if meta.input.peek(syn::Token![=]) {
                    if let Some(expr) = value(meta, errors) {
                        if let Some(percent) = refresh_percent(&expr, errors) {
                            self.refresh.set(span, Refresh::Percent(percent), errors);
                        }
                    }
                } else {
                    self.refresh.set(span, Refresh::XFetch, errors);
                }
                return;
            }
            "before" => {
                if meta.input.peek(syn::Token![=]) {
                    if let Some(expr) = value(meta, errors) {
                        errors.error(expr.span(), value_hint("before"));
                    }
                } else {
                    self.before.set(span, (), errors);
                }
                return;
            }
            "coalesce" => {
                if meta.input.peek(syn::Token![=]) {
                    if let Some(expr) = value(meta, errors) {
                        match &expr {
                            Expr::Lit(ExprLit {
                                lit: Lit::Bool(b), ..
                            }) => self.coalesce.set(span, b.value, errors),
                            _ => errors.error(expr.span(), value_hint("coalesce")),
                        }
                    }
                } else {
                    self.coalesce.set(span, true, errors);
                }
                return;
            }
            _ => {}
        }
        if !meta.input.peek(syn::Token![=]) {
            errors.error(span, value_hint(&ident));
            skip_value(meta, errors);
            return;
        }
        let Some(expr) = value(meta, errors) else {
            return;
        };
        match ident.as_str() {
            "key" => match lit_str(&expr) {
                Some(lit) => self.key.set(span, lit, errors),
                None => errors.error(expr.span(), value_hint("key")),
            },
            "keys" => {
                if let Some(list) = templates(&expr, "keys", errors) {
                    self.keys.set(span, list, errors);
                }
            }
            "tags" => {
                if let Some(list) = templates(&expr, "tags", errors) {
                    self.tags.set(span, list, errors);
                }
            }
            "queue" => match lit_str(&expr) {
                Some(lit) => match queue_name_error(&lit.value()) {
                    Some(msg) => errors.error(lit.span(), msg),
                    None => self.queue.set(span, lit, errors),
                },
                None => errors.error(expr.span(), value_hint("queue")),
            },
            "name" => match lit_str(&expr) {
                Some(lit) if lit.value().trim().is_empty() => {
                    errors.error(lit.span(), "`name` must not be empty")
                }
                Some(lit) => self.name.set(span, lit, errors),
                None => errors.error(expr.span(), value_hint("name")),
            },
            "ttl" => {
                if let Some(ms) = duration_ms(&expr, "ttl", errors) {
                    self.ttl_ms.set(span, ms, errors);
                }
            }
            "stale" => {
                if let Some(ms) = duration_ms(&expr, "stale", errors) {
                    self.stale_ms.set(span, ms, errors);
                }
            }
            "version" => match &expr {
                Expr::Lit(ExprLit {
                    lit: Lit::Int(int), ..
                }) => match int.base10_parse::<u32>() {
                    Ok(0) => errors.error(int.span(), "`version` starts at 1"),
                    Ok(v) => self.version.set(span, v, errors),
                    Err(_) => errors.error(
                        int.span(),
                        "`version` must be a whole number from 1 to 4294967295",
                    ),
                },
                _ => errors.error(expr.span(), value_hint("version")),
            },
            "cache" => self.cache.set(span, expr, errors),
            "value" => self.value.set(span, expr, errors),
            "condition" | "unless" => {
                if let Some(lit) = lit_str(&expr) {
                    errors.error(
                        lit.span(),
                        format_args!(
                            "`{ident}` takes a Rust expression, not a string; remove the quotes"
                        ),
                    );
                } else if ident == "condition" {
                    self.condition.set(span, expr, errors);
                } else {
                    self.unless.set(span, expr, errors);
                }
            }
            _ => unreachable!("options matched above"),
        }
    }

    /// The rules that involve several options, or an option that is missing.
    fn validate(&self, errors: &mut Errors) {
        // An option written wrong was reported already, not to be reported missing too.
        let written = |name: &str| self.written.iter().any(|w| w == name);
        match self.kind {
            Kind::Cached => {}
            Kind::Put => {
                if !written("key") {
                    errors.error(
                        Span::call_site(),
                        "`#[cache_put]` needs the key it writes: add `key = \"...\"`, the template of the `#[cached]` function that reads the entry, e.g. `key = \"user:{id}\"`",
                    );
                }
                if let (Some(span), Some(_)) = (self.cache_none.span(), self.value.get()) {
                    errors.error(
                        span,
                        "`cache_none` has no effect with `value`: the value is written only when the function returns `Ok` or `Some`; remove it",
                    );
                }
            }
            Kind::Evict => {
                let none = |slot: &Slot<Vec<LitStr>>| slot.get().is_none_or(Vec::is_empty);
                let wrong = |slot: &Slot<Vec<LitStr>>| slot.get().is_none() && written(slot.name);
                if none(&self.keys) && none(&self.tags) && !wrong(&self.keys) && !wrong(&self.tags)
                {
                    let msg = "`#[cache_evict]` has nothing to evict: list the keys, e.g. `keys = [\"user:{id}\"]`, or the tags, e.g. `tags = [\"org:{org}\"]`";
                    let span = self.keys.span().or(self.tags.span());
                    errors.error(span.unwrap_or_else(Span::call_site), msg);
                }
            }
            Kind::WriteBehind => {
                let missing = [
                    (
                        "key",
                        "`#[write_behind]` needs the key it writes: add `key = \"...\"`, the template of the `#[cached]` function that reads the entry, e.g. `key = \"user:{id}\"`",
                    ),
                    (
                        "value",
                        "`#[write_behind]` needs the value it writes to the cache at once: add `value = <expr>` over the arguments, e.g. `value = user` (the body runs later, in a worker, so there is no result to write)",
                    ),
                    (
                        "queue",
                        "`#[write_behind]` needs the queue its writes wait in until a worker applies them: add `queue = \"...\"`, e.g. `queue = \"users\"`",
                    ),
                ];
                for (option, msg) in missing {
                    if !written(option) {
                        errors.error(Span::call_site(), msg);
                    }
                }
            }
        }
    }
}

/// Why `name` is not a valid queue name, if it is not: 1 to 64 characters of `A-Z`, `a-z`,
/// `0-9`, `_`, `.`, `-` (it becomes part of Redis key names, inside a hash tag).
fn queue_name_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("the queue's name must not be empty, e.g. `queue = \"users\"`".to_owned());
    }
    if name.len() > 64 {
        return Some(format!(
            "the queue's name is {} characters long; at most 64",
            name.len()
        ));
    }
    name.chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        .map(|c| {
            format!(
                "the queue's name may hold only ASCII letters, digits, `_`, `.` and `-`, not {c:?}; e.g. `queue = \"user-writes\"`"
            )
        })
}

/// `["a:{x}", "b"]`: an array of string literals.
fn templates(expr: &Expr, option: &str, errors: &mut Errors) -> Option<Vec<LitStr>> {
    let Expr::Array(array) = expr else {
        errors.error(expr.span(), value_hint(option));
        return None;
    };
    let mut out = Vec::with_capacity(array.elems.len());
    for elem in &array.elems {
        match lit_str(elem) {
            Some(lit) => out.push(lit),
            None => errors.error(
                elem.span(),
                format_args!(
                    "each of `{option}` must be a string literal template, e.g. `\"user:{{id}}\"`"
                ),
            ),
        }
    }
    (out.len() == array.elems.len()).then_some(out)
}

/// Parses `= <expr>`, reporting a malformed expression.
fn value(meta: &ParseNestedMeta<'_>, errors: &mut Errors) -> Option<Expr> {
    match meta.value().and_then(|v| v.parse::<Expr>()) {
        Ok(e) => Some(e),
        Err(e) => {
            errors.push(e);
            None
        }
    }
}

/// Consumes whatever follows an option we reject, so parsing can go on to the next one.
fn skip_value(meta: &ParseNestedMeta<'_>, errors: &mut Errors) {
    if meta.input.peek(syn::Token![=]) {
        let _ = value(meta, errors);
    } else if meta.input.peek(syn::token::Paren) {
        let _ = meta.parse_nested_meta(|inner| {
            skip_value(&inner, errors);
            Ok(())
        });
    }
}

fn lit_str(expr: &Expr) -> Option<LitStr> {
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => Some(s.clone()),
        _ => None,
    }
}

/// `refresh = "80%"`: a whole percentage of the TTL, from 1 to 99.
fn refresh_percent(expr: &Expr, errors: &mut Errors) -> Option<u8> {
    let Some(lit) = lit_str(expr) else {
        errors.error(expr.span(), value_hint("refresh"));
        return None;
    };
    let text = lit.value();
    let number = text.trim().strip_suffix('%').map(str::trim_end);
    match number.map(str::parse::<u8>) {
        Some(Ok(p @ 1..=99)) => Some(p),
        Some(Ok(_)) => {
            errors.error(
                lit.span(),
                "`refresh` must be between 1% and 99% of the TTL: a refresh at 0% would run on every hit, one at 100% or more only after the entry expired",
            );
            None
        }
        _ => {
            errors.error(lit.span(), value_hint("refresh"));
            None
        }
    }
}

/// A TTL-like option: an integer number of seconds, or a duration string (`"15m"`,
/// `"1h30m"`, `"500ms"`). Must be greater than zero.
fn duration_ms(expr: &Expr, option: &str, errors: &mut Errors) -> Option<u64> {
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Int(int), ..
        }) => match int.base10_parse::<u64>() {
            Ok(0) => {
                errors.error(
                    int.span(),
                    format_args!("`{option}` must be greater than zero"),
                );
                None
            }
            Ok(secs) => match secs.checked_mul(1000) {
                Some(ms) => Some(ms),
                None => {
                    errors.error(int.span(), format_args!("`{option}` is too large"));
                    None
                }
            },
            Err(_) => {
                errors.error(
                    int.span(),
                    format_args!("`{option}` must be a whole number of seconds"),
                );
                None
            }
        },
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => match parse_duration(&s.value()) {
            Ok(0) => {
                errors.error(
                    s.span(),
                    format_args!("`{option}` must be greater than zero"),
                );
                None
            }
            Ok(ms) => Some(ms),
            Err(msg) => {
                errors.error(s.span(), format_args!("invalid `{option}`: {msg}"));
                None
            }
        },
        other => {
            errors.error(other.span(), value_hint(option));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages of parsing `args` for `kind`.
    fn messages(kind: Kind, args: &str) -> Vec<String> {
        let mut errors = Errors::default();
        Args::parse(kind, args.parse().unwrap(), &mut errors);
        match errors.into_result() {
            Ok(()) => Vec::new(),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn refresh_forms() {
        let parse = |args: &str| {
            let mut errors = Errors::default();
            let args = Args::parse(Kind::Cached, args.parse().unwrap(), &mut errors);
            assert!(errors.is_empty());
            args.refresh.get().copied()
        };
        assert_eq!(parse("refresh"), Some(Refresh::XFetch));
        assert_eq!(parse(r#"refresh = "80%""#), Some(Refresh::Percent(80)));
        assert_eq!(parse(r#"refresh = " 1 %""#), Some(Refresh::Percent(1)));
        assert_eq!(parse(r#"refresh = "99%""#), Some(Refresh::Percent(99)));
        assert_eq!(parse("ttl = 5"), None);
    }

    #[test]
    fn evict_options() {
        let mut errors = Errors::default();
        let args = Args::parse(
            Kind::Evict,
            r#"keys = ["user:{id}", "user_list"], tags = ["org:{org}"], before"#
                .parse()
                .unwrap(),
            &mut errors,
        );
        assert!(errors.is_empty());
        let values = |slot: &Slot<Vec<LitStr>>| -> Vec<String> {
            slot.get().unwrap().iter().map(LitStr::value).collect()
        };
        assert_eq!(values(&args.keys), ["user:{id}", "user_list"]);
        assert_eq!(values(&args.tags), ["org:{org}"]);
        assert!(args.before.get().is_some());
    }

    #[test]
    fn one_message_per_mistake() {
        let one = |kind, args| {
            let m = messages(kind, args);
            assert_eq!(m.len(), 1, "{args}: {m:?}");
            m.into_iter().next().unwrap()
        };
        assert!(one(Kind::Evict, "keys = []").contains("nothing to evict"));
        assert!(one(Kind::Evict, "name = \"x\"").contains("nothing to evict"));
        assert!(one(Kind::Evict, r#"keys = "user:{id}""#).contains("takes an array"));
        assert!(one(Kind::Evict, "keys = [K]").contains("must be a string literal"));
        assert!(one(Kind::Evict, r#"keys = ["a"], before = true"#).contains("is a flag"));
        assert!(one(Kind::Put, "ttl = 60").contains("needs the key it writes"));
        assert!(one(Kind::Put, "key = 5").contains("takes a string literal"));
        assert!(one(Kind::Put, r#"key = "a", lock"#).contains("option of `#[cached]`"));
        assert!(one(Kind::Put, r#"key = "a", cache_none = 5"#).contains("without a value"));
        assert!(one(Kind::Put, r#"key = "a", value = x, cache_none"#).contains("no effect"));
        assert!(one(Kind::Cached, r#"tags = "a""#).contains("takes an array"));
        assert!(one(Kind::Cached, r#"refresh = "0%""#).contains("between 1% and 99%"));
        assert!(one(Kind::Cached, r#"refresh = "100%""#).contains("between 1% and 99%"));
        assert!(one(Kind::Cached, r#"refresh = "80""#).contains("percentage"));
        assert!(one(Kind::Cached, "refresh = 80").contains("percentage"));
        assert!(one(Kind::Cached, "refresh, refresh").contains("duplicate option"));
        assert!(one(Kind::Put, r#"key = "a", refresh"#).contains("option of `#[cached]`"));
        assert!(one(Kind::Evict, r#"keys = ["a"], refresh"#).contains("writes nothing"));
        let wb = |rest: &str| format!(r#"key = "u:{{id}}", value = user, queue = "users"{rest}"#);
        assert!(messages(Kind::WriteBehind, &wb("")).is_empty());
        assert!(messages(Kind::WriteBehind, &wb(", coalesce = false, ttl = 5")).is_empty());
        assert!(one(Kind::WriteBehind, "value = u, queue = \"q\"").contains("needs the key"));
        assert!(one(Kind::WriteBehind, "key = \"k\", queue = \"q\"").contains("needs the value"));
        assert!(one(Kind::WriteBehind, "key = \"k\", value = u").contains("needs the queue"));
        let wb_one = |rest: &str| {
            let m = messages(Kind::WriteBehind, &wb(rest));
            assert_eq!(m.len(), 1, "{rest}: {m:?}");
            m.into_iter().next().unwrap()
        };
        assert!(wb_one(", lock").contains("option of `#[cached]`"));
        assert!(wb_one(", unless = true").contains("no result to test"));
        assert!(wb_one(", coalesce = 1").contains("`true` or `false`"));
        assert!(wb_one(", coalesce, coalesce").contains("duplicate"));
        assert!(wb_one(r#", queue = "q""#).contains("duplicate"));
        assert!(one(Kind::Put, r#"key = "a", queue = "q""#).contains("`#[write_behind]`"));
        let queue = |name: &str| {
            messages(
                Kind::WriteBehind,
                &format!(r#"key = "k", value = u, queue = {name:?}"#),
            )
        };
        assert!(queue("a.b-c_D9").is_empty());
        assert!(queue(&"q".repeat(64)).is_empty());
        assert!(queue(&"q".repeat(65))[0].contains("at most 64"));
        assert!(queue("")[0].contains("must not be empty"));
        assert!(queue("a:b")[0].contains("not ':'"));
        assert!(queue("a{b}")[0].contains("not '{'"));
        assert!(messages(Kind::Evict, r#"keys = [], tags = ["a"]"#).is_empty());
        assert!(messages(Kind::Put, r#"key = "a", value = "text""#).is_empty());
    }
}
