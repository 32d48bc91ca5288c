#![deny(warnings)]

//! A crate that denies warnings can use every option.

use cache_runtime::{Cache, cached};
use serde::{Deserialize, Serialize};

/// A user.
#[derive(Serialize, Deserialize)]
pub struct User {
    id: u64,
}

/// A repository.
pub struct Repo {
    cache: Cache,
    tenant: String,
}

impl Repo {
    /// Every option at once.
    #[cached(
        cache = self.cache,
        key = "user:{self.tenant}:{id}",
        ttl = "1h30m",
        condition = id > 0,
        unless = matches!(result, Ok(None)),
        cache_none = 30,
        version = 2,
        lock = "30s",
        name = "repo_get"
    )]
    pub async fn get(&self, id: u64) -> Result<Option<User>, std::io::Error> {
        Ok(Some(User { id }))
    }

    /// The default key.
    #[cached]
    pub async fn count(&self, prefix: &str) -> usize {
        self.tenant.len() + prefix.len()
    }
}

/// A free function with an unused-looking parameter name.
#[cached(key = "ping:{_id}")]
pub async fn ping(_id: u32) {}

fn main() {
    let repo = Repo {
        cache: Cache::memory(),
        tenant: "acme".to_owned(),
    };
    let _ = repo.get(1);
    let _ = repo.count("x");
    let _ = ping(1);
}
