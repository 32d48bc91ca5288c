//! `#[cache_put]`: write-through, driven by the runtime's `Put`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

use super::{Gen, hidden};

// Input:
//     #[cache_put(key = "user:{id}", ttl = "1h", tags = ["org:{org}"])]
//     pub async fn rename_user(id: u64, org: u64, name: &str) -> Result<User, E> { stmts }
//
// Output (paths shortened as in `cached.rs`; the `__cache_*` names are hidden):
//     pub async fn rename_user(id: u64, org: u64, name: &str) -> Result<User, E> {
//         static __CACHE_SITE: Site = Site::new(module_path!(), "rename_user").ttl_ms(3600000);
//         let __cache_handle: &Cache = default_cache();
//         let __cache_key: CallKey = { /* as #[cached] */ };
//         let __cache_tags: Tags = { /* one key writer per tag, pushed */ };
//         let __cache_mode = (&&&&Tag::<Result<User, E>>::new()).__cache_mode();
//         let mut __cache_put = Put::new(Call {
//             cache: __cache_handle, site: &__CACHE_SITE, self_type: None, key: __cache_key,
//         });
//         __cache_put.tags(__cache_tags);
//         __cache_put.begin().await;
//         let __cache_result = async move { /* the fake return, as #[cached] */ stmts }.await;
//         __cache_put.encode_result(&__cache_mode, &__cache_result);
//         __cache_put.finish().await;
//         __cache_result
//     }
//
// With `value = <expr>`, the mode is not needed: `__cache_put.succeeded(<Ok, Some or any
// value>)` follows the body, and the value is encoded with `__cache_put.encode(&(<expr>))`,
// before the body if `<expr>` does not name `result`, after it (only if the put still wants
// it, with `result: &R` bound) if it does. `unless` adds `__cache_put.unless({ let result =
// &__cache_result; <expr> })` before the encoding. The `#[async_trait]` shape is handled as
// for `#[cached]`.
pub(super) fn generate(g: &Gen<'_>) -> TokenStream {
    let (args, rt_ret) = (g.args, g.rt_ret());
    let (key, key_let) = g.key_let();
    let tags = g.tags_let();
    let call = g.call(&key);
    let put = g.at_ret("__cache_put");
    let result = g.at_ret("__cache_result");

    let (tags_let, tags_call) = match &tags {
        Some((tags, tags_let)) => (tags_let.clone(), quote!(#put.tags(#tags);)),
        None => Default::default(),
    };
    let unless = args.unless.get().map(|expr| {
        // A non-`bool` expression is "expected `bool` because of" the `unless` option.
        let bool_ty = quote_spanned!(args.unless.span().unwrap_or_else(|| expr.span())=> bool);
        let bind = g.bind_result(&result, expr);
        let rejected = hidden("__cache_unless");
        quote_spanned!(expr.span()=> #put.unless({ #bind let #rejected: #bool_ty = #expr; #rejected });)
    });
    // What is written: the value of `value = <expr>`, or the result as `#[cached]` stores it.
    let (mode_let, before_body, after_body) = match args.value.get() {
        Some(expr) => {
            // Spanned at the expression: a value that is not `Serialize` is reported there.
            let value = super::shared::spanned_ref(expr);
            let encode = quote_spanned!(expr.span()=> #put.encode(#value););
            let succeeded = g.success(&result);
            let bind = g.bind_result(&result, expr);
            if !bind.is_empty() {
                let after = quote! {
                    #put.succeeded(#succeeded);
                    #unless
                    if #put.wants_value() { #bind #encode }
                };
                (TokenStream::new(), TokenStream::new(), after)
            } else {
                let before = quote!(if #put.wants_value() { #encode });
                let after = quote! {
                    #put.succeeded(#succeeded);
                    #unless
                };
                (TokenStream::new(), before, after)
            }
        }
        None => {
            let (mode, mode_let) = g.mode_let();
            let after = quote_spanned! {g.ret_loc=>
                #unless
                #put.encode_result(&#mode, &#result);
            };
            (mode_let, TokenStream::new(), after)
        }
    };
    let body = g.body(|future| {
        quote_spanned! {g.ret_loc=>
            let mut #put = #rt_ret::Put::new(#call);
            #tags_call
            #put.begin().await;
            #before_body
            let #result = #future.await;
            #after_body
            #put.finish().await;
            #result
        }
    });

    let cache_none_check = g.cache_none_check();
    quote! {
        #key_let
        #tags_let
        #mode_let
        #cache_none_check
        #body
    }
}
