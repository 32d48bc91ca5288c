#![deny(warnings)]

//! `#[cache_put]`, `#[cache_evict]` and `tags` in `#[async_trait]` impls.

use async_trait::async_trait;
use cache_runtime::{Cache, cache_evict, cache_put, cached};

/// A store.
#[async_trait]
pub trait UserStore {
    /// Reads.
    async fn load(&self, id: u64) -> Result<String, std::io::Error>;
    /// Writes the result.
    async fn rename(&self, id: u64, name: String) -> Result<String, std::io::Error>;
    /// Writes a value.
    async fn save(&self, id: u64, name: String) -> Result<(), std::io::Error>;
    /// Writes a value computed from the result.
    async fn upper(&self, id: u64) -> Option<String>;
    /// Evicts.
    async fn delete(&self, id: u64) -> Result<(), std::io::Error>;
    /// Reads, with an argument only the key uses.
    async fn schema(&self, tenant: u64) -> u32;
}

/// An implementation.
pub struct PgStore {
    cache: Cache,
    region: &'static str,
}

#[async_trait]
impl UserStore for PgStore {
    #[cached(cache = self.cache, key = "user:{id}", tags = ["region:{self.region}"])]
    async fn load(&self, id: u64) -> Result<String, std::io::Error> {
        Ok(format!("{}:{id}", self.region))
    }

    #[cache_put(cache = self.cache, key = "user:{id}", tags = ["region:{self.region}"])]
    async fn rename(&self, id: u64, name: String) -> Result<String, std::io::Error> {
        Ok(format!("{}:{id}:{name}", self.region))
    }

    #[cache_put(cache = self.cache, key = "user:{id}", value = name, unless = result.is_err())]
    async fn save(&self, id: u64, name: String) -> Result<(), std::io::Error> {
        // `id` and `name` are used by the attribute only.
        Ok(())
    }

    #[cache_put(cache = self.cache, key = "user:{id}", value = result.as_deref().map(str::to_uppercase))]
    async fn upper(&self, id: u64) -> Option<String> {
        Some(id.to_string())
    }

    #[cache_evict(cache = self.cache, keys = ["user:{id}"], tags = ["region:{self.region}"], before)]
    async fn delete(&self, id: u64) -> Result<(), std::io::Error> {
        Ok(())
    }

    #[cached(cache = self.cache, key = "schema:{tenant}")]
    async fn schema(&self, tenant: u64) -> u32 {
        3
    }
}

fn main() {
    let store = PgStore {
        cache: Cache::memory(),
        region: "eu",
    };
    let store: &dyn UserStore = &store;
    let _ = (store.load(1), store.rename(1, "a".into()), store.save(1, "b".into()));
    let _ = (store.upper(1), store.delete(1), store.schema(1));
}
