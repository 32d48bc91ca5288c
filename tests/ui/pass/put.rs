#![deny(warnings)]

//! `#[cache_put]` on free functions and `&self` methods, with and without `value`.

use cache_runtime::{Cache, cache_put};
use serde::{Deserialize, Serialize};

/// A user.
#[derive(Serialize, Deserialize, Clone)]
pub struct User {
    id: u64,
    name: String,
}

/// The result is written.
#[cache_put(key = "user:{id}", ttl = "1h")]
pub async fn rename(id: u64, name: &str) -> Result<User, std::io::Error> {
    Ok(User { id, name: name.to_owned() })
}

/// `Option`, with `cache_none`, `condition`, `unless`, `version`, `name` and `tags`.
#[cache_put(
    key = "user:{id}",
    ttl = 60,
    cache_none,
    condition = id > 0,
    unless = matches!(result, Some(u) if u.name.is_empty()),
    version = 2,
    name = "find",
    tags = ["org:{org}", "users"]
)]
pub async fn find(id: u64, org: u32) -> Option<User> {
    let _ = org;
    None
}

/// A value computed from the arguments, before the body (which then moves `user`).
#[cache_put(key = "user:{id}", value = user)]
pub async fn save(id: u64, user: User) -> Result<(), std::io::Error> {
    let _ = (id, user);
    Ok(())
}

/// A value computed from `result`, after the body; `unless` without `result`.
#[cache_put(key = "user:{id}", value = result.as_ref().map(|u| u.name.len()).unwrap_or(0), unless = id == 7)]
pub async fn name_len(id: u64) -> Result<User, String> {
    Ok(User { id, name: String::new() })
}

/// A value that names `result` only inside a format string.
#[cache_put(key = "label:{id}", value = format!("{result:?}"))]
pub async fn label(id: u64) -> u64 {
    id
}

/// Methods.
pub struct Repo {
    cache: Cache,
    tenant: String,
}

impl Repo {
    /// `{self.field}` and `cache = self.cache`.
    #[cache_put(cache = self.cache, key = "user:{self.tenant}:{id}", tags = ["tenant:{self.tenant}"])]
    pub async fn rename(&self, id: u64, name: String) -> Result<User, std::io::Error> {
        Ok(User { id, name })
    }

    /// A value from `self` and an argument.
    #[cache_put(cache = self.cache, key = "user:{self.tenant}:{id}", value = User { id, name: self.tenant.clone() })]
    pub async fn touch(&self, id: u64) -> Option<()> {
        Some(())
    }
}

fn main() {
    let repo = Repo {
        cache: Cache::memory(),
        tenant: "acme".to_owned(),
    };
    let user = User { id: 1, name: "a".to_owned() };
    let _ = (rename(1, "a"), find(1, 2), save(1, user.clone()), name_len(1), label(1));
    let _ = (repo.rename(1, "b".to_owned()), repo.touch(1));
}
