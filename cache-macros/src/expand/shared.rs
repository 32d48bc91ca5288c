//! [`Gen`]: the pieces of generated code the attributes share (site, cache handle, keys,
//! tags, return-type mode, success test, the body and its shapes).

use proc_macro2::{Delimiter, Group, Spacing, Span, TokenStream, TokenTree};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Expr, Ident, ReturnType};

use super::{Compiled, Config, keys};
use crate::args::{Args, Refresh};
use crate::item::{ItemFn, Shape};

/// Hidden names: `Span::mixed_site()` locals cannot be named by the user's code.
pub(super) fn hidden(name: &str) -> Ident {
    Ident::new(name, Span::mixed_site())
}

/// Whether an option's expression names `result` (as an identifier, or inside a string
/// literal, where `format!("{result}")` captures it).
pub(super) fn mentions_result(tokens: TokenStream) -> bool {
    tokens.into_iter().any(|tt| match tt {
        TokenTree::Ident(i) => i == "result",
        TokenTree::Group(g) => mentions_result(g.stream()),
        TokenTree::Literal(l) => l.to_string().contains("result"),
        TokenTree::Punct(_) => false,
    })
}

/// Whether `tokens` name `name`: as an identifier, or inside a string literal (where
/// `format!("{name}")` captures it). Errs on the side of yes.
pub(super) fn mentions_name(tokens: TokenStream, name: &str) -> bool {
    let name = name.strip_prefix("r#").unwrap_or(name);
    tokens.into_iter().any(|tt| match tt {
        TokenTree::Ident(i) => {
            let i = i.to_string();
            i.strip_prefix("r#").unwrap_or(&i) == name
        }
        TokenTree::Group(g) => mentions_name(g.stream(), name),
        TokenTree::Literal(l) => l.to_string().contains(name),
        TokenTree::Punct(_) => false,
    })
}

/// The identifiers in `tokens` (a pattern's bindings, and its paths' segments).
pub(super) fn idents(tokens: TokenStream) -> Vec<String> {
    let mut out = Vec::new();
    for tt in tokens {
        match tt {
            TokenTree::Ident(i) => out.push(i.to_string()),
            TokenTree::Group(g) => out.extend(idents(g.stream())),
            _ => {}
        }
    }
    out
}

/// Whether `self` is followed by `::` at the start of `tokens` (`self::module::item`: a path,
/// not the receiver).
fn starts_with_path_sep(tokens: &[TokenTree]) -> bool {
    matches!(
        tokens,
        [TokenTree::Punct(a), TokenTree::Punct(b), ..]
            if a.as_char() == ':' && a.spacing() == Spacing::Joint && b.as_char() == ':'
    )
}

/// Whether `tokens` name the receiver `self` (not a `self::` path).
pub(super) fn mentions_self(tokens: TokenStream) -> bool {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    tokens.iter().enumerate().any(|(i, tt)| match tt {
        TokenTree::Ident(id) => id == "self" && !starts_with_path_sep(&tokens[i + 1..]),
        TokenTree::Group(g) => mentions_self(g.stream()),
        _ => false,
    })
}

/// `tokens` with every `self` (the receiver, not a `self::` path) replaced by `with`, at the
/// place of the `self` it replaces; through groups (macro arguments included), as
/// `#[async_trait]` does.
pub(super) fn replace_self(tokens: TokenStream, with: &Ident) -> TokenStream {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    let mut out = TokenStream::new();
    for (i, tt) in tokens.iter().enumerate() {
        let replaced = match tt {
            TokenTree::Ident(id) if id == "self" && !starts_with_path_sep(&tokens[i + 1..]) => {
                let mut with = with.clone();
                with.set_span(with.span().located_at(id.span()));
                TokenTree::Ident(with)
            }
            TokenTree::Group(g) => {
                let mut group = Group::new(g.delimiter(), replace_self(g.stream(), with));
                group.set_span(g.span());
                TokenTree::Group(group)
            }
            other => other.clone(),
        };
        out.extend([replaced]);
    }
    out
}

/// `&(<expr>)`, spanned from the expression's first token to its last (spans cannot be
/// joined on stable Rust), so that an error about the reference's type underlines the whole
/// expression.
pub(super) fn spanned_ref(expr: &Expr) -> TokenStream {
    let tokens = expr.to_token_stream();
    let mut spans = tokens.clone().into_iter().map(|t| t.span());
    let first = spans.next().unwrap_or_else(Span::call_site);
    let last = spans.last().unwrap_or(first);
    let mut group = Group::new(Delimiter::Parenthesis, tokens);
    group.set_span(last);
    quote_spanned!(first=> &#group)
}

/// The pieces of generated code the attributes share.
pub(super) struct Gen<'a> {
    pub(super) args: &'a Args,
    pub(super) func: &'a ItemFn,
    pub(super) config: &'a Config,
    /// `::cache_runtime::__private`.
    pub(super) rt: TokenStream,
    pub(super) fn_name: String,
    /// The return type as written, where errors about it go.
    pub(super) ret_span: Span,
    /// Generated at the return type, so that a return type that is not `Serialize +
    /// DeserializeOwned` is reported there, not on the whole attribute. The mode and the
    /// calls that use it share one hygiene context: rustc only points at an argument that
    /// shares the call's.
    pub(super) ret_loc: Span,
    pub(super) site: Ident,
    pub(super) handle: Ident,
}

impl<'a> Gen<'a> {
    pub(super) fn new(args: &'a Args, func: &'a ItemFn, config: &'a Config) -> Self {
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
    pub(super) fn at_ret(&self, name: &str) -> Ident {
        Ident::new(name, self.ret_loc)
    }

    /// `::cache_runtime::__private` at the return type.
    pub(super) fn rt_ret(&self) -> TokenStream {
        quote_spanned!(self.ret_loc=> ::cache_runtime::__private)
    }

    /// The rewritten function: the site and the cache handle, then `inner`, the rest of the
    /// new body's statements.
    pub(super) fn function(&self, inner: TokenStream) -> TokenStream {
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
    pub(super) fn site_static(&self) -> TokenStream {
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
        if let Some(ms) = args.local_ms.get() {
            site_opts.extend(quote!(.local_ms(#ms)));
        }
        if let Some(ms) = args.stale_ms.get() {
            site_opts.extend(quote!(.stale_ms(#ms)));
        }
        match args.refresh.get() {
            Some(Refresh::Percent(p)) => site_opts.extend(quote!(.refresh_percent(#p))),
            Some(Refresh::XFetch) => site_opts.extend(quote!(.refresh_xfetch())),
            None => {}
        }
        quote! {
            static #site: #rt::Site = #rt::Site::new(::core::module_path!(), #fn_name) #site_opts;
        }
    }

    /// `let __cache_handle: &Cache = ..;`
    pub(super) fn handle_let(&self) -> TokenStream {
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
    pub(super) fn writer(
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
    pub(super) fn key(&self, key: Option<&Compiled>) -> TokenStream {
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
    pub(super) fn condition(&self) -> Option<TokenStream> {
        self.args.condition.get().map(|cond| {
            quote_spanned!(cond.span()=> { let __cache_condition: bool = #cond; __cache_condition })
        })
    }

    /// `let __cache_key: CallKey = ..;`, the key of `#[cached]` and `#[cache_put]`: a bypass
    /// when `condition` is false.
    pub(super) fn key_let(&self) -> (Ident, TokenStream) {
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
    pub(super) fn tags_let(&self) -> Option<(Ident, TokenStream)> {
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
    pub(super) fn mode_let(&self) -> (Ident, TokenStream) {
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
    pub(super) fn cache_none_check(&self) -> TokenStream {
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
    pub(super) fn success(&self, result: &Ident) -> TokenStream {
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
    pub(super) fn call(&self, key: &Ident) -> TokenStream {
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
    pub(super) fn self_type(&self) -> TokenStream {
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
    pub(super) fn bind_result(&self, result: &Ident, expr: &Expr) -> TokenStream {
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
    pub(super) fn body(&self, run: impl FnOnce(TokenStream) -> TokenStream) -> TokenStream {
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
