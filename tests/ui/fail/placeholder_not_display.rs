use cache_runtime::cached;

#[derive(serde::Serialize)]
struct Filter {
    active: bool,
}

#[cached(key = "users:{filter}", ttl = 60)]
async fn list(filter: Filter) -> Vec<u64> {
    if filter.active { vec![1] } else { vec![] }
}

fn main() {}
