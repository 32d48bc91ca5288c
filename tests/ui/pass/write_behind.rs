#![deny(warnings)]

//! `#[write_behind]`: the return types it takes, tags, condition, pattern arguments, and the
//! options that change nothing in the call's shape.

use cache_runtime::{Cache, write_behind};
use serde::{Deserialize, Serialize};

/// A user.
#[derive(Serialize, Deserialize, Clone)]
pub struct User {
    name: String,
}

/// A database error.
#[derive(Debug)]
pub struct DbError;

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("db")
    }
}

/// A typical one: `Result<(), E>`, a body with `?`.
#[write_behind(key = "user:{id}", ttl = "1h", value = user, queue = "users")]
pub async fn save_user(id: u64, user: User) -> Result<(), DbError> {
    check(id)?;
    let _ = user.name.len();
    Ok(())
}

fn check(id: u64) -> Result<(), DbError> {
    if id == 0 { Err(DbError) } else { Ok(()) }
}

/// A unit function, `tags`, `condition`, `coalesce = false`, `name`, `version`.
#[write_behind(
    key = "user:{id}",
    value = name,
    queue = "renames",
    tags = ["org:{org}"],
    condition = id > 0,
    coalesce = false,
    name = "rename_user",
    version = 2
)]
pub async fn rename(id: u64, org: u64, name: String) {
    let _ = (org, name);
}

/// `io::Result<()>`, `cache = expr`, pattern arguments, `mut`.
#[write_behind(cache = CACHE, key = "pair:{id}", value = (a, b), queue = "pairs", coalesce)]
async fn pair(id: u64, (a, b): (u64, u64), mut note: String, _: bool) -> std::io::Result<()> {
    note.push_str(&(id + a + b).to_string());
    Ok(())
}

/// A one-line body that uses only some arguments.
#[write_behind(key = "count:{id}", value = n, queue = "counts")]
async fn count(id: u64, n: u64) -> Result<(), std::io::Error> { Ok(()) }

static CACHE: std::sync::LazyLock<Cache> = std::sync::LazyLock::new(Cache::memory);

/// A repository of users.
pub struct Users;

impl Users {
    /// An associated function (no `self`), with attributes kept on it.
    #[allow(clippy::unused_async)]
    #[write_behind(key = "user:{id}", value = user, queue = "users", name = "Users::save")]
    pub async fn save(id: u64, user: User) -> anyhow_like::Result<()> {
        if id == 0 {
            return Err(DbError);
        }
        drop(user);
        Ok(())
    }
}

/// A `Result` alias under another path, as `anyhow::Result<()>`.
mod anyhow_like {
    /// `Result<T, DbError>`.
    pub type Result<T> = std::result::Result<T, super::DbError>;
}

fn main() {
    drop(save_user(1, User { name: "a".into() }));
    drop(rename(1, 2, "b".into()));
    drop(pair(1, (2, 3), String::new(), true));
    drop(count(1, 2));
    drop(Users::save(1, User { name: "c".into() }));
}
