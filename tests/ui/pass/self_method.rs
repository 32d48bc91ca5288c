use cache_runtime::{Cache, cached};

struct Repo {
    cache: Cache,
    tenant: String,
}

impl Repo {
    #[cached(cache = self.cache, key = "user:{self.tenant}:{id}", ttl = "10m")]
    async fn get(&self, id: u64) -> Result<String, std::io::Error> {
        Ok(format!("{}:{id}", self.tenant))
    }

    #[cached(cache = self.cache)]
    async fn count(&self) -> u64 {
        self.tenant.len() as u64
    }
}

fn main() {
    let repo = Repo {
        cache: Cache::memory(),
        tenant: "acme".to_owned(),
    };
    let _ = repo.get(1);
    let _ = repo.count();
}
