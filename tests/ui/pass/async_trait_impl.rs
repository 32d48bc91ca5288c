use async_trait::async_trait;
use cache_runtime::{Cache, cached};

#[async_trait]
trait UserStore {
    async fn load(&self, id: u64) -> Result<String, std::io::Error>;
    async fn load_default_key(&self, id: u64) -> Option<String>;
}

struct PgStore {
    cache: Cache,
    region: &'static str,
}

#[async_trait]
impl UserStore for PgStore {
    #[cached(cache = self.cache, key = "store:{self.region}:{id}", ttl = "10m")]
    async fn load(&self, id: u64) -> Result<String, std::io::Error> {
        Ok(format!("{}:{id}", self.region))
    }

    #[cached(cache = self.cache, cache_none)]
    async fn load_default_key(&self, id: u64) -> Option<String> {
        (id > 0).then(|| id.to_string())
    }
}

fn main() {
    let store = PgStore {
        cache: Cache::memory(),
        region: "eu",
    };
    let _ = store.load(1);
    let _ = store.load_default_key(1);
}
