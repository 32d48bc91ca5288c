//! The Grafana dashboard (`examples/grafana/cache-dashboard.json`) parses, and every query of
//! every panel names only metrics the library (`cache-runtime/src/stats/metrics.rs`) or the
//! example service (`users_db_queries_total`) exports.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The metric names declared in metrics.rs: `const X: &str = "name";`.
fn exported_metrics() -> BTreeSet<String> {
    let source =
        std::fs::read_to_string(root().join("cache-runtime/src/stats/metrics.rs")).unwrap();
    let names: BTreeSet<String> = source
        .lines()
        .filter(|l| l.contains("const ") && l.contains(": &str = \""))
        .filter_map(|l| l.split('"').nth(1))
        .map(str::to_owned)
        .collect();
    assert!(
        names.contains("cache_hits_total"),
        "metrics.rs changed its form: found {names:?}"
    );
    names
}

/// Every series name the dashboard's queries use, as written (with a histogram's
/// `_bucket`/`_sum`/`_count` suffix): what the service's `/metrics` must show.
pub(crate) fn dashboard_series() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(root().join("examples/grafana/cache-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    let mut out = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("a panels array") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            out.extend(words_in(expr));
        }
    }
    out
}

/// The `cache_*` and `users_*` identifiers of a PromQL expression, outside strings.
fn words_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_string = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_string = !in_string;
            word.clear();
            continue;
        }
        if !in_string && (c.is_ascii_alphanumeric() || c == '_') {
            word.push(c);
            continue;
        }
        if word.starts_with("cache_") || word.starts_with("users_") {
            out.push(std::mem::take(&mut word));
        }
        word.clear();
    }
    out
}

/// The metric names a PromQL expression uses: identifiers of the form `cache_*` or
/// `users_*`, without a histogram's `_bucket`/`_sum`/`_count` suffix.
fn metrics_in(expr: &str) -> Vec<String> {
    words_in(expr)
        .into_iter()
        .map(|word| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(&word)
                .to_owned()
        })
        .collect()
}

#[test]
fn the_grafana_dashboard_queries_only_exported_metrics() {
    let text =
        std::fs::read_to_string(root().join("examples/grafana/cache-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    let mut known = exported_metrics();
    known.insert(cache_service_example::users_service::DB_QUERIES.to_owned());

    let panels = dashboard["panels"].as_array().expect("a panels array");
    assert!(!panels.is_empty());
    let mut used = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("every panel has a title");
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has targets");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("every target has an expr");
            let names = metrics_in(expr);
            assert!(!names.is_empty(), "panel {title:?}: {expr} names no metric");
            for name in names {
                assert!(
                    known.contains(&name),
                    "panel {title:?} queries {name}, which is not exported (known: {known:?})"
                );
                used.insert(name);
            }
        }
    }
    // What the issue asks to see: hit rate, load time, fail-open events, lock waits, the
    // breaker (histograms queried through their buckets).
    for needed in [
        "cache_hits_total",
        "cache_misses_total",
        "cache_load_seconds",
        "cache_fail_open_total",
        "cache_lock_waits_total",
        "cache_breaker_open",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }

    // The hit-rate panel draws the 80% line.
    let hit_rate = panels
        .iter()
        .find(|p| p["title"] == "Hit rate per function")
        .expect("a hit-rate panel");
    let steps = hit_rate["fieldConfig"]["defaults"]["thresholds"]["steps"]
        .as_array()
        .expect("thresholds");
    assert!(steps.iter().any(|s| s["value"].as_f64() == Some(0.8)));
    let expr = hit_rate["targets"][0]["expr"].as_str().unwrap();
    assert_eq!(
        metrics_in(expr),
        ["cache_hits_total", "cache_hits_total", "cache_misses_total"],
        "hits / (hits + misses): {expr}"
    );
}

#[test]
fn metric_names_are_read_from_promql() {
    assert_eq!(
        metrics_in(
            r#"histogram_quantile(0.99, sum by (function, le) (rate(cache_load_seconds_bucket{cache=~"$cache", function="cache_x"}[5m])))"#
        ),
        ["cache_load_seconds"]
    );
    assert_eq!(
        metrics_in("rate(cache_hits_total[1m]) / rate(users_db_queries_total[1m])"),
        ["cache_hits_total", "users_db_queries_total"]
    );
}
