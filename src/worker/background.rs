//! Tasks beside the consumers: the instance state gauges, and reloading sessions on request.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::instances::Instances;
use crate::session::SessionState;
use crate::telemetry;

/// Keeps the per-instance state gauges current.
pub async fn report_instance_states(instances: Arc<Instances>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        for instance in instances.iter() {
            let current = instance.session().state();
            let connected = current == SessionState::Connected;
            metrics::gauge!(telemetry::INSTANCE_CONNECTED, "wa_instance" => instance.name().to_owned())
                .set(if connected { 1.0 } else { 0.0 });
            for state in SessionState::ALL {
                metrics::gauge!(
                    telemetry::INSTANCE_STATE,
                    "wa_instance" => instance.name().to_owned(),
                    "state" => state.label()
                )
                .set(if state == current { 1.0 } else { 0.0 });
            }
        }
    }
}

/// On SIGHUP or `POST /admin/reload` (`requested`), sessions paired meanwhile are opened and
/// connected.
pub async fn reload_on_request(
    instances: Arc<Instances>,
    requested: Arc<Notify>,
    stop: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).ok();
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = hup => tracing::info!("SIGHUP received; reloading sessions."),
            _ = requested.notified() => tracing::info!("Reload requested; reloading sessions."),
        }
        // Only this worker's: another worker holds the others' sessions.
        let owned = instances
            .iter()
            .filter(|i| i.lease().generation().is_some());
        for instance in owned {
            instance.session().reload().await;
        }
    }
}
