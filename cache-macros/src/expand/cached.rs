//! `#[cached]`: cache-aside, driven by the runtime's `Fetch`.

use proc_macro2::{Ident, Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

use super::{Gen, Passing, hidden};

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
//         // In the call's `tracing` span (`Fetch::traced`: `Instrumented`).
//         let __cache_result = __cache_fetch.traced(async move { // the body's own braces
//             if let Some(__cache_ret) = None::<Result<User, E>> {
//                 return __cache_ret;
//             }
//             stmts
//         })
//         .await;
//         let __cache_verdict = __cache_finish.verdict(
//             &mut __cache_fetch, &__cache_mode, __cache_typed, &__cache_result, None,
//         );
//         __cache_fetch.complete(__cache_verdict).await;
//         __cache_result
//     }
//
// With `tags = ["org:{org}"]`, `let __cache_tags: Tags = { let mut __cache_tags =
// Tags::new(); { let mut __cache_w = key_writer(..); ..; __cache_tags.push(__cache_w); }
// __cache_tags };` follows the key, and `__cache_fetch.tags(__cache_tags);` follows
// `Fetch::new` (an untagged function has neither). With `local`, `require_local(&__cache_mode);`
// follows the mode (at the option's span), and `if let Some(__cache_hit) =
// __cache_call.local(Some(&__cache_tags) /* or None */, &__cache_mode, __cache_typed) {
// return __cache_hit; }` precedes `Fetch::new(__cache_call)`. With `stale`, the body runs as
// `match catch_unwind(async move { .. }).await { Ok(r) => r, Err(p) => { if let Some(h) =
// __cache_finish.panicked(..).await { return h; } resume_unwind(p) } }`, and `if let Some(h) =
// __cache_finish.stale(&mut __cache_fetch, ..) { return h; }` follows `complete`. With
// `refresh`, `let __cache_refresher = || -> Refresh { .. };` (see `refresher_let`: copies of
// the arguments the body uses, and a copy of the body on them) comes first, and the calls are
// `find_refreshing(&__cache_mode, __cache_typed, &__cache_refresher)` and
// `local_refreshing(.., &__cache_refresher)`: a hit that is due calls it and spawns what it
// makes; other hits do not call it.
// With `condition`, the key is `if cond { .. } else { CallKey::Condition }`; with `unless`,
// the last argument of `verdict` is `Some(&mut |result: &R| -> bool { expr })`; `cache_none`
// adds `require_cache_none(PhantomData::<R>);` first; in a method, `self_type` is
// `Some(type_name::<Self>())`. After `#[async_trait]`, the body `{ Box::pin(async move {
// .. }) }` becomes `{ let ..; Box::pin(async move { let mut __cache_fetch = ..; ..
// async move { .. }.await; .. }) }`, the inner `async move { .. }` being `#[async_trait]`'s,
// unchanged. The function's own state machine drives the call; the runtime's `find` and
// `verdict` are generic over the return type only, so functions returning the same type
// share them.
pub(super) fn generate(g: &Gen<'_>) -> TokenStream {
    let (args, ret, rt_ret) = (g.args, &g.config.ret, g.rt_ret());
    let (key, key_let) = g.key_let();
    let tags = g.tags_let();
    let (mode, mode_let) = g.mode_let();
    // In-process backends keep the decoded value when its type is `Clone + Send + Sync`, so
    // that a hit clones it instead of decoding JSON.
    let typed = hidden("__cache_typed");
    let rt = &g.rt;
    let typed_let = quote! {
        #[allow(clippy::needless_borrow)]
        let #typed = {
            #[allow(unused_imports)]
            use #rt::{ViaTyped as _, ViaUntyped as _};
            (&&#mode).__cache_typed()
        };
    };
    let cache_none_check = g.cache_none_check();
    // `local`: the stored type must be cloneable (each in-process hit gets a clone), checked
    // at the option; the in-process tier is probed before anything else.
    let call_var = g.at_ret("__cache_call");
    // `refresh`: the closure that makes a background refresh, called by a hit that is due.
    let refresher = hidden("__cache_refresher");
    let (local_check, local_probe) = match args.local_ms.span() {
        Some(span) => {
            let rt_local = quote_spanned!(span=> ::cache_runtime::__private);
            // The same hygienic name, reported at the option.
            let mode_at = Ident::new(&mode.to_string(), mode.span().located_at(span));
            let hit = g.at_ret("__cache_hit");
            let tags_arg = match &tags {
                Some((tags, _)) => quote!(::core::option::Option::Some(&#tags)),
                None => quote!(::core::option::Option::None),
            };
            let probe = match args.refresh.get() {
                Some(_) => quote!(local_refreshing(#tags_arg, &#mode, #typed, &#refresher)),
                None => quote!(local(#tags_arg, &#mode, #typed)),
            };
            (
                quote_spanned!(span=> #rt_local::require_local(&#mode_at);),
                quote! {
                    if let ::core::option::Option::Some(#hit) = #call_var.#probe {
                        return #hit;
                    }
                },
            )
        }
        None => Default::default(),
    };
    let unless_closure = args.unless.get().map(|expr| {
        let result = Ident::new("result", Span::call_site());
        // A non-`bool` expression is "expected `bool` because of" the `unless` option.
        let unless_span = args.unless.span().unwrap_or_else(|| expr.span());
        let bool_ty = quote_spanned!(unless_span=> bool);
        quote_spanned!(expr.span()=> |#result: &#ret| -> #bool_ty { #expr })
    });
    let unless = match &unless_closure {
        Some(closure) => quote!(::core::option::Option::Some(&mut #closure)),
        None => quote!(::core::option::Option::None),
    };
    let call = g.call(&key);
    // At the return type, like the mode: a type error in these calls is one about the
    // return type.
    let fetch = g.at_ret("__cache_fetch");
    let hit = g.at_ret("__cache_hit");
    let finish = g.at_ret("__cache_finish");
    let result = g.at_ret("__cache_result");
    let verdict = g.at_ret("__cache_verdict");
    let (tags_let, tags_call) = match &tags {
        Some((tags, tags_let)) => (tags_let.clone(), quote!(#fetch.tags(#tags);)),
        None => Default::default(),
    };
    // `stale`: a failed load (an error, or a panic, caught) returns the value kept past its
    // TTL if there is one.
    let stale_on = args.stale_ms.get().is_some();
    let stale_return = if stale_on {
        let hit = g.at_ret("__cache_hit");
        quote! {
            if let ::core::option::Option::Some(#hit) = #finish.stale(&mut #fetch, &#mode, #typed) {
                return #hit;
            }
        }
    } else {
        TokenStream::new()
    };
    // The function's own state machine drives the call: `find` and `verdict` are generic
    // over the return type only, everything else in the runtime is not generic at all, so an
    // annotated function adds little code of its own.
    let body = g.body(|future| {
        let run_body = if stale_on {
            let (hit, panic) = (g.at_ret("__cache_hit"), g.at_ret("__cache_panic"));
            quote_spanned! {g.ret_loc=>
                if #fetch.skip_load().await {
                    if let ::core::option::Option::Some(#hit) =
                        #finish.stale(&mut #fetch, &#mode, #typed)
                    {
                        return #hit;
                    }
                }
                let #result = match #rt_ret::catch_unwind(#fetch.traced(#future)).await {
                    ::core::result::Result::Ok(#result) => #result,
                    ::core::result::Result::Err(#panic) => {
                        if let ::core::option::Option::Some(#hit) =
                            #finish.panicked(&mut #fetch, &#mode, #typed).await
                        {
                            return #hit;
                        }
                        ::std::panic::resume_unwind(#panic)
                    }
                };
            }
        } else {
            quote_spanned! {g.ret_loc=> let #result = #fetch.traced(#future).await; }
        };
        let (refresher_let, find) = match args.refresh.span() {
            Some(span) => (
                refresher_let(
                    g,
                    span,
                    &refresher,
                    &future,
                    &mode,
                    &typed,
                    unless_closure.as_ref(),
                ),
                quote_spanned!(g.ret_loc=> find_refreshing(&#mode, #typed, &#refresher)),
            ),
            None => (
                TokenStream::new(),
                quote_spanned!(g.ret_loc=> find(&#mode, #typed)),
            ),
        };
        quote_spanned! {g.ret_loc=>
            #refresher_let
            let #call_var = #call;
            #local_probe
            let mut #fetch = #rt_ret::Fetch::new(#call_var);
            #tags_call
            let #finish = match #fetch.#find.await {
                ::core::result::Result::Ok(#hit) => return #hit,
                ::core::result::Result::Err(#finish) => #finish,
            };
            #run_body
            let #verdict = #finish.verdict(&mut #fetch, &#mode, #typed, &#result, #unless);
            #fetch.complete(#verdict).await;
            #stale_return
            #result
        }
    });

    quote! {
        #key_let
        #tags_let
        #mode_let
        #typed_let
        #cache_none_check
        #local_check
        #body
    }
}

/// `refresh`: `let __cache_refresher = || -> Refresh { .. };`, the closure a hit that is due
/// calls to make the background refresh (so that other hits pay nothing for it). It copies
/// each argument the body uses (`own_arg(&id)` for one passed by value, `own_ref(name)` for one
/// passed by reference: `&str` becomes a `String`, `&[T]` a `Vec<T>`, `&T` a `T`), and `self`
/// (`own_self`), each checked at its parameter, then wraps an `async move` block that binds
/// the names to the copies (by reference where the argument was a reference), runs a copy of
/// the body (`self` in it replaced by the copy, as `#[async_trait]` does) and evaluates
/// `unless`:
///
/// ```text
/// let __cache_refresher = || -> Refresh {
///     let __cache_own_0 = own_ref(name);
///     let __cache_own_1 = own_arg(&id);
///     refresh(__cache_handle, &__cache_mode, __cache_typed, async move {
///         let name = view(&__cache_own_0); let _ = &name;
///         let id = __cache_own_1; let _ = &id;
///         let __cache_result = async move { body }.await;
///         let __cache_rejected: bool = refresh_rejected(&__cache_mode, &__cache_result,
///             |result: &R| -> bool { unless });  // or `false`
///         (__cache_result, __cache_rejected)
///     })
/// };
/// ```
fn refresher_let(
    g: &Gen<'_>,
    span: Span,
    refresher: &Ident,
    future: &TokenStream,
    mode: &Ident,
    typed: &Ident,
    unless: Option<&TokenStream>,
) -> TokenStream {
    let (config, handle, rt) = (g.config, &g.handle, &g.rt);
    let mut owns = TokenStream::new();
    let mut rebinds = TokenStream::new();
    for (i, p) in config.params.iter().enumerate() {
        // A pattern or `&mut` argument the body uses was rejected (`refresh_checks`).
        let (true, Some(ident), Some(binding)) = (p.used, &p.ident, &p.binding) else {
            continue;
        };
        let own = hidden(&format!("__cache_own_{i}"));
        // At the parameter: an argument that cannot be copied is reported there. Located
        // there, but from the expansion: rustc suggests no edits of the signature.
        let at = Span::call_site().located_at(p.span);
        let arg = Ident::new(
            &ident.to_string(),
            Span::call_site().located_at(ident.span()),
        );
        let rt_p = quote_spanned!(at=> ::cache_runtime::__private);
        match p.passing {
            Passing::Ref => {
                owns.extend(quote_spanned!(at=> let #own = #rt_p::own_ref(#arg);));
                rebinds.extend(quote!(let #binding = #rt::view(&#own); let _ = &#ident;));
            }
            _ => {
                owns.extend(quote_spanned!(at=> let #own = #rt_p::own_arg(&#arg);));
                rebinds.extend(quote!(let #binding = #own; let _ = &#ident;));
            }
        }
    }
    let this = hidden("__cache_self");
    let body = match config.receiver.as_ref().filter(|r| r.used) {
        Some(r) => {
            let (own, mutability) = (hidden("__cache_own_self"), &r.mutability);
            let at = Span::call_site().located_at(r.span);
            let self_token = Ident::new("self", Span::call_site().located_at(r.self_span));
            let rt_r = quote_spanned!(at=> ::cache_runtime::__private);
            match r.passing {
                Passing::Ref => {
                    owns.extend(quote_spanned!(at=> let #own = #rt_r::own_self(#self_token);));
                    rebinds.extend(quote!(let #this = &#own;));
                }
                _ => {
                    owns.extend(quote_spanned!(at=> let #own = #rt_r::own_self(&#self_token);));
                    rebinds.extend(quote!(let #mutability #this = #own;));
                }
            }
            super::shared::replace_self(future.clone(), &this)
        }
        None => future.clone(),
    };
    let (result, rejected) = (hidden("__cache_result"), hidden("__cache_rejected"));
    let rejected_expr = match unless {
        Some(closure) => quote!(#rt::refresh_rejected(&#mode, &#result, #closure)),
        None => quote!(false),
    };
    // At the option: a body whose future is not `Send`, or a return type that is not
    // `Send + 'static`, is reported there.
    let rt_opt = quote_spanned!(span=> ::cache_runtime::__private);
    let refresh_call = quote_spanned! {span=>
        #rt_opt::refresh(#handle, &#mode, #typed, async move {
            #rebinds
            let #result = #body.await;
            let #rejected: bool = #rejected_expr;
            (#result, #rejected)
        })
    };
    quote! {
        let #refresher = || -> #rt::Refresh {
            #owns
            #refresh_call
        };
    }
}
