#![deny(warnings)]

//! One-line bodies, in a crate that denies warnings: the body's braces must not be reported
//! as "unnecessary braces around block return value" (`unused_braces`).

use async_trait::async_trait;
use cache_runtime::{Cache, cached};

/// Plain.
#[cached]
pub async fn plain(id: u64) -> u64 { id * 2 }

/// Plain, with a key.
#[cached(key = "plain:{id}")]
pub async fn plain_key(id: u64) -> u64 { id * 2 }

/// `Result`.
#[cached]
pub async fn result(id: u64) -> Result<u64, String> { Ok(id) }

/// `Result`, with a key.
#[cached(key = "result:{id}")]
pub async fn result_key(id: u64) -> Result<u64, String> { Ok(id) }

/// `Option`.
#[cached]
pub async fn option(id: u64) -> Option<u64> { Some(id) }

/// `Option`, with a key and `cache_none`.
#[cached(key = "option:{id}", cache_none)]
pub async fn option_key(id: u64) -> Option<u64> { Some(id) }

/// `String`.
#[cached]
pub async fn string(id: u64) -> String { format!("{id}") }

/// `String`, with a key.
#[cached(key = "string:{id}")]
pub async fn string_key(id: u64) -> String { format!("{id}") }

/// `Result<Option<T>, E>`.
#[cached(key = "both:{id}")]
pub async fn both(id: u64) -> Result<Option<u64>, String> { Ok(Some(id)) }

/// A literal.
#[cached]
pub async fn literal() -> u64 { 7 }

/// A path.
#[cached]
pub async fn path(id: u64) -> u64 { id }

/// Nothing.
#[cached(key = "unit:{id}")]
pub async fn unit(id: u64) { let _ = id; }

/// A repository.
pub struct Repo {
    cache: Cache,
    tenant: String,
}

impl Repo {
    /// Plain.
    #[cached(cache = self.cache)]
    pub async fn plain(&self, id: u64) -> u64 { id * 2 }

    /// Plain, with a key.
    #[cached(cache = self.cache, key = "plain:{self.tenant}:{id}")]
    pub async fn plain_key(&self, id: u64) -> u64 { id * 2 }

    /// `Result`.
    #[cached(cache = self.cache)]
    pub async fn result(&self, id: u64) -> Result<u64, String> { Ok(id) }

    /// `Result`, with a key.
    #[cached(cache = self.cache, key = "result:{self.tenant}:{id}")]
    pub async fn result_key(&self, id: u64) -> Result<u64, String> { Ok(id) }

    /// `Option`.
    #[cached(cache = self.cache)]
    pub async fn option(&self, id: u64) -> Option<u64> { Some(id) }

    /// `Option`, with a key.
    #[cached(cache = self.cache, key = "option:{self.tenant}:{id}")]
    pub async fn option_key(&self, id: u64) -> Option<u64> { Some(id) }

    /// `String`.
    #[cached(cache = self.cache)]
    pub async fn string(&self, id: u64) -> String { format!("{id}") }

    /// `String`, with a key.
    #[cached(cache = self.cache, key = "string:{self.tenant}:{id}")]
    pub async fn string_key(&self, id: u64) -> String { format!("{id}") }

    /// A field.
    #[cached(cache = self.cache, key = "tenant")]
    pub async fn tenant(&self) -> String { self.tenant.clone() }
}

/// A store behind `#[async_trait]`.
#[async_trait]
pub trait Store {
    /// Plain.
    async fn plain(&self, id: u64) -> u64;
    /// Plain, with a key.
    async fn plain_key(&self, id: u64) -> u64;
    /// `Result`.
    async fn result(&self, id: u64) -> Result<u64, String>;
    /// `Result`, with a key.
    async fn result_key(&self, id: u64) -> Result<u64, String>;
    /// `Option`.
    async fn option(&self, id: u64) -> Option<u64>;
    /// `Option`, with a key.
    async fn option_key(&self, id: u64) -> Option<u64>;
    /// `String`.
    async fn string(&self, id: u64) -> String;
    /// `String`, with a key.
    async fn string_key(&self, id: u64) -> String;
}

#[async_trait]
impl Store for Repo {
    #[cached(cache = self.cache)]
    async fn plain(&self, id: u64) -> u64 { id * 2 }

    #[cached(cache = self.cache, key = "t-plain:{id}")]
    async fn plain_key(&self, id: u64) -> u64 { id * 2 }

    #[cached(cache = self.cache)]
    async fn result(&self, id: u64) -> Result<u64, String> { Ok(id) }

    #[cached(cache = self.cache, key = "t-result:{id}")]
    async fn result_key(&self, id: u64) -> Result<u64, String> { Ok(id) }

    #[cached(cache = self.cache)]
    async fn option(&self, id: u64) -> Option<u64> { Some(id) }

    #[cached(cache = self.cache, key = "t-option:{id}")]
    async fn option_key(&self, id: u64) -> Option<u64> { Some(id) }

    #[cached(cache = self.cache)]
    async fn string(&self, id: u64) -> String { format!("{id}") }

    #[cached(cache = self.cache, key = "t-string:{id}")]
    async fn string_key(&self, id: u64) -> String { format!("{id}") }
}

fn main() {
    let repo = Repo {
        cache: Cache::memory(),
        tenant: "acme".to_owned(),
    };
    let _ = (plain(1), plain_key(1), result(1), result_key(1));
    let _ = (option(1), option_key(1), string(1), string_key(1));
    let _ = (both(1), literal(), path(1), unit(1));
    let _ = (repo.plain(1), repo.plain_key(1), repo.result(1), repo.result_key(1));
    let _ = (repo.option(1), repo.option_key(1), repo.string(1), repo.string_key(1));
    let _ = repo.tenant();
    let store: &dyn Store = &repo;
    let _ = (store.plain(1), store.plain_key(1), store.result(1), store.result_key(1));
    let _ = (store.option(1), store.option_key(1), store.string(1), store.string_key(1));
}
