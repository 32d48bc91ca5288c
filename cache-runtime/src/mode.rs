//! How a function's return type maps to what is cached.
//!
//! | return type            | stored                        | restored as      |
//! |------------------------|-------------------------------|------------------|
//! | `Result<T, E>`         | `T` of `Ok`; `Err` never      | `Ok(T)`          |
//! | `Result<Option<T>, E>` | `Ok(Some)`; `Ok(None)` only with `cache_none` | `Ok(Option<T>)` |
//! | `Option<T>`            | `Some`; `None` only with `cache_none` | `Option<T>` |
//! | anything else `R`      | `R`                           | `R`              |
//!
//! The mode is picked by the type itself, not by its spelling, so aliases such as
//! `anyhow::Result<T>` or `type DbResult<T> = Result<T, DbError>` work. The selection uses
//! auto-ref specialisation in the code the attribute generates:
//! `(&&&&Tag::<R>::new()).__cache_mode()` resolves to the most specific of four traits.

use std::any::Any;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// What a result means for the cache.
pub enum Classified<'a, V> {
    /// A value to store.
    Store(&'a V),
    /// A `None` value: stored only with `cache_none`.
    StoreNone(&'a V),
    /// An error: never stored.
    Error,
    /// A return type this mode cannot classify (see [`PlainMode`]): never stored.
    Refused,
}

/// Maps a return type `R` to the value that is stored, and back.
pub trait Mode<R> {
    /// The stored type.
    type Value: Serialize + DeserializeOwned;
    /// What `result` means for the cache.
    fn classify<'a>(&self, result: &'a R) -> Classified<'a, Self::Value>;
    /// Rebuilds a result from a stored value.
    fn restore(&self, value: Self::Value) -> R;
}

/// Return types whose `None` can be cached (`cache_none`): the types that select
/// [`OptionMode`] or [`ResultOptionMode`].
#[diagnostic::on_unimplemented(
    message = "`cache_none` needs a function returning `Option<T>` or `Result<Option<T>, E>`",
    label = "`{Self}` has no `None` to cache",
    note = "remove `cache_none`, or return an `Option`"
)]
pub trait SupportsNone {}

/// `Result<T, E>`.
pub struct ResultMode<T, E>(PhantomData<fn() -> (T, E)>);
/// `Result<Option<T>, E>`.
pub struct ResultOptionMode<T, E>(PhantomData<fn() -> (T, E)>);
/// `Option<T>`.
pub struct OptionMode<T>(PhantomData<fn() -> T>);
/// Any other return type.
pub struct PlainMode<R>(PhantomData<fn() -> R>);

impl<T: Serialize + DeserializeOwned, E> Mode<Result<T, E>> for ResultMode<T, E> {
    type Value = T;
    #[inline]
    fn classify<'a>(&self, result: &'a Result<T, E>) -> Classified<'a, T> {
        match result {
            Ok(v) => Classified::Store(v),
            Err(_) => Classified::Error,
        }
    }
    #[inline]
    fn restore(&self, value: T) -> Result<T, E> {
        Ok(value)
    }
}

impl<T: Serialize + DeserializeOwned, E> Mode<Result<Option<T>, E>> for ResultOptionMode<T, E> {
    type Value = Option<T>;
    #[inline]
    fn classify<'a>(&self, result: &'a Result<Option<T>, E>) -> Classified<'a, Option<T>> {
        match result {
            Ok(v @ Some(_)) => Classified::Store(v),
            Ok(v @ None) => Classified::StoreNone(v),
            Err(_) => Classified::Error,
        }
    }
    #[inline]
    fn restore(&self, value: Option<T>) -> Result<Option<T>, E> {
        Ok(value)
    }
}

impl<T: Serialize + DeserializeOwned> Mode<Option<T>> for OptionMode<T> {
    type Value = Option<T>;
    #[inline]
    fn classify<'a>(&self, result: &'a Option<T>) -> Classified<'a, Option<T>> {
        match result {
            Some(_) => Classified::Store(result),
            None => Classified::StoreNone(result),
        }
    }
    #[inline]
    fn restore(&self, value: Option<T>) -> Option<T> {
        value
    }
}

/// Whether `R` is a `Result` or an `Option`: then the plain mode was selected only because
/// the expansion saw a type parameter (of an `impl`, which the macro cannot see), and storing
/// would cache `Err`s and `None`s.
fn is_result_or_option<R>() -> bool {
    let name = std::any::type_name::<R>();
    [
        "core::result::Result<",
        "core::option::Option<",
        "std::result::Result<",
        "std::option::Option<",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

impl<R: Serialize + DeserializeOwned> Mode<R> for PlainMode<R> {
    type Value = R;
    #[inline]
    fn classify<'a>(&self, result: &'a R) -> Classified<'a, R> {
        if is_result_or_option::<R>() {
            return Classified::Refused;
        }
        Classified::Store(result)
    }
    #[inline]
    fn restore(&self, value: R) -> R {
        value
    }
}

// Copied into a background refresh (`refresh`): no bounds on the type parameters, the modes
// hold no values.
macro_rules! copy_mode {
    ($($mode:ident<$($p:ident),*>),*) => {$(
        impl<$($p),*> Clone for $mode<$($p),*> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<$($p),*> Copy for $mode<$($p),*> {}
    )*};
}
copy_mode!(ResultMode<T, E>, ResultOptionMode<T, E>, OptionMode<T>, PlainMode<R>);

impl<T, E> SupportsNone for Result<Option<T>, E> {}
impl<T> SupportsNone for Option<T> {}

/// Checks at compile time that `cache_none` fits the return type `R`.
#[inline]
pub fn require_cache_none<R: SupportsNone>(_: PhantomData<R>) {}

/// Stored types the in-process tier (`local`) can keep: it hands each hit a clone.
#[diagnostic::on_unimplemented(
    message = "`local` keeps decoded values in process: `{Self}` must be `Clone + Send + Sync + 'static`",
    label = "the cached value `{Self}` is not `Clone + Send + Sync + 'static`",
    note = "derive `Clone` for it, wrap it in an `Arc`, or remove `local`"
)]
pub trait LocalValue {}
impl<T: Clone + Send + Sync + 'static> LocalValue for T {}

/// Checks at compile time that `local` fits the function's stored type.
#[inline]
pub fn require_local<M: ModeValue>(_: &M)
where
    M::Value: LocalValue,
{
}

/// The arguments of a `#[write_behind]` function: queued (serialized) at the call, decoded
/// later by a worker, possibly in another process.
#[diagnostic::on_unimplemented(
    message = "`#[write_behind]` queues its arguments for a worker: `{Self}` must be `Serialize + DeserializeOwned + Send + 'static`",
    label = "the argument type `{Self}` cannot be queued",
    note = "derive `serde::Serialize` and `serde::Deserialize` for it, or take an owned type that does (`String` for `&str`)"
)]
pub trait WbArg {}
impl<T: Serialize + DeserializeOwned + Send + 'static> WbArg for T {}

/// Checks at compile time that a `#[write_behind]` argument of type `T` can be queued.
#[inline]
pub fn require_wb_arg<T: WbArg>(_: PhantomData<T>) {}

/// The stored type of a mode, independent of the return type (for [`ViaTyped`]).
pub trait ModeValue {
    /// The stored type.
    type Value;
}

impl<T, E> ModeValue for ResultMode<T, E> {
    type Value = T;
}
impl<T, E> ModeValue for ResultOptionMode<T, E> {
    type Value = Option<T>;
}
impl<T> ModeValue for OptionMode<T> {
    type Value = Option<T>;
}
impl<R> ModeValue for PlainMode<R> {
    type Value = R;
}

/// How an in-process backend keeps a decoded value next to its envelope, so that a hit
/// clones it instead of decoding JSON. Available when the stored type is
/// `Clone + Send + Sync + 'static` (selected by [`ViaTyped`] / [`ViaUntyped`]).
pub struct Typed<V> {
    pub(crate) wrap: fn(&V) -> Arc<dyn Any + Send + Sync>,
    pub(crate) unwrap: fn(&(dyn Any + Send + Sync)) -> Option<V>,
}

impl<V> Clone for Typed<V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for Typed<V> {}

/// Selects typed storage: the stored type is `Clone + Send + Sync + 'static`.
pub trait ViaTyped {
    /// The stored type.
    type Value;
    /// Typed storage.
    fn __cache_typed(&self) -> Option<Typed<Self::Value>>;
}
/// Falls back to decoding on every hit.
pub trait ViaUntyped {
    /// The stored type.
    type Value;
    /// No typed storage.
    fn __cache_typed(&self) -> Option<Typed<Self::Value>>;
}

impl<M: ModeValue> ViaTyped for &M
where
    M::Value: Clone + Send + Sync + 'static,
{
    type Value = M::Value;
    #[inline]
    fn __cache_typed(&self) -> Option<Typed<M::Value>> {
        Some(Typed {
            wrap: |v| Arc::new(v.clone()),
            unwrap: |any| any.downcast_ref::<M::Value>().cloned(),
        })
    }
}
impl<M: ModeValue> ViaUntyped for M {
    type Value = M::Value;
    #[inline]
    fn __cache_typed(&self) -> Option<Typed<M::Value>> {
        None
    }
}

/// The type-level tag that mode selection dispatches on.
pub struct Tag<R>(PhantomData<fn() -> R>);

impl<R> Tag<R> {
    /// A tag for `R`.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Tag(PhantomData)
    }
}

/// Selects `ResultOptionMode` (most specific).
pub trait ViaResultOption {
    /// The selected mode.
    type Mode;
    /// The selected mode.
    fn __cache_mode(&self) -> Self::Mode;
}
/// Selects `ResultMode`.
pub trait ViaResult {
    /// The selected mode.
    type Mode;
    /// The selected mode.
    fn __cache_mode(&self) -> Self::Mode;
}
/// Selects `OptionMode`.
pub trait ViaOption {
    /// The selected mode.
    type Mode;
    /// The selected mode.
    fn __cache_mode(&self) -> Self::Mode;
}
/// Selects `PlainMode` (least specific).
pub trait ViaPlain {
    /// The selected mode.
    type Mode;
    /// The selected mode.
    fn __cache_mode(&self) -> Self::Mode;
}

impl<T, E> ViaResultOption for &&&Tag<Result<Option<T>, E>> {
    type Mode = ResultOptionMode<T, E>;
    #[inline]
    fn __cache_mode(&self) -> Self::Mode {
        ResultOptionMode(PhantomData)
    }
}
impl<T, E> ViaResult for &&Tag<Result<T, E>> {
    type Mode = ResultMode<T, E>;
    #[inline]
    fn __cache_mode(&self) -> Self::Mode {
        ResultMode(PhantomData)
    }
}
impl<T> ViaOption for &Tag<Option<T>> {
    type Mode = OptionMode<T>;
    #[inline]
    fn __cache_mode(&self) -> Self::Mode {
        OptionMode(PhantomData)
    }
}
impl<R> ViaPlain for Tag<R> {
    type Mode = PlainMode<R>;
    #[inline]
    fn __cache_mode(&self) -> Self::Mode {
        PlainMode(PhantomData)
    }
}

/// Whether a result is a success: `Ok`, `Some`, or any value of another type. What
/// `#[cache_put]` (with `value = ..`) and `#[cache_evict]` test before they write or evict.
/// Selected like the mode: `(&&Tag::<R>::new()).__cache_success()`.
pub trait SuccessResult {
    /// The result's type.
    type R;
    /// The test.
    fn __cache_success(&self) -> fn(&Self::R) -> bool;
}
/// See [`SuccessResult`].
pub trait SuccessOption {
    /// The result's type.
    type R;
    /// The test.
    fn __cache_success(&self) -> fn(&Self::R) -> bool;
}
/// See [`SuccessResult`].
pub trait SuccessPlain {
    /// The result's type.
    type R;
    /// The test.
    fn __cache_success(&self) -> fn(&Self::R) -> bool;
}

impl<T, E> SuccessResult for &&Tag<Result<T, E>> {
    type R = Result<T, E>;
    #[inline]
    fn __cache_success(&self) -> fn(&Result<T, E>) -> bool {
        Result::is_ok
    }
}
impl<T> SuccessOption for &Tag<Option<T>> {
    type R = Option<T>;
    #[inline]
    fn __cache_success(&self) -> fn(&Option<T>) -> bool {
        Option::is_some
    }
}
impl<R> SuccessPlain for Tag<R> {
    type R = R;
    #[inline]
    fn __cache_success(&self) -> fn(&R) -> bool {
        |_| true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind<R, M: Mode<R>>(_: &M, _: &R) -> &'static str {
        std::any::type_name::<M>()
    }

    #[test]
    #[allow(clippy::needless_borrow)] // the borrows are the selection mechanism
    fn selection_follows_the_type_not_its_spelling() {
        type DbResult<T> = Result<T, std::io::Error>;
        let m = (&&&&Tag::<DbResult<u32>>::new()).__cache_mode();
        assert!(kind(&m, &Ok(1)).contains("ResultMode"));
        let m = (&&&&Tag::<Result<Option<u32>, ()>>::new()).__cache_mode();
        assert!(kind(&m, &Ok(None)).contains("ResultOptionMode"));
        let m = (&&&&Tag::<Option<String>>::new()).__cache_mode();
        assert!(kind(&m, &None).contains("OptionMode"));
        let m = (&&&&Tag::<Vec<u8>>::new()).__cache_mode();
        assert!(kind(&m, &vec![]).contains("PlainMode"));
    }

    #[test]
    #[allow(clippy::needless_borrow)] // the borrows are the selection mechanism
    fn typed_storage_needs_clone() {
        struct NotClone;
        let m = ResultMode::<u32, ()>(PhantomData);
        let typed = (&&m).__cache_typed().expect("u32 is Clone");
        let any = (typed.wrap)(&7);
        assert_eq!((typed.unwrap)(&*any), Some(7));
        assert_eq!((typed.unwrap)(&"other type"), None);
        let m = PlainMode::<Vec<u8>>(PhantomData);
        assert!((&&m).__cache_typed().is_some());
        let m = OptionMode::<std::cell::Cell<u8>>(PhantomData);
        assert!((&&m).__cache_typed().is_none(), "Cell is not Sync");
        let m = PlainMode::<NotClone>(PhantomData);
        assert!((&&m).__cache_typed().is_none());
    }

    #[test]
    fn the_plain_mode_refuses_results_and_options() {
        // What a method returning its impl's type parameter `R = Result<..>` gets.
        let m = PlainMode::<Result<u32, String>>(PhantomData);
        assert!(matches!(m.classify(&Err("x".into())), Classified::Refused));
        let m = PlainMode::<Option<u32>>(PhantomData);
        assert!(matches!(m.classify(&None), Classified::Refused));
        let m = PlainMode::<Vec<Option<u32>>>(PhantomData);
        assert!(matches!(m.classify(&vec![]), Classified::Store(_)));
    }

    #[test]
    #[allow(clippy::needless_borrow)] // the borrows are the selection mechanism
    fn success_follows_the_type() {
        let ok = (&&&Tag::<Result<(), String>>::new()).__cache_success();
        assert!(ok(&Ok(())));
        assert!(!ok(&Err("x".into())));
        let some = (&&&Tag::<Option<u8>>::new()).__cache_success();
        assert!(some(&Some(1)));
        assert!(!some(&None));
        let plain = (&&&Tag::<u64>::new()).__cache_success();
        assert!(plain(&0));
    }

    #[test]
    fn errors_are_never_stored() {
        let m = ResultMode::<u32, String>(PhantomData);
        assert!(matches!(m.classify(&Err("x".into())), Classified::Error));
        assert!(matches!(m.classify(&Ok(3)), Classified::Store(3)));
        let m = ResultOptionMode::<u32, String>(PhantomData);
        assert!(matches!(m.classify(&Ok(None)), Classified::StoreNone(None)));
    }
}
