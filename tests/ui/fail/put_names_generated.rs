use cache_runtime::cache_put;

// The generated locals are hidden: `value` and `unless` can name `result`, not them.
#[cache_put(key = "user:{id}", value = __cache_result.clone())]
async fn rename_user(id: u64) -> Result<String, std::io::Error> {
    Ok(id.to_string())
}

fn main() {}
