//! A scripted in-process session. It never talks to WhatsApp: it is for trying the worker
//! without a phone, for tests and for benchmarks.

use std::io::Write;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{SimulatedConfig, SimulatedFailure};
use crate::fence::Fence;
use crate::pipeline::request::ChatJid;

use super::{ChatSession, SessionError, SessionState};

pub struct SimulatedSession {
    connected: bool,
    latency: Duration,
    failures_left: AtomicU32,
    failure: SimulatedFailure,
    deletes: AtomicU64,
    effects_log: Option<Mutex<std::fs::File>>,
    connected_flag_file: Option<std::path::PathBuf>,
    resolve: std::collections::BTreeMap<String, ChatJid>,
}

impl SimulatedSession {
    pub fn new(cfg: &SimulatedConfig) -> std::io::Result<Self> {
        let effects_log = match &cfg.effects_log {
            Some(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                Some(Mutex::new(file))
            }
            None => None,
        };
        Ok(Self {
            connected: cfg.connected,
            latency: Duration::from_millis(cfg.latency_ms),
            failures_left: AtomicU32::new(cfg.fail_first),
            failure: cfg.failure,
            deletes: AtomicU64::new(0),
            effects_log,
            connected_flag_file: cfg.connected_flag_file.clone(),
            resolve: cfg.resolve.clone(),
        })
    }

    /// Deletes performed so far.
    pub fn deletes(&self) -> u64 {
        self.deletes.load(Ordering::Relaxed)
    }

    fn is_connected(&self) -> bool {
        match &self.connected_flag_file {
            Some(flag) => flag.exists(),
            None => self.connected,
        }
    }

    fn record(&self, chat: &ChatJid) -> Result<(), SessionError> {
        self.deletes.fetch_add(1, Ordering::Relaxed);
        if let Some(log) = &self.effects_log {
            let now = chrono::Utc::now().timestamp_micros();
            let mut file = log.lock().unwrap_or_else(|e| e.into_inner());
            // Durable before the delete counts as done: the crash harness reads this log.
            writeln!(file, "{now} {chat}")
                .and_then(|()| file.sync_data())
                .map_err(|e| SessionError::Server(format!("effects log: {}", e.kind())))?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ChatSession for SimulatedSession {
    fn state(&self) -> SessionState {
        if self.is_connected() {
            SessionState::Connected
        } else {
            SessionState::NotPaired
        }
    }

    async fn delete_chat(
        &self,
        chat: &ChatJid,
        lookup: bool,
        fence: Arc<dyn Fence>,
    ) -> Result<ChatJid, SessionError> {
        // The latency stands for the wait in the session and the call itself; the effect, and
        // the fence check just before it, come at its end.
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        fence.check().map_err(SessionError::Fenced)?;
        if !self.is_connected() {
            return Err(SessionError::NotConnected);
        }
        let fail = self
            .failures_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(match self.failure {
                SimulatedFailure::NotConnected => SessionError::NotConnected,
                SimulatedFailure::Timeout => SessionError::Timeout,
                SimulatedFailure::ServerError => {
                    SessionError::Server("simulated server error".into())
                }
                SimulatedFailure::Rejected => SessionError::Rejected("simulated rejection".into()),
            });
        }
        // Resolution as scripted; a number not in the script is its own chat.
        let chat = match self.resolve.get(chat.user()) {
            Some(scripted) if lookup => scripted,
            _ => chat,
        };
        self.record(chat)?;
        Ok(chat.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fence::Unfenced;
    use crate::pipeline::request::normalise_number;

    #[tokio::test]
    async fn fails_first_n_then_succeeds_and_logs_each_delete() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("effects.log");
        let session = SimulatedSession::new(&SimulatedConfig {
            fail_first: 2,
            failure: SimulatedFailure::Timeout,
            effects_log: Some(log.clone()),
            ..Default::default()
        })
        .unwrap();
        let chat = normalise_number("5511999999999").unwrap();
        assert_eq!(
            session.delete_chat(&chat, false, Arc::new(Unfenced)).await,
            Err(SessionError::Timeout)
        );
        assert_eq!(
            session.delete_chat(&chat, false, Arc::new(Unfenced)).await,
            Err(SessionError::Timeout)
        );
        assert_eq!(
            session.delete_chat(&chat, false, Arc::new(Unfenced)).await,
            Ok(chat.clone())
        );
        assert_eq!(session.deletes(), 1);
        let text = std::fs::read_to_string(log).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.ends_with(" 5511999999999@s.whatsapp.net\n"));
    }

    #[tokio::test]
    async fn disconnected_session_answers_not_connected() {
        let session = SimulatedSession::new(&SimulatedConfig {
            connected: false,
            ..Default::default()
        })
        .unwrap();
        let chat = normalise_number("5511999999999").unwrap();
        assert_eq!(session.state(), SessionState::NotPaired);
        assert_eq!(
            session.delete_chat(&chat, false, Arc::new(Unfenced)).await,
            Err(SessionError::NotConnected)
        );
        assert_eq!(session.deletes(), 0);
    }

    #[tokio::test]
    async fn numbers_resolve_as_scripted_and_jids_as_given() {
        let scripted = normalise_number("553187654321@s.whatsapp.net").unwrap();
        let session = SimulatedSession::new(&SimulatedConfig {
            resolve: [("5531987654321".to_owned(), scripted.clone())].into(),
            ..Default::default()
        })
        .unwrap();
        let chat = normalise_number("5531987654321").unwrap();
        let by_number = session.delete_chat(&chat, true, Arc::new(Unfenced)).await;
        assert_eq!(by_number, Ok(scripted));
        let as_given = session.delete_chat(&chat, false, Arc::new(Unfenced)).await;
        assert_eq!(as_given, Ok(chat));
    }
}
