use cache_runtime::cached;

#[cached(key = "a:{id}", refresh = "0%")]
async fn zero(id: u64) -> u64 { id }

#[cached(key = "b:{id}", refresh = "100%")]
async fn full(id: u64) -> u64 { id }

#[cached(key = "c:{id}", refresh = "80")]
async fn no_unit(id: u64) -> u64 { id }

#[cached(key = "d:{id}", refresh = 80)]
async fn not_a_string(id: u64) -> u64 { id }

#[cached(key = "e:{id}", refresh = "0.8")]
async fn fraction(id: u64) -> u64 { id }

fn main() {}
