use cache_runtime::write_behind;

#[derive(serde::Serialize, serde::Deserialize)]
struct User {
    name: String,
}

struct Audit {
    by: String,
}

#[write_behind(key = "user:{id}", value = user, queue = "users")]
async fn save_user(id: u64, user: User, audit: Audit) -> Result<(), std::io::Error> {
    let _ = (id, user.name, audit.by);
    Ok(())
}

fn main() {}
