use cache_runtime::cached;

struct User {
    id: u64,
}

#[cached(key = "user:{id}", ttl = 60)]
async fn get(id: u64) -> Result<User, std::io::Error> {
    Ok(User { id })
}

fn main() {}
