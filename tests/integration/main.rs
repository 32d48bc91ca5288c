//! Integration tests: behaviour on both backends (memory, and the Redis at `REDIS_URL`),
//! Redis failure handling with private `redis-server` processes, the shapes of functions the
//! attribute accepts, and the trybuild UI tests. One binary, many modules.
#![deny(warnings)]

mod support;

mod behaviour;
mod cachectl;
mod cluster;
mod cluster_node;
mod coalescing;
mod dashboard;
mod engine_defects;
mod fleet;
mod local;
mod local_cluster;
mod long_keys;
mod metrics;
mod redis_failures;
mod refresh;
mod sentinel;
mod shapes;
mod spans;
mod stale;
mod stampede;
mod tls;
mod ui;
mod users_service;
mod write_behind_macro;
mod write_behind_pg;
mod write_behind_runtime;
mod write_regressions;
mod write_shapes;
mod writes;
