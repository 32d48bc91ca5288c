//! `refresh` in the shapes users write: both forms, with `lock`, `local`, `stale`, tags,
//! `unless`, `cache_none`; reference, slice, `mut`, `_`, generic and unused arguments (an
//! argument the body does not use need not be copyable), format-string captures, a `self::`
//! path; `&self`, `self` and `self: Arc<Self>` methods (a method whose body does not use
//! `self` needs no `Clone`), one inside `#[async_trait]`; under `#![deny(warnings)]`. The
//! functions' futures stay `Send`.
#![deny(warnings)]

use std::sync::Arc;

use async_trait::async_trait;
use cache_runtime::{Cache, cached};

#[cached(key = "price:{id}", ttl = 60, refresh = "80%")]
pub async fn price(id: u64) -> Result<u64, std::io::Error> { Ok(id) }

#[cached(key = "rate:{from}:{to}", ttl = "30s", refresh, lock, local, stale = 600, tags = ["fx:{from}"])]
pub async fn rate(from: &str, to: &str, _hint: u8) -> Option<f64> {
    (from != to).then_some(1.5)
}

#[cached(key = "sum:{id}", refresh = "50%", unless = matches!(result, Ok(Some(s)) if s.is_empty()), cache_none)]
pub async fn sum(id: u64, mut weights: Vec<u32>, ids: &[u64]) -> Result<Option<String>, String> {
    weights.push(1);
    Ok(Some(format!("{id}:{}:{}", weights.len(), ids.len())))
}

/// Not `Clone`: fine as long as the body does not use it.
pub struct Conn {
    pub enabled: bool,
}

#[cached(key = "flag:{name}", condition = conn.enabled, refresh = "90%")]
pub async fn flag(conn: &Conn, name: String) -> bool {
    self::helper(&name)
}

fn helper(name: &str) -> bool {
    name.is_empty()
}

#[cached(key = "label:{id}", refresh = "1%")]
pub async fn label<T: std::fmt::Display + Clone + Send + Sync + 'static>(id: u64, prefix: T) -> String {
    format!("{prefix}{id}")
}

#[derive(Clone)]
pub struct Repo {
    cache: Cache,
    region: Arc<str>,
}

/// Not `Clone`: fine for methods whose body does not use `self`.
pub struct Plain {
    cache: Cache,
}

impl Repo {
    #[cached(cache = self.cache, key = "user:{self.region}:{id}", refresh = "75%")]
    pub async fn user(&self, id: u64) -> Result<String, std::io::Error> {
        Ok(format!("{}/{id}", self.region))
    }

    #[cached(key = "owned:{id}", refresh)]
    pub async fn owned(self, id: u64) -> String {
        format!("{}/{id}", self.region)
    }

    #[cached(key = "shared:{id}", refresh)]
    pub async fn shared(self: Arc<Self>, id: u64) -> String {
        format!("{}/{id}", self.region)
    }
}

impl Plain {
    #[cached(cache = self.cache, key = "plain:{id}", refresh = "60%")]
    pub async fn get(&self, id: u64) -> u64 {
        id + 1
    }
}

#[async_trait]
pub trait Store {
    async fn load(&self, id: u64, name: &str) -> Result<String, std::io::Error>;
}

#[async_trait]
impl Store for Repo {
    #[cached(cache = self.cache, key = "store:{id}", ttl = "10m", refresh = "80%")]
    async fn load(&self, id: u64, name: &str) -> Result<String, std::io::Error> {
        Ok(format!("{}:{id}:{name}", self.region))
    }
}

fn assert_send<T: Send>(_: T) {}

fn main() {
    let repo = Repo { cache: Cache::memory(), region: "eu".into() };
    let plain = Plain { cache: Cache::memory() };
    let conn = Conn { enabled: true };
    let _ = (price(1), rate("a", "b", 0), sum(1, vec![], &[1]), flag(&conn, String::new()));
    let _ = (label(1, "x"), repo.user(1), plain.get(1), repo.load(1, "n"));
    let _ = (repo.clone().owned(1), Arc::new(repo.clone()).shared(1));
    // The functions' futures are still `Send`: they can be spawned.
    assert_send(rate("a", "b", 0));
    assert_send(sum(1, vec![], &[1]));
    assert_send(repo.user(1));
    assert_send(plain.get(1));
}
