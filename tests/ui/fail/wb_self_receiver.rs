use cache_runtime::write_behind;

struct Repo;

impl Repo {
    #[write_behind(key = "user:{id}", value = name, queue = "users")]
    async fn save_user(&self, id: u64, name: String) -> Result<(), std::io::Error> {
        let _ = (id, name);
        Ok(())
    }
}

fn main() {}
