//! Placeholder until the media purge lands.
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    pub root: PathBuf,
    pub prefix_template: String,
}
impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            root: "data/media".into(),
            prefix_template: "{instance}/{chat_jid}/".into(),
        }
    }
}
pub struct PurgeReport {
    pub objects: u64,
    pub bytes: u64,
}
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MediaError(String);
impl MediaError {
    pub fn is_retryable(&self) -> bool {
        true
    }
    pub fn reason(&self) -> String {
        self.0.clone()
    }
}
pub struct MediaStore {
    cfg: MediaConfig,
}
impl MediaStore {
    pub fn from_config(cfg: &MediaConfig) -> Result<Self, MediaError> {
        Ok(Self { cfg: cfg.clone() })
    }
    pub async fn purge_chat(
        &self,
        instance: &str,
        chat_jid: &str,
    ) -> Result<PurgeReport, MediaError> {
        let dir = self.cfg.root.join(instance).join(chat_jid);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(PurgeReport {
                objects: 0,
                bytes: 0,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PurgeReport {
                objects: 0,
                bytes: 0,
            }),
            Err(e) => Err(MediaError(e.kind().to_string())),
        }
    }
}
