use cache_runtime::write_behind;

#[write_behind(key = "user:{id}", value = name, queue = "users")]
async fn save_user(id: u64, name: &str) -> Result<(), std::io::Error> {
    let _ = (id, name);
    Ok(())
}

fn main() {}
