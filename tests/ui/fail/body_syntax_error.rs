use cache_runtime::cached;

#[cached(key = "user:{id}", ttl = 60)]
async fn get(id: u64) -> u64 {
    let doubled = id * ;
    doubled
}

fn main() {}
