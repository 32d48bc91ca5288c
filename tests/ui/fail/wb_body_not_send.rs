use cache_runtime::write_behind;

async fn audit() {}

#[write_behind(key = "user:{id}", value = name, queue = "users")]
async fn save_user(id: u64, name: String) -> Result<(), std::io::Error> {
    let local = std::rc::Rc::new(name);
    audit().await;
    let _ = (id, local);
    Ok(())
}

fn main() {}
