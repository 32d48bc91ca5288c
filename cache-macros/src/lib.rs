//! Procedural macros for [`cache-runtime`](https://docs.rs/cache-runtime).
//!
//! Do not depend on this crate directly: depend on `cache-runtime`, which re-exports the
//! attributes (`use cache_runtime::{cache_evict, cache_put, cached, write_behind};`). This crate only
//! parses, validates and rewrites; every behaviour lives in the runtime.
#![forbid(unsafe_code)]

mod args;
mod expand;
mod item;
mod template;

use proc_macro::TokenStream;

use crate::args::Kind;

// The user documentation: IDEs show the proc-macro item's docs, not the re-export's. Its
// examples need `cache-runtime`, so they run as `cache-runtime`'s doctests (see
// `CachedDocTests`, `CachePutDocTests`, `CacheEvictDocTests` and `WriteBehindDocTests` there),
// and are left out of this crate's own: `cargo test --doc` runs doctests even with
// `doctest = false`.
#[cfg_attr(not(doctest), doc = include_str!("docs/cached.md"))]
#[proc_macro_attribute]
pub fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::expand(Kind::Cached, args.into(), item.into()).into()
}

#[cfg_attr(not(doctest), doc = include_str!("docs/cache_put.md"))]
#[proc_macro_attribute]
pub fn cache_put(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::expand(Kind::Put, args.into(), item.into()).into()
}

#[cfg_attr(not(doctest), doc = include_str!("docs/cache_evict.md"))]
#[proc_macro_attribute]
pub fn cache_evict(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::expand(Kind::Evict, args.into(), item.into()).into()
}

#[cfg_attr(not(doctest), doc = include_str!("docs/write_behind.md"))]
#[proc_macro_attribute]
pub fn write_behind(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::expand(Kind::WriteBehind, args.into(), item.into()).into()
}
