//! Every Prometheus family the supervisor exports, registered once in one registry; the
//! submodules serve them (`server`), sample the Celery queues into them (`queue_sampler`) and
//! chart them (`dashboard`).
//!
//! The families are created here and handed to the pool, the programs and beat as an
//! `Arc<Metrics>`: the prometheus types are atomic counters and gauges, so recording a value is
//! lock-free and never passes through the main loop. Label values are bounded (status classes,
//! slots, program and job names from the config), never paths, pids or task ids.

pub mod dashboard;
pub mod queue_sampler;
pub mod server;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Buckets for web latencies and queue waits, from 5 ms to 30 s: fine steps where typical
/// requests fall (so p50/p95 interpolate well) and enough above 1 s to see requests approach the
/// default 10 s queue timeout and 30 s request timeout.
const WEB_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
];

/// The `status` label values of `sauna_http_requests_total`: status classes, never codes.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `reason` label values of `sauna_worker_restarts_total` (interface.md).
pub const WORKER_RESTART_REASONS: [&str; 6] = [
    "crash",
    "timeout",
    "max_requests",
    "max_rss",
    "reload",
    "scale",
];

/// The `reason` label values of `sauna_http_rejected_total` (the pool's `Rejected::label`).
pub const REJECT_REASONS: [&str; 3] = ["queue_full", "queue_timeout", "shutting_down"];

/// The `outcome` label values of `sauna_reloads_total`: the new generation serves; a role
/// failed and was rolled back (the old generation serves); the new config did not load
/// (nothing changed); a `[hooks].before_reload` command failed or timed out (nothing changed);
/// the reload itself broke.
pub const RELOAD_OUTCOMES: [&str; 5] = [
    "success",
    "rolled_back",
    "config_error",
    "hook_failed",
    "failed",
];

/// Buckets for beat publish lag, from 1 ms to 60 s.
const LAG_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 60.0];

/// The registry and every family in it.
pub struct Metrics {
    registry: Registry,
    /// Responses by status class (`2xx`, `5xx`, …).
    pub http_requests_total: IntCounterVec,
    /// Accepted → response complete.
    pub http_request_duration_seconds: Histogram,
    /// Accepted → a worker starts it.
    pub http_queue_wait_seconds: Histogram,
    /// Requests waiting for a worker right now.
    pub http_queue_depth: IntGauge,
    /// Requests in a worker right now.
    pub http_in_flight: IntGauge,
    /// Requests refused before reaching a worker, by reason.
    pub http_rejected_total: IntCounterVec,
    /// Requests offered in advance to a busy worker and taken back before it started them.
    pub http_offers_taken_back_total: IntCounter,
    /// Workers by state.
    pub workers: IntGaugeVec,
    /// RSS of each worker, labelled by slot number (never by pid, which changes on recycle).
    pub worker_rss_bytes: IntGaugeVec,
    /// PSS of each worker (shared pages divided among their sharers), labelled like the RSS.
    pub worker_pss_bytes: IntGaugeVec,
    /// RSS of the serving generation's template (`[web] preload`; 0 without).
    pub template_rss_bytes: IntGauge,
    /// PSS of the serving generation's template.
    pub template_pss_bytes: IntGauge,
    /// Worker replacements by reason.
    pub worker_restarts_total: IntCounterVec,
    /// 1 while a program has all its instances running.
    pub program_up: IntGaugeVec,
    /// Restarts of each program.
    pub program_restarts_total: IntCounterVec,
    /// Celery tasks published by each job.
    pub beat_published_total: IntCounterVec,
    /// Failed publishes of each job.
    pub beat_errors_total: IntCounterVec,
    /// Due instant → published.
    pub beat_lag_seconds: Histogram,
    /// 1 while this supervisor holds the beat leader lock.
    pub beat_leader: IntGauge,
    /// Next due instant of each job, Unix seconds.
    pub beat_next_run_timestamp_seconds: IntGaugeVec,
    /// Messages waiting in each Celery queue (all priority keys).
    pub celery_queue_length: IntGaugeVec,
    /// Reloads by outcome.
    pub reloads_total: IntCounterVec,
    /// The current generation.
    pub generation: IntGauge,
}

impl Metrics {
    /// Creates and registers every family, plus the process collector.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let family = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(family.clone()))?;
            Ok::<_, prometheus::Error>(family)
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let family = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(family.clone()))?;
            Ok::<_, prometheus::Error>(family)
        };
        let gauge = |name: &str, help: &str| {
            let family = IntGauge::new(name, help)?;
            registry.register(Box::new(family.clone()))?;
            Ok::<_, prometheus::Error>(family)
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let family =
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
            registry.register(Box::new(family.clone()))?;
            Ok::<_, prometheus::Error>(family)
        };

        let build_info = gauge_vec(
            "sauna_build_info",
            "Always 1; the version label names the running sauna-supervisor.",
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        registry.register(Box::new(AccessLinesDropped::new()?))?;

        let metrics = Metrics {
            http_requests_total: counter(
                "sauna_http_requests_total",
                "HTTP responses sent, by status class.",
                &["status"],
            )?,
            http_request_duration_seconds: histogram(
                "sauna_http_request_duration_seconds",
                "Time from accepting a request to the end of its response.",
                WEB_BUCKETS,
            )?,
            http_queue_wait_seconds: histogram(
                "sauna_http_queue_wait_seconds",
                "Time a request waited between being accepted and a worker starting it.",
                WEB_BUCKETS,
            )?,
            http_queue_depth: gauge(
                "sauna_http_queue_depth",
                "Requests waiting for a free worker.",
            )?,
            http_in_flight: gauge(
                "sauna_http_in_flight_requests",
                "Requests being handled by a worker.",
            )?,
            http_rejected_total: counter(
                "sauna_http_rejected_total",
                "Requests refused before reaching a worker, by reason.",
                &["reason"],
            )?,
            http_offers_taken_back_total: {
                let family = IntCounter::new(
                    "sauna_http_offers_taken_back_total",
                    "Requests handed in advance to a busy worker (to start as soon as it finishes its current one) and taken back before it started them: to run on a worker that became free first, or because their worker timed out, was retired or died.",
                )?;
                registry.register(Box::new(family.clone()))?;
                family
            },
            workers: gauge_vec("sauna_workers", "Web workers by state.", &["state"])?,
            worker_rss_bytes: gauge_vec(
                "sauna_worker_rss_bytes",
                "Resident memory of the web worker in each slot.",
                &["worker"],
            )?,
            worker_pss_bytes: gauge_vec(
                "sauna_worker_pss_bytes",
                "Proportional set size of the web worker in each slot: pages shared with other processes (a preloaded template, its other workers) count as their share.",
                &["worker"],
            )?,
            template_rss_bytes: gauge(
                "sauna_template_rss_bytes",
                "Resident memory of the preloaded template of the serving generation ([web] preload).",
            )?,
            template_pss_bytes: gauge(
                "sauna_template_pss_bytes",
                "Proportional set size of the preloaded template of the serving generation ([web] preload).",
            )?,
            worker_restarts_total: counter(
                "sauna_worker_restarts_total",
                "Web workers replaced, by reason.",
                &["reason"],
            )?,
            program_up: gauge_vec(
                "sauna_program_up",
                "1 while every instance of the program is running.",
                &["program"],
            )?,
            program_restarts_total: counter(
                "sauna_program_restarts_total",
                "Times a program instance was started again.",
                &["program"],
            )?,
            beat_published_total: counter(
                "sauna_beat_published_total",
                "Celery tasks published by each beat job.",
                &["job"],
            )?,
            beat_errors_total: counter(
                "sauna_beat_errors_total",
                "Failed publishes of each beat job.",
                &["job"],
            )?,
            beat_lag_seconds: histogram(
                "sauna_beat_lag_seconds",
                "Time between a job's due instant and its publish.",
                LAG_BUCKETS,
            )?,
            beat_leader: gauge(
                "sauna_beat_leader",
                "1 while this supervisor holds the beat leader lock.",
            )?,
            beat_next_run_timestamp_seconds: gauge_vec(
                "sauna_beat_next_run_timestamp_seconds",
                "Unix time of each job's next due instant.",
                &["job"],
            )?,
            celery_queue_length: gauge_vec(
                "sauna_celery_queue_length",
                "Messages waiting in a Celery queue, over all its priority keys.",
                &["queue"],
            )?,
            reloads_total: counter("sauna_reloads_total", "Reloads, by outcome.", &["outcome"])?,
            generation: gauge(
                "sauna_generation",
                "The generation now serving; 1 at start, one more per successful reload.",
            )?,
            registry,
        };
        // Label sets known in advance start at 0, so every family shows from the first scrape
        // and `rate()` sees the first increment instead of a series appearing at 1.
        for class in STATUS_CLASSES {
            metrics.http_requests_total.with_label_values(&[class]);
        }
        for reason in WORKER_RESTART_REASONS {
            metrics.worker_restarts_total.with_label_values(&[reason]);
        }
        for reason in REJECT_REASONS {
            metrics.http_rejected_total.with_label_values(&[reason]);
        }
        for outcome in RELOAD_OUTCOMES {
            metrics.reloads_total.with_label_values(&[outcome]);
        }
        Ok(metrics)
    }

    /// The live figures `status` shows, read from the same families Prometheus scrapes.
    pub fn figures(&self) -> serde_json::Value {
        let by_label = |family: &IntCounterVec, labels: &[&str]| -> serde_json::Value {
            labels
                .iter()
                .map(|label| {
                    let value = family.with_label_values(&[label]).get();
                    ((*label).to_owned(), serde_json::Value::from(value))
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        serde_json::json!({
            "requests": by_label(&self.http_requests_total, &STATUS_CLASSES),
            "in_flight": self.http_in_flight.get(),
            "queue_depth": self.http_queue_depth.get(),
            "queue_wait_seconds_sum": self.http_queue_wait_seconds.get_sample_sum(),
            "request_seconds_sum": self.http_request_duration_seconds.get_sample_sum(),
            "rejected": by_label(&self.http_rejected_total, &REJECT_REASONS),
            "worker_restarts": by_label(&self.worker_restarts_total, &WORKER_RESTART_REASONS),
            "reloads": by_label(&self.reloads_total, &RELOAD_OUTCOMES),
        })
    }

    /// The text exposition (format 0.0.4) of every family.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        String::from_utf8(buffer).map_err(|error| prometheus::Error::Msg(error.to_string()))
    }
}

/// `sauna_access_log_dropped_total`, read at scrape time from the logger, which counts the
/// lines itself because it exists before any registry does.
struct AccessLinesDropped {
    counter: IntCounter,
    /// Serialises catching up, so that two scrapes at once do not both add the difference.
    catch_up: std::sync::Mutex<()>,
}

impl AccessLinesDropped {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(AccessLinesDropped {
            counter: IntCounter::new(
                "sauna_access_log_dropped_total",
                "Access log lines dropped because the log output could not keep up.",
            )?,
            catch_up: std::sync::Mutex::new(()),
        })
    }
}

impl Collector for AccessLinesDropped {
    fn desc(&self) -> Vec<&Desc> {
        self.counter.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _serial = self
            .catch_up
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let total = crate::logging::access_lines_dropped();
        let shown = self.counter.get();
        if total > shown {
            self.counter.inc_by(total - shown);
        }
        self.counter.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_with_known_labels_show_from_the_start() {
        let text = Metrics::new().unwrap().render().unwrap();
        for family in [
            "sauna_http_requests_total",
            "sauna_http_request_duration_seconds",
            "sauna_http_queue_wait_seconds",
            "sauna_http_queue_depth",
            "sauna_http_in_flight_requests",
            "sauna_http_rejected_total",
            "sauna_http_offers_taken_back_total",
            "sauna_worker_restarts_total",
            "sauna_beat_lag_seconds",
            "sauna_beat_leader",
            "sauna_reloads_total",
            "sauna_generation",
            "sauna_build_info",
            "sauna_access_log_dropped_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_cpu_seconds_total",
            "process_start_time_seconds",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} missing"
            );
        }
        assert!(text.contains("sauna_http_requests_total{status=\"5xx\"} 0"));
        assert!(text.contains("sauna_worker_restarts_total{reason=\"max_rss\"} 0"));
        assert!(text.contains("sauna_http_request_duration_seconds_bucket{le=\"30\"} 0"));
    }

    #[test]
    fn families_with_open_labels_show_once_recorded() {
        let metrics = Metrics::new().unwrap();
        metrics.workers.with_label_values(&["idle"]).set(2);
        metrics
            .worker_rss_bytes
            .with_label_values(&["0"])
            .set(1 << 20);
        metrics
            .celery_queue_length
            .with_label_values(&["celery"])
            .set(3);
        let text = metrics.render().unwrap();
        assert!(text.contains("sauna_workers{state=\"idle\"} 2"));
        assert!(text.contains("sauna_worker_rss_bytes{worker=\"0\"} 1048576"));
        assert!(text.contains("sauna_celery_queue_length{queue=\"celery\"} 3"));
    }
}
