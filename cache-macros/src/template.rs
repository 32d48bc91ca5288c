//! The key-template compiler: `"user:{id}:{opts.lang}"` into literal runs and placeholders,
//! checked against the function's parameters at expansion time.

use std::collections::BTreeSet;

use syn::LitStr;

/// One piece of a template.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// Text written as is (`{{` and `}}` already unescaped).
    Literal(String),
    /// `{root.field.sub}`: a parameter (or `self`) and a field path.
    Placeholder { root: String, fields: Vec<String> },
}

/// A compiled template.
#[derive(Debug)]
pub(crate) struct Template {
    pub(crate) parts: Vec<Part>,
    /// Characters to escape in every value, besides the always-reserved ones, so that values
    /// cannot blur the boundary between two placeholders.
    pub(crate) extra_escapes: String,
}

/// Characters that escaped values never contain as themselves.
fn is_delimiter(c: char) -> bool {
    matches!(c, ':' | '{' | '}' | ' ' | '\u{7f}') || (c as u32) < 0x20
}

/// Characters that can appear in an escaped value (`%HH` escapes): unusable as delimiters.
fn in_escapes(c: char) -> bool {
    c == '%' || c.is_ascii_digit() || ('A'..='F').contains(&c)
}

fn is_ident(s: &str) -> bool {
    let s = s.strip_prefix("r#").unwrap_or(s);
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c == '_' || c.is_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c == '_' || c.is_alphanumeric())
}

fn is_field(s: &str) -> bool {
    // Keywords are fields written raw (`{q.type}` is `q.r#type`), except those that cannot be.
    let not_a_field = matches!(
        s.strip_prefix("r#").unwrap_or(s),
        "_" | "self" | "Self" | "super" | "crate"
    );
    (is_ident(s) && !not_a_field) || (!s.is_empty() && s.chars().all(|c| c.is_ascii_digit()))
}

/// Compiles `lit` for a function with `params` (names, without `self`), parameters written as
/// `patterns` (`(a, b)`, which placeholders cannot name) and, if `has_self`, a receiver. Errors
/// are on the literal (a string literal's inner spans are not available on stable Rust) and
/// name the offending placeholder.
pub(crate) fn compile(
    lit: &LitStr,
    params: &[String],
    patterns: &[String],
    has_self: bool,
) -> Result<Template, syn::Error> {
    let text = lit.value();
    let err = |msg: String| syn::Error::new(lit.span(), msg);
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|(_, c)| *c) == Some('{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek().map(|(_, c)| *c) == Some('}') => {
                chars.next();
                literal.push('}');
            }
            '}' => {
                return Err(err(
                    "unmatched `}` in key template; write `}}` for a literal brace".to_owned(),
                ));
            }
            '{' => {
                let mut inner = String::new();
                let mut closed = false;
                for (_, c) in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    if c == '{' {
                        break;
                    }
                    inner.push(c);
                }
                if !closed {
                    return Err(err(
                        "unclosed `{` in key template; close the placeholder with `}`, or write `{{` for a literal brace"
                            .to_owned(),
                    ));
                }
                let inner = inner.trim();
                if inner.is_empty() {
                    return Err(err(
                        "empty placeholder `{}` in key template; name a parameter, e.g. `{id}`"
                            .to_owned(),
                    ));
                }
                let mut segments = inner.split('.').map(str::trim);
                let root = segments.next().unwrap_or_default().to_owned();
                let fields: Vec<String> = segments.map(str::to_owned).collect();
                if !is_ident(&root) || !fields.iter().all(|f| is_field(f)) {
                    return Err(err(format!(
                        "invalid placeholder `{{{inner}}}`; expected a parameter name or a field path such as `{{user.id}}`"
                    )));
                }
                if root == "self" {
                    if !has_self {
                        return Err(err(format!(
                            "placeholder `{{{inner}}}` needs a method with a `self` receiver; this function has none"
                        )));
                    }
                } else if !params
                    .iter()
                    .any(|p| p == &root || p.strip_prefix("r#") == Some(&root))
                {
                    let named = if patterns.is_empty() { "" } else { "named " };
                    let mut known = match params {
                        [] if has_self => {
                            format!("this function has no {named}parameters besides `self`")
                        }
                        [] => format!("this function has no {named}parameters"),
                        [one] => format!("the only {named}parameter is `{one}`"),
                        _ => {
                            let list = params
                                .iter()
                                .map(|p| format!("`{p}`"))
                                .collect::<Vec<_>>()
                                .join(", ");
                            format!("the {named}parameters are {list}")
                        }
                    };
                    if let Some(pat) = patterns.first() {
                        known.push_str(&format!(
                            ", and a key cannot use the names bound by the pattern `{pat}`; name that parameter and use a field path, e.g. `{{arg.0}}`"
                        ));
                    }
                    return Err(err(format!("unknown placeholder `{{{inner}}}`; {known}")));
                }
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(Part::Placeholder { root, fields });
            }
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        parts.push(Part::Literal(literal));
    }
    check_hash_tag(&parts).map_err(err)?;
    let extra_escapes = delimiters(&parts).map_err(err)?;
    Ok(Template {
        parts,
        extra_escapes,
    })
}

fn describe(p: &Part) -> String {
    match p {
        Part::Placeholder { root, fields } if fields.is_empty() => format!("`{{{root}}}`"),
        Part::Placeholder { root, fields } => format!("`{{{root}.{}}}`", fields.join(".")),
        Part::Literal(s) => format!("{s:?}"),
    }
}

/// Every literal run between two placeholders must let a reader tell where the first value
/// ends: it must contain a delimiter that escaped values never contain. Returns the extra
/// characters to escape for runs that only have ordinary characters (`{first}-{last}`).
fn delimiters(parts: &[Part]) -> Result<String, String> {
    let mut extra = BTreeSet::new();
    for (i, part) in parts.iter().enumerate() {
        let Part::Placeholder { .. } = part else {
            continue;
        };
        match parts.get(i + 1) {
            Some(next @ Part::Placeholder { .. }) => {
                return Err(format!(
                    "placeholders {} and {} need a separator between them, e.g. `:`, or their values could run together",
                    describe(part),
                    describe(next)
                ));
            }
            Some(Part::Literal(run)) if parts.get(i + 2).is_some() => {
                if run.chars().any(is_delimiter) {
                    continue;
                }
                match run.chars().find(|c| !in_escapes(*c)) {
                    Some(c) => {
                        extra.insert(c);
                    }
                    None => {
                        return Err(format!(
                            "the separator {run:?} between {} and {} is ambiguous (values may contain `%`, digits and `A`-`F`); use `:` or a letter",
                            describe(part),
                            describe(&parts[i + 2])
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(extra.into_iter().collect())
}

/// Literal braces (`{{`, `}}`) are allowed to form a Redis Cluster hash tag; a stray `}` would
/// make the key's slot differ from its auxiliary keys' slot.
fn check_hash_tag(parts: &[Part]) -> Result<(), String> {
    // Walk the rendered shape: literal characters, and `V` for a (brace-free) value.
    let mut seen_open = false;
    let mut content = false;
    let mut tag_closed = false;
    for part in parts {
        match part {
            Part::Placeholder { .. } => {
                if seen_open && !tag_closed {
                    content = true;
                }
            }
            Part::Literal(s) => {
                for c in s.chars() {
                    match c {
                        '{' if !seen_open => seen_open = true,
                        '}' if !seen_open => {
                            return Err(
                                "a literal `}` in a key must close a Redis Cluster hash tag opened earlier with `{{`, e.g. `{{user:{id}}}:profile`"
                                    .to_owned(),
                            );
                        }
                        '}' if !tag_closed => {
                            if !content {
                                return Err("empty hash tag `{}` in key; put the part of the key to hash between the braces, e.g. `{{user:{id}}}`".to_owned());
                            }
                            tag_closed = true;
                        }
                        _ if seen_open && !tag_closed => content = true,
                        _ => {}
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(s: &str) -> LitStr {
        LitStr::new(s, proc_macro2::Span::call_site())
    }

    fn params(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    fn compile_ok(s: &str) -> Template {
        compile(
            &lit(s),
            &params(&["id", "user", "role", "first", "last"]),
            &[],
            true,
        )
        .unwrap()
    }

    fn compile_err(s: &str) -> String {
        compile(&lit(s), &params(&["id", "user"]), &[], false)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parts() {
        let t = compile_ok("user:{id}:{user.org.id}:{self.tenant}");
        assert_eq!(
            t.parts,
            vec![
                Part::Literal("user:".into()),
                Part::Placeholder {
                    root: "id".into(),
                    fields: vec![]
                },
                Part::Literal(":".into()),
                Part::Placeholder {
                    root: "user".into(),
                    fields: vec!["org".into(), "id".into()]
                },
                Part::Literal(":".into()),
                Part::Placeholder {
                    root: "self".into(),
                    fields: vec!["tenant".into()]
                },
            ]
        );
        assert_eq!(t.extra_escapes, "");
    }

    #[test]
    fn literal_braces() {
        let t = compile_ok("{{user:{id}}}:x");
        assert_eq!(t.parts[0], Part::Literal("{user:".into()));
        assert_eq!(t.parts[2], Part::Literal("}:x".into()));
    }

    #[test]
    fn errors() {
        assert!(compile_err("user:{id").contains("unclosed `{`"));
        assert!(compile_err("user:id}").contains("unmatched `}`"));
        assert!(compile_err("user:{}").contains("empty placeholder"));
        assert!(compile_err("user:{nope}").contains("the parameters are `id`, `user`"));
        assert!(compile_err("user:{self.x}").contains("needs a method with a `self` receiver"));
        assert!(compile_err("{id}{user}").contains("need a separator"));
        assert!(compile_err("{id}1{user}").contains("ambiguous"));
        assert!(compile_err("x}}").contains("hash tag"));
        assert!(compile_err("{{}}{id}").contains("empty hash tag"));
        assert!(compile_err("{a b}").contains("invalid placeholder"));
        assert!(compile_err("{user.self}").contains("invalid placeholder"));
        assert!(compile_err("{user.r#crate}").contains("invalid placeholder"));
    }

    #[test]
    fn unknown_placeholders_list_the_parameters() {
        let msg = |params: &[&str], patterns: &[&str], has_self: bool| {
            compile(
                &lit("x:{nope}"),
                &self::params(params),
                &self::params(patterns),
                has_self,
            )
            .unwrap_err()
            .to_string()
        };
        assert!(msg(&[], &[], false).ends_with("this function has no parameters"));
        assert!(msg(&[], &[], true).ends_with("no parameters besides `self`"));
        assert!(msg(&["id"], &[], false).ends_with("the only parameter is `id`"));
        let pattern = msg(&["id"], &["(a, b)"], false);
        assert!(pattern.contains("the only named parameter is `id`"));
        assert!(pattern.contains("the pattern `(a, b)`"));
    }

    #[test]
    fn ordinary_separators_are_escaped() {
        assert_eq!(compile_ok("{first}-{last}").extra_escapes, "-");
        assert_eq!(compile_ok("{first}%x{last}").extra_escapes, "x");
        assert_eq!(compile_ok("name:{first}-{last}:{id}").extra_escapes, "-");
    }
}
