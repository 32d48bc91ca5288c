use cache_runtime::cache_put;

struct Row {
    id: u64,
}

#[cache_put(key = "user:{id}", value = Row { id })]
async fn save(id: u64) -> Result<(), std::io::Error> {
    Ok(())
}

fn main() {}
