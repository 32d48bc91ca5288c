use cache_runtime::cache_put;

#[cache_put(key = "user:{id}", lock)]
async fn rename_user(id: u64, name: String) -> Result<String, std::io::Error> {
    Ok(format!("{id}:{name}"))
}

fn main() {}
