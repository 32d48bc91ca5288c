//! The users service (an axum HTTP API over PostgreSQL whose reads, writes and deletes are
//! cached with `cache-runtime`) and the load generator that measures it: libraries here, so
//! that the end-to-end test starts both in its own process; the `users-service` and
//! `loadgen` examples are their command lines.

pub mod loadgen;
pub mod users_service;

/// Parses one option's value, or says which option and value did not parse.
fn parse<T: std::str::FromStr>(what: &str, value: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| format!("invalid {what} `{value}`: {e}"))
}
