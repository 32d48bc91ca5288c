//! `#[cache_evict]`: event-based invalidation, driven by the runtime's `Evict`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};

use super::{Gen, hidden};

// Input:
//     #[cache_evict(keys = ["user:{id}", "user_list"], tags = ["org:{org}"], before)]
//     pub async fn delete_user(id: u64, org: u64) -> Result<(), E> { stmts }
//
// Output (paths shortened as in `cached.rs`; the `__cache_*` names are hidden):
//     pub async fn delete_user(id: u64, org: u64) -> Result<(), E> {
//         static __CACHE_SITE: Site = Site::new(module_path!(), "delete_user");
//         let __cache_handle: &Cache = default_cache();
//         let mut __cache_evict = Evict::new(EvictCall {
//             cache: __cache_handle, site: &__CACHE_SITE, self_type: None, active: true,
//         });
//         __cache_evict.key({ let mut __cache_w = key_writer(__cache_handle); ..; __cache_w.finish(None) });
//         __cache_evict.key({ /* "user_list" */ });
//         let __cache_tags: Tags = { /* one key writer per tag, pushed */ };
//         __cache_evict.tags(__cache_tags);
//         __cache_evict.start();                         // inside the future: armed
//         __cache_evict.before().await;                  // only with `before`
//         let __cache_result = async move { /* the fake return, as #[cached] */ stmts }.await;
//         __cache_evict.succeeded(<Ok, Some or any value>);
//         __cache_evict.finish().await;
//         __cache_result
//     }
//
// With `condition = <expr>`, `let __cache_active: bool = <expr>;` comes first, is the
// `active` field, and the keys and tags are rendered only `if __cache_active { .. }`. After
// `#[async_trait]`, everything up to `before` stays outside `Box::pin(async move { .. })`,
// which takes `__cache_evict` in, as `#[cached]` does with its key.
pub(super) fn generate(g: &Gen<'_>) -> TokenStream {
    let rt_ret = g.rt_ret();
    let (site, handle) = (&g.site, &g.handle);
    let self_type = g.self_type();
    let evict = g.at_ret("__cache_evict");
    let result = g.at_ret("__cache_result");

    let active = hidden("__cache_active");
    let (active_let, active_expr) = match g.condition() {
        Some(cond) => (quote!(let #active: bool = #cond;), quote!(#active)),
        None => (TokenStream::new(), quote!(true)),
    };
    let keys = g.config.keys.iter().map(|k| {
        let key = g.key(Some(k));
        quote!(#evict.key(#key);)
    });
    let tags = g.tags_let().map(|(tags, tags_let)| {
        quote! {
            #tags_let
            #evict.tags(#tags);
        }
    });
    let mut targets = quote!(#(#keys)* #tags);
    if g.args.condition.get().is_some() {
        targets = quote!(if #active { #targets });
    }
    // Armed inside the future: a future dropped before it ran evicts nothing.
    let mut before = quote_spanned!(g.ret_loc=> #evict.start(););
    if g.args.before.get().is_some() {
        before.extend(quote_spanned!(g.ret_loc=> #evict.before().await;));
    }
    let succeeded = g.success(&result);
    let body = g.body(|future| {
        quote_spanned! {g.ret_loc=>
            #before
            let #result = #future.await;
            #evict.succeeded(#succeeded);
            #evict.finish().await;
            #result
        }
    });

    quote! {
        #active_let
        let mut #evict = #rt_ret::Evict::new(#rt_ret::EvictCall {
            cache: #handle,
            site: &#site,
            self_type: #self_type,
            active: #active_expr,
        });
        #targets
        #body
    }
}
