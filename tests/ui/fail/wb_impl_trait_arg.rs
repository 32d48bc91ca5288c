use cache_runtime::write_behind;

#[write_behind(key = "user:{id}", value = name.to_string(), queue = "users")]
async fn save_user(id: u64, name: impl std::fmt::Display) -> Result<(), std::io::Error> {
    let _ = (id, name.to_string());
    Ok(())
}

fn main() {}
