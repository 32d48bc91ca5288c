use cache_runtime::cache_put;

// `value = result` would name the parameter, not the function's output.
#[cache_put(key = "score:{id}", value = result)]
async fn save_score(id: u64, result: u64) -> Result<(), String> {
    let _ = (id, result);
    Ok(())
}

fn main() {}
