use cache_runtime::cached;

#[cached(key = "user:{id}", lock = true)]
async fn get(id: u64) -> u64 {
    id
}

fn main() {}
