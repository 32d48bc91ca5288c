//! Procedural macros for [`cache-runtime`](https://docs.rs/cache-runtime).
//!
//! Do not depend on this crate directly: depend on `cache-runtime`, which re-exports the
//! attributes (`use cache_runtime::cached;`). This crate only parses, validates and rewrites;
//! every behaviour lives in the runtime.
#![forbid(unsafe_code)]

mod args;
mod expand;
mod item;
mod template;

use proc_macro::TokenStream;

// The user documentation: IDEs show the proc-macro item's docs, not the re-export's. Its
// examples need `cache-runtime`, so they run as `cache-runtime`'s doctests (see
// `CachedDocTests` there), and are left out of this crate's own: `cargo test --doc` runs
// doctests even with `doctest = false`.
#[cfg_attr(not(doctest), doc = include_str!("docs/cached.md"))]
#[proc_macro_attribute]
pub fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::cached(args.into(), item.into()).into()
}
