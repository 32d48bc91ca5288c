//! `#[write_behind]`: the call writes the cache and queues its arguments; the body runs later,
//! in a worker, driven by the runtime's `WriteBehind`.
//!
//! Unlike the other attributes, the body does not stay in the function: a worker in another
//! process (or this one, later) must run it from the queued arguments alone, so it is moved into
//! a nested `async fn` with the same parameters and return type, which both the call (when it
//! falls back to write-through) and the worker's decoder call. Hence the signature rules
//! checked in [`check`]: no `self`, no generics, owned arguments that serialize, and a return
//! type with nothing to return but success (`()` or `Result<(), E>`).

use proc_macro2::{Delimiter, Group, Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::visit_mut::VisitMut;
use syn::{FnArg, GenericArgument, Ident, Pat, PathArguments, ReturnType, Type};

use super::shared::{idents, mentions_name, spanned_ref};
use super::{Config, Gen, hidden};
use crate::args::Errors;
use crate::item::{ItemFn, Shape};

/// serde implements `Serialize` and `Deserialize` for tuples of up to 16 elements, and the
/// arguments are queued as one tuple.
const MAX_ARGS: usize = 16;

/// What the function returns when its write is queued.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Returns {
    /// `()` (or nothing written).
    Unit,
    /// `Result<(), E>`, under any path whose last segment is `Result` (`io::Result<()>`).
    Result,
}

/// `()` or `Result<(), E>`; `None` for any other type.
fn returns(ty: &Type) -> Option<Returns> {
    match ty {
        Type::Paren(p) => returns(&p.elem),
        Type::Group(g) => returns(&g.elem),
        Type::Tuple(t) if t.elems.is_empty() => Some(Returns::Unit),
        Type::Path(p) if p.qself.is_none() => {
            let last = p.path.segments.last()?;
            if last.ident != "Result" {
                return None;
            }
            let PathArguments::AngleBracketed(args) = &last.arguments else {
                return None;
            };
            match args.args.first()? {
                GenericArgument::Type(first) if returns(first) == Some(Returns::Unit) => {
                    Some(Returns::Result)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The owned type to take instead of the reference `r`, for the message.
fn owned_hint(r: &syn::TypeReference) -> String {
    let elem = &r.elem;
    match &**elem {
        Type::Path(p) if p.path.is_ident("str") => "`String` instead of `&str`".to_owned(),
        Type::Path(p) if p.path.is_ident("Path") => "`PathBuf` instead of `&Path`".to_owned(),
        Type::Slice(s) => format!("`Vec<{0}>` instead of `&[{0}]`", super::type_text(&s.elem)),
        other => format!("`{}` instead of a reference", super::type_text(other)),
    }
}

/// Whether `ty` contains `impl Trait`.
fn has_impl_trait(ty: &Type) -> bool {
    fn walk(tokens: TokenStream) -> bool {
        tokens.into_iter().any(|tt| match tt {
            proc_macro2::TokenTree::Ident(i) => i == "impl",
            proc_macro2::TokenTree::Group(g) => walk(g.stream()),
            _ => false,
        })
    }
    walk(ty.to_token_stream())
}

/// The signature rules of `#[write_behind]`, each reported at the token it is about.
pub(super) fn check(func: &ItemFn, config: &Config, errors: &mut Errors) {
    let sig = &func.sig;
    if let Shape::AsyncTrait { .. } = config.shape {
        errors.error(
            sig.ident.span(),
            "`#[write_behind]` cannot be used in an `#[async_trait]` impl: a worker runs the body from the queued arguments alone, as a free function; write a free `async fn`, and call it from the method",
        );
        return;
    }
    if let Some(receiver) = sig.receiver() {
        errors.push(syn::Error::new_spanned(
            receiver,
            "`#[write_behind]` cannot be applied to a method with `self`: the body runs later, in a worker, from the queued arguments alone, and there is no `self` there; make it a free function (or one without `self`) that takes what the body needs as arguments",
        ));
    }
    if !sig.generics.params.is_empty() {
        errors.push(syn::Error::new_spanned(
            &sig.generics,
            "`#[write_behind]` cannot be applied to a generic function: a worker decodes the queued arguments into the parameters' types, which must be concrete; write the types",
        ));
    }
    let mut typed = 0;
    for arg in &sig.inputs {
        let FnArg::Typed(pt) = arg else { continue };
        typed += 1;
        if typed == MAX_ARGS + 1 {
            errors.error(
                pt.span(),
                format_args!(
                    "`#[write_behind]` takes at most {MAX_ARGS} arguments (they are queued as one tuple); group some of them in a struct"
                ),
            );
        }
        match &*pt.ty {
            Type::Reference(r) => errors.push(syn::Error::new_spanned(
                &pt.ty,
                format_args!(
                    "`#[write_behind]` queues its arguments for a worker that runs the body later, so each argument must be owned: take {}",
                    owned_hint(r)
                ),
            )),
            ty if has_impl_trait(ty) => errors.push(syn::Error::new_spanned(
                ty,
                "`#[write_behind]` cannot take `impl Trait` arguments: a worker decodes the queued arguments into the parameters' types, which must be concrete; write the type",
            )),
            _ => {}
        }
    }
    if returns(&config.ret).is_none() {
        let msg = "`#[write_behind]` returns as soon as the write is queued, before the body runs, so it has no result to give: return `()` or `Result<(), E>` (an `Err` of the body is retried by the worker, or returned when the call falls back to running it)";
        match &sig.output {
            ReturnType::Type(_, ty) => errors.push(syn::Error::new_spanned(ty, msg)),
            ReturnType::Default => errors.error(sig.ident.span(), msg),
        }
    }
}

/// A pattern with its bindings' `mut` and `ref` removed: how the call binds a pattern
/// parameter by reference, for `value` and `condition` (the body binds it as written).
struct PlainBindings;

impl VisitMut for PlainBindings {
    fn visit_pat_ident_mut(&mut self, pat: &mut syn::PatIdent) {
        pat.by_ref = None;
        pat.mutability = None;
        syn::visit_mut::visit_pat_ident_mut(self, pat);
    }
}

/// A parameter: how the call names the whole argument, and how it was written.
struct Arg<'a> {
    /// The name of the whole argument in the rewritten function: the parameter's own name
    /// (without `mut`/`ref`), or a hidden one for a pattern.
    name: Ident,
    /// `Some(pattern)` for a pattern parameter (`(a, b): (u64, u64)`, `_: u64`).
    pattern: Option<&'a Pat>,
    pt: &'a syn::PatType,
}

// Input:
//     #[write_behind(key = "user:{id}", ttl = "1h", value = user, queue = "users")]
//     pub async fn save_user(id: u64, mut user: User) -> Result<(), DbError> { stmts }
//
// Output (paths shortened as in `cached.rs`; the `__cache_*` names are hidden):
//     pub async fn save_user(id: u64, user: User) -> Result<(), DbError> {
//         async fn __cache_body(
//             #[allow(unused_variables)] id: u64,
//             #[allow(unused_variables)] mut user: User,
//         ) -> Result<(), DbError> { stmts } // the body's own braces
//         static __CACHE_SITE: Site = Site::new(module_path!(), "save_user").ttl_ms(3600000);
//         fn __cache_apply(__cache_args: &[u8]) -> Result<Applying, ArgsError> {
//             let (__cache_a0, __cache_a1): (u64, User) = wb_decode(__cache_args)?;
//             Ok(Applying::new(async move {
//                 wb_outcome!(__cache_body(__cache_a0, __cache_a1).await)
//             }))
//         }
//         static __CACHE_WB: WbFunction =
//             WbFunction::new(&__CACHE_SITE, "users", __cache_apply).coalesce(true);
//         inventory::submit! { WbHandler(&__CACHE_WB) }
//         require_wb_arg(PhantomData::<u64>);   // one per argument, at its type
//         require_wb_arg(PhantomData::<User>);
//         let __cache_handle: &Cache = default_cache();
//         let __cache_key: CallKey = { /* as #[cache_put] */ };
//         let mut __cache_wb = WriteBehind::new(Call {
//             cache: __cache_handle, site: &__CACHE_SITE, self_type: None, key: __cache_key,
//         }, &__CACHE_WB);
//         __cache_wb.begin().await;
//         if __cache_wb.wants_value() { __cache_wb.encode(&(user)); }
//         __cache_wb.args(&(&id, &user,));
//         match __cache_wb.enqueue().await {
//             None => Ok(()),                  // `()` for a unit function
//             Some(__cache_inline) => __cache_inline.run(__cache_body(id, user)).await,
//         }
//     }
//
// The outer signature binds every parameter by its plain name: `mut`/`ref` are the body's
// (`mut user` there), and a pattern parameter (`(a, b): (u64, u64)`, `_: u64`) is named
// `__cache_arg<i>` (hidden) and, if `value` or `condition` names one of its bindings, bound
// by reference first (`let (a, b) = &__cache_arg1;`). With `tags`, `let __cache_tags: Tags =
// ..;` follows the key and `__cache_wb.tags(__cache_tags);` follows `WriteBehind::new`; with
// `condition`, the key is `if cond { .. } else { CallKey::Condition }` (the call runs the body
// inline). The function's outer attributes (doc comments included) and visibility stay on
// the outer function, its inner attributes at the start of its body.
pub(super) fn generate(g: &Gen<'_>) -> TokenStream {
    let (args, func, rt, rt_ret) = (g.args, g.func, &g.rt, g.rt_ret());
    let ItemFn {
        attrs,
        vis,
        sig,
        body,
    } = func;
    let returns = returns(&g.config.ret).unwrap_or(Returns::Unit);

    let params: Vec<Arg<'_>> = sig
        .inputs
        .iter()
        .filter_map(|arg| match arg {
            FnArg::Typed(pt) => Some(pt),
            FnArg::Receiver(_) => None,
        })
        .enumerate()
        .map(|(i, pt)| match &*pt.pat {
            Pat::Ident(pi) if pi.subpat.is_none() => Arg {
                name: pi.ident.clone(),
                pattern: None,
                pt,
            },
            pat => Arg {
                name: hidden(&format!("__cache_arg{i}")),
                pattern: Some(pat),
                pt,
            },
        })
        .collect();
    let names: Vec<&Ident> = params.iter().map(|p| &p.name).collect();
    let types: Vec<&Type> = params.iter().map(|p| &*p.pt.ty).collect();

    // The outer function: every parameter bound by its plain name.
    let mut outer_sig = sig.clone();
    for (input, param) in outer_sig
        .inputs
        .iter_mut()
        .filter_map(|arg| match arg {
            FnArg::Typed(pt) => Some(pt),
            FnArg::Receiver(_) => None,
        })
        .zip(&params)
    {
        let name = &param.name;
        *input.pat = syn::parse_quote!(#name);
    }

    // The body, as a nested function of the same parameters. Each is allowed to be unused
    // there: an argument only the key or the value names is used by the call.
    let body_fn = hidden("__cache_body");
    let body_params = params.iter().map(|p| {
        let (pat_attrs, pat, ty) = (&p.pt.attrs, &p.pt.pat, &p.pt.ty);
        quote!(#[allow(unused_variables)] #(#pat_attrs)* #pat: #ty)
    });
    let output = &sig.output;
    let mut block = Group::new(Delimiter::Brace, body.stmts.clone());
    block.set_span(body.brace.span.join());
    let body_item = quote! {
        async fn #body_fn(#(#body_params),*) #output #block
    };

    // The worker's entry point: decode the queued arguments, run the body.
    let apply = hidden("__cache_apply");
    let bytes = hidden("__cache_args");
    let decoded: Vec<Ident> = (0..params.len())
        .map(|i| hidden(&format!("__cache_a{i}")))
        .collect();
    // Spanned at the parameter list: an argument type that does not deserialize is reported
    // at the arguments (and first at its own type, by `require_wb_arg` below).
    let inputs_span = sig.paren_token.span.join();
    let rt_inputs = quote_spanned!(inputs_span=> ::cache_runtime::__private);
    let decode = if params.is_empty() {
        quote_spanned!(inputs_span=> #rt_inputs::wb_decode::<()>(#bytes)?;)
    } else {
        quote_spanned!(inputs_span=> let (#(#decoded,)*): (#(#types,)*) = #rt_inputs::wb_decode(#bytes)?;)
    };
    // Spanned at `async`: a body whose future is not `Send` (a worker runs it on a task) is
    // reported at the function's `async`, with the `.await` that holds the culprit.
    let async_span = sig.asyncness.map_or_else(|| sig.fn_token.span, |a| a.span);
    let rt_async = quote_spanned!(async_span=> ::cache_runtime::__private);
    let applying = quote_spanned! {async_span=>
        #rt_async::Applying::new(async move {
            #rt::wb_outcome!(#body_fn(#(#decoded),*).await)
        })
    };
    let apply_item = quote! {
        fn #apply(
            #bytes: &[u8],
        ) -> ::core::result::Result<#rt::Applying, #rt::ArgsError> {
            #decode
            ::core::result::Result::Ok(#applying)
        }
    };

    let site = &g.site;
    let wb_static = hidden("__CACHE_WB");
    let queue = args.queue.get();
    let coalesce = args.coalesce.get().copied().unwrap_or(true);
    let statics = quote! {
        static #wb_static: #rt::WbFunction =
            #rt::WbFunction::new(&#site, #queue, #apply).coalesce(#coalesce);
        #rt::inventory::submit! { #rt::WbHandler(&#wb_static) }
    };

    // Each argument is queued and decoded by a worker: checked at its type.
    let arg_checks = types.iter().map(|ty| {
        let tokens = ty.to_token_stream();
        let mut spans = tokens.clone().into_iter().map(|t| t.span());
        let first = spans.next().unwrap_or_else(Span::call_site);
        let last = spans.last().unwrap_or(first);
        let mut arg = Group::new(
            Delimiter::Parenthesis,
            quote_spanned!(last=> ::core::marker::PhantomData::<#ty>),
        );
        arg.set_span(last);
        quote_spanned!(first=> ::cache_runtime::__private::require_wb_arg #arg;)
    });

    // A pattern parameter is bound (by reference) where `value` or `condition` may name it.
    let options: Vec<TokenStream> = [args.value.get(), args.condition.get()]
        .into_iter()
        .flatten()
        .map(ToTokens::to_token_stream)
        .collect();
    let pattern_lets = params.iter().filter_map(|p| {
        let pat = p.pattern?;
        let named = idents(pat.to_token_stream())
            .iter()
            .any(|n| options.iter().any(|o| mentions_name(o.clone(), n)));
        if !named {
            return None;
        }
        let mut pat = pat.clone();
        PlainBindings.visit_pat_mut(&mut pat);
        let name = &p.name;
        Some(quote! {
            #[allow(unused_variables)]
            let #pat = &#name;
        })
    });

    let (key, key_let) = g.key_let();
    let call = g.call(&key);
    let wb = g.at_ret("__cache_wb");
    let (tags_let, tags_call) = match g.tags_let() {
        Some((tags, tags_let)) => (tags_let, quote!(#wb.tags(#tags);)),
        None => Default::default(),
    };
    let encode = args.value.get().map(|expr| {
        // Spanned at the expression: a value that is not `Serialize` is reported there.
        let value = spanned_ref(expr);
        quote_spanned!(expr.span()=> #wb.encode(#value);)
    });
    let queue_args = quote_spanned!(inputs_span=> #wb.args(&(#(&#names,)*)););
    let inline = g.at_ret("__cache_inline");
    let accepted = match returns {
        Returns::Unit => quote!(()),
        Returns::Result => quote!(::core::result::Result::Ok(())),
    };

    let inner_attrs = &body.inner_attrs;
    let handle_let = g.handle_let();
    let site_static = g.site_static();
    quote! {
        #(#attrs)*
        #vis #outer_sig {
            #(#inner_attrs)*
            #body_item
            #site_static
            #apply_item
            #statics
            #(#arg_checks)*
            #handle_let
            #(#pattern_lets)*
            #key_let
            #tags_let
            let mut #wb = #rt_ret::WriteBehind::new(#call, &#wb_static);
            #tags_call
            #wb.begin().await;
            if #wb.wants_value() {
                #encode
            }
            #queue_args
            match #wb.enqueue().await {
                ::core::option::Option::None => #accepted,
                ::core::option::Option::Some(#inline) => #inline.run(#body_fn(#(#names),*)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(text: &str) -> Type {
        syn::parse_str(text).unwrap()
    }

    #[test]
    fn return_types() {
        assert_eq!(returns(&ty("()")), Some(Returns::Unit));
        assert_eq!(returns(&ty("Result<(), E>")), Some(Returns::Result));
        assert_eq!(returns(&ty("io::Result<()>")), Some(Returns::Result));
        assert_eq!(returns(&ty("::anyhow::Result<()>")), Some(Returns::Result));
        assert_eq!(returns(&ty("Result<u64, E>")), None);
        assert_eq!(returns(&ty("Option<()>")), None);
        assert_eq!(returns(&ty("u64")), None);
        assert_eq!(returns(&ty("Result")), None);
    }

    /// The expansion of `attr` on `item`, as text; panics if it is not a valid item.
    fn expand(attr: &str, item: &str) -> String {
        let out = super::super::expand(
            crate::args::Kind::WriteBehind,
            attr.parse().unwrap(),
            item.parse().unwrap(),
        );
        let text = out.to_string();
        assert!(!text.contains("compile_error"), "{text}");
        syn::parse2::<syn::ItemFn>(out).unwrap_or_else(|e| panic!("{e}: {text}"));
        text
    }

    #[test]
    fn shape() {
        let text = expand(
            r#"key = "user:{id}", value = user, queue = "users", coalesce = false"#,
            "/// Docs.\npub async fn save(id: u64, mut user: User, (a, b): (u8, u8)) -> Result<(), E> { user.n += a + b; Ok(()) }",
        );
        assert!(
            text.contains("pub async fn save (id : u64 , user : User , __cache_arg2 : (u8 , u8))"),
            "{text}"
        );
        assert!(text.contains("async fn __cache_body"), "{text}");
        assert!(text.contains("mut user : User"), "{text}");
        assert!(text.contains(". coalesce (false)"), "{text}");
        assert!(text.contains("doc"), "{text}");
        // `(a, b)` is not named by `value`: not bound in the call.
        assert!(!text.contains("let (a , b)"), "{text}");
        let text = expand(
            r#"key = "k", value = a, queue = "q""#,
            "async fn unit((a, mut b): (u8, u8)) { b += a; }",
        );
        assert!(text.contains("let (a , b) = & __cache_arg0"), "{text}");
        // No parameters: `()` is queued, and decoded.
        let text = expand(r#"key = "k", value = 1, queue = "q""#, "async fn ping() {}");
        assert!(text.contains("wb_decode :: < () >"), "{text}");
        assert!(text.contains("args (& ())"), "{text}");
    }
}
