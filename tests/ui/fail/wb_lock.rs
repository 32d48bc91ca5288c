use cache_runtime::write_behind;

#[write_behind(key = "user:{id}", value = name, queue = "users", lock)]
async fn save_user(id: u64, name: String) -> Result<(), std::io::Error> {
    let _ = (id, name);
    Ok(())
}

fn main() {}
