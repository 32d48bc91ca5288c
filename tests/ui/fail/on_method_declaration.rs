use cache_runtime::cached;

trait UserStore {
    #[cached(key = "user:{id}", ttl = 60)]
    async fn get(&self, id: u64) -> u64;
}

fn main() {}
