use cache_runtime::cache_put;

#[cache_put(key = "user:{id}", unless = result.as_ref().ok())]
async fn rename_user(id: u64) -> Result<String, std::io::Error> {
    Ok(id.to_string())
}

fn main() {}
