use cache_runtime::cached;
use serde::Serialize;
use serde::de::DeserializeOwned;

trait Query {
    type Output: Default + Serialize + DeserializeOwned;
}

#[cached(key = "run:{id}", ttl = 60)]
async fn run<Q: Query>(id: u64) -> Q::Output {
    let _ = id;
    Q::Output::default()
}

#[cached(key = "run_qualified:{id}", ttl = 60)]
async fn run_qualified<Q: Query>(id: u64) -> <Q as Query>::Output {
    let _ = id;
    Default::default()
}

fn main() {}
