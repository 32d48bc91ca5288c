//! Code generation for `#[cached]`, `#[cache_put]` and `#[cache_evict]`.
//!
//! The function is rewritten in place: attributes, visibility and signature are re-emitted
//! unchanged, and the body becomes a few calls of one runtime type (`Fetch`, `Put`, `Evict`)
//! around the original body, run as an `async move` block. `self`, generics, lifetimes and
//! `where` clauses need no special handling because the body stays inside the same function.
//! The body's statements are not parsed (see `item.rs`), except to recognise
//! `#[async_trait]`'s shape.
//!
//! This module holds what the three attributes share: the entry point, the checked
//! [`Config`], and [`Gen`], the pieces of generated code (site, cache handle, keys, tags,
//! return-type mode, body). `cached.rs`, `put.rs` and `evict.rs` assemble them.

mod cached;
mod evict;
mod keys;
mod put;

use proc_macro2::{Delimiter, Group, Span, TokenStream, TokenTree};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Expr, FnArg, Ident, LitStr, Pat, ReturnType, Type};

use crate::args::{Args, Errors, Kind};
use crate::item::{self, Generic, ItemFn, Shape};
use crate::template::{self, Template};

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
    match Config::build(&args, &func, &mut errors) {
        Some(config) if errors.is_empty() => {
            let g = Gen::new(&args, &func, &config);
            let body = match kind {
                Kind::Cached => cached::generate(&g),
                Kind::Put => put::generate(&g),
                Kind::Evict => evict::generate(&g),
            };
            g.function(body)
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
        if let (Some(generic), false) = (item::generic_return(&ret, sig), kind == Kind::Evict) {
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
            params,
            key,
            keys,
            tags,
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

/// Whether an option's expression names `result` (as an identifier, or inside a string
/// literal, where `format!("{result}")` captures it).
fn mentions_result(tokens: TokenStream) -> bool {
    tokens.into_iter().any(|tt| match tt {
        TokenTree::Ident(i) => i == "result",
        TokenTree::Group(g) => mentions_result(g.stream()),
        TokenTree::Literal(l) => l.to_string().contains("result"),
        TokenTree::Punct(_) => false,
    })
}

/// `&(<expr>)`, spanned from the expression's first token to its last (spans cannot be
/// joined on stable Rust), so that an error about the reference's type underlines the whole
/// expression.
fn spanned_ref(expr: &Expr) -> TokenStream {
    let tokens = expr.to_token_stream();
    let mut spans = tokens.clone().into_iter().map(|t| t.span());
    let first = spans.next().unwrap_or_else(Span::call_site);
    let last = spans.last().unwrap_or(first);
    let mut group = Group::new(Delimiter::Parenthesis, tokens);
    group.set_span(last);
    quote_spanned!(first=> &#group)
}

/// The pieces of generated code the attributes share.
struct Gen<'a> {
    args: &'a Args,
    func: &'a ItemFn,
    config: &'a Config,
    /// `::cache_runtime::__private`.
    rt: TokenStream,
    fn_name: String,
    /// The return type as written, where errors about it go.
    ret_span: Span,
    /// Generated at the return type, so that a return type that is not `Serialize +
    /// DeserializeOwned` is reported there, not on the whole attribute. The mode and the
    /// calls that use it share one hygiene context: rustc only points at an argument that
    /// shares the call's.
    ret_loc: Span,
    site: Ident,
    handle: Ident,
}

impl<'a> Gen<'a> {
    fn new(args: &'a Args, func: &'a ItemFn, config: &'a Config) -> Self {
        let sig = &func.sig;
        let fn_name = sig.ident.to_string();
        let fn_name = fn_name.strip_prefix("r#").unwrap_or(&fn_name).to_owned();
        let ret_span = match (&sig.output, &config.shape) {
            (ReturnType::Type(_, ty), Shape::Native) => ty.span(),
            // `#[async_trait]` moved the written return type into `Future<Output = R>`.
            (ReturnType::Type(..), Shape::AsyncTrait { .. }) => config.ret.span(),
            (ReturnType::Default, _) => sig.ident.span(),
        };
        Gen {
            args,
            func,
            config,
            rt: quote!(::cache_runtime::__private),
            fn_name,
            ret_span,
            ret_loc: Span::mixed_site().located_at(ret_span),
            site: hidden("__CACHE_SITE"),
            handle: hidden("__cache_handle"),
        }
    }

    /// A hidden local at the return type (see `ret_loc`).
    fn at_ret(&self, name: &str) -> Ident {
        Ident::new(name, self.ret_loc)
    }

    /// `::cache_runtime::__private` at the return type.
    fn rt_ret(&self) -> TokenStream {
        quote_spanned!(self.ret_loc=> ::cache_runtime::__private)
    }

    /// The rewritten function: the site and the cache handle, then `inner`, the rest of the
    /// new body's statements.
    fn function(&self, inner: TokenStream) -> TokenStream {
        let ItemFn {
            attrs,
            vis,
            sig,
            body,
        } = self.func;
        // The body's inner attributes (`#![allow(..)]`) apply to the whole rewritten function.
        let inner_attrs = &body.inner_attrs;
        let site_static = self.site_static();
        let handle_let = self.handle_let();
        quote! {
            #(#attrs)*
            #vis #sig {
                #(#inner_attrs)*
                #site_static
                #handle_let
                #inner
            }
        }
    }

    /// `static __CACHE_SITE: Site = ..;`: everything static about this function.
    fn site_static(&self) -> TokenStream {
        let (rt, args, site, fn_name) = (&self.rt, self.args, &self.site, &self.fn_name);
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
        quote! {
            static #site: #rt::Site = #rt::Site::new(::core::module_path!(), #fn_name) #site_opts;
        }
    }

    /// `let __cache_handle: &Cache = ..;`
    fn handle_let(&self) -> TokenStream {
        let (rt, handle) = (&self.rt, &self.handle);
        let cache_expr = match self.args.cache.get() {
            Some(expr) => quote_spanned!(expr.span()=> &(#expr)),
            None => quote!(#rt::default_cache()),
        };
        // A `cache = <expr>` of the wrong type is "expected due to" the `cache` option.
        let cache_ty = match self.args.cache.span() {
            Some(span) => quote_spanned!(span=> &::cache_runtime::__private::Cache),
            None => quote!(&#rt::Cache),
        };
        quote! {
            let #handle: #cache_ty = #cache_expr;
        }
    }

    /// `{ let mut w = key_writer(handle); <pushes> <end> }`, `end` using the writer `w`.
    fn writer(
        &self,
        pushes: impl FnOnce(&Ident) -> TokenStream,
        end: impl FnOnce(&Ident) -> TokenStream,
    ) -> TokenStream {
        let (rt, handle) = (&self.rt, &self.handle);
        let w = hidden("__cache_w");
        let pushes = pushes(&w);
        let end = end(&w);
        quote! {{
            let mut #w = #rt::key_writer(#handle);
            #pushes
            #end
        }}
    }

    /// A key (a `CallKey`): the compiled template, or the default key without one.
    fn key(&self, key: Option<&Compiled>) -> TokenStream {
        let version = match self.args.version.get() {
            Some(v) => quote!(::core::option::Option::Some(#v)),
            None => quote!(::core::option::Option::None),
        };
        self.writer(
            |w| match key {
                Some(k) => keys::template_pushes(&k.template, w, k.span, self.config),
                None => keys::default_key_pushes(w, &self.fn_name, &self.func.sig, self.config),
            },
            |w| quote!(#w.finish(#version)),
        )
    }

    /// `condition = <expr>`, as a `bool` expression spanned at the user's expression.
    fn condition(&self) -> Option<TokenStream> {
        self.args.condition.get().map(|cond| {
            quote_spanned!(cond.span()=> { let __cache_condition: bool = #cond; __cache_condition })
        })
    }

    /// `let __cache_key: CallKey = ..;`, the key of `#[cached]` and `#[cache_put]`: a bypass
    /// when `condition` is false.
    fn key_let(&self) -> (Ident, TokenStream) {
        let rt = &self.rt;
        let key = hidden("__cache_key");
        let render = self.key(self.config.key.as_ref());
        let key_expr = match self.condition() {
            Some(cond) => quote! {
                if #cond { #render } else { #rt::CallKey::Condition }
            },
            None => render,
        };
        let out = quote! {
            let #key: #rt::CallKey = #key_expr;
        };
        (key, out)
    }

    /// `let __cache_tags: Tags = ..;` with every tag rendered, if the attribute has `tags`.
    fn tags_let(&self) -> Option<(Ident, TokenStream)> {
        self.args.tags.get()?;
        let rt = &self.rt;
        let tags = hidden("__cache_tags");
        let pushes = self.config.tags.iter().map(|t| {
            self.writer(
                |w| keys::template_pushes(&t.template, w, t.span, self.config),
                |w| quote!(#tags.push(#w);),
            )
        });
        let out = quote! {
            let #tags: #rt::Tags = {
                let mut #tags = #rt::Tags::new();
                #(#pushes)*
                #tags
            };
        };
        Some((tags, out))
    }

    /// `let __cache_mode = ..;`: what the return type stores (see `mode.rs` in the runtime).
    fn mode_let(&self) -> (Ident, TokenStream) {
        let (rt, ret) = (&self.rt, &self.config.ret);
        let mode = self.at_ret("__cache_mode");
        let out = quote_spanned! {self.ret_span=>
            #[allow(clippy::needless_borrow, clippy::borrow_deref_ref)]
            let #mode = {
                #[allow(unused_imports)]
                use #rt::{ViaOption as _, ViaPlain as _, ViaResult as _, ViaResultOption as _};
                (&&&&#rt::Tag::<#ret>::new()).__cache_mode()
            };
        };
        (mode, out)
    }

    /// Checks at compile time that `cache_none` fits the return type.
    fn cache_none_check(&self) -> TokenStream {
        let ret = &self.config.ret;
        match self.args.cache_none.span() {
            Some(span) => {
                let rt_none = quote_spanned!(span=> ::cache_runtime::__private);
                quote_spanned!(span=> #rt_none::require_cache_none(::core::marker::PhantomData::<#ret>);)
            }
            None => TokenStream::new(),
        }
    }

    /// Whether `result` (a local of the return type) is a success: `Ok`, `Some`, any other
    /// value.
    fn success(&self, result: &Ident) -> TokenStream {
        let (rt, ret) = (&self.rt, &self.config.ret);
        let test = hidden("__cache_success");
        quote_spanned! {self.ret_loc=>
            {
                #[allow(unused_imports)]
                use #rt::{SuccessOption as _, SuccessPlain as _, SuccessResult as _};
                #[allow(clippy::needless_borrow)]
                let #test = (&&&#rt::Tag::<#ret>::new()).__cache_success();
                #test(&#result)
            }
        }
    }

    /// `Call { .. }`, what `Fetch::new` and `Put::new` take, at the return type.
    fn call(&self, key: &Ident) -> TokenStream {
        let (rt_ret, handle, site, self_type) =
            (self.rt_ret(), &self.handle, &self.site, self.self_type());
        quote_spanned! {self.ret_loc=>
            #rt_ret::Call {
                cache: #handle,
                site: &#site,
                self_type: #self_type,
                key: #key,
            }
        }
    }

    /// `Some(type_name::<Self>())` in a method, `None` in a free function.
    fn self_type(&self) -> TokenStream {
        if self.config.has_self {
            quote!(::core::option::Option::Some(
                ::core::any::type_name::<Self>()
            ))
        } else {
            quote!(::core::option::Option::None)
        }
    }

    /// For an option's expression over `result` (`unless`, `value`): `let result = &<result>;`
    /// (so `result: &R`) if the expression names `result`, nothing otherwise.
    fn bind_result(&self, result: &Ident, expr: &Expr) -> TokenStream {
        if !mentions_result(expr.to_token_stream()) {
            return TokenStream::new();
        }
        // At call-site hygiene, so that the user's expression can name it.
        let name = Ident::new("result", Span::call_site());
        quote_spanned!(expr.span()=> let #name = &#result;)
    }

    /// The function's body, run by `run`: `run` receives the body as a future (an `async
    /// move` block) and returns the statements that drive it. After `#[async_trait]`, the body
    /// `{ Box::pin(async move { .. }) }` becomes `{ Box::pin(async move { <run> }) }`, the
    /// inner `async move { .. }` being `#[async_trait]`'s, unchanged.
    fn body(&self, run: impl FnOnce(TokenStream) -> TokenStream) -> TokenStream {
        let ret = &self.config.ret;
        let fake_ret = hidden("__cache_ret");
        let body = &self.func.body;
        match &self.config.shape {
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
        }
    }
}
