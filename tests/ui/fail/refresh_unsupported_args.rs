use cache_runtime::cached;

#[cached(key = "mut_ref:{id}", refresh = "80%")]
async fn mut_ref(buf: &mut Vec<u8>, id: u64) -> usize {
    buf.push(1);
    buf.len() + id as usize
}

#[cached(key = "pattern:{a}", refresh = "80%")]
async fn pattern(a: u64, (b, c): (u64, u64)) -> u64 {
    a + b + c
}

#[derive(Clone)]
pub struct Counter {
    n: u64,
}

impl Counter {
    #[cached(key = "counter:{id}", refresh)]
    async fn bump(&mut self, id: u64) -> u64 {
        self.n += id;
        self.n
    }
}

fn main() {}
