use async_trait::async_trait;
use cache_runtime::cached;

struct User {
    id: u64,
}

#[async_trait]
trait UserStore {
    async fn load(&self, id: u64) -> Option<User>;
}

struct PgStore;

#[async_trait]
impl UserStore for PgStore {
    #[cached(key = "user:{id}", ttl = 60)]
    async fn load(&self, id: u64) -> Option<User> {
        Some(User { id })
    }
}

fn main() {}
