//! Media purge: removes every stored media object of one chat, on S3-compatible storage
//! (`s3`) or on a local disk (`disk`), and nothing else.
//!
//! A chat's media lives under a prefix built from a template (`prefix`, default
//! `{instance}/{chat_jid}/`), below a disk root folder or below an optional key prefix in a
//! bucket. The prefix is a list of whole path segments, so it always ends at a separator:
//! `5511@s.whatsapp.net` never matches `551199@s.whatsapp.net`. Failed storage calls are
//! retried (`retry`); a later purge resumes with whatever is left.

mod config;
mod disk;
mod error;
mod prefix;
mod retry;
mod s3;

pub use config::{
    DiskConfig, MediaBackend, MediaConfig, MediaConfigError, MediaRetryConfig, S3Config,
};
pub use error::{MediaError, PurgeReport};

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use crate::fence::Fence;
use crate::telemetry;
use disk::Disk;
use prefix::{Segment, expand, parse_template};
use s3::S3;

/// Purges chat media on the configured backend. Cheap to clone.
#[derive(Clone)]
pub struct MediaStore {
    backend: Backend,
    template: Arc<[Segment]>,
    concurrency: usize,
    retry: MediaRetryConfig,
}

#[derive(Clone)]
enum Backend {
    Disk(Disk),
    S3(S3),
}

// object_store's own Debug output includes the credentials.
impl fmt::Debug for MediaStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("MediaStore");
        match &self.backend {
            Backend::Disk(disk) => d.field("disk_root", &disk.root),
            Backend::S3(s3) => d
                .field("s3_bucket", &s3.bucket)
                .field("key_prefix", &s3.key_prefix),
        };
        d.field("template", &self.template)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl MediaStore {
    /// Checks the config and builds the store; it does not contact the storage.
    pub fn from_config(config: &MediaConfig) -> Result<Self, MediaError> {
        config
            .validate()
            .map_err(|e| MediaError::Config(e.to_string()))?;
        let template = parse_template(&config.prefix_template).map_err(MediaError::Config)?;
        let backend = match &config.backend {
            MediaBackend::Disk(disk) => Backend::Disk(Disk {
                root: disk.root.clone(),
            }),
            MediaBackend::S3(s3) => Backend::S3(S3::new(s3)?),
        };
        Ok(Self {
            backend,
            template: template.into(),
            concurrency: config.concurrency,
            retry: config.retry.clone(),
        })
    }

    /// Deletes every media object of `chat_jid` in `instance`, checking `fence` before each
    /// batch. A chat without media is a success with 0 objects; after a failure, calling again
    /// deletes whatever is left.
    pub async fn purge_chat(
        &self,
        instance: &str,
        chat_jid: &str,
        fence: Arc<dyn Fence>,
    ) -> Result<PurgeReport, MediaError> {
        let segments = expand(&self.template, instance, chat_jid)?;
        let started = Instant::now();
        let totals = Arc::new(Totals::default());
        let (concurrency, retry) = (self.concurrency, &self.retry);
        let result = match &self.backend {
            Backend::Disk(disk) => {
                disk.purge(&segments, concurrency, retry, &totals, fence)
                    .await
            }
            Backend::S3(s3) => {
                s3.purge(&segments, concurrency, retry, &totals, fence.as_ref())
                    .await
            }
        };
        let report = totals.report();
        match &result {
            // The caller's span carries the instance and the command id.
            Ok(()) => tracing::info!(
                chat_jid,
                objects = report.objects,
                bytes = report.bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Media purged."
            ),
            Err(e) => tracing::warn!(
                chat_jid,
                objects = report.objects,
                bytes = report.bytes,
                retryable = e.is_retryable(),
                error = %e,
                "Media purge failed."
            ),
        }
        result.map(|()| report)
    }
}

/// What one purge deleted so far.
#[derive(Default)]
struct Totals {
    objects: AtomicU64,
    bytes: AtomicU64,
}

impl Totals {
    /// Metrics are recorded as objects go, so that a failed purge still reports its progress.
    fn add(&self, objects: u64, bytes: u64) {
        if objects == 0 {
            return;
        }
        self.objects.fetch_add(objects, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        metrics::counter!(telemetry::MEDIA_OBJECTS_DELETED).increment(objects);
        metrics::counter!(telemetry::MEDIA_BYTES_DELETED).increment(bytes);
    }

    fn report(&self) -> PurgeReport {
        PurgeReport {
            objects: self.objects.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[derive(serde::Deserialize)]
    struct Worker {
        #[serde(default)]
        media: MediaConfig,
    }

    #[test]
    fn config_defaults_and_s3_table() {
        let empty: Worker = toml::from_str("").unwrap();
        assert_eq!(empty.media.prefix_template, "{instance}/{chat_jid}/");
        match &empty.media.backend {
            MediaBackend::Disk(disk) => assert_eq!(disk.root, PathBuf::from("data/media")),
            other => panic!("default backend should be disk, got {other:?}"),
        }
        MediaStore::from_config(&empty.media).unwrap();

        let disk: Worker =
            toml::from_str("[media.backend]\nkind = \"disk\"\nroot = \"/srv/media\"").unwrap();
        match &disk.media.backend {
            MediaBackend::Disk(disk) => assert_eq!(disk.root, PathBuf::from("/srv/media")),
            other => panic!("expected disk, got {other:?}"),
        }

        let s3: Worker = toml::from_str(
            r#"
            [media]
            concurrency = 8
            [media.backend]
            kind = "s3"
            bucket = "media"
            endpoint = "http://127.0.0.1:9000"
            path_style = true
            allow_http = true
            access_key_id = "AKIDEXAMPLE"
            secret_access_key = "very-secret-value"
            key_prefix = "prod/media/"
            [media.retry]
            attempts = 5
            "#,
        )
        .unwrap();
        assert_eq!(s3.media.concurrency, 8);
        assert_eq!(s3.media.retry.attempts, 5);
        assert_eq!(s3.media.retry.base_delay_ms, 200);
        let MediaBackend::S3(cfg) = &s3.media.backend else {
            panic!("expected s3")
        };
        assert_eq!(cfg.region, "us-east-1");
        assert_eq!(cfg.request_timeout_ms, 30_000);
        let store = MediaStore::from_config(&s3.media).unwrap();
        for debug in [format!("{:?}", s3.media), format!("{store:?}")] {
            assert!(
                !debug.contains("very-secret-value"),
                "secret in Debug: {debug}"
            );
            assert!(!debug.contains("AKIDEXAMPLE"), "key id in Debug: {debug}");
        }
    }

    #[test]
    fn config_rejects_unknown_fields_and_unsafe_templates() {
        for text in [
            "[media]\nbogus = 1",
            "[media.backend]\nkind = \"disk\"\nroot = \"x\"\nbogus = 1",
            "[media.backend]\nkind = \"s3\"\nbucket = \"b\"\nbogus = 1",
            "[media.backend]\nkind = \"ftp\"",
            "[media.retry]\nbogus = 1",
        ] {
            assert!(toml::from_str::<Worker>(text).is_err(), "accepted: {text}");
        }
        // Every refused template is listed in prefix.rs; here, that the store refuses them too.
        for template in ["{instance}/", "media/../{chat_jid}/", ""] {
            let config = MediaConfig {
                prefix_template: template.into(),
                ..MediaConfig::default()
            };
            let err = MediaStore::from_config(&config).expect_err(template);
            assert!(matches!(err, MediaError::Config(_)), "{template}: {err}");
            assert!(!err.is_retryable());
        }
        let ok = MediaConfig {
            prefix_template: "media/{instance}/chats/{chat_jid}".into(),
            ..MediaConfig::default()
        };
        MediaStore::from_config(&ok).unwrap();
        let zero = MediaConfig {
            concurrency: 0,
            ..MediaConfig::default()
        };
        assert!(MediaStore::from_config(&zero).is_err());
    }

    #[test]
    fn validation_names_the_key() {
        let cases = [
            (
                "[media]\nprefix_template = \"{instance}/\"",
                "prefix_template",
            ),
            ("[media]\nconcurrency = 0", "concurrency"),
            ("[media.retry]\nattempts = 0", "retry.attempts"),
            (
                "[media.retry]\nbase_delay_ms = 9\nmax_delay_ms = 1",
                "retry.base_delay_ms",
            ),
            (
                "[media.backend]\nkind = \"disk\"\nroot = \"\"",
                "backend.root",
            ),
            (
                "[media.backend]\nkind = \"s3\"\nbucket = \" \"",
                "backend.bucket",
            ),
            (
                "[media.backend]\nkind = \"s3\"\nbucket = \"b\"\naccess_key_id = \"a\"",
                "backend.access_key_id",
            ),
            (
                "[media.backend]\nkind = \"s3\"\nbucket = \"b\"\nkey_prefix = \"a/../b\"",
                "backend.key_prefix",
            ),
        ];
        for (text, key) in cases {
            let worker: Worker = toml::from_str(text).unwrap();
            let err = worker.media.validate().expect_err(text);
            assert_eq!(err.key, key, "{text}: {err}");
        }
    }
}
