//! Procedural macros for [`cache-runtime`](https://docs.rs/cache-runtime).
//!
//! Do not depend on this crate directly: depend on `cache-runtime`, which re-exports the
//! attributes (`use cache_runtime::cached;`) and documents them. This crate only parses,
//! validates and rewrites; every behaviour lives in the runtime.
#![forbid(unsafe_code)]

mod args;
mod expand;
mod item;
mod template;

use proc_macro::TokenStream;

/// Caches an `async fn`'s results. Documented at `cache_runtime::cached`.
#[proc_macro_attribute]
pub fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::cached(args.into(), item.into()).into()
}
