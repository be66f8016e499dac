//! The Grafana dashboard that `sauna-supervisor emit grafana` writes: panels over the families in
//! [`crate::metrics`], importable as is (Dashboards → New → Import), with the Prometheus data
//! source chosen at import time (`${DS_PROMETHEUS}`) and an `instance` variable to pick
//! supervisors.
//!
//! It owns the panel layout and the PromQL; the metric names it queries are checked against
//! what [`crate::metrics::Metrics`] exposes by the tests below. It does not read `sauna.toml`:
//! every panel groups by label, so one dashboard fits every configuration.

use serde_json::{Value, json};

/// The file `emit grafana -o DIR` writes.
pub const FILE_NAME: &str = "grafana-dashboard.json";

/// The selector every query carries, so the `instance` variable filters all panels.
const SELECTOR: &str = r#"instance=~"$instance""#;

/// The dashboard as pretty-printed JSON with a final newline.
pub fn dashboard_text() -> String {
    let mut text = serde_json::to_string_pretty(&dashboard()).unwrap_or_default();
    text.push('\n');
    text
}

/// One query of a panel: PromQL and its legend.
struct Query {
    expr: String,
    legend: &'static str,
}

fn query(expr: impl Into<String>, legend: &'static str) -> Query {
    Query {
        expr: expr.into(),
        legend,
    }
}

/// `sum by (label) (rate(name{instance}[$__rate_interval]))`.
fn rate_by(name: &str, label: &str) -> String {
    format!("sum by ({label}) (rate({name}{{{SELECTOR}}}[$__rate_interval]))")
}

/// `sum by (label) (increase(name{instance}[$__rate_interval]))`.
fn increase_by(name: &str, label: &str) -> String {
    format!("sum by ({label}) (increase({name}{{{SELECTOR}}}[$__rate_interval]))")
}

/// p50, p95 and p99 of a histogram over all selected instances.
fn quantiles(histogram: &str) -> Vec<Query> {
    [(0.5, "p50"), (0.95, "p95"), (0.99, "p99")]
        .into_iter()
        .map(|(q, legend)| {
            query(
                format!(
                    "histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{{{SELECTOR}}}[$__rate_interval])))"
                ),
                legend,
            )
        })
        .collect()
}

/// The whole dashboard model.
pub fn dashboard() -> Value {
    let rows: Vec<(&str, &str, &str, Vec<Query>)> = vec![
        (
            "Requests per second by status",
            "Responses sent by the HTTP front, by status class.",
            "reqps",
            vec![query(
                rate_by("sauna_http_requests_total", "status"),
                "{{status}}",
            )],
        ),
        (
            "Request latency",
            "Accepted → response complete, including queue wait.",
            "s",
            quantiles("sauna_http_request_duration_seconds"),
        ),
        (
            "Queue wait",
            "Accepted → a worker starts the request: the figure that says the pool is too small.",
            "s",
            quantiles("sauna_http_queue_wait_seconds"),
        ),
        (
            "Queue depth and requests in flight",
            "Requests waiting for a worker, and requests inside workers.",
            "short",
            vec![
                query(
                    format!("sum(sauna_http_queue_depth{{{SELECTOR}}})"),
                    "waiting",
                ),
                query(
                    format!("sum(sauna_http_in_flight_requests{{{SELECTOR}}})"),
                    "in flight",
                ),
            ],
        ),
        (
            "Rejected requests by reason",
            "Requests answered 503 before reaching a worker.",
            "reqps",
            vec![query(
                rate_by("sauna_http_rejected_total", "reason"),
                "{{reason}}",
            )],
        ),
        (
            "Workers by state",
            "Web workers in each state.",
            "short",
            vec![query(
                format!("sum by (state) (sauna_workers{{{SELECTOR}}})"),
                "{{state}}",
            )],
        ),
        (
            "Memory (RSS, PSS)",
            "Resident memory of each worker slot, and of the supervisor itself; with preload, the PSS (shared pages counted as their share) of each worker and of the template.",
            "bytes",
            vec![
                query(
                    format!("max by (instance, worker) (sauna_worker_rss_bytes{{{SELECTOR}}})"),
                    "worker {{worker}} ({{instance}})",
                ),
                query(
                    format!("max by (instance, worker) (sauna_worker_pss_bytes{{{SELECTOR}}})"),
                    "worker {{worker}} PSS ({{instance}})",
                ),
                query(
                    format!("sauna_template_pss_bytes{{{SELECTOR}}}"),
                    "template PSS ({{instance}})",
                ),
                query(
                    format!("process_resident_memory_bytes{{{SELECTOR}}}"),
                    "supervisor ({{instance}})",
                ),
            ],
        ),
        (
            "Worker restarts by reason",
            "Workers replaced per interval: crash, timeout, max_requests, max_rss, reload, scale.",
            "short",
            vec![query(
                increase_by("sauna_worker_restarts_total", "reason"),
                "{{reason}}",
            )],
        ),
        (
            "Reloads and generation",
            "Reloads per interval by outcome, and the generation now serving.",
            "short",
            vec![
                query(increase_by("sauna_reloads_total", "outcome"), "{{outcome}}"),
                query(
                    format!("max by (instance) (sauna_generation{{{SELECTOR}}})"),
                    "generation ({{instance}})",
                ),
            ],
        ),
        (
            "Programs",
            "1 while every instance of a program runs; restarts per interval.",
            "short",
            vec![
                query(
                    format!("min by (program) (sauna_program_up{{{SELECTOR}}})"),
                    "{{program}} up",
                ),
                query(
                    increase_by("sauna_program_restarts_total", "program"),
                    "{{program}} restarts",
                ),
            ],
        ),
        (
            "Beat lag",
            "Due instant → Celery task published.",
            "s",
            quantiles("sauna_beat_lag_seconds"),
        ),
        (
            "Beat publishes and leader",
            "Celery tasks published and failed per job, and which supervisor holds the leader lock.",
            "short",
            vec![
                query(
                    increase_by("sauna_beat_published_total", "job"),
                    "{{job}} published",
                ),
                query(
                    increase_by("sauna_beat_errors_total", "job"),
                    "{{job}} errors",
                ),
                query(
                    format!("max by (instance) (sauna_beat_leader{{{SELECTOR}}})"),
                    "leader ({{instance}})",
                ),
            ],
        ),
        (
            "Celery queue lengths",
            "Messages waiting in each Celery queue, over all priority keys.",
            "short",
            vec![query(
                format!("max by (queue) (sauna_celery_queue_length{{{SELECTOR}}})"),
                "{{queue}}",
            )],
        ),
    ];
    let panels: Vec<Value> = rows
        .into_iter()
        .enumerate()
        .map(|(index, (title, description, unit, queries))| {
            panel(index, title, description, unit, queries)
        })
        .collect();
    json!({
        "__inputs": [{
            "name": "DS_PROMETHEUS",
            "label": "Prometheus",
            "description": "The Prometheus that scrapes sauna-supervisor's [metrics].listen",
            "type": "datasource",
            "pluginId": "prometheus",
            "pluginName": "Prometheus"
        }],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "9.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""}
        ],
        "title": "sauna-supervisor",
        "uid": "sauna-supervisor",
        "description": "Web pool, programs, beat and Celery queues of sauna-supervisor (generated by `sauna-supervisor emit grafana`).",
        "tags": ["sauna-supervisor", "python", "celery"],
        "editable": true,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [{
            "name": "instance",
            "label": "Instance",
            "type": "query",
            "datasource": datasource(),
            "query": {"query": "label_values(sauna_build_info, instance)", "refId": "instance"},
            "definition": "label_values(sauna_build_info, instance)",
            "refresh": 2,
            "includeAll": true,
            "multi": true,
            "allValue": ".*",
            "current": {"selected": true, "text": ["All"], "value": ["$__all"]},
            "options": [],
            "sort": 1,
            "hide": 0
        }]},
        "panels": panels
    })
}

fn datasource() -> Value {
    json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"})
}

/// A time-series panel, two per row, 12 × 8 grid units each.
fn panel(index: usize, title: &str, description: &str, unit: &str, queries: Vec<Query>) -> Value {
    let targets: Vec<Value> = queries
        .into_iter()
        .zip('A'..)
        .map(|(query, ref_id)| {
            json!({
                "datasource": datasource(),
                "expr": query.expr,
                "legendFormat": query.legend,
                "refId": ref_id.to_string(),
                "range": true
            })
        })
        .collect();
    json!({
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": datasource(),
        "gridPos": {"h": 8, "w": 12, "x": (index % 2) * 12, "y": (index / 2) * 8},
        "fieldConfig": {
            "defaults": {"unit": unit, "custom": {"fillOpacity": 10, "lineWidth": 1}},
            "overrides": []
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": true},
            "tooltip": {"mode": "multi", "sort": "desc"}
        },
        "targets": targets
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::metrics::Metrics;

    /// Every `expr` in the dashboard.
    fn expressions(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", Value::String(expr)) => found.push(expr.clone()),
                        _ => expressions(value, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| expressions(item, found)),
            _ => {}
        }
    }

    /// The identifiers of a PromQL expression, without string literals, ranges and variables.
    fn identifiers(expr: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut chars = expr.chars().peekable();
        let mut current = String::new();
        let flush = |current: &mut String, out: &mut Vec<String>| {
            if current
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            {
                out.push(current.clone());
            }
            current.clear();
        };
        while let Some(c) = chars.next() {
            match c {
                '"' => {
                    flush(&mut current, &mut out);
                    for c in chars.by_ref() {
                        if c == '"' {
                            break;
                        }
                    }
                }
                '[' => {
                    flush(&mut current, &mut out);
                    for c in chars.by_ref() {
                        if c == ']' {
                            break;
                        }
                    }
                }
                c if c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '.' => {
                    current.push(c)
                }
                _ => flush(&mut current, &mut out),
            }
        }
        flush(&mut current, &mut out);
        out
    }

    /// Names of the samples a scrape can contain, with one series in every labelled family.
    fn exposed_names() -> BTreeSet<String> {
        let metrics = Metrics::new().unwrap();
        metrics.workers.with_label_values(&["idle"]).set(1);
        metrics.worker_rss_bytes.with_label_values(&["0"]).set(1);
        metrics.worker_pss_bytes.with_label_values(&["0"]).set(1);
        metrics.program_up.with_label_values(&["celery"]).set(1);
        metrics
            .program_restarts_total
            .with_label_values(&["celery"])
            .inc();
        metrics
            .beat_published_total
            .with_label_values(&["job"])
            .inc();
        metrics.beat_errors_total.with_label_values(&["job"]).inc();
        metrics
            .beat_next_run_timestamp_seconds
            .with_label_values(&["job"])
            .set(1);
        metrics
            .celery_queue_length
            .with_label_values(&["celery"])
            .set(1);
        let text = metrics.render().unwrap();
        let mut names = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                names.insert(name.to_owned());
                if kind == "histogram" {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
            }
        }
        names
    }

    #[test]
    fn the_dashboard_is_importable_json() {
        let text = dashboard_text();
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["__inputs"][0]["name"], "DS_PROMETHEUS");
        let panels = parsed["panels"].as_array().unwrap();
        assert!(panels.len() >= 10);
        let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
        assert_eq!(ids.len(), panels.len(), "panel ids are unique");
        for panel in panels {
            assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}");
            assert!(!panel["targets"].as_array().unwrap().is_empty());
        }
    }

    #[test]
    fn every_query_names_exposed_metrics_and_labels() {
        let exposed = exposed_names();
        let promql = [
            "sum",
            "max",
            "min",
            "by",
            "rate",
            "increase",
            "histogram_quantile",
        ];
        // Labels the families carry, plus `instance`, which Prometheus adds on scrape.
        let labels = [
            "instance", "le", "status", "reason", "state", "worker", "program", "job", "queue",
            "outcome",
        ];
        let mut expressions_found = Vec::new();
        expressions(&dashboard(), &mut expressions_found);
        assert!(expressions_found.len() >= 15);
        let mut queried = BTreeSet::new();
        for expr in &expressions_found {
            let names: Vec<String> = identifiers(expr)
                .into_iter()
                .filter(|word| !word.starts_with(|c: char| c.is_ascii_digit()))
                .collect();
            let metrics: Vec<&String> = names
                .iter()
                .filter(|word| !promql.contains(&word.as_str()) && !labels.contains(&word.as_str()))
                .collect();
            assert!(!metrics.is_empty(), "no metric in {expr}");
            for name in metrics {
                assert!(exposed.contains(name), "{expr}: {name} is not exposed");
                queried.insert(name.clone());
            }
        }
        // The issue's list: request rate, latency, queue wait, workers, RSS, restarts, reloads,
        // beat lag, Celery queue lengths.
        for needed in [
            "sauna_http_requests_total",
            "sauna_http_request_duration_seconds_bucket",
            "sauna_http_queue_wait_seconds_bucket",
            "sauna_workers",
            "sauna_worker_rss_bytes",
            "sauna_worker_restarts_total",
            "sauna_reloads_total",
            "sauna_beat_lag_seconds_bucket",
            "sauna_celery_queue_length",
        ] {
            assert!(queried.contains(needed), "{needed} is not on the dashboard");
        }
    }

    #[test]
    fn identifiers_skip_strings_ranges_and_numbers() {
        assert_eq!(
            identifiers(
                r#"histogram_quantile(0.5, sum by (le) (rate(x_bucket{instance=~"$i"}[$__rate_interval])))"#
            ),
            [
                "histogram_quantile",
                "sum",
                "by",
                "le",
                "rate",
                "x_bucket",
                "instance"
            ]
        );
    }
}
