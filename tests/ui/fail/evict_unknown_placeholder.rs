use cache_runtime::cache_evict;

#[cache_evict(keys = ["user:{id}", "user_profile:{user_id}"])]
async fn on_user_updated(id: u64) -> Result<(), std::io::Error> {
    let _ = id;
    Ok(())
}

fn main() {}
