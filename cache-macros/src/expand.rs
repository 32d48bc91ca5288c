//! Code generation for `#[cached]`.
//!
//! The function is rewritten in place: attributes, visibility and signature are re-emitted
//! unchanged, and the body becomes one call of the runtime's `cached` entry point with the
//! original body as an `async move` block. `self`, generics, lifetimes and `where` clauses
//! need no special handling because the body stays inside the same function. The body's
//! statements are not parsed (see `item.rs`), except to recognise `#[async_trait]`'s shape.

use proc_macro2::{Delimiter, Group, Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, GenericParam, Ident, Pat, ReturnType, Signature, Type};

use crate::args::{CachedArgs, Errors};
use crate::item::{self, Generic, ItemFn, Shape};
use crate::template::{self, Part, Template};

/// Entry point: parse, validate, generate. On any error the user's item is emitted unchanged,
/// followed by the errors, so the rest of the crate still type-checks.
pub(crate) fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let args = CachedArgs::parse(args, &mut errors);
    let func: ItemFn = match syn::parse2(item.clone()) {
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
                format_args!("`#[cached]` can only be applied to an `async fn`, not {what}"),
            );
            return with_errors(item, errors);
        }
    };
    match Config::build(&args, &func, &mut errors) {
        Some(config) if errors.is_empty() => generate(&args, &func, &config),
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
    /// The whole pattern, for messages.
    pat: TokenStream,
    span: Span,
    /// `Some(references to strip)` if the declared type is a primitive integer (`u64`: 0,
    /// `&i32`: 1, ...): such placeholders are formatted without the `fmt` machinery.
    integer: Option<usize>,
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

/// What generation needs, checked.
struct Config {
    shape: Shape,
    ret: Type,
    has_self: bool,
    params: Vec<Param>,
    template: Option<Template>,
}

impl Config {
    fn build(args: &CachedArgs, func: &ItemFn, errors: &mut Errors) -> Option<Config> {
        let sig = &func.sig;
        let (shape, ret) = match item::shape(sig, &func.body) {
            Some(found) => found,
            None => {
                errors.error(
                    sig.fn_token.span,
                    "`#[cached]` can only be applied to an `async fn`; add `async`, or cache the function's caller",
                );
                return None;
            }
        };
        if let Some(generic) = item::generic_return(&ret, sig) {
            let what = match generic {
                Generic::Param => "a type parameter",
                Generic::Projection => "an associated type of a type parameter",
            };
            errors.push(syn::Error::new_spanned(
                &ret,
                format_args!(
                    "`#[cached]` cannot tell whether `{}` is a `Result` or an `Option`: the return type is {what}; write the shape, e.g. `Result<T, E>` or `Option<T>`",
                    type_text(&ret)
                ),
            ));
        }
        let has_self = sig.receiver().is_some();
        let params: Vec<Param> = sig
            .inputs
            .iter()
            .filter_map(|arg| match arg {
                FnArg::Receiver(_) => None,
                FnArg::Typed(pt) => Some(Param {
                    ident: match &*pt.pat {
                        Pat::Ident(pi) if pi.subpat.is_none() => Some(pi.ident.clone()),
                        _ => None,
                    },
                    pat: pt.pat.to_token_stream(),
                    span: pt.span(),
                    integer: integer_type(&pt.ty),
                }),
            })
            .collect();

        let template = match args.key.get() {
            Some(lit) => {
                let names: Vec<String> = params
                    .iter()
                    .filter_map(|p| p.ident.as_ref().map(ToString::to_string))
                    .collect();
                let patterns: Vec<String> = params
                    .iter()
                    .filter(|p| p.ident.is_none())
                    .map(|p| p.pat.to_string())
                    .collect();
                match template::compile(lit, &names, &patterns, has_self) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        errors.push(e);
                        None
                    }
                }
            }
            None => {
                for p in params.iter().filter(|p| p.ident.is_none()) {
                    errors.error(
                        p.span,
                        format_args!(
                            "the default cache key needs named parameters, and `{}` is a pattern; name it, or give the function a `key = \"...\"`",
                            p.pat
                        ),
                    );
                }
                None
            }
        };

        if let (Some(span), Type::Tuple(t)) = (args.unless.span(), &ret) {
            if t.elems.is_empty() {
                errors.error(
                    span,
                    "`unless` has no effect without a return value to test; remove it",
                );
            }
        }

        Some(Config {
            shape,
            ret,
            has_self,
            params,
            template,
        })
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

/// Hidden names: `Span::mixed_site()` locals cannot be named by the user's code.
fn hidden(name: &str) -> Ident {
    Ident::new(name, Span::mixed_site())
}

// Input:
//     #[cached(key = "user:{id}", ttl = 60)]
//     pub async fn get_user(id: u64) -> Result<User, E> { #![inner] stmts }
//
// Output (`::cache_runtime::__private::` and `::core::..::` paths shortened, `#[allow(..)]`s
// left out; the `__cache_*` names have mixed-site hygiene, so `stmts` cannot name them):
//     pub async fn get_user(id: u64) -> Result<User, E> {
//         #![inner]
//         static __CACHE_SITE: Site = Site::new(module_path!(), "get_user").ttl_ms(60000);
//         let __cache_handle: &Cache = default_cache();
//         let __cache_key: CallKey = {
//             let mut __cache_w = key_writer(__cache_handle);
//             __cache_w.literal("user:");
//             __cache_w.integer(id, ""); // `display(&id, "")` for a non-integer parameter
//             __cache_w.finish(None)
//         };
//         let __cache_mode = {
//             use {ViaOption as _, ViaPlain as _, ViaResult as _, ViaResultOption as _};
//             (&&&&Tag::<Result<User, E>>::new()).__cache_mode()
//         };
//         let __cache_typed = {
//             use {ViaTyped as _, ViaUntyped as _};
//             (&&__cache_mode).__cache_typed()
//         };
//         let mut __cache_fetch = Fetch::new(Call {
//             cache: __cache_handle, site: &__CACHE_SITE, self_type: None, key: __cache_key,
//         });
//         let __cache_finish = match __cache_fetch.find(&__cache_mode, __cache_typed).await {
//             Ok(__cache_hit) => return __cache_hit,
//             Err(__cache_finish) => __cache_finish,
//         };
//         let __cache_result = async move { // these braces are the body's own (their spans)
//             if let Some(__cache_ret) = None::<Result<User, E>> {
//                 return __cache_ret;
//             }
//             stmts
//         }
//         .await;
//         let __cache_verdict = __cache_finish.verdict(
//             &mut __cache_fetch, &__cache_mode, __cache_typed, &__cache_result, None,
//         );
//         __cache_fetch.complete(__cache_verdict).await;
//         __cache_result
//     }
//
// With `condition`, the key is `if cond { .. } else { CallKey::Condition }`; with `unless`,
// the last argument of `verdict` is `Some(&mut |result: &R| -> bool { expr })`; `cache_none`
// adds `require_cache_none(PhantomData::<R>);` first; in a method, `self_type` is
// `Some(type_name::<Self>())`. After `#[async_trait]`, the body `{ Box::pin(async move {
// .. }) }` becomes `{ let ..; Box::pin(async move { let mut __cache_fetch = ..; ..
// async move { .. }.await; .. }) }`, the inner `async move { .. }` being `#[async_trait]`'s,
// unchanged. The function's own state machine drives the call; the runtime's `find` and
// `verdict` are generic over the return type only, so functions returning the same type
// share them.
fn generate(args: &CachedArgs, func: &ItemFn, config: &Config) -> TokenStream {
    let rt = quote!(::cache_runtime::__private);
    let ItemFn {
        attrs,
        vis,
        sig,
        body,
    } = func;
    // The body's inner attributes (`#![allow(..)]`) apply to the whole rewritten function.
    let inner_attrs = &body.inner_attrs;
    let fn_name = sig.ident.to_string();
    let fn_name = fn_name.strip_prefix("r#").unwrap_or(&fn_name);
    let ret = &config.ret;
    let ret_span = match (&sig.output, &config.shape) {
        (ReturnType::Type(_, ty), Shape::Native) => ty.span(),
        // `#[async_trait]` moved the written return type into `Future<Output = R>`.
        (ReturnType::Type(..), Shape::AsyncTrait { .. }) => ret.span(),
        (ReturnType::Default, _) => sig.ident.span(),
    };

    let site = hidden("__CACHE_SITE");
    let handle = hidden("__cache_handle");
    let key = hidden("__cache_key");
    let w = hidden("__cache_w");
    // Generated at the return type, so that a return type that is not `Serialize +
    // DeserializeOwned` is reported there, not on the whole attribute. The mode and the call
    // share one hygiene context: rustc only points at an argument that shares the call's.
    let ret_loc = Span::mixed_site().located_at(ret_span);
    let mode = Ident::new("__cache_mode", ret_loc);
    let fake_ret = hidden("__cache_ret");

    // The site: everything static about this function.
    let mut site_opts = TokenStream::new();
    if let Some(name) = args.name.get() {
        site_opts.extend(quote!(.name(#name)));
    }
    if let Some(ms) = args.ttl_ms.get() {
        site_opts.extend(quote!(.ttl_ms(#ms)));
    }
    if let Some(none) = args.cache_none.get() {
        let ttl = match none.ttl_ms {
            Some(ms) => quote!(::core::option::Option::Some(#ms)),
            None => quote!(::core::option::Option::None),
        };
        site_opts.extend(quote!(.cache_none(#ttl)));
    }
    if let Some(v) = args.version.get() {
        site_opts.extend(quote!(.version(#v)));
    }
    if let Some(ms) = args.lock_ms.get() {
        site_opts.extend(quote!(.lock_ms(#ms)));
    }
    let site_static = quote! {
        static #site: #rt::Site = #rt::Site::new(::core::module_path!(), #fn_name) #site_opts;
    };

    let cache_expr = match args.cache.get() {
        Some(expr) => quote_spanned!(expr.span()=> &(#expr)),
        None => quote!(#rt::default_cache()),
    };
    // A `cache = <expr>` of the wrong type is "expected due to" the `cache` option.
    let cache_ty = match args.cache.span() {
        Some(span) => quote_spanned!(span=> &::cache_runtime::__private::Cache),
        None => quote!(&#rt::Cache),
    };
    let handle_let = quote! {
        let #handle: #cache_ty = #cache_expr;
    };

    // The key.
    let pushes = match &config.template {
        Some(t) => template_pushes(
            t,
            &w,
            args.key.get().map_or_else(Span::call_site, |l| l.span()),
            config,
        ),
        None => default_key_pushes(&w, fn_name, sig, config),
    };
    let version = match args.version.get() {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    let render = quote! {{
        let mut #w = #rt::key_writer(#handle);
        #pushes
        #w.finish(#version)
    }};
    let key_expr = match args.condition.get() {
        Some(cond) => {
            let cond = quote_spanned!(cond.span()=> { let __cache_condition: bool = #cond; __cache_condition });
            quote! {
                if #cond { #render } else { #rt::CallKey::Condition }
            }
        }
        None => render,
    };
    let key_let = quote! {
        let #key: #rt::CallKey = #key_expr;
    };

    let mode_let = quote_spanned! {ret_span=>
        #[allow(clippy::needless_borrow, clippy::borrow_deref_ref)]
        let #mode = {
            #[allow(unused_imports)]
            use #rt::{ViaOption as _, ViaPlain as _, ViaResult as _, ViaResultOption as _};
            (&&&&#rt::Tag::<#ret>::new()).__cache_mode()
        };
    };
    // In-process backends keep the decoded value when its type is `Clone + Send + Sync`, so
    // that a hit clones it instead of decoding JSON.
    let typed = hidden("__cache_typed");
    let typed_let = quote! {
        #[allow(clippy::needless_borrow)]
        let #typed = {
            #[allow(unused_imports)]
            use #rt::{ViaTyped as _, ViaUntyped as _};
            (&&#mode).__cache_typed()
        };
    };
    let cache_none_check = match args.cache_none.span() {
        Some(span) => {
            let rt_none = quote_spanned!(span=> ::cache_runtime::__private);
            quote_spanned!(span=> #rt_none::require_cache_none(::core::marker::PhantomData::<#ret>);)
        }
        None => TokenStream::new(),
    };

    let unless = match args.unless.get() {
        Some(expr) => {
            let result = Ident::new("result", Span::call_site());
            // A non-`bool` expression is "expected `bool` because of" the `unless` option.
            let unless_span = args.unless.span().unwrap_or_else(|| expr.span());
            let bool_ty = quote_spanned!(unless_span=> bool);
            let closure = quote_spanned!(expr.span()=> |#result: &#ret| -> #bool_ty { #expr });
            quote!(::core::option::Option::Some(&mut #closure))
        }
        None => quote!(::core::option::Option::None),
    };
    let self_type = if config.has_self {
        quote!(::core::option::Option::Some(
            ::core::any::type_name::<Self>()
        ))
    } else {
        quote!(::core::option::Option::None)
    };
    let rt_ret = quote_spanned!(ret_loc=> ::cache_runtime::__private);
    // At the return type, like the mode: a type error in these calls is one about the
    // return type.
    let fetch = Ident::new("__cache_fetch", ret_loc);
    let hit = Ident::new("__cache_hit", ret_loc);
    let finish = Ident::new("__cache_finish", ret_loc);
    let result = Ident::new("__cache_result", ret_loc);
    let verdict = Ident::new("__cache_verdict", ret_loc);
    // The function's own state machine drives the call: `find` and `verdict` are generic
    // over the return type only, everything else in the runtime is not generic at all, so an
    // annotated function adds little code of its own.
    let run = |future: TokenStream| {
        quote_spanned! {ret_loc=>
            let mut #fetch = #rt_ret::Fetch::new(#rt_ret::Call {
                cache: #handle,
                site: &#site,
                self_type: #self_type,
                key: #key,
            });
            let #finish = match #fetch.find(&#mode, #typed).await {
                ::core::result::Result::Ok(#hit) => return #hit,
                ::core::result::Result::Err(#finish) => #finish,
            };
            let #result = #future.await;
            let #verdict = #finish.verdict(&mut #fetch, &#mode, #typed, &#result, #unless);
            #fetch.complete(#verdict).await;
            #result
        }
    };

    let body = match &config.shape {
        Shape::Native => {
            // The user's braces become the async block's: the body is not a block in tail
            // position of another, which `unused_braces` would flag when it is one line.
            let stmts = &body.stmts;
            let mut block = Group::new(
                Delimiter::Brace,
                quote! {
                    if let ::core::option::Option::Some(#fake_ret) = ::core::option::Option::None::<#ret> {
                        #[allow(unreachable_code)]
                        return #fake_ret;
                    }
                    #stmts
                },
            );
            block.set_span(body.brace.span.join());
            run(quote!(async move #block))
        }
        Shape::AsyncTrait { pin_fn, future } => {
            let inner = run(future.clone());
            quote!(#pin_fn(async move { #inner }))
        }
    };

    quote! {
        #(#attrs)*
        #vis #sig {
            #(#inner_attrs)*
            #site_static
            #handle_let
            #key_let
            #mode_let
            #typed_let
            #cache_none_check
            #body
        }
    }
}

fn template_pushes(t: &Template, w: &Ident, span: Span, config: &Config) -> TokenStream {
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

fn default_key_pushes(w: &Ident, fn_name: &str, sig: &Signature, config: &Config) -> TokenStream {
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
