use cache_runtime::cached;

struct Repo {
    pool: String,
}

impl Repo {
    #[cached(cache = self.pool, key = "user:{id}", ttl = 60)]
    async fn get(&self, id: u64) -> u64 {
        id
    }
}

fn main() {}
