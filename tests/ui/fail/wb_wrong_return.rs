use cache_runtime::write_behind;

#[write_behind(key = "user:{id}", value = name, queue = "users")]
async fn save_user(id: u64, name: String) -> Result<u64, std::io::Error> {
    let _ = name;
    Ok(id)
}

fn main() {}
