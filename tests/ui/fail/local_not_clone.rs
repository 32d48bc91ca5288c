use cache_runtime::cached;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Settings {
    theme: String,
}

#[cached(key = "settings:{id}", ttl = 600, local)]
async fn settings(id: u64) -> Result<Settings, std::io::Error> {
    Ok(Settings { theme: format!("{id}") })
}

fn main() {}
