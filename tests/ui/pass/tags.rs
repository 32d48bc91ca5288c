#![deny(warnings)]

//! `tags` on `#[cached]`.

use cache_runtime::{Cache, cached};

/// Tags from arguments and literal tags.
#[cached(key = "user:{id}", tags = ["org:{org}", "users"], ttl = "10m")]
pub async fn get_user(id: u64, org: u32) -> Result<String, std::io::Error> {
    Ok(format!("{org}:{id}"))
}

/// The default key, with a tag; `condition`.
#[cached(tags = ["org:{org}"], condition = org > 0)]
pub async fn count(org: u32) -> u64 {
    u64::from(org)
}

/// Methods.
pub struct Repo {
    cache: Cache,
    tenant: String,
}

impl Repo {
    /// `{self.field}` in a tag.
    #[cached(cache = self.cache, key = "user:{id}", tags = ["tenant:{self.tenant}", "user:{id}"])]
    pub async fn get(&self, id: u64) -> Option<String> {
        Some(format!("{}:{id}", self.tenant))
    }
}

fn main() {
    let repo = Repo {
        cache: Cache::memory(),
        tenant: "acme".to_owned(),
    };
    let _ = (get_user(1, 2), count(1), repo.get(1));
}
