//! Media purge: removes every stored media object of one chat, on S3-compatible storage or on a
//! local disk, and nothing else.
//!
//! A chat's media lives under a prefix built from a template (default `{instance}/{chat_jid}/`),
//! below a disk root folder or below an optional key prefix in a bucket. The prefix is a list of
//! whole path segments, so it always ends at a separator: `5511@s.whatsapp.net` never matches
//! `551199@s.whatsapp.net`. Values that could change the shape of the prefix (`..`, `/`, `\`,
//! NUL, empty, anything outside `[A-Za-z0-9@._-]`) are refused before any storage call.
//!
//! S3: the listing is streamed, cut into batches of 1,000 keys (one `DeleteObjects` request
//! each) and several batches are in flight at once. Keys a batch failed to delete are retried
//! alone; an interrupted listing resumes after the last key seen. Once the retry budget is spent
//! the error is returned, and a later call resumes with whatever is left.
//!
//! Disk: a recursive walk that never follows symlinks (a link is removed as a link), deletes the
//! files of each folder on a few threads, then removes the emptied folders, including the chat
//! folder and emptied parents up to (not including) the root.
//!
//! Known limits: std has no `openat`/`unlinkat`, so the disk walk works on paths; someone able
//! to write into the media root could swap a checked folder for a symlink between the check and
//! the delete. S3 "folder marker" keys ending in `/` cannot be addressed through object_store
//! and stay behind (they hold no data).

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{StreamExt, stream};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectMeta, ObjectStore};
use serde::Deserialize;

/// Counter of media objects (files, links, S3 keys) deleted.
pub const METRIC_OBJECTS_DELETED: &str = "chat_delete_media_objects_deleted_total";
/// Counter of bytes freed by deleted media objects.
pub const METRIC_BYTES_DELETED: &str = "chat_delete_media_bytes_deleted_total";

/// Largest number of keys S3 accepts in one `DeleteObjects` request.
const S3_BATCH: usize = 1_000;
/// Below this many files in a folder, extra threads cost more than they save.
const DISK_FILES_PER_THREAD: usize = 256;
/// Instance names are at most 64 bytes and JIDs far shorter; anything longer is not ours.
const MAX_VALUE_LEN: usize = 128;

// ---------------------------------------------------------------------------------------------
// Configuration

/// The `[media]` table of the worker's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Where media is stored: `kind = "disk"` (a local root folder, the default) or
    /// `kind = "s3"` (a bucket on AWS S3 or an S3-compatible server such as MinIO).
    pub backend: MediaBackend,
    /// Location of one chat's media, relative to the disk root or to the S3 key prefix.
    /// `/`-separated segments, each either literal text or exactly `{instance}` or `{chat_jid}`;
    /// `{chat_jid}` is required so that a purge never covers more than one chat.
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

impl MediaRetryConfig {
    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(self.base_delay_ms))
            .with_max_delay(Duration::from_millis(self.max_delay_ms))
            .with_factor(2.0)
            .with_max_times(self.attempts.saturating_sub(1) as usize)
            .with_jitter()
            .build()
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and results

/// What one purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Objects deleted: files and symlinks on disk, keys on S3.
    pub objects: u64,
    /// Bytes freed (sizes of deleted regular files or objects; links count 0).
    pub bytes: u64,
}

/// Why a purge failed.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The `[media]` config cannot be used.
    #[error("invalid media config: {0}")]
    Config(String),
    /// `instance` or `chat_jid` would not give a safe prefix; nothing was touched.
    #[error("refused media prefix: {0}")]
    InvalidPrefix(String),
    /// A folder on the way to the chat's media is a symlink; nothing was touched.
    #[error("media folder {} goes through a symlink", path.display())]
    SymlinkInPath { path: PathBuf },
    /// The storage failed a listing or a delete, after the retry budget for retryable failures.
    #[error("media storage {op} failed after {}: {detail}", tries(*attempts))]
    Storage {
        op: &'static str,
        attempts: u32,
        /// Short, credential-free description (S3 error code, HTTP status, connection...).
        detail: String,
        retryable: bool,
        #[source]
        source: object_store::Error,
    },
    /// A disk operation failed, after the retry budget for retryable failures.
    #[error("media disk {op} of {} failed after {}: {source}", path.display(), tries(*attempts))]
    Disk {
        op: &'static str,
        path: PathBuf,
        attempts: u32,
        #[source]
        source: io::Error,
    },
}

impl MediaError {
    /// True when a later try may succeed (storage down, timeouts, partial batch failures).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Config(_) | Self::InvalidPrefix(_) | Self::SymlinkInPath { .. } => false,
            Self::Storage { retryable, .. } => *retryable,
            Self::Disk { source, .. } => io_retryable(source),
        }
    }

    /// Short, public reason: no paths, URLs or credentials (it ends up in a result event).
    pub fn reason(&self) -> String {
        match self {
            Self::Config(_) => "media storage is misconfigured".into(),
            Self::InvalidPrefix(why) => format!("unsafe media prefix ({why})"),
            Self::SymlinkInPath { .. } => "media folder path goes through a symlink".into(),
            Self::Storage {
                op,
                attempts,
                detail,
                ..
            } => format!("storage {op} failed after {} ({detail})", tries(*attempts)),
            Self::Disk {
                op,
                attempts,
                source,
                ..
            } => format!(
                "disk {op} failed after {} ({})",
                tries(*attempts),
                source.kind()
            ),
        }
    }
}

fn tries(n: u32) -> String {
    if n == 1 {
        "1 try".into()
    } else {
        format!("{n} tries")
    }
}

fn io_retryable(e: &io::Error) -> bool {
    !matches!(
        e.kind(),
        io::ErrorKind::PermissionDenied
            | io::ErrorKind::ReadOnlyFilesystem
            | io::ErrorKind::InvalidInput
            | io::ErrorKind::InvalidFilename
            | io::ErrorKind::NotADirectory
    )
}

// ---------------------------------------------------------------------------------------------
// Prefix template

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Instance,
    ChatJid,
}

fn parse_template(template: &str) -> Result<Vec<Segment>, MediaError> {
    let bad = |why: &str| MediaError::Config(format!("prefix_template {template:?}: {why}"));
    if template.starts_with('/') {
        return Err(bad("must be relative"));
    }
    // One trailing `/` is the usual spelling; the prefix ends at a separator either way.
    let body = template.strip_suffix('/').unwrap_or(template);
    if body.is_empty() {
        return Err(bad("is empty"));
    }
    let mut segments = Vec::new();
    for part in body.split('/') {
        let segment = match part {
            "{instance}" => Segment::Instance,
            "{chat_jid}" => Segment::ChatJid,
            _ if part.contains(['{', '}']) => {
                return Err(bad(
                    "placeholders must be whole segments: {instance} or {chat_jid}",
                ));
            }
            _ => Segment::Literal(check_literal(part).map_err(|why| bad(&why))?),
        };
        segments.push(segment);
    }
    if !segments.contains(&Segment::ChatJid) {
        return Err(bad("must contain {chat_jid}"));
    }
    Ok(segments)
}

/// Literal segments from the config: nothing that changes the path shape or that object_store
/// would percent-encode (the key on S3 must be exactly what the operator wrote).
fn check_literal(part: &str) -> Result<String, String> {
    const AVOID: &[char] = &[
        '\\', '{', '}', '^', '%', '`', '[', ']', '"', '<', '>', '~', '#', '|', '*', '?',
    ];
    if part.is_empty() {
        Err("empty segment (`//`)".into())
    } else if part == "." || part == ".." {
        Err(format!("`{part}` segment"))
    } else if part.chars().any(|c| c.is_control() || AVOID.contains(&c)) {
        Err(format!(
            "segment {part:?} has a control or reserved character"
        ))
    } else {
        Ok(part.to_owned())
    }
}

/// Caller-supplied values; the caller validates too, this is the last line of defence.
fn check_value(what: &str, value: &str) -> Result<(), MediaError> {
    let why = if value.is_empty() {
        "is empty"
    } else if value.len() > MAX_VALUE_LEN {
        "is too long"
    } else if value.contains('\0') {
        "contains NUL"
    } else if value.contains('/') {
        "contains '/'"
    } else if value.contains('\\') {
        "contains '\\'"
    } else if value.contains("..") {
        "contains '..'"
    } else if value.starts_with('.') {
        "starts with '.'"
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'@' | b'.' | b'_' | b'-'))
    {
        "has a character outside [A-Za-z0-9@._-]"
    } else {
        return Ok(());
    };
    Err(MediaError::InvalidPrefix(format!("{what} {why}")))
}

fn expand(template: &[Segment], instance: &str, chat_jid: &str) -> Result<Vec<String>, MediaError> {
    check_value("instance", instance)?;
    check_value("chat_jid", chat_jid)?;
    Ok(template
        .iter()
        .map(|s| match s {
            Segment::Literal(text) => text.clone(),
            Segment::Instance => instance.to_owned(),
            Segment::ChatJid => chat_jid.to_owned(),
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Store

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
    Disk {
        root: PathBuf,
    },
    S3 {
        store: Arc<AmazonS3>,
        bucket: String,
        key_prefix: Vec<String>,
    },
}

// object_store's own Debug output includes the credentials.
impl fmt::Debug for MediaStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("MediaStore");
        match &self.backend {
            Backend::Disk { root } => d.field("disk_root", root),
            Backend::S3 {
                bucket, key_prefix, ..
            } => d.field("s3_bucket", bucket).field("key_prefix", key_prefix),
        };
        d.field("template", &self.template)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl MediaStore {
    /// Checks the config and builds the store; it does not contact the storage.
    pub fn from_config(config: &MediaConfig) -> Result<Self, MediaError> {
        let template: Arc<[Segment]> = parse_template(&config.prefix_template)?.into();
        if config.concurrency == 0 {
            return Err(MediaError::Config("concurrency must be at least 1".into()));
        }
        let retry = &config.retry;
        if retry.attempts == 0 {
            return Err(MediaError::Config(
                "retry.attempts must be at least 1".into(),
            ));
        }
        if retry.base_delay_ms > retry.max_delay_ms {
            return Err(MediaError::Config(
                "retry.base_delay_ms must not exceed retry.max_delay_ms".into(),
            ));
        }
        let backend = match &config.backend {
            MediaBackend::Disk(disk) => {
                if disk.root.as_os_str().is_empty() {
                    return Err(MediaError::Config("backend.root is empty".into()));
                }
                Backend::Disk {
                    root: disk.root.clone(),
                }
            }
            MediaBackend::S3(s3) => build_s3(s3)?,
        };
        Ok(Self {
            backend,
            template,
            concurrency: config.concurrency,
            retry: config.retry.clone(),
        })
    }

    /// Deletes every media object of `chat_jid` in `instance`. A chat without media is a success
    /// with 0 objects; after a failure, calling again deletes whatever is left.
    pub async fn purge_chat(
        &self,
        instance: &str,
        chat_jid: &str,
    ) -> Result<PurgeReport, MediaError> {
        let segments = expand(&self.template, instance, chat_jid)?;
        let started = Instant::now();
        let totals = Arc::new(Totals::default());
        let result = match &self.backend {
            Backend::Disk { root } => self.purge_disk(root, segments, &totals).await,
            Backend::S3 {
                store, key_prefix, ..
            } => {
                let prefix: ObjectPath = key_prefix
                    .iter()
                    .chain(&segments)
                    .map(String::as_str)
                    .collect();
                self.purge_s3(store, prefix, &totals).await
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

    // ---- S3 ----

    async fn purge_s3(
        &self,
        store: &Arc<AmazonS3>,
        prefix: ObjectPath,
        totals: &Totals,
    ) -> Result<(), MediaError> {
        // Bounded so that the listing never runs far ahead of the deletes.
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<ObjectMeta>>(self.concurrency);
        let stop = AtomicBool::new(false);
        let lister = self.list_s3(store, &prefix, tx, &stop);
        let batches = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
        let deleter = batches
            .map(|batch| self.delete_s3_batch(store, batch, totals, &stop))
            .buffer_unordered(self.concurrency)
            .fold(None::<MediaError>, |first, result| {
                let first = match (first, result) {
                    (None, Err(e)) => {
                        // Let the batches in flight finish (so they are counted) but list no more.
                        stop.store(true, Ordering::Relaxed);
                        Some(e)
                    }
                    (first, _) => first,
                };
                async move { first }
            });
        let (listed, delete_error) = tokio::join!(lister, deleter);
        match delete_error {
            Some(e) => Err(e),
            None => listed,
        }
    }

    async fn list_s3(
        &self,
        store: &Arc<AmazonS3>,
        prefix: &ObjectPath,
        tx: tokio::sync::mpsc::Sender<Vec<ObjectMeta>>,
        stop: &AtomicBool,
    ) -> Result<(), MediaError> {
        let depth = prefix.parts_count();
        let mut batch = Vec::with_capacity(S3_BATCH);
        let mut last: Option<ObjectPath> = None;
        let mut backoff = self.retry.backoff();
        let mut tries = 1;
        'pages: loop {
            let mut listing = match &last {
                None => store.list(Some(prefix)),
                Some(after) => store.list_with_offset(Some(prefix), after),
            };
            while let Some(item) = listing.next().await {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                match item {
                    Ok(meta) => {
                        if tries > 1 {
                            backoff = self.retry.backoff();
                            tries = 1;
                        }
                        // object_store already matches whole segments; this guards the guarantee.
                        if meta.location.prefix_match(prefix).is_none()
                            || meta.location.parts_count() <= depth
                        {
                            tracing::warn!(key = %meta.location, "Listing returned a key outside the chat prefix; skipped.");
                            continue;
                        }
                        last = Some(meta.location.clone());
                        batch.push(meta);
                        if batch.len() == S3_BATCH {
                            let full = std::mem::replace(&mut batch, Vec::with_capacity(S3_BATCH));
                            if tx.send(full).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    Err(e) => {
                        let retryable = store_error_retryable(&e);
                        match backoff.next() {
                            Some(delay) if retryable => {
                                tracing::debug!(error = %e, tries, "Media listing failed; resuming after the last key.");
                                tries += 1;
                                tokio::time::sleep(delay).await;
                                continue 'pages;
                            }
                            _ => return Err(storage_error("listing", tries, retryable, e)),
                        }
                    }
                }
            }
            break;
        }
        if !batch.is_empty() && !stop.load(Ordering::Relaxed) {
            let _ = tx.send(batch).await;
        }
        Ok(())
    }

    async fn delete_s3_batch(
        &self,
        store: &Arc<AmazonS3>,
        mut pending: Vec<ObjectMeta>,
        totals: &Totals,
        stop: &AtomicBool,
    ) -> Result<(), MediaError> {
        // Another batch already failed for good: the purge is over, a later call resumes.
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut backoff = self.retry.backoff();
        let mut tries = 1;
        loop {
            let locations: Vec<_> = pending.iter().map(|m| Ok(m.location.clone())).collect();
            // At most 1,000 keys: object_store sends exactly one DeleteObjects request.
            let results: Vec<_> = store
                .delete_stream(stream::iter(locations).boxed())
                .collect()
                .await;
            let mut deleted = HashSet::with_capacity(results.len());
            let mut first_error = None;
            for result in results {
                match result {
                    Ok(path) => {
                        deleted.insert(path);
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            let (mut objects, mut bytes) = (0, 0);
            pending.retain(|meta| {
                let gone = deleted.contains(&meta.location);
                if gone {
                    objects += 1;
                    bytes += meta.size;
                }
                !gone
            });
            totals.add(objects, bytes);
            if pending.is_empty() {
                return Ok(());
            }
            let error = first_error.unwrap_or_else(|| object_store::Error::Generic {
                store: "S3",
                source: "DeleteObjects response did not mention every key".into(),
            });
            let retryable = store_error_retryable(&error);
            match backoff.next() {
                Some(delay) if retryable => {
                    tracing::debug!(error = %error, left = pending.len(), tries, "Media delete batch incomplete; retrying the failed keys.");
                    tries += 1;
                    tokio::time::sleep(delay).await;
                }
                _ => {
                    let left = pending.len();
                    let mut e = storage_error("delete", tries, retryable, error);
                    if let MediaError::Storage { detail, .. } = &mut e {
                        *detail = format!("{left} objects left: {detail}");
                    }
                    return Err(e);
                }
            }
        }
    }

    // ---- disk ----

    async fn purge_disk(
        &self,
        root: &FsPath,
        segments: Vec<String>,
        totals: &Arc<Totals>,
    ) -> Result<(), MediaError> {
        let mut backoff = self.retry.backoff();
        let mut tries = 1;
        let segments = Arc::new(segments);
        loop {
            let (root, segments, totals) = (root.to_owned(), segments.clone(), totals.clone());
            let concurrency = self.concurrency;
            let pass = tokio::task::spawn_blocking(move || {
                disk_pass(&root, &segments, concurrency, &totals)
            })
            .await
            .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()));
            match pass {
                Ok(()) => return Ok(()),
                Err(mut e) => {
                    let retryable = e.is_retryable();
                    match backoff.next() {
                        Some(delay) if retryable => {
                            tracing::debug!(error = %e, tries, "Media disk purge incomplete; retrying.");
                            tries += 1;
                            tokio::time::sleep(delay).await;
                        }
                        _ => {
                            if let MediaError::Disk { attempts, .. } = &mut e {
                                *attempts = tries;
                            }
                            return Err(e);
                        }
                    }
                }
            }
        }
    }
}

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
        metrics::counter!(METRIC_OBJECTS_DELETED).increment(objects);
        metrics::counter!(METRIC_BYTES_DELETED).increment(bytes);
    }

    fn report(&self) -> PurgeReport {
        PurgeReport {
            objects: self.objects.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// S3 helpers

fn build_s3(config: &S3Config) -> Result<Backend, MediaError> {
    let bad = |why: String| MediaError::Config(format!("backend (s3): {why}"));
    if config.bucket.trim().is_empty() {
        return Err(bad("bucket is empty".into()));
    }
    if config.request_timeout_ms == 0 {
        return Err(bad("request_timeout_ms must be at least 1".into()));
    }
    let key_prefix = match config.key_prefix.as_deref().map(|p| p.trim_matches('/')) {
        None | Some("") => Vec::new(),
        Some(prefix) => prefix
            .split('/')
            .map(|part| check_literal(part).map_err(|why| bad(format!("key_prefix: {why}"))))
            .collect::<Result<_, _>>()?,
    };
    let timeout = Duration::from_millis(config.request_timeout_ms);
    let options = ClientOptions::new()
        .with_allow_http(config.allow_http)
        .with_timeout(timeout)
        .with_connect_timeout(timeout.min(Duration::from_secs(5)));
    // The module's own retry (per key, resumable listing) is the only one, so that
    // `retry.attempts` means what it says and a dead server fails fast.
    let no_retry = object_store::RetryConfig {
        max_retries: 0,
        ..Default::default()
    };
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&config.bucket)
        .with_region(&config.region)
        .with_virtual_hosted_style_request(!config.path_style)
        .with_client_options(options)
        .with_retry(no_retry);
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    match (&config.access_key_id, &config.secret_access_key) {
        (Some(id), Some(secret)) => {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
        }
        (None, None) => {}
        _ => {
            return Err(bad(
                "access_key_id and secret_access_key must be set together".into(),
            ));
        }
    }
    // object_store's message may quote the endpoint; keep only the gist.
    let store = builder.build().map_err(|e| {
        bad(format!(
            "cannot build the S3 client ({})",
            describe_store_error(&e)
        ))
    })?;
    Ok(Backend::S3 {
        store: Arc::new(store),
        bucket: config.bucket.clone(),
        key_prefix,
    })
}

fn storage_error(
    op: &'static str,
    attempts: u32,
    retryable: bool,
    source: object_store::Error,
) -> MediaError {
    MediaError::Storage {
        op,
        attempts,
        detail: describe_store_error(&source),
        retryable,
        source,
    }
}

/// S3 error codes that no retry will fix.
const PERMANENT_S3_CODES: &[&str] = &[
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "InvalidBucketName",
    "NoSuchBucket",
    "SignatureDoesNotMatch",
];

fn store_error_retryable(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    match e {
        E::Generic { .. } => {
            if find_http_error(e).is_some() {
                return true;
            }
            if let Some(code) = s3_error_code(e)
                && PERMANENT_S3_CODES.contains(&code.as_str())
            {
                return false;
            }
            match http_status(e) {
                // 408 and 429 are "try later"; other 4xx will fail the same way again.
                Some(s) if (400..500).contains(&s) => s == 408 || s == 429,
                _ => true,
            }
        }
        E::NotFound { .. }
        | E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::InvalidPath { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::UnknownConfigurationKey { .. } => false,
        _ => true,
    }
}

/// A short description that is safe to publish: built from classified facts, never from the
/// raw message (which may quote URLs).
fn describe_store_error(e: &object_store::Error) -> String {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => return "bucket not found".into(),
        E::PermissionDenied { .. } => return "access denied".into(),
        E::Unauthenticated { .. } => return "authentication failed".into(),
        _ => {}
    }
    if let Some(http) = find_http_error(e) {
        return match http.kind() {
            HttpErrorKind::Connect => "cannot connect to the storage",
            HttpErrorKind::Timeout => "request timed out",
            HttpErrorKind::Interrupted => "connection interrupted",
            HttpErrorKind::Decode => "unreadable response",
            _ => "request failed",
        }
        .into();
    }
    if let Some(code) = s3_error_code(e) {
        return format!("S3 error {code}");
    }
    if let Some(status) = http_status(e) {
        return format!("HTTP status {status}");
    }
    "storage error".into()
}

fn find_http_error(e: &object_store::Error) -> Option<&HttpError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(http) = s.downcast_ref::<HttpError>() {
            return Some(http);
        }
        source = s.source();
    }
    None
}

/// object_store does not expose S3 error codes as data, only in its messages; a code is plain
/// letters and digits, so nothing else can leak through.
fn s3_error_code(e: &object_store::Error) -> Option<String> {
    let text = e.to_string();
    // Per-key failures say `(code: X)`; failed requests quote the XML body `<Code>X</Code>`.
    let start = ["(code: ", "<Code>"]
        .iter()
        .find_map(|marker| text.rfind(marker).map(|at| at + marker.len()))?;
    let code: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    (!code.is_empty()).then_some(code)
}

fn http_status(e: &object_store::Error) -> Option<u16> {
    let text = e.to_string();
    let start = text.find("status code: ")? + "status code: ".len();
    text.get(start..start + 3)?.parse().ok()
}

fn redact_url(url: &str) -> String {
    // `scheme://user:pass@host` → `scheme://<redacted>@host`
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}<redacted>{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Disk helpers (blocking; run inside spawn_blocking)

fn disk_error(op: &'static str, path: &FsPath, source: io::Error) -> MediaError {
    MediaError::Disk {
        op,
        path: path.to_owned(),
        attempts: 1,
        source,
    }
}

fn disk_pass(
    root: &FsPath,
    segments: &[String],
    concurrency: usize,
    totals: &Totals,
) -> Result<(), MediaError> {
    // The root may itself be a symlink (an operator's choice); everything below it must not be.
    let root = match fs::canonicalize(root) {
        Ok(root) => root,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(disk_error("open root", root, e)),
    };
    let mut dir = root.clone();
    for (i, segment) in segments.iter().enumerate() {
        dir.push(segment);
        let meta = match fs::symlink_metadata(&dir) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(disk_error("stat", &dir, e)),
        };
        let is_chat_folder = i + 1 == segments.len();
        if meta.file_type().is_symlink() {
            if !is_chat_folder {
                return Err(MediaError::SymlinkInPath { path: dir });
            }
            // The chat folder is a link: remove the link, never what it points to.
            match fs::remove_file(&dir) {
                Ok(()) => totals.add(1, 0),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(disk_error("unlink", &dir, e)),
            }
            remove_empty_parents(&root, &dir);
            return Ok(());
        }
        if !meta.is_dir() {
            // A file where a folder should be: nothing of this chat can be below it.
            return Ok(());
        }
    }
    purge_tree(&dir, concurrency, totals)?;
    remove_empty_parents(&root, &dir);
    Ok(())
}

/// Removes `top` and everything in it, without following symlinks. Iterative (post-order) so
/// that a deep tree cannot overflow the stack.
fn purge_tree(top: &FsPath, concurrency: usize, totals: &Totals) -> Result<(), MediaError> {
    let mut first_error: Option<MediaError> = None;
    let mut stack = vec![(top.to_owned(), false)];
    while let Some((dir, emptied)) = stack.pop() {
        if emptied {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Expected when something below failed; that error is the one to report.
                Err(_) if first_error.is_some() => {}
                Err(e) => first_error = Some(disk_error("rmdir", &dir, e)),
            }
            continue;
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                first_error.get_or_insert(disk_error("read folder", &dir, e));
                continue;
            }
        };
        stack.push((dir.clone(), true));
        let mut files = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    first_error.get_or_insert(disk_error("read folder", &dir, e));
                    continue;
                }
            };
            // From the directory entry itself (lstat semantics): a symlink is never a folder here.
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push((entry.path(), false)),
                Ok(_) => files.push(entry),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    first_error.get_or_insert(disk_error("stat", &entry.path(), e));
                }
            }
        }
        let (objects, bytes, error) = delete_files(&files, concurrency);
        // Counted per folder: one metrics update instead of one per file.
        totals.add(objects, bytes);
        if let Some(e) = error {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Deletes non-folder entries (files, symlinks, sockets...) of one folder; large folders are
/// split across up to `concurrency` threads. Returns what was deleted and the first error.
fn delete_files(files: &[fs::DirEntry], concurrency: usize) -> (u64, u64, Option<MediaError>) {
    let threads = concurrency.min(files.len() / DISK_FILES_PER_THREAD).max(1);
    if threads == 1 {
        return delete_chunk(files);
    }
    let chunk = files.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = files
            .chunks(chunk)
            .map(|part| scope.spawn(move || delete_chunk(part)))
            .collect();
        workers
            .into_iter()
            .fold((0, 0, None), |(o, b, err), worker| {
                let (objects, bytes, error) = worker
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (o + objects, b + bytes, err.or(error))
            })
    })
}

fn delete_chunk(files: &[fs::DirEntry]) -> (u64, u64, Option<MediaError>) {
    let (mut objects, mut bytes, mut first_error) = (0, 0, None);
    for entry in files {
        // Size from the entry (no symlink following); links free no file data, so count 0.
        let size = match entry.metadata() {
            Ok(meta) if meta.is_file() => meta.len(),
            _ => 0,
        };
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => {
                objects += 1;
                bytes += size;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                first_error.get_or_insert(disk_error("unlink", &path, e));
            }
        }
    }
    (objects, bytes, first_error)
}

/// Removes the folders between `root` (excluded) and `chat_folder` (excluded) that the purge
/// left empty, deepest first; stops at the first one still in use.
fn remove_empty_parents(root: &FsPath, chat_folder: &FsPath) {
    let mut current = chat_folder.parent();
    while let Some(dir) = current {
        if dir == root || !dir.starts_with(root) || fs::remove_dir(dir).is_err() {
            break;
        }
        current = dir.parent();
    }
}
