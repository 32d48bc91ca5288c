//! The item an attribute is applied to: a function whose signature is parsed and whose body
//! is kept as tokens, and the two shapes of `async fn` the attributes accept.

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::ToTokens;
use syn::parse::{ParseStream, Parser};
use syn::token::Brace;
use syn::{
    Attribute, Block, Expr, GenericArgument, GenericParam, PathArguments, ReturnType, Signature,
    Stmt, Token, Type, TypeParamBound, Visibility, braced,
};

/// A function, with its body unparsed (as in tokio-macros' `entry.rs`): a syntax error in the
/// body is rustc's to report, on the body, and is no reason to reject the function.
pub(crate) struct ItemFn {
    /// Outer attributes, in order.
    pub(crate) attrs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    pub(crate) sig: Signature,
    pub(crate) body: Body,
}

/// `{ #![inner] stmts }`.
pub(crate) struct Body {
    pub(crate) brace: Brace,
    pub(crate) inner_attrs: Vec<Attribute>,
    /// The statements, as written: not parsed.
    pub(crate) stmts: TokenStream,
}

impl ItemFn {
    /// Parses the function `attr` (`#[cached]`, for messages) is applied to.
    pub(crate) fn parse(item: TokenStream, attr: &str) -> syn::Result<ItemFn> {
        let parser = |input: ParseStream<'_>| {
            let attrs = input.call(Attribute::parse_outer)?;
            let vis = input.parse()?;
            let sig = input.parse()?;
            if let Some(semi) = input.parse::<Option<Token![;]>>()? {
                return Err(syn::Error::new(
                    semi.span,
                    format_args!(
                        "`{attr}` needs the function's body; put it on the `async fn` in the `impl`, not on its declaration"
                    ),
                ));
            }
            let content;
            let brace = braced!(content in input);
            let inner_attrs = content.call(Attribute::parse_inner)?;
            let stmts = content.parse()?;
            Ok(ItemFn {
                attrs,
                vis,
                sig,
                body: Body {
                    brace,
                    inner_attrs,
                    stmts,
                },
            })
        };
        parser.parse2(item)
    }
}

/// Whether `item` has a top-level `fn` before its first `{ .. }`: then it was meant as a
/// function, and a parse failure is a syntax error in its signature.
pub(crate) fn looks_like_fn(item: &TokenStream) -> bool {
    for tt in item.clone() {
        match tt {
            TokenTree::Ident(i) if i == "fn" => return true,
            TokenTree::Group(g) if g.delimiter() == proc_macro2::Delimiter::Brace => return false,
            _ => {}
        }
    }
    false
}

/// The span and a description of a non-function item, for the error message.
pub(crate) fn describe_item(item: &TokenStream) -> (Span, &'static str) {
    match syn::parse2::<syn::Item>(item.clone()) {
        Ok(syn::Item::Struct(s)) => (s.struct_token.span, "a struct"),
        Ok(syn::Item::Enum(e)) => (e.enum_token.span, "an enum"),
        Ok(syn::Item::Const(c)) => (c.const_token.span, "a const"),
        Ok(syn::Item::Static(s)) => (s.static_token.span, "a static"),
        Ok(syn::Item::Impl(i)) => (
            i.impl_token.span,
            "an impl block (put it on the `async fn`s inside)",
        ),
        Ok(syn::Item::Trait(t)) => (t.trait_token.span, "a trait"),
        Ok(syn::Item::Mod(m)) => (m.mod_token.span, "a module"),
        Ok(syn::Item::Type(t)) => (t.type_token.span, "a type alias"),
        Ok(syn::Item::Union(u)) => (u.union_token.span, "a union"),
        Ok(syn::Item::Use(u)) => (u.use_token.span, "a `use` item"),
        _ => (
            item.clone()
                .into_iter()
                .next()
                .map_or_else(Span::call_site, |t| t.span()),
            "this item",
        ),
    }
}

/// How the function's body produces its future.
pub(crate) enum Shape {
    /// `async fn f(..) -> R { body }`.
    Native,
    /// What `#[async_trait]` leaves: `fn f(..) -> Pin<Box<dyn Future<Output = R> + ..>>`
    /// whose body is `Box::pin(async move { .. })`.
    AsyncTrait {
        pin_fn: TokenStream,
        future: TokenStream,
    },
}

/// Recognises a native `async fn`, or the shape `#[async_trait]` rewrote one into, and
/// returns the type the function's future produces. Only the second needs the body parsed.
pub(crate) fn shape(sig: &Signature, body: &Body) -> Option<(Shape, Type)> {
    if sig.asyncness.is_some() {
        let ret = match &sig.output {
            ReturnType::Default => syn::parse_quote!(()),
            ReturnType::Type(_, ty) => (**ty).clone(),
        };
        return Some((Shape::Native, ret));
    }
    // Input (after #[async_trait]):
    //     fn f<'life0, 'async_trait>(&'life0 self, id: u64)
    //         -> Pin<Box<dyn Future<Output = R> + Send + 'async_trait>>
    //     { Box::pin(async move { ... }) }
    let ret = future_output(&sig.output)?;
    let mut stmts = Block::parse_within.parse2(body.stmts.clone()).ok()?;
    if stmts.len() != 1 {
        return None;
    }
    let Some(Stmt::Expr(Expr::Call(mut call), None)) = stmts.pop() else {
        return None;
    };
    let Expr::Path(path) = &*call.func else {
        return None;
    };
    if path.path.segments.last()?.ident != "pin" || call.args.len() != 1 {
        return None;
    }
    let Expr::Async(mut future) = call.args.pop()? else {
        return None;
    };
    mark_rebound_params_used(&mut future.block);
    Some((
        Shape::AsyncTrait {
            pin_fn: call.func.into_token_stream(),
            future: future.into_token_stream(),
        },
        ret,
    ))
}

/// `#[async_trait]` moves each argument into its future (`let id = id;`). An argument only the
/// attribute uses (in a key, a tag, `value`) is then unused there, which `#![deny(warnings)]`
/// turns into an error: each rebinding is followed by `let _ = &id;`.
fn mark_rebound_params_used(block: &mut syn::Block) {
    let mut i = 0;
    while i < block.stmts.len() {
        let rebound = match &block.stmts[i] {
            Stmt::Local(local) => match (&local.pat, &local.init) {
                (syn::Pat::Ident(pat), Some(init)) if pat.subpat.is_none() => match &*init.expr {
                    Expr::Path(path) if path.qself.is_none() && path.path.is_ident(&pat.ident) => {
                        Some(pat.ident.clone())
                    }
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        i += 1;
        if let Some(ident) = rebound {
            block.stmts.insert(i, syn::parse_quote!(let _ = &#ident;));
            i += 1;
        }
    }
}

/// `R` of `Pin<Box<dyn Future<Output = R> + ...>>`.
fn future_output(output: &ReturnType) -> Option<Type> {
    let ReturnType::Type(_, ty) = output else {
        return None;
    };
    let inner = single_generic(ty, "Pin")?;
    let boxed = single_generic(inner, "Box")?;
    let Type::TraitObject(obj) = boxed else {
        return None;
    };
    obj.bounds.iter().find_map(|b| {
        let TypeParamBound::Trait(t) = b else {
            return None;
        };
        let seg = t.path.segments.last()?;
        if seg.ident != "Future" {
            return None;
        }
        let PathArguments::AngleBracketed(args) = &seg.arguments else {
            return None;
        };
        args.args.iter().find_map(|a| match a {
            GenericArgument::AssocType(assoc) if assoc.ident == "Output" => Some(assoc.ty.clone()),
            _ => None,
        })
    })
}

fn single_generic<'t>(ty: &'t Type, name: &str) -> Option<&'t Type> {
    let Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    if seg.ident != name {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &seg.arguments else {
        return None;
    };
    args.args.iter().find_map(|a| match a {
        GenericArgument::Type(t) => Some(t),
        _ => None,
    })
}

/// A return type that hides its shape behind a type parameter.
pub(crate) enum Generic {
    /// `R`, a type parameter of the function.
    Param,
    /// `T::Output` or `<T as Tr>::Output`, an associated type of one.
    Projection,
}

/// Whether the return type is a type parameter of the function, or an associated type of
/// one. The caching rule (`Result`, `Option`, ...) is picked where the function is compiled,
/// where such a type is neither a `Result` nor an `Option`: `Err` would be stored when the
/// caller picks a `Result`. Only the function's own type parameters are known here; an
/// impl's are not, and `R` could as well name a struct.
pub(crate) fn generic_return(ret: &Type, sig: &Signature) -> Option<Generic> {
    let is_param = |ident: &syn::Ident| {
        sig.generics
            .params
            .iter()
            .any(|p| matches!(p, GenericParam::Type(t) if t.ident == *ident))
    };
    match ret {
        Type::Paren(p) => generic_return(&p.elem, sig),
        Type::Group(g) => generic_return(&g.elem, sig),
        Type::Path(p) => match &p.qself {
            // `<T as Tr>::Output`, `<T::A as Tr>::B`.
            Some(q) => generic_return(&q.ty, sig).map(|_| Generic::Projection),
            None if p.path.leading_colon.is_some() => None,
            None => {
                let first = p.path.segments.first()?;
                if !is_param(&first.ident) {
                    None
                } else if p.path.segments.len() == 1 {
                    Some(Generic::Param)
                } else {
                    Some(Generic::Projection)
                }
            }
        },
        _ => None,
    }
}
