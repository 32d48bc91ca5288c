#![deny(warnings)]

//! One-line bodies of `#[cache_put]`, `#[cache_evict]` and tagged `#[cached]` functions, in a
//! crate that denies warnings.

use async_trait::async_trait;
use cache_runtime::{Cache, cache_evict, cache_put, cached};

/// Tagged.
#[cached(key = "t:{id}", tags = ["t"])]
pub async fn tagged(id: u64) -> u64 { id }

/// Put, result.
#[cache_put(key = "p:{id}")]
pub async fn put_result(id: u64) -> Result<u64, String> { Ok(id) }

/// Put, option.
#[cache_put(key = "p:{id}", tags = ["p"])]
pub async fn put_option(id: u64) -> Option<u64> { Some(id) }

/// Put, plain.
#[cache_put(key = "p:{id}")]
pub async fn put_plain(id: u64) -> u64 { id }

/// Put, value.
#[cache_put(key = "p:{id}", value = id)]
pub async fn put_value(id: u64) -> Result<(), String> { Ok(()) }

/// Put, value over the result.
#[cache_put(key = "p:{id}", value = *result + 1)]
pub async fn put_value_result(id: u64) -> u64 { id }

/// Put, nothing returned.
#[cache_put(key = "p:{id}", value = id)]
pub async fn put_unit(id: u64) {}

/// Evict, unit.
#[cache_evict(keys = ["p:{id}"])]
pub async fn evict_unit(id: u64) {}

/// Evict, result.
#[cache_evict(keys = ["p:{id}"], tags = ["p"], before)]
pub async fn evict_result(id: u64) -> Result<(), String> { Ok(()) }

/// Evict, plain.
#[cache_evict(keys = ["p:{id}"], condition = id > 1)]
pub async fn evict_plain(id: u64) -> u64 { id }

/// A repository.
pub struct Repo {
    cache: Cache,
}

impl Repo {
    /// Put.
    #[cache_put(cache = self.cache, key = "p:{id}")]
    pub async fn put(&self, id: u64) -> Option<u64> { Some(id) }

    /// Put, value.
    #[cache_put(cache = self.cache, key = "p:{id}", value = id)]
    pub async fn put_value(&self, id: u64) -> bool { id > 0 }

    /// Evict.
    #[cache_evict(cache = self.cache, keys = ["p:{id}"])]
    pub async fn evict(&self, id: u64) -> Result<u64, String> { Ok(id) }
}

/// A store behind `#[async_trait]`.
#[async_trait]
pub trait Store {
    /// Put.
    async fn put(&self, id: u64) -> Option<u64>;
    /// Put, value.
    async fn put_value(&self, id: u64) -> bool;
    /// Evict.
    async fn evict(&self, id: u64) -> Result<u64, String>;
}

#[async_trait]
impl Store for Repo {
    #[cache_put(cache = self.cache, key = "t-p:{id}")]
    async fn put(&self, id: u64) -> Option<u64> { Some(id) }

    #[cache_put(cache = self.cache, key = "t-p:{id}", value = id)]
    async fn put_value(&self, id: u64) -> bool { id > 0 }

    #[cache_evict(cache = self.cache, keys = ["t-p:{id}"])]
    async fn evict(&self, id: u64) -> Result<u64, String> { Ok(id) }
}

fn main() {
    let repo = Repo { cache: Cache::memory() };
    let _ = (tagged(1), put_result(1), put_option(1), put_plain(1), put_value(1));
    let _ = (put_value_result(1), put_unit(1), evict_unit(1), evict_result(1), evict_plain(1));
    let _ = (repo.put(1), repo.put_value(1), repo.evict(1));
    let store: &dyn Store = &repo;
    let _ = (store.put(1), store.put_value(1), store.evict(1));
}
