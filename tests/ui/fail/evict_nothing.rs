use cache_runtime::cache_evict;

#[cache_evict(keys = [])]
async fn delete_user(id: u64) -> Result<(), std::io::Error> {
    let _ = id;
    Ok(())
}

fn main() {}
