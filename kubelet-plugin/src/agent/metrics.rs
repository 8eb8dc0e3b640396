//! Prometheus metrics: migrations by result, time spent in each phase, bytes moved.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use podmigrate_vocabulary::Phase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

/// How a migration driven by this agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    RolledBack,
    Failed,
    Refused,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::RolledBack => "rolled_back",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    migrations: Family<ResultLabel, Counter>,
    phase_seconds: Family<PhaseLabel, Histogram>,
    bytes_moved: Counter,
    in_flight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("podmigrate");
        let migrations = Family::<ResultLabel, Counter>::default();
        registry.register(
            "migrations",
            "Outbound migrations driven by this node's agent, by result",
            migrations.clone(),
        );
        // 10 ms to about 45 minutes.
        let phase_seconds = Family::<PhaseLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 18))
        });
        registry.register(
            "phase_duration_seconds",
            "Time spent in each migration phase",
            phase_seconds.clone(),
        );
        let bytes_moved = Counter::default();
        registry.register(
            "archive_bytes_moved",
            "Archive bytes committed to the share",
            bytes_moved.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "migrations_in_flight",
            "Outbound migrations in progress on this node",
            in_flight.clone(),
        );
        Metrics {
            registry,
            migrations,
            phase_seconds,
            bytes_moved,
            in_flight,
        }
    }
}

impl Metrics {
    pub fn record_outcome(&self, outcome: Outcome) {
        self.migrations
            .get_or_create(&ResultLabel {
                result: outcome.as_str().into(),
            })
            .inc();
    }

    pub fn record_phase(&self, phase: Phase, seconds: f64) {
        self.phase_seconds
            .get_or_create(&PhaseLabel {
                phase: phase.as_str().into(),
            })
            .observe(seconds);
    }

    pub fn record_bytes(&self, bytes: u64) {
        self.bytes_moved.inc_by(bytes);
    }

    /// How many migrations this node's agent drives now.
    pub fn set_in_flight(&self, n: i64) {
        self.in_flight.set(n);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/metrics` and `/healthz` until `shutdown` fires.
pub async fn serve(
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = Arc::clone(&metrics);
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_metrics_name_results_phases_and_bytes() {
        let metrics = Arc::new(Metrics::default());
        metrics.record_outcome(Outcome::Succeeded);
        metrics.record_outcome(Outcome::RolledBack);
        metrics.record_phase(Phase::Checkpointing, 1.5);
        metrics.record_bytes(1234);
        metrics.set_in_flight(1);
        let text = metrics.render();
        assert!(
            text.contains("podmigrate_migrations_total{result=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("podmigrate_migrations_total{result=\"rolled_back\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("podmigrate_phase_duration_seconds_count{phase=\"Checkpointing\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("podmigrate_archive_bytes_moved_total 1234"),
            "{text}"
        );
        assert!(text.contains("podmigrate_migrations_in_flight 1"), "{text}");
        metrics.set_in_flight(0);
        assert!(metrics
            .render()
            .contains("podmigrate_migrations_in_flight 0"));
    }
}
