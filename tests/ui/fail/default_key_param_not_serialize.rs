use cache_runtime::cached;

struct Filter {
    active: bool,
}

#[cached(ttl = 60)]
async fn list(id: u64, filter: Filter) -> Vec<u64> {
    if filter.active { vec![id] } else { vec![] }
}

fn main() {}
