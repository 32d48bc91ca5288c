//! `stale` in the shapes users write: with `lock`, `local`, tags, on a method, a one-line body,
//! under `#![deny(warnings)]`.
#![deny(warnings)]

use cache_runtime::cached;

#[cached(key = "price:{id}", ttl = 60, stale = "10m")]
pub async fn price(id: u64) -> Result<u64, std::io::Error> { Ok(id) }

#[cached(key = "rate:{from}:{to}", ttl = "30s", stale = 600, lock, local, tags = ["fx"])]
pub async fn rate(from: &str, to: &str) -> Option<f64> {
    (from != to).then_some(1.5)
}

pub struct Catalog;

impl Catalog {
    #[cached(key = "item:{id}", stale = "1h")]
    pub async fn item(&self, id: u64) -> String {
        format!("item {id}")
    }
}

fn main() {
    let _ = (price(1), rate("a", "b"), Catalog.item(3));
}
