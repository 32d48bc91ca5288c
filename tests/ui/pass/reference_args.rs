use cache_runtime::cached;

#[cached(key = "name:{name}", ttl = 60)]
async fn greet(name: &str) -> String {
    format!("hello {name}")
}

#[cached(ttl = 60)]
async fn total(name: &str, ids: &[u64]) -> u64 {
    name.len() as u64 + ids.iter().sum::<u64>()
}

#[cached(key = "first:{ids.0}", ttl = 60)]
async fn first<'a>(ids: &'a (u64, u64), _tail: &'a [u64]) -> u64 {
    ids.0
}

fn main() {
    let ids = vec![1, 2, 3];
    let _ = greet("ada");
    let _ = total("ada", &ids);
    let _ = first(&(1, 2), &ids);
}
