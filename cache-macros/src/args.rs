//! Parsing of the attribute's options into [`CachedArgs`].
//!
//! Every option is read into a set-once [`Slot`] that remembers its span and reports a second
//! occurrence. Errors are collected, not returned at the first one, so that one compilation
//! shows every mistake in the attribute.

use proc_macro2::{Span, TokenStream};
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Lit, LitStr};

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

/// `cache_none` or `cache_none = <ttl>`.
pub(crate) struct CacheNone {
    pub(crate) ttl_ms: Option<u64>,
}

/// The options of `#[cached(...)]`, each with the span it was written at.
pub(crate) struct CachedArgs {
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
}

/// The lease of `lock` without a value.
pub(crate) const DEFAULT_LOCK_MS: u64 = 10_000;

const OPTIONS: &[&str] = &[
    "key",
    "ttl",
    "cache",
    "condition",
    "unless",
    "cache_none",
    "version",
    "name",
    "lock",
];

impl CachedArgs {
    fn new() -> Self {
        CachedArgs {
            key: Slot::new("key"),
            ttl_ms: Slot::new("ttl"),
            cache: Slot::new("cache"),
            condition: Slot::new("condition"),
            unless: Slot::new("unless"),
            cache_none: Slot::new("cache_none"),
            version: Slot::new("version"),
            name: Slot::new("name"),
            lock_ms: Slot::new("lock"),
        }
    }

    /// Parses the attribute's arguments. Returns the options that parsed, and every error.
    pub(crate) fn parse(args: TokenStream, errors: &mut Errors) -> CachedArgs {
        let mut out = CachedArgs::new();
        let parser = syn::meta::parser(|meta| {
            out.option(&meta, errors);
            Ok(())
        });
        if let Err(e) = parser.parse2(args) {
            errors.push(e);
        }
        out
    }

    fn option(&mut self, meta: &ParseNestedMeta<'_>, errors: &mut Errors) {
        let path = &meta.path;
        let span = path.span();
        let Some(ident) = path.get_ident().map(|i| i.to_string()) else {
            errors.error(span, unknown_message(&quote::quote!(#path).to_string()));
            skip_value(meta, errors);
            return;
        };
        // Options that are flags or take a value.
        match ident.as_str() {
            "cache_none" => {
                if meta.input.peek(syn::Token![=]) {
                    if let Some(expr) = value(meta, errors) {
                        if let Some(ms) = duration_ms(&expr, "cache_none", errors) {
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
            "key" | "ttl" | "cache" | "condition" | "unless" | "version" | "name" => {}
            other => {
                errors.error(span, unknown_message(other));
                skip_value(meta, errors);
                return;
            }
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

fn value_hint(option: &str) -> String {
    match option {
        "key" => "`key` takes a string literal template, e.g. `key = \"user:{id}\"`".to_owned(),
        "name" => "`name` takes a string literal, e.g. `name = \"get_user\"`".to_owned(),
        "ttl" => "`ttl` takes seconds or a duration string, e.g. `ttl = 3600` or `ttl = \"1h\"`"
            .to_owned(),
        "version" => "`version` takes a whole number, e.g. `version = 2`".to_owned(),
        "lock" => {
            "`lock` takes the lease length in seconds or as a duration string, e.g. `lock = 10` or `lock = \"30s\"`"
                .to_owned()
        }
        "cache" => {
            "`cache` takes an expression naming a `Cache`, e.g. `cache = self.cache`".to_owned()
        }
        "condition" => {
            "`condition` takes a boolean expression over the arguments, e.g. `condition = id > 0`"
                .to_owned()
        }
        "unless" => {
            "`unless` takes a boolean expression over `result`, e.g. `unless = result.is_empty()`"
                .to_owned()
        }
        other => format!("`{other}` takes a value"),
    }
}

fn unknown_message(option: &str) -> String {
    let list = OPTIONS
        .iter()
        .map(|o| format!("`{o}`"))
        .collect::<Vec<_>>()
        .join(", ");
    match OPTIONS
        .iter()
        .filter(|o| edit_distance(o, option) <= 2)
        .min_by_key(|o| edit_distance(o, option))
    {
        Some(close) => format!("unknown option `{option}`; did you mean `{close}`?"),
        None => format!("unknown option `{option}`; expected one of {list}"),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
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

/// Parses `"90s"`, `"15m"`, `"1h30m"`, `"500ms"`, `"2d"` into milliseconds.
pub(crate) fn parse_duration(text: &str) -> Result<u64, String> {
    const HINT: &str = "expected a number and a unit (ms, s, m, h, d), e.g. \"15m\" or \"1h30m\"";
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("empty duration; {HINT}"));
    }
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{text:?} is not a duration; {HINT}"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?} is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].trim();
        let factor: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("{text:?} has a number without a unit; {HINT}")),
            other => return Err(format!("unknown unit {other:?} in {text:?}; {HINT}")),
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(factor)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{text:?} is too large"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Ok(900_000));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("2d"), Ok(172_800_000));
        assert_eq!(parse_duration("0s"), Ok(0));
        assert!(parse_duration("15").is_err());
        assert!(parse_duration("15x").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn suggestions() {
        assert!(unknown_message("tll").contains("did you mean `ttl`"));
        assert!(unknown_message("tags").contains("expected one of"));
    }
}
