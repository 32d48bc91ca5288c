use cache_runtime::cached;
use serde::Serialize;
use serde::de::DeserializeOwned;

// With `R = Result<_, _>`, an `Err` would be stored: the caching rule cannot see through `R`.
#[cached(key = "load:{id}", ttl = 60)]
async fn load<R: Serialize + DeserializeOwned + Default>(id: u64) -> R {
    let _ = id;
    R::default()
}

fn main() {
    let _ = load::<Option<u64>>(1);
}
