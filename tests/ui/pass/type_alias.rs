use cache_runtime::cached;

type DbResult<T> = Result<T, std::io::Error>;
type Maybe<T> = Option<T>;

#[cached(key = "user:{id}", ttl = 60)]
async fn get(id: u64) -> DbResult<String> {
    Ok(id.to_string())
}

#[cached(key = "user:{id}", ttl = 60, cache_none)]
async fn find(id: u64) -> DbResult<Maybe<String>> {
    Ok(Some(id.to_string()))
}

fn main() {
    let _ = get(1);
    let _ = find(1);
}
