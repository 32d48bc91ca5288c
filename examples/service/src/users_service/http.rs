//! The routes: thin handlers over [`Users`], errors as JSON `{"error": ..}`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use super::{UserUpdate, Users};
use cache_examples::DbError;

#[derive(Clone)]
struct App {
    users: Arc<Users>,
    metrics: Option<PrometheusHandle>,
}

/// The service's routes.
pub(super) fn router(users: Arc<Users>, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route(
            "/users/{id}",
            get(get_user).put(put_user).delete(delete_user),
        )
        .route("/orgs/{org}/users", get(org_users))
        .route("/metrics", get(render_metrics))
        .route("/stats", get(stats))
        .with_state(App { users, metrics })
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// The database failed: the details (SQL, table and column names, server messages) go to
/// the log, the client gets a generic message.
fn db_failure(e: DbError) -> Response {
    eprintln!("users-service: database error: {e}");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the database is unavailable; see the service's log",
    )
}

fn no_user(id: i64) -> Response {
    error(StatusCode::NOT_FOUND, format!("no user {id}"))
}

async fn get_user(State(app): State<App>, Path(id): Path<i64>) -> Response {
    match app.users.user(id).await {
        Ok(Some(user)) => Json(user).into_response(),
        Ok(None) => no_user(id),
        Err(e) => db_failure(e),
    }
}

async fn put_user(
    State(app): State<App>,
    Path(id): Path<i64>,
    body: Result<Json<UserUpdate>, JsonRejection>,
) -> Response {
    let change = match body {
        Ok(Json(change)) => change,
        Err(e) => return error(e.status(), e.body_text()),
    };
    match app.users.update(id, &change).await {
        Ok(Some(user)) => Json(user).into_response(),
        Ok(None) => no_user(id),
        Err(e) => db_failure(e),
    }
}

async fn delete_user(State(app): State<App>, Path(id): Path<i64>) -> Response {
    match app.users.delete(id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => no_user(id),
        Err(e) => db_failure(e),
    }
}

async fn org_users(State(app): State<App>, Path(org): Path<i64>) -> Response {
    match app.users.org_users(org).await {
        Ok(users) => Json(users).into_response(),
        Err(e) => db_failure(e),
    }
}

async fn render_metrics(State(app): State<App>) -> Response {
    match &app.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => error(StatusCode::NOT_FOUND, "no metrics recorder installed"),
    }
}

async fn stats(State(app): State<App>) -> String {
    app.users.cache().stats().to_string()
}
