//! `/metrics`, `/healthz` and `/readyz` on one HTTP port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Pipeline;

/// What `/readyz` reports, and the admin requests the worker listens for.
#[derive(Debug, Default)]
pub struct Health {
    pub broker_connected: AtomicBool,
    pub consuming: AtomicBool,
    /// `POST /admin/reload`: pick up sessions paired since the start.
    pub reload: tokio::sync::Notify,
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
    pipeline: Arc<Pipeline>,
}

/// One line of `GET /instances`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InstanceView {
    pub name: String,
    pub state: String,
    pub paired_as: Option<String>,
    pub changed_at: Option<String>,
}

/// Binds the port and serves until `stop`; returns the bound address (port 0 picks one).
pub async fn serve(
    bind: &str,
    port: u16,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    pipeline: Arc<Pipeline>,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind((bind, port)).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { s.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/instances", get(instances))
        .route("/admin/reload", post(reload))
        .with_state(AppState {
            metrics,
            health,
            pipeline,
        });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "HTTP server failed.");
        }
    });
    Ok(addr)
}

async fn instances(State(s): State<AppState>) -> axum::Json<Vec<InstanceView>> {
    let mut views: Vec<InstanceView> = s
        .pipeline
        .instances()
        .iter()
        .map(|i| {
            let details = i.session().details();
            InstanceView {
                name: i.name().to_owned(),
                state: i.session().state().label().to_owned(),
                paired_as: details.as_ref().and_then(|d| d.paired_as.clone()),
                changed_at: details.map(|d| d.changed_at.to_rfc3339()),
            }
        })
        .collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    axum::Json(views)
}

async fn reload(State(s): State<AppState>) -> (StatusCode, &'static str) {
    s.health.reload.notify_one();
    (StatusCode::ACCEPTED, "reloading sessions\n")
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    let broker = s.health.broker_connected.load(Ordering::SeqCst);
    let consuming = s.health.consuming.load(Ordering::SeqCst);
    let store = s.pipeline.store_reachable().await;
    let status = if broker && consuming && store {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        format!("broker_connected={broker} consuming={consuming} store_reachable={store}\n"),
    )
}
