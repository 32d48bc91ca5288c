use cache_runtime::cache_evict;

#[cache_evict(keys = ["user:{id}"], before = true)]
async fn delete_user(id: u64) -> Result<(), std::io::Error> {
    let _ = id;
    Ok(())
}

fn main() {}
