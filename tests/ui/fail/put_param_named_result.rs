use cache_runtime::cache_put;

// `value = result` would name the parameter, not the function's output.
#[cache_put(key = "score:{id}", value = result)]
async fn save_score(id: u64, result: u64) -> Result<(), String> {
    let _ = (id, result);
    Ok(())
}

// Nor a pattern that binds `result`.
#[cache_put(key = "pair:{id}", unless = result.is_err())]
async fn save_pair(id: u64, (result, n): (u64, u64)) -> Result<u64, String> {
    Ok(id + result + n)
}

fn main() {}
