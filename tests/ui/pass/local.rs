//! `local` in the shapes users write: a flag, a TTL, with `lock`, tags, `cache_none`, on a
//! method, under `#![deny(warnings)]`.
#![deny(warnings)]

use cache_runtime::cached;
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
pub struct Setting {
    pub value: String,
}

#[cached(key = "setting:{key}", ttl = 600, local)]
pub async fn setting(key: String) -> Setting { Setting { value: key } }

#[cached(key = "flag:{name}", ttl = "10m", local = "30s", lock)]
pub async fn flag(name: &str) -> Result<bool, std::io::Error> {
    Ok(name.is_empty())
}

#[cached(key = "org:{org}:user:{id}", ttl = 60, tags = ["org:{org}"], local = 5, cache_none)]
pub async fn user(org: u64, id: u64) -> Option<String> {
    (id > 0).then(|| format!("{org}/{id}"))
}

pub struct Repo;

impl Repo {
    #[cached(key = "repo:{id}", local)]
    pub async fn get(&self, id: u64) -> Vec<u8> {
        vec![id as u8]
    }
}

fn main() {
    let _ = (setting(String::new()), flag(""), user(1, 2), Repo.get(3));
}
