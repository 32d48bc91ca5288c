//! What a `#[write_behind]` function registers: its [`WbFunction`] (site, queue, coalescing,
//! and the `apply` function that turns a queued entry's arguments back into a call of the
//! body), collected from every linked crate through `inventory` as [`WbHandler`]s. And what
//! `apply` returns: [`Applying`], the body's future, whose output ([`Applied`]) the worker
//! acts on. Not public API: the expansion names these through `__private`.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;

use crate::stats::Site;

/// Turns a queued entry's arguments (a JSON array, in parameter order) into the body's
/// future. Generated per function.
#[doc(hidden)]
pub type ApplyFn = fn(&[u8]) -> Result<Applying, ArgsError>;

/// The static description of one `#[write_behind]` function. Not public API.
#[doc(hidden)]
pub struct WbFunction {
    pub(crate) site: &'static Site,
    pub(crate) queue: &'static str,
    pub(crate) apply: ApplyFn,
    pub(crate) coalesce: bool,
    /// The function's id in the queue (its site label), made on first use.
    id: OnceLock<String>,
}

impl std::fmt::Debug for WbFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WbFunction")
            .field("id", &self.id())
            .field("queue", &self.queue)
            .field("coalesce", &self.coalesce)
            .finish_non_exhaustive()
    }
}

impl WbFunction {
    /// A function of `site`, queued on `queue`, applied by `apply`. Coalescing is on.
    pub const fn new(site: &'static Site, queue: &'static str, apply: ApplyFn) -> Self {
        WbFunction {
            site,
            queue,
            apply,
            coalesce: true,
            id: OnceLock::new(),
        }
    }

    /// The `coalesce` option (default true): consecutive queued writes of one key by this
    /// function are applied once, with the last one's arguments.
    pub const fn coalesce(mut self, coalesce: bool) -> Self {
        self.coalesce = coalesce;
        self
    }

    /// The function's identity in the queue: the `name` option, else `module::function`.
    pub(crate) fn id(&self) -> &str {
        self.id.get_or_init(|| self.site.label(None))
    }

    /// The queue's name.
    pub(crate) fn queue(&self) -> &'static str {
        self.queue
    }
}

/// A `#[write_behind]` function linked into the binary, registered by its expansion with
/// `inventory::submit!`: a worker finds every one of them. Not public API.
#[doc(hidden)]
pub struct WbHandler(pub &'static WbFunction);

inventory::collect!(WbHandler);

/// Every `#[write_behind]` function linked into the binary.
pub(crate) fn registered() -> impl Iterator<Item = &'static WbFunction> {
    inventory::iter::<WbHandler>.into_iter().map(|h| h.0)
}

/// The body of a `#[write_behind]` function, called with a queued entry's arguments. Not
/// public API.
#[doc(hidden)]
pub struct Applying(pub(crate) Pin<Box<dyn Future<Output = Applied> + Send + 'static>>);

impl Applying {
    /// Wraps the body's future (whose output went through `wb_outcome!`).
    pub fn new(fut: impl Future<Output = Applied> + Send + 'static) -> Self {
        Applying(Box::pin(fut))
    }
}

impl std::fmt::Debug for Applying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Applying(..)")
    }
}

/// How one run of a `#[write_behind]` body ended. Not public API.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// `Ok(())` or `()`: the write is acknowledged.
    Ok,
    /// `Err(e)`: the error's `Display` (else `Debug`, else its type's name); retried.
    Err(String),
}

/// A queued entry's arguments do not decode into the function's parameters (a binary with
/// another signature queued it, or the entry was damaged). Not public API.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct ArgsError(pub(crate) String);

impl std::fmt::Display for ArgsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the arguments do not decode: {}", self.0)
    }
}

impl std::error::Error for ArgsError {}

/// Decodes a queued entry's arguments (a JSON array) into the parameters' tuple. Not public
/// API.
#[doc(hidden)]
pub fn wb_decode<T: DeserializeOwned>(args: &[u8]) -> Result<T, ArgsError> {
    serde_json::from_slice(args).map_err(|e| ArgsError(e.to_string()))
}

/// The return types a `#[write_behind]` function may have: `()` and `Result<(), E>`. Not
/// public API.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "a `#[write_behind]` function must return `()` or `Result<(), E>`",
    label = "`{Self}` is not `()` or `Result<(), E>`"
)]
pub trait WbResult {
    /// Whether the call succeeded (then its value is written to the cache).
    fn wb_ok(&self) -> bool;
}

impl WbResult for () {
    #[inline]
    fn wb_ok(&self) -> bool {
        true
    }
}

impl<E> WbResult for Result<(), E> {
    #[inline]
    fn wb_ok(&self) -> bool {
        self.is_ok()
    }
}

/// `wb_outcome!(result)`: the [`Applied`] of a body's result, through autoref dispatch (the
/// error's `Display`, else its `Debug`, else its type's name). Not public API.
#[doc(hidden)]
pub struct WbOutcome<'a, R>(pub &'a R);

/// `wb_outcome!` when the error is `Display` (and for `()`).
#[doc(hidden)]
pub trait ViaDisplay {
    /// The outcome.
    fn __wb_applied(&self) -> Applied;
}

/// `wb_outcome!` when the error is `Debug` only.
#[doc(hidden)]
pub trait ViaDebug {
    /// The outcome.
    fn __wb_applied(&self) -> Applied;
}

/// `wb_outcome!` when the error is neither `Display` nor `Debug`.
#[doc(hidden)]
pub trait ViaName {
    /// The outcome.
    fn __wb_applied(&self) -> Applied;
}

impl ViaDisplay for &&WbOutcome<'_, ()> {
    #[inline]
    fn __wb_applied(&self) -> Applied {
        Applied::Ok
    }
}

impl<E: std::fmt::Display> ViaDisplay for &&WbOutcome<'_, Result<(), E>> {
    fn __wb_applied(&self) -> Applied {
        match self.0 {
            Ok(()) => Applied::Ok,
            Err(e) => Applied::Err(e.to_string()),
        }
    }
}

impl<E: std::fmt::Debug> ViaDebug for &WbOutcome<'_, Result<(), E>> {
    fn __wb_applied(&self) -> Applied {
        match self.0 {
            Ok(()) => Applied::Ok,
            Err(e) => Applied::Err(format!("{e:?}")),
        }
    }
}

impl<E> ViaName for WbOutcome<'_, Result<(), E>> {
    fn __wb_applied(&self) -> Applied {
        match self.0 {
            Ok(()) => Applied::Ok,
            Err(_) => Applied::Err(format!("an error of type `{}`", std::any::type_name::<E>())),
        }
    }
}

/// `__private::wb_outcome!(expr)`: the [`Applied`] of a `#[write_behind]` body's result
/// (`()` or `Result<(), E>`). A macro because the choice between `Display`, `Debug` and the
/// type's name is made where the error type is known (autoref dispatch, as in `mode.rs`).
#[doc(hidden)]
#[macro_export]
macro_rules! __cache_wb_outcome {
    ($result:expr) => {{
        #[allow(unused_imports)]
        use $crate::__private::{ViaDebug as _, ViaDisplay as _, ViaName as _};
        let __cache_result = $result;
        #[allow(clippy::needless_borrow)]
        (&&&$crate::__private::WbOutcome(&__cache_result)).__wb_applied()
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Opaque;
    #[derive(Debug)]
    struct OnlyDebug;

    #[test]
    fn outcomes_pick_display_then_debug_then_the_type_name() {
        assert_eq!(crate::__private::wb_outcome!(()), Applied::Ok);
        let ok: Result<(), Opaque> = Ok(());
        assert_eq!(crate::__private::wb_outcome!(ok), Applied::Ok);
        let e: Result<(), String> = Err("boom".into());
        assert_eq!(
            crate::__private::wb_outcome!(e),
            Applied::Err("boom".into())
        );
        let e: Result<(), OnlyDebug> = Err(OnlyDebug);
        assert_eq!(
            crate::__private::wb_outcome!(e),
            Applied::Err("OnlyDebug".into())
        );
        let e: Result<(), Opaque> = Err(Opaque);
        let Applied::Err(msg) = crate::__private::wb_outcome!(e) else {
            panic!("an error")
        };
        assert!(msg.contains("Opaque"), "{msg}");
        // What the traits resolve to without the macro.
        let unit = ();
        assert_eq!((&&&WbOutcome(&unit)).__wb_applied(), Applied::Ok);
    }

    #[test]
    fn args_decode_or_say_why() {
        let (a, b): (u64, String) = wb_decode(br#"[7,"x"]"#).unwrap();
        assert_eq!((a, b.as_str()), (7, "x"));
        let e = wb_decode::<(u64,)>(b"{").unwrap_err();
        assert!(e.to_string().contains("do not decode"));
    }
}
