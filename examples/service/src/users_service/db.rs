//! The service's database access: a small pool of `tokio-postgres` connections, each with
//! its prepared statements, and the table's creation and seeding.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::{Client, NoTls, Statement};

use super::User;
use cache_examples::DbError;

/// How long connecting to PostgreSQL may take before the request fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The metric counting the statements the service sends to PostgreSQL (what the cache saves).
pub const DB_QUERIES: &str = "users_db_queries_total";

/// A connection and its prepared statements.
struct Conn {
    client: Client,
    select: Statement,
    by_org: Statement,
    update: Statement,
    delete: Statement,
}

/// A fixed number of connections used round-robin. A `tokio-postgres` client pipelines
/// concurrent queries over its one connection, so a caller never waits for a free slot;
/// a slot whose connection died is reconnected by its next caller.
pub(super) struct Db {
    url: String,
    table: String,
    slots: Vec<Mutex<Option<Arc<Conn>>>>,
    next: AtomicUsize,
    queries: metrics::Counter,
    count: AtomicU64,
}

fn db_error(context: &str, e: impl std::fmt::Display) -> DbError {
    DbError(format!("{context}: {e}"))
}

/// The columns the service reads and writes, with their PostgreSQL types
/// (`information_schema.columns.data_type`).
const COLUMNS: [(&str, &str); 4] = [
    ("id", "bigint"),
    ("name", "text"),
    ("email", "text"),
    ("org_id", "bigint"),
];

/// `table` as a quoted SQL identifier (it is checked by [`check_table_name`]: no quote in
/// it), so that a reserved word (`user`) names a table too.
fn ident(table: &str) -> String {
    format!("\"{table}\"")
}

/// Checks that `table` can be written in SQL: `[a-z_][a-z0-9_]*`, at most 63 bytes.
pub(super) fn check_table_name(table: &str) -> Result<(), String> {
    let mut chars = table.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if !first_ok
        || table.len() > 63
        || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(format!(
            "invalid table name `{table}`: use 1 to 63 characters of [a-z0-9_], not starting with a digit"
        ));
    }
    Ok(())
}

/// Connects once, spawning the connection's driver on the current runtime.
async fn connect(url: &str) -> Result<Client, DbError> {
    let (client, connection) =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| {
                DbError(format!(
                    "connecting to PostgreSQL timed out after {CONNECT_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| db_error("connecting to PostgreSQL", e))?;
    tokio::spawn(async move {
        // Ends when the client is dropped or the server goes away; the next caller of the
        // slot sees `is_closed()` and reconnects.
        let _ = connection.await;
    });
    Ok(client)
}

impl Db {
    /// A pool of `size` connections to `url` for `table` (connected on first use).
    pub(super) fn new(url: &str, table: &str, size: usize) -> Db {
        Db {
            url: url.to_owned(),
            table: table.to_owned(),
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            queries: metrics::counter!(DB_QUERIES),
            count: AtomicU64::new(0),
        }
    }

    /// Creates the table if missing and inserts the rows `1..=rows` that are not there (a
    /// fresh table: one `INSERT .. SELECT generate_series`, seconds at most for 100 000
    /// rows). Concurrent starts on one table serialize on an advisory lock.
    pub(super) async fn prepare_table(&self, rows: i64) -> Result<(), DbError> {
        let mut client = connect(&self.url).await?;
        let name = &self.table;
        let t = &ident(name);
        let tx = client
            .transaction()
            .await
            .map_err(|e| db_error("BEGIN", e))?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[name])
            .await
            .map_err(|e| db_error("taking the seeding lock", e))?;
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                 id bigint PRIMARY KEY,
                 name text NOT NULL,
                 email text NOT NULL,
                 org_id bigint NOT NULL
             )"
        ))
        .await
        .map_err(|e| db_error(&format!("creating table {t}"), e))?;
        // An existing table of another shape would fail every request (or worse): say so now.
        let found: Vec<(String, String)> = tx
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns
                  WHERE table_schema = current_schema() AND table_name = $1
                  ORDER BY ordinal_position",
                &[name],
            )
            .await
            .map_err(|e| db_error(&format!("reading the columns of {t}"), e))?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| db_error(&format!("reading the columns of {t}"), e))?;
        let wrong: Vec<String> = COLUMNS
            .iter()
            .filter(|(col, ty)| !found.iter().any(|(c, t)| c == col && t == ty))
            .map(|(col, ty)| format!("{col} {ty}"))
            .collect();
        if !wrong.is_empty() {
            let have: Vec<String> = found.iter().map(|(c, t)| format!("{c} {t}")).collect();
            return Err(DbError(format!(
                "table {name} exists with another schema: it lacks {} (it has: {}); \
                 use another table (USERS_TABLE / --table) or drop this one",
                wrong.join(", "),
                have.join(", ")
            )));
        }
        let have: i64 = tx
            .query_one(
                &format!("SELECT count(*) FROM {t} WHERE id BETWEEN 1 AND $1"),
                &[&rows],
            )
            .await
            .map_err(|e| db_error(&format!("counting the rows of {t}"), e))?
            .try_get(0)
            .map_err(|e| db_error(&format!("counting the rows of {t}"), e))?;
        if have < rows {
            tx.execute(
                &format!(
                    "INSERT INTO {t} (id, name, email, org_id)
                     SELECT g, 'User ' || g, 'user' || g || '@example.com', g % 1000
                       FROM generate_series(1, $1::bigint) AS g
                     ON CONFLICT (id) DO NOTHING"
                ),
                &[&rows],
            )
            .await
            .map_err(|e| db_error(&format!("seeding {t}"), e))?;
        }
        tx.commit().await.map_err(|e| db_error("COMMIT", e))
    }

    /// Drops the table (tests).
    pub(super) async fn drop_table(&self) -> Result<(), DbError> {
        let client = connect(&self.url).await?;
        client
            .batch_execute(&format!("DROP TABLE IF EXISTS {}", ident(&self.table)))
            .await
            .map_err(|e| db_error(&format!("dropping {}", self.table), e))
    }

    async fn open(&self) -> Result<Arc<Conn>, DbError> {
        let client = connect(&self.url).await?;
        let t = &ident(&self.table);
        let prepare = |sql: String| {
            let client = &client;
            async move {
                client
                    .prepare(&sql)
                    .await
                    .map_err(|e| db_error("preparing a statement", e))
            }
        };
        let select = prepare(format!(
            "SELECT id, name, email, org_id FROM {t} WHERE id = $1"
        ))
        .await?;
        let by_org = prepare(format!(
            "SELECT id, name, email, org_id FROM {t} WHERE org_id = $1 ORDER BY id LIMIT 50"
        ))
        .await?;
        let update = prepare(format!(
            "UPDATE {t} SET name = $2, email = coalesce($3, email) WHERE id = $1
             RETURNING id, name, email, org_id"
        ))
        .await?;
        let delete = prepare(format!("DELETE FROM {t} WHERE id = $1 RETURNING org_id")).await?;
        Ok(Arc::new(Conn {
            client,
            select,
            by_org,
            update,
            delete,
        }))
    }

    /// The next slot's connection, reconnecting it if it died.
    async fn conn(&self) -> Result<Arc<Conn>, DbError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[i];
        let live = slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|c| !c.client.is_closed())
            .cloned();
        if let Some(c) = live {
            return Ok(c);
        }
        // Two callers may both reconnect a dead slot; the later one's connection wins and
        // the other is closed when its last request ends.
        let conn = self.open().await?;
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    fn counted(&self) {
        self.queries.increment(1);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Statements sent so far by this pool.
    pub(super) fn queries(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// `SELECT .. WHERE id = $1`.
    pub(super) async fn select(&self, id: i64) -> Result<Option<User>, DbError> {
        let c = self.conn().await?;
        self.counted();
        let row = c
            .client
            .query_opt(&c.select, &[&id])
            .await
            .map_err(|e| db_error("SELECT", e))?;
        row.map(|r| user(&r)).transpose()
    }

    /// The first 50 users of an organisation, by id.
    pub(super) async fn by_org(&self, org: i64) -> Result<Vec<User>, DbError> {
        let c = self.conn().await?;
        self.counted();
        let rows = c
            .client
            .query(&c.by_org, &[&org])
            .await
            .map_err(|e| db_error("SELECT by org", e))?;
        rows.iter().map(user).collect()
    }

    /// `UPDATE .. RETURNING`: the new row, `None` if there is no such user.
    pub(super) async fn update(
        &self,
        id: i64,
        name: &str,
        email: Option<&str>,
    ) -> Result<Option<User>, DbError> {
        let c = self.conn().await?;
        self.counted();
        let row = c
            .client
            .query_opt(&c.update, &[&id, &name, &email])
            .await
            .map_err(|e| db_error("UPDATE", e))?;
        row.map(|r| user(&r)).transpose()
    }

    /// `DELETE .. RETURNING org_id`: the deleted user's organisation, `None` if there was
    /// no such user.
    pub(super) async fn delete(&self, id: i64) -> Result<Option<i64>, DbError> {
        let c = self.conn().await?;
        self.counted();
        let row = c
            .client
            .query_opt(&c.delete, &[&id])
            .await
            .map_err(|e| db_error("DELETE", e))?;
        row.map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| db_error("DELETE", e))
    }
}

/// A row as a [`User`]; a column of another type is an error, not a panic.
fn user(r: &tokio_postgres::Row) -> Result<User, DbError> {
    let column = |e| db_error("reading a row", e);
    Ok(User {
        id: r.try_get(0).map_err(column)?,
        name: r.try_get(1).map_err(column)?,
        email: r.try_get(2).map_err(column)?,
        org_id: r.try_get(3).map_err(column)?,
    })
}
