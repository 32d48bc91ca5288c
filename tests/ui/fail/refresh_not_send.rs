use std::rc::Rc;

use cache_runtime::cached;

#[cached(key = "local_state:{id}", refresh = "80%")]
async fn local_state(id: u64) -> u64 {
    let held = Rc::new(id);
    tokio::task::yield_now().await;
    *held
}

fn main() {}
