use cache_runtime::cached;

struct Org {
    id: u64,
}

struct Query {
    org: Org,
    r#type: &'static str,
}

#[cached(
    key = "search:{q.org.id}:{q.r#type}:{q.type}:{pair.1}:{r#ref}",
    ttl = 60
)]
async fn search(q: &Query, pair: (u8, u8), r#ref: u32) -> u64 {
    q.org.id + u64::from(pair.1) + u64::from(r#ref) + q.r#type.len() as u64
}

fn main() {
    let q = Query {
        org: Org { id: 1 },
        r#type: "user",
    };
    let _ = search(&q, (0, 1), 2);
}
