use cache_runtime::cached;

#[cached(key = "pair:{a}{b}", ttl = 60)]
async fn pair(a: u64, b: u64) -> u64 {
    a + b
}

fn main() {}
