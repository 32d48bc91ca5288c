//! Shared pieces of the examples: a user record and a pretend database.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A user row, about 200 bytes of JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Primary key.
    pub id: u64,
    /// Display name.
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// Organisation.
    pub org_id: u64,
    /// Roles.
    pub roles: Vec<String>,
    /// Creation time, seconds since the epoch.
    pub created_at: u64,
}

/// The error a database call can return.
#[derive(Debug)]
pub struct DbError(pub String);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "database error: {}", self.0)
    }
}

impl std::error::Error for DbError {}

static QUERIES: AtomicU64 = AtomicU64::new(0);

/// Pretends to run `SELECT ... FROM users WHERE id = $1`, taking `latency`.
pub async fn select_user(id: u64, latency: Duration) -> Result<Option<User>, DbError> {
    QUERIES.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(latency).await;
    if id == 0 {
        return Ok(None);
    }
    Ok(Some(User {
        id,
        name: format!("User {id}"),
        email: format!("user{id}@example.com"),
        org_id: id % 7,
        roles: vec!["reader".to_owned(), "writer".to_owned()],
        created_at: 1_700_000_000 + id,
    }))
}

/// How many queries [`select_user`] has run.
pub fn queries() -> u64 {
    QUERIES.load(Ordering::Relaxed)
}
