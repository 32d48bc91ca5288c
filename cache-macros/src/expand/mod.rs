//! Code generation for `#[cached]`, `#[cache_put]`, `#[cache_evict]` and `#[write_behind]`.
//!
//! The function is rewritten in place: attributes, visibility and signature are re-emitted
//! unchanged, and the body becomes a few calls of one runtime type (`Fetch`, `Put`, `Evict`)
//! around the original body, run as an `async move` block. `self`, generics, lifetimes and
//! `where` clauses need no special handling because the body stays inside the same function.
//! The body's statements are not parsed (see `item.rs`), except to recognise
//! `#[async_trait]`'s shape.
//!
//! `#[write_behind]` is the exception: its body runs later, in a worker, so it is moved into a
//! nested `async fn` of the same parameters (see `write_behind.rs`), and the function may not
//! have `self` or generics.
//!
//! This module holds what the attributes share: the entry point, the checked [`Config`], and
//! [`Gen`], the pieces of generated code (site, cache handle, keys, tags, return-type mode,
//! body). `cached.rs`, `put.rs`, `evict.rs` and `write_behind.rs` assemble them.

mod cached;
mod evict;
mod keys;
mod put;
mod shared;
mod write_behind;

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote};
use syn::spanned::Spanned;
use syn::{FnArg, Ident, LitStr, Pat, ReturnType, Type};

use crate::args::{Args, Errors, Kind};
use crate::item::{self, Generic, ItemFn, Shape};
use crate::template::{self, Template};

use shared::{Gen, hidden};

/// Entry point: parse, validate, generate. On any error the user's item is emitted unchanged,
/// followed by the errors, so the rest of the crate still type-checks.
pub(crate) fn expand(kind: Kind, args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let args = Args::parse(kind, args, &mut errors);
    let func = match ItemFn::parse(item.clone(), kind.attr()) {
        Ok(f) => f,
        // A function with a syntax error in its signature: syn's error, where rustc's will be.
        Err(e) if item::looks_like_fn(&item) => {
            errors.push(e);
            return with_errors(item, errors);
        }
        Err(_) => {
            let (span, what) = item::describe_item(&item);
            errors.error(
                span,
                format_args!(
                    "`{}` can only be applied to an `async fn`, not {what}",
                    kind.attr()
                ),
            );
            return with_errors(item, errors);
        }
    };
    let config = Config::build(&args, &func, &mut errors);
    if let (Some(config), Kind::WriteBehind) = (&config, kind) {
        write_behind::check(&func, config, &mut errors);
    }
    match config {
        Some(config) if errors.is_empty() => {
            let g = Gen::new(&args, &func, &config);
            match kind {
                Kind::Cached => g.function(cached::generate(&g)),
                Kind::Put => g.function(put::generate(&g)),
                Kind::Evict => g.function(evict::generate(&g)),
                Kind::WriteBehind => write_behind::generate(&g),
            }
        }
        _ => with_errors(item, errors),
    }
}

fn with_errors(item: TokenStream, errors: Errors) -> TokenStream {
    let errs = match errors.into_result() {
        Ok(()) => TokenStream::new(),
        Err(e) => e.into_compile_error(),
    };
    quote!(#item #errs)
}

/// A parameter of the function.
struct Param {
    /// The name, if the parameter is a plain identifier (`id`, `mut id`).
    ident: Option<Ident>,
    /// `ref? mut? ident`, for a plain identifier: how the body binds it.
    binding: Option<TokenStream>,
    /// The whole pattern, for messages.
    pat: TokenStream,
    span: Span,
    /// `Some(references to strip)` if the declared type is a primitive integer (`u64`: 0,
    /// `&i32`: 1, ...): such placeholders are formatted without the `fmt` machinery.
    integer: Option<usize>,
    /// How the argument is passed (by value, `&`, `&mut`), as its declared type says.
    passing: Passing,
    /// `refresh`: whether the body (or `unless`) names it, so that a refresh needs its own
    /// copy of it. Only computed with `refresh`.
    used: bool,
}

/// How an argument (or `self`) is passed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Passing {
    Value,
    Ref,
    MutRef,
}

fn passing(ty: &Type) -> Passing {
    match ty {
        Type::Reference(r) if r.mutability.is_some() => Passing::MutRef,
        Type::Reference(_) => Passing::Ref,
        Type::Paren(p) => passing(&p.elem),
        Type::Group(g) => passing(&g.elem),
        _ => Passing::Value,
    }
}

/// The method's receiver.
struct Receiver {
    /// Where the `self` token is.
    self_span: Span,
    /// `mut` of `mut self`.
    mutability: Option<syn::Token![mut]>,
    span: Span,
    passing: Passing,
    /// `refresh`: whether the body (or `unless`) names `self`.
    used: bool,
}

/// For a primitive integer type of at most 64 bits, or a shared reference to one: how many
/// references to strip.
fn integer_type(ty: &Type) -> Option<usize> {
    match ty {
        Type::Reference(r) if r.mutability.is_none() => integer_type(&r.elem).map(|refs| refs + 1),
        Type::Path(p) if p.qself.is_none() => {
            let ident = p.path.get_ident()?;
            match ident.to_string().as_str() {
                "u8" | "u16" | "u32" | "u64" | "usize" | "i8" | "i16" | "i32" | "i64" | "isize" => {
                    Some(0)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// A compiled template and the span of its literal, where errors about its values go.
struct Compiled {
    template: Template,
    span: Span,
}

/// What generation needs, checked.
struct Config {
    shape: Shape,
    ret: Type,
    has_self: bool,
    receiver: Option<Receiver>,
    params: Vec<Param>,
    /// `key = ".."` (`None`: the default key of `#[cached]`).
    key: Option<Compiled>,
    /// `keys = [..]` of `#[cache_evict]`.
    keys: Vec<Compiled>,
    /// `tags = [..]`.
    tags: Vec<Compiled>,
}

impl Config {
    fn build(args: &Args, func: &ItemFn, errors: &mut Errors) -> Option<Config> {
        let kind = args.kind;
        let attr = kind.attr();
        let sig = &func.sig;
        let (shape, ret) = match item::shape(sig, &func.body) {
            Some(found) => found,
            None => {
                let hint = match kind {
                    Kind::Cached => "add `async`, or cache the function's caller",
                    Kind::Put => "add `async`, or write the entry from an async caller",
                    Kind::Evict => "add `async`, or evict from an async caller",
                    Kind::WriteBehind => "add `async` (its body runs later, in a worker)",
                };
                errors.error(
                    sig.fn_token.span,
                    format_args!("`{attr}` can only be applied to an `async fn`; {hint}"),
                );
                return None;
            }
        };
        // `#[cache_evict]` only tests the result for success: a type parameter evicts after
        // any result, which is harmless.
        // `#[write_behind]` rejects generic functions (see `write_behind::check`).
        let shape_matters = !matches!(kind, Kind::Evict | Kind::WriteBehind);
        if let (Some(generic), true) = (item::generic_return(&ret, sig), shape_matters) {
            let what = match generic {
                Generic::Param => "a type parameter",
                Generic::Projection => "an associated type of a type parameter",
            };
            errors.push(syn::Error::new_spanned(
                &ret,
                format_args!(
                    "`{attr}` cannot tell whether `{}` is a `Result` or an `Option`: the return type is {what}; write the shape, e.g. `Result<T, E>` or `Option<T>`",
                    type_text(&ret)
                ),
            ));
        }
        let has_self = sig.receiver().is_some();
        // `refresh` runs a copy of the body in the background, with copies of the arguments it
        // names (in its tokens, or in a string literal, which `format!` can capture from).
        let refresh_uses = args.refresh.get().map(|_| {
            let mut tokens = match &shape {
                Shape::Native => func.body.stmts.clone(),
                Shape::AsyncTrait { future, .. } => future.clone(),
            };
            if let Some(unless) = args.unless.get() {
                tokens.extend(unless.to_token_stream());
            }
            tokens
        });
        let receiver = sig.receiver().map(|r| Receiver {
            self_span: r.self_token.span,
            mutability: r.mutability,
            span: r.span(),
            passing: match &r.kind {
                syn::ReceiverKind::Reference(_, _, Some(_)) => Passing::MutRef,
                syn::ReceiverKind::Reference(..) => Passing::Ref,
                syn::ReceiverKind::Typed(_, ty) => passing(ty),
                _ => Passing::Value,
            },
            used: refresh_uses
                .as_ref()
                .is_some_and(|t| shared::mentions_self(t.clone())),
        });
        let params: Vec<Param> = sig
            .inputs
            .iter()
            .filter_map(|arg| match arg {
                FnArg::Receiver(_) => None,
                FnArg::Typed(pt) => {
                    let (ident, binding) = match &*pt.pat {
                        Pat::Ident(pi) if pi.subpat.is_none() => {
                            let (by_ref, mutability, ident) =
                                (&pi.by_ref, &pi.mutability, &pi.ident);
                            (
                                Some(ident.clone()),
                                Some(quote!(#by_ref #mutability #ident)),
                            )
                        }
                        _ => (None, None),
                    };
                    let used = match (&refresh_uses, &*pt.pat) {
                        (None, _) | (_, Pat::Wild(_)) => false,
                        (Some(tokens), Pat::Ident(pi)) if pi.subpat.is_none() => {
                            shared::mentions_name(tokens.clone(), &pi.ident.to_string())
                        }
                        // A pattern: whether it binds a name the body uses.
                        (Some(tokens), pat) => shared::idents(pat.to_token_stream())
                            .iter()
                            .any(|name| shared::mentions_name(tokens.clone(), name)),
                    };
                    Some(Param {
                        ident,
                        binding,
                        pat: pt.pat.to_token_stream(),
                        span: pt.span(),
                        integer: integer_type(&pt.ty),
                        passing: passing(&pt.ty),
                        used,
                    })
                }
            })
            .collect();
        if args.refresh.get().is_some() {
            refresh_checks(receiver.as_ref(), &params, errors);
        }

        let names: Vec<String> = params
            .iter()
            .filter_map(|p| p.ident.as_ref().map(ToString::to_string))
            .collect();
        let patterns: Vec<String> = params
            .iter()
            .filter(|p| p.ident.is_none())
            .map(|p| p.pat.to_string())
            .collect();
        let mut compile = |lits: &[LitStr]| -> Vec<Compiled> {
            lits.iter()
                .filter_map(
                    |lit| match template::compile(lit, &names, &patterns, has_self) {
                        Ok(template) => Some(Compiled {
                            template,
                            span: lit.span(),
                        }),
                        Err(e) => {
                            errors.push(e);
                            None
                        }
                    },
                )
                .collect()
        };
        let key = compile(args.key.get().map_or(&[], std::slice::from_ref)).pop();
        let keys = compile(args.keys.get().map_or(&[], Vec::as_slice));
        let tags = compile(args.tags.get().map_or(&[], Vec::as_slice));

        if kind == Kind::Cached && args.key.get().is_none() {
            for p in params.iter().filter(|p| p.ident.is_none()) {
                errors.error(
                    p.span,
                    format_args!(
                        "the default cache key needs named parameters, and `{}` is a pattern; name it, or give the function a `key = \"...\"`",
                        p.pat
                    ),
                );
            }
        }

        // In `value` and `unless`, `result` is the function's output: a parameter of that name
        // would be shadowed there without a word. `#[write_behind]` has no output to name:
        // `value` is written before the body runs.
        let names_result = [args.value.get(), args.unless.get()]
            .into_iter()
            .flatten()
            .any(|e| shared::mentions_result(e.to_token_stream()));
        if let (true, Kind::WriteBehind, Some(value)) = (names_result, kind, args.value.get()) {
            errors.push(syn::Error::new_spanned(
                value,
                "`value` cannot name `result` in `#[write_behind]`: the value is written when the call is queued, before the body runs; write it over the arguments, e.g. `value = user`",
            ));
        } else if names_result {
            for p in &params {
                // A plain `result`, or a pattern that binds one (`(result, n): (u8, u8)`).
                if p.ident.as_ref().is_some_and(|i| i == "result")
                    || (p.ident.is_none() && shared::mentions_result(p.pat.clone()))
                {
                    errors.error(
                        p.span,
                        "this parameter binds the name `result`, which `value` and `unless` use for the function's output; rename it",
                    );
                }
            }
        }

        if let Type::Tuple(t) = &ret {
            if t.elems.is_empty() {
                if let Some(span) = args.unless.span() {
                    errors.error(
                        span,
                        "`unless` has no effect without a return value to test; remove it",
                    );
                }
                if kind == Kind::Put && args.value.get().is_none() {
                    let span = match &sig.output {
                        ReturnType::Type(_, ty) => ty.span(),
                        ReturnType::Default => sig.ident.span(),
                    };
                    errors.error(
                        span,
                        "`#[cache_put]` writes the function's result, and this function returns nothing; say what to write with `value = <expr>`",
                    );
                }
            }
        }

        Some(Config {
            shape,
            ret,
            has_self,
            receiver,
            params,
            key,
            keys,
            tags,
        })
    }
}

/// `refresh`: the arguments the body uses (and `self`) must be ones a refresh can copy: not
/// `&mut` (a copy could not change the caller's value), not a pattern (nothing names the whole
/// argument). Whether their types can be copied is checked by the compiler, at each argument.
fn refresh_checks(receiver: Option<&Receiver>, params: &[Param], errors: &mut Errors) {
    if let Some(r) = receiver.filter(|r| r.used && r.passing == Passing::MutRef) {
        errors.error(
            r.span,
            "`refresh` reloads in the background with its own copy of `self`, and a copy could not change the caller's value through `&mut self`: take `&self`, or remove `refresh`",
        );
    }
    for p in params.iter().filter(|p| p.used) {
        if p.ident.is_none() {
            errors.error(
                p.span,
                format_args!(
                    "`refresh` reloads in the background with its own copy of each argument the body uses, and nothing names the whole argument `{}`: name the parameter and destructure it in the body, or remove `refresh`",
                    p.pat
                ),
            );
        } else if p.passing == Passing::MutRef {
            errors.error(
                p.span,
                format_args!(
                    "`refresh` reloads in the background with its own copy of each argument the body uses, and a copy of `{}` could not change the caller's value through `&mut`: pass it by value or by `&`, or remove `refresh`",
                    p.pat
                ),
            );
        }
    }
}

/// A type as it is written, for messages: `T::Output`, not `T :: Output`.
fn type_text(ty: &Type) -> String {
    ty.to_token_stream()
        .to_string()
        .replace(" :: ", "::")
        .replace(" <", "<")
        .replace("< ", "<")
        .replace(" >", ">")
        .replace(" ,", ",")
}
