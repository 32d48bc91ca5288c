use cache_runtime::cached;

#[derive(serde::Serialize)]
struct Query {
    org: u64,
}

#[cached(key = "search:{q.orgs}", ttl = 60)]
async fn search(q: &Query) -> u64 {
    q.org
}

fn main() {}
