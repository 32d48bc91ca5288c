//! Key and tag rendering: a template's literal runs and placeholders, or `#[cached]`'s
//! default key, as calls of the runtime's `KeyWriter`.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::{GenericParam, Ident, Signature};

use super::{Config, Param};
use crate::template::{Part, Template};

/// The writer calls for `t`: a literal is written as is, a placeholder `{id}` with
/// `w.integer(id, ..)` (a primitive integer parameter) or `w.display(&id, ..)`, spanned at
/// the template's literal so that a value that is not `Display` is reported there.
pub(super) fn template_pushes(t: &Template, w: &Ident, span: Span, config: &Config) -> TokenStream {
    let extra = &t.extra_escapes;
    let mut out = TokenStream::new();
    for part in &t.parts {
        match part {
            Part::Literal(s) => out.extend(quote!(#w.literal(#s);)),
            Part::Placeholder { root, fields } => {
                let param = config.params.iter().find(|p| {
                    p.ident.as_ref().is_some_and(|i| {
                        let s = i.to_string();
                        s == *root || s.strip_prefix("r#") == Some(root)
                    })
                });
                if let (
                    Some(Param {
                        ident: Some(ident),
                        integer: Some(refs),
                        ..
                    }),
                    true,
                ) = (param, fields.is_empty())
                {
                    // `{id}` with `id: u64` (or `&u64`): format the integer directly.
                    let mut ident = ident.clone();
                    ident.set_span(span);
                    let derefs = (0..*refs).map(|_| quote_spanned!(span=> *));
                    out.extend(quote_spanned!(span=> #w.integer(#(#derefs)* #ident, #extra);));
                    continue;
                }
                let root_tokens = if root == "self" {
                    quote_spanned!(span=> self)
                } else {
                    // Use the parameter's own spelling (it may be a raw identifier).
                    let ident = param
                        .and_then(|p| p.ident.as_ref())
                        .map(|i| {
                            let mut i = i.clone();
                            i.set_span(span);
                            i
                        })
                        .unwrap_or_else(|| Ident::new(root, span));
                    ident.to_token_stream()
                };
                // Field names resolve the same at any hygiene; a mixed-site span marks them
                // as generated, so that rustc does not offer to rewrite the key literal as a
                // field name ("a field with a similar name exists").
                let field_span = Span::mixed_site().located_at(span);
                let fields = fields.iter().map(|f| match f.parse::<u32>() {
                    Ok(n) => {
                        let index = syn::Index {
                            index: n,
                            span: field_span,
                        };
                        quote_spanned!(span=> .#index)
                    }
                    Err(_) => {
                        // `{q.type}` and `{q.r#type}` both mean the field `r#type`.
                        let name = f.strip_prefix("r#").unwrap_or(f);
                        let ident = match syn::parse_str::<Ident>(name) {
                            Ok(_) => Ident::new(name, field_span),
                            Err(_) => Ident::new_raw(name, field_span),
                        };
                        quote_spanned!(span=> .#ident)
                    }
                });
                out.extend(quote_spanned!(span=> #w.display(&#root_tokens #(#fields)*, #extra);));
            }
        }
    }
    out
}

/// The writer calls for `#[cached]`'s default key: the function's path, its type
/// parameters, and the arguments as JSON.
pub(super) fn default_key_pushes(
    w: &Ident,
    fn_name: &str,
    sig: &Signature,
    config: &Config,
) -> TokenStream {
    let mut out = if config.has_self {
        let suffix = format!("::{fn_name}");
        quote! {
            #w.literal(::core::any::type_name::<Self>());
            #w.literal(#suffix);
        }
    } else {
        quote!(#w.literal(::core::concat!(::core::module_path!(), "::", #fn_name));)
    };
    // Generic functions: the same arguments with other type parameters are other entries.
    let generics: Vec<TokenStream> = sig
        .generics
        .params
        .iter()
        .filter_map(|p| match p {
            GenericParam::Type(t) => {
                let id = &t.ident;
                Some(quote!(#w.literal(::core::any::type_name::<#id>());))
            }
            GenericParam::Const(c) => {
                let id = &c.ident;
                Some(quote!(#w.display(&#id, "");))
            }
            GenericParam::Lifetime(_) => None,
        })
        .collect();
    if !generics.is_empty() {
        let mut first = true;
        out.extend(quote!(#w.literal("<");));
        for g in generics {
            if !first {
                out.extend(quote!(#w.literal(",");));
            }
            first = false;
            out.extend(g);
        }
        out.extend(quote!(#w.literal(">");));
    }
    out.extend(quote!(#w.open_args();));
    for p in &config.params {
        if let Some(ident) = &p.ident {
            out.extend(quote_spanned!(p.span=> #w.arg(&#ident);));
        }
    }
    out.extend(quote!(#w.close_args();));
    out
}
