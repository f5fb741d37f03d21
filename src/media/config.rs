//! The `[media]` table of the worker's config, and its checks (reached from
//! `Config::validate`, so `check-config` and the usage exit code cover them).

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::prefix::{check_literal, parse_template};

/// The `[media]` table of the worker's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Where media is stored: `kind = "disk"` (a local root folder, the default) or
    /// `kind = "s3"` (a bucket on AWS S3 or an S3-compatible server such as MinIO).
    pub backend: MediaBackend,
    /// Location of one chat's media, relative to the disk root or to the S3 key prefix.
    /// `/`-separated segments, each either literal text or exactly `{instance}` or `{chat_jid}`;
    /// both are required, so that a purge never covers another chat or another instance's.
    pub prefix_template: String,
    /// S3: delete batches (1,000 keys each) in flight at once. Disk: files deleted at once.
    pub concurrency: usize,
    /// Retries inside one purge (a failed listing page, the keys a delete batch left behind).
    pub retry: MediaRetryConfig,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            backend: MediaBackend::default(),
            prefix_template: "{instance}/{chat_jid}/".into(),
            concurrency: 4,
            retry: MediaRetryConfig::default(),
        }
    }
}

/// Storage backend of the media, chosen by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MediaBackend {
    /// Files under a local folder (`kind = "disk"`).
    Disk(DiskConfig),
    /// Objects in an S3-compatible bucket (`kind = "s3"`).
    S3(S3Config),
}

impl Default for MediaBackend {
    fn default() -> Self {
        Self::Disk(DiskConfig::default())
    }
}

/// `kind = "disk"` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskConfig {
    /// Root folder of all media; relative paths are relative to the working directory. A purge
    /// never deletes outside it and never removes the root itself.
    pub root: PathBuf,
}

impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("data/media"),
        }
    }
}

/// `kind = "s3"` settings.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Bucket name (required).
    pub bucket: String,
    /// Region used to sign requests; S3-compatible servers usually accept any.
    #[serde(default = "default_region")]
    pub region: String,
    /// Endpoint URL of an S3-compatible server (MinIO, moto...); unset for AWS S3.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Path-style URLs (`endpoint/bucket/key`) instead of virtual-hosted ones; MinIO needs it.
    #[serde(default)]
    pub path_style: bool,
    /// Allow a plain `http://` endpoint (local or test servers only).
    #[serde(default)]
    pub allow_http: bool,
    /// Access key id; unset to take it, with the secret, from the standard `AWS_*` variables.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret access key; set together with `access_key_id`.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Key prefix in front of every chat prefix (for a bucket shared with other data).
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// Bound on one HTTP request (a listing page or a delete batch), in milliseconds.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_request_timeout_ms() -> u64 {
    30_000
}

// Hand-written so that secrets never reach a log line through `{:?}`.
impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint.as_deref().map(redact_url))
            .field("path_style", &self.path_style)
            .field("allow_http", &self.allow_http)
            .field(
                "access_key_id",
                &self.access_key_id.as_ref().map(|_| "<set>"),
            )
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("key_prefix", &self.key_prefix)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .finish()
    }
}

/// Retries inside one purge: exponential backoff with jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaRetryConfig {
    /// Tries of one listing page or one delete batch, the first included (1 = no retry).
    pub attempts: u32,
    /// Delay before the first retry, in milliseconds; it doubles on each further retry.
    pub base_delay_ms: u64,
    /// Longest delay between two tries, in milliseconds.
    pub max_delay_ms: u64,
}

impl Default for MediaRetryConfig {
    fn default() -> Self {
        Self {
            attempts: 4,
            base_delay_ms: 200,
            max_delay_ms: 5_000,
        }
    }
}

/// A `[media]` setting that cannot be used: the key below `media.` and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaConfigError {
    pub key: &'static str,
    pub message: String,
}

impl fmt::Display for MediaConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "media.{}: {}", self.key, self.message)
    }
}

impl MediaConfig {
    /// Everything that can be checked without contacting the storage.
    pub fn validate(&self) -> Result<(), MediaConfigError> {
        let bad = |key, message: String| MediaConfigError { key, message };
        parse_template(&self.prefix_template).map_err(|why| bad("prefix_template", why))?;
        if self.concurrency == 0 {
            return Err(bad("concurrency", "must be at least 1".into()));
        }
        if self.retry.attempts == 0 {
            return Err(bad("retry.attempts", "must be at least 1".into()));
        }
        if self.retry.base_delay_ms > self.retry.max_delay_ms {
            return Err(bad(
                "retry.base_delay_ms",
                "must not exceed retry.max_delay_ms".into(),
            ));
        }
        match &self.backend {
            MediaBackend::Disk(disk) if disk.root.as_os_str().is_empty() => {
                Err(bad("backend.root", "is empty".into()))
            }
            MediaBackend::Disk(_) => Ok(()),
            MediaBackend::S3(s3) => s3.validate().map_err(|(key, why)| bad(key, why)),
        }
    }
}

impl S3Config {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.bucket.trim().is_empty() {
            return Err(("backend.bucket", "is empty".into()));
        }
        if self.request_timeout_ms == 0 {
            return Err(("backend.request_timeout_ms", "must be at least 1".into()));
        }
        self.key_prefix_segments()
            .map_err(|why| ("backend.key_prefix", why))?;
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err((
                "backend.access_key_id",
                "access_key_id and secret_access_key must be set together".into(),
            ));
        }
        Ok(())
    }

    /// `key_prefix` as path segments (empty when unset).
    pub(super) fn key_prefix_segments(&self) -> Result<Vec<String>, String> {
        match self.key_prefix.as_deref().map(|p| p.trim_matches('/')) {
            None | Some("") => Ok(Vec::new()),
            Some(prefix) => prefix.split('/').map(check_literal).collect(),
        }
    }
}

/// `scheme://user:pass@host` → `scheme://<redacted>@host`
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}<redacted>{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}
