use cache_runtime::cache_put;

#[cache_put(key = "user:{id}")]
async fn touch_user(id: u64) {
    let _ = id;
}

fn main() {}
