#![deny(warnings)]

//! `#[cache_evict]` on free functions and `&self` methods.

use cache_runtime::{Cache, cache_evict};

/// Several keys and a tag.
#[cache_evict(keys = ["user:{id}", "user_profile:{id}", "user_list"], tags = ["org:{org}"])]
pub async fn delete_user(id: u64, org: u64) -> Result<(), std::io::Error> {
    let _ = (id, org);
    Ok(())
}

/// `before`, `condition`, `version`, `name`; a body that moves its argument.
#[cache_evict(keys = ["user:{user.id}"], before, condition = user.id > 0, version = 2, name = "purge")]
pub async fn purge(user: User) -> bool {
    drop(user);
    true
}

/// Tags only; `keys = []`.
#[cache_evict(keys = [], tags = ["org:{org}", "users"])]
pub async fn reorganise(org: u64) {
    let _ = org;
}

/// A user.
pub struct User {
    id: u64,
}

/// Methods.
pub struct Accounts {
    region: &'static str,
    cache: Cache,
}

impl Accounts {
    /// `{self.field}` and `cache = self.cache`.
    #[cache_evict(cache = self.cache, keys = ["user:{self.region}:{id}"], tags = ["region:{self.region}"])]
    pub async fn delete(&self, id: u64) -> Option<u64> {
        Some(id)
    }
}

fn main() {
    let repo = Accounts {
        region: "eu",
        cache: Cache::memory(),
    };
    let _ = (delete_user(1, 2), purge(User { id: 1 }), reorganise(1), repo.delete(1));
}
