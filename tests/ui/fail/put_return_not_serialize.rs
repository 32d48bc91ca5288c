use cache_runtime::cache_put;

struct Row {
    id: u64,
}

#[cache_put(key = "user:{id}")]
async fn save(id: u64) -> Result<Row, std::io::Error> {
    Ok(Row { id })
}

fn main() {}
