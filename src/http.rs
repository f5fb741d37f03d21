//! One HTTP port: `/metrics`, `/healthz`, `/readyz`, `/instances` and `POST /admin/reload`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract;
use axum::http::StatusCode;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Pipeline;
use crate::telemetry;

/// The broker side of `/readyz`: connected, and consuming.
#[derive(Debug, Default)]
pub struct Readiness {
    broker_connected: AtomicBool,
    consuming: AtomicBool,
}

impl Readiness {
    /// Also kept as the `broker_connected` gauge; a lost connection consumes nothing.
    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.store(connected, Ordering::SeqCst);
        if !connected {
            self.consuming.store(false, Ordering::SeqCst);
        }
        metrics::gauge!(telemetry::BROKER_CONNECTED).set(if connected { 1.0 } else { 0.0 });
    }

    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::SeqCst);
    }
}

/// What the endpoints read.
#[derive(Clone)]
pub struct State {
    pub metrics: PrometheusHandle,
    pub readiness: Arc<Readiness>,
    pub pipeline: Arc<Pipeline>,
    /// Notified by `POST /admin/reload`: pick up sessions paired since the start.
    pub reload: Arc<Notify>,
}

type AppState = extract::State<State>;

/// One line of `GET /instances`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InstanceView {
    pub name: String,
    pub state: String,
    pub paired_as: Option<String>,
    pub changed_at: Option<String>,
    /// While WhatsApp's 429 holds the instance's deletes back.
    #[serde(default)]
    pub throttled_until: Option<String>,
    /// When the chat list's app state last failed to sync (deletes may not land).
    #[serde(default)]
    pub app_state_failed_at: Option<String>,
    /// Since when the chat list is stuck at version 0 (every delete conflicts).
    #[serde(default)]
    pub app_state_stuck_since: Option<String>,
    /// The chat index: how many chats, and whether it holds the phone's whole chat list.
    #[serde(default)]
    pub chat_index: Option<crate::session::ChatIndexStatus>,
}

/// Binds the port and serves until `stop`; returns the bound address (port 0 picks one).
pub async fn serve(
    bind: &str,
    port: u16,
    state: State,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind((bind, port)).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(|extract::State(s): AppState| async move { s.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/instances", get(instances))
        .route("/admin/reload", post(reload))
        .with_state(state);
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

async fn instances(extract::State(s): AppState) -> axum::Json<Vec<InstanceView>> {
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
                changed_at: details.as_ref().map(|d| d.changed_at.to_rfc3339()),
                app_state_failed_at: details
                    .as_ref()
                    .and_then(|d| d.app_state_failed_at)
                    .map(|at| at.to_rfc3339()),
                app_state_stuck_since: details
                    .as_ref()
                    .and_then(|d| d.app_state_stuck_since)
                    .map(|at| at.to_rfc3339()),
                chat_index: details.as_ref().and_then(|d| d.chat_index),
                throttled_until: details
                    .and_then(|d| d.throttled_until)
                    .filter(|until| *until > chrono::Utc::now())
                    .map(|until| until.to_rfc3339()),
            }
        })
        .collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    axum::Json(views)
}

async fn reload(extract::State(s): AppState) -> (StatusCode, &'static str) {
    s.reload.notify_one();
    (StatusCode::ACCEPTED, "reloading sessions\n")
}

async fn readyz(extract::State(s): AppState) -> (StatusCode, String) {
    let broker = s.readiness.broker_connected.load(Ordering::SeqCst);
    let consuming = s.readiness.consuming.load(Ordering::SeqCst);
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
