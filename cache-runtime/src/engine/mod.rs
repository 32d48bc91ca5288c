//! The get-or-load engine: the one entry point the `#[cached]` expansion calls.
//!
//! ```text
//! no key (`condition` false, an argument that does not render) ─────► run the function (bypass)
//! memory backend: read ── hit ──────────────────────────────────────► decoded value
//! join the key's flight (this process)
//!   ├ follower ── the leader's value ───────────────────────────────► decoded value (coalesced)
//!   │           ├ retry (the leader failed, panicked, was cancelled,
//!   │           │  or its fill was stale) ── join again: one of the followers leads
//!   │           └ the leader outlived the wait (the lease, or 30 s) ─► detach it, join again
//!   └ leader
//!       without `lock`: read (value, or generation) ── hit ─────────► decoded value, shared
//!       with `lock`: Store::lease: the value, or the lease, or a wait for the holder's fill
//!       then: run the function ── verdict (stored? shared? an error?) ── fill if the
//!             generation is unchanged (releases the lease, wakes waiters) ── share with the
//!             followers, or tell them to retry
//! ```
//!
//! The code is split so that each annotated function compiles little: [`cached`] is the thin
//! generic shell (decode a value, run the body, classify and encode its result) and
//! [`fetch::Fetch`] is everything else, compiled once. Backend failures and undecodable values
//! are counted, logged (rate-limited) and treated as misses; they never reach the caller.

mod fetch;

use std::future::Future;

use crate::backend::Stored;
use crate::cache::Cache;
use crate::envelope;
use crate::key::CallKey;
use crate::mode::{Classified, Mode, Typed};
use crate::stats::Site;

pub(crate) use self::fetch::{Fetch, Step, Verdict};

/// One call of a cached function, as the attribute's expansion describes it.
#[doc(hidden)]
pub struct Call<'a> {
    /// The cache to use.
    pub cache: &'a Cache,
    /// The function's static description.
    pub site: &'static Site,
    /// `type_name::<Self>()` for methods, for the default label.
    pub self_type: Option<&'static str>,
    /// The rendered key, or why there is none (the call then bypasses the cache).
    pub key: CallKey,
}

/// Decodes a stored value: the kept decoded value when there is one of the right type,
/// otherwise the envelope's JSON.
fn restore<R, M: Mode<R>>(
    stored: &Stored,
    mode: &M,
    typed: Option<Typed<M::Value>>,
) -> Result<R, envelope::DecodeError> {
    if let (Some(any), Some(typed)) = (&stored.typed, typed) {
        if let Some(v) = (typed.unwrap)(&**any) {
            return Ok(mode.restore(v));
        }
    }
    envelope::decode::<M::Value>(&stored.bytes).map(|v| mode.restore(v))
}

/// What `result` means for the cache, encoded if it is to be stored or shared.
fn verdict<R, M: Mode<R>>(
    fetch: &Fetch<'_>,
    mode: &M,
    typed: Option<Typed<M::Value>>,
    result: &R,
    unless: impl FnOnce(&R) -> bool,
) -> Verdict {
    let (value, none) = match mode.classify(result) {
        Classified::Store(v) => (v, false),
        Classified::StoreNone(v) => (v, true),
        Classified::Error => return Verdict::Error,
    };
    if !fetch.wants_value() {
        return Verdict::Skip;
    }
    let rejected = unless(result);
    let bytes = match envelope::encode(value, fetch.load_time()) {
        Ok(bytes) => bytes,
        Err(e) => return Verdict::Unencodable(e),
    };
    let stored = Stored {
        bytes,
        typed: match typed {
            Some(typed) if fetch.keeps_typed() => Some((typed.wrap)(value)),
            _ => None,
        },
    };
    Verdict::new(stored, none, rejected)
}

/// The cached call: see the module docs.
#[doc(hidden)]
pub async fn cached<R, M, U, F>(
    call: Call<'_>,
    mode: M,
    typed: Option<Typed<M::Value>>,
    unless: U,
    fut: F,
) -> R
where
    M: Mode<R>,
    U: FnOnce(&R) -> bool,
    F: Future<Output = R>,
{
    let mut fetch = Fetch::new(call);
    if let Step::Found(stored) = fetch.lookup().await {
        match restore(&stored, &mode, typed) {
            Ok(value) => {
                fetch.hit(stored);
                return value;
            }
            Err(e) => fetch.unusable(&e).await,
        }
    }
    fetch.begin_load();
    let result = fut.await;
    fetch.end_load();
    let verdict = verdict(&fetch, &mode, typed, &result, unless);
    fetch.complete(verdict).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mode::{Tag, ViaResult as _, ViaTyped as _};

    fn assert_send<T: Send>(_: &T) {}

    /// The shell's future is `Send` when the body's future and the return type are: a cached
    /// function can be spawned.
    #[test]
    fn the_call_is_send() {
        let cache = Cache::memory();
        static SITE: Site = Site::new("tests", "send");
        #[allow(clippy::needless_borrow)]
        let mode = (&&Tag::<Result<u32, String>>::new()).__cache_mode();
        #[allow(clippy::needless_borrow)]
        let typed = (&&mode).__cache_typed();
        let call = Call {
            cache: &cache,
            site: &SITE,
            self_type: None,
            key: CallKey::Key("k".to_owned()),
        };
        let fut = cached(call, mode, typed, |_: &Result<u32, String>| false, async {
            Ok::<u32, String>(1)
        });
        assert_send(&fut);
    }
}
