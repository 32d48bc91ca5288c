use cache_runtime::cache_evict;

const USER_LIST: &str = "user_list";

#[cache_evict(keys = ["user:{id}", USER_LIST])]
async fn delete_user(id: u64) -> Result<(), std::io::Error> {
    let _ = id;
    Ok(())
}

fn main() {}
