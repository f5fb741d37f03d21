//! The purge on S3-compatible storage: the listing is streamed, cut into batches of 1,000 keys
//! (one `DeleteObjects` request each) and several batches are in flight at once. Keys a batch
//! failed to delete are retried alone; an interrupted listing resumes after the last key seen.
//! Once the retry budget is spent the error is returned, and a later call resumes with
//! whatever is left.
//!
//! S3 "folder marker" keys ending in `/` cannot be addressed through object_store and stay
//! behind (they hold no data).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectMeta, ObjectStore};

use super::retry::Retry;
use super::{MediaError, MediaRetryConfig, S3Config, Totals};
use crate::fence::Fence;

/// Largest number of keys S3 accepts in one `DeleteObjects` request.
const S3_BATCH: usize = 1_000;

/// A bucket (and key prefix) holding media.
#[derive(Clone)]
pub(super) struct S3 {
    store: Arc<AmazonS3>,
    pub(super) bucket: String,
    pub(super) key_prefix: Vec<String>,
}

impl S3 {
    /// Builds the client from a validated config; it does not contact the storage.
    pub(super) fn new(config: &S3Config) -> Result<Self, MediaError> {
        let bad = |why: String| MediaError::Config(format!("backend (s3): {why}"));
        let key_prefix = config
            .key_prefix_segments()
            .map_err(|why| bad(format!("key_prefix: {why}")))?;
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
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
        }
        // object_store's message may quote the endpoint; keep only the gist.
        let store = builder.build().map_err(|e| {
            bad(format!(
                "cannot build the S3 client ({})",
                describe_store_error(&e)
            ))
        })?;
        Ok(Self {
            store: Arc::new(store),
            bucket: config.bucket.clone(),
            key_prefix,
        })
    }

    /// Deletes every object under `segments` (below the key prefix).
    pub(super) async fn purge(
        &self,
        segments: &[String],
        concurrency: usize,
        retry: &MediaRetryConfig,
        totals: &Totals,
        fence: &dyn Fence,
    ) -> Result<(), MediaError> {
        let prefix: ObjectPath = self
            .key_prefix
            .iter()
            .chain(segments)
            .map(String::as_str)
            .collect();
        // Bounded so that the listing never runs far ahead of the deletes.
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<ObjectMeta>>(concurrency);
        let stop = AtomicBool::new(false);
        let lister = self.list(&prefix, tx, retry, &stop);
        let batches = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
        let deleter = batches
            .map(|batch| self.delete_batch(batch, retry, totals, fence, &stop))
            .buffer_unordered(concurrency)
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

    async fn list(
        &self,
        prefix: &ObjectPath,
        tx: tokio::sync::mpsc::Sender<Vec<ObjectMeta>>,
        retry: &MediaRetryConfig,
        stop: &AtomicBool,
    ) -> Result<(), MediaError> {
        let depth = prefix.parts_count();
        let mut batch = Vec::with_capacity(S3_BATCH);
        let mut last: Option<ObjectPath> = None;
        let mut retry = Retry::new(retry);
        'pages: loop {
            let mut listing = match &last {
                None => self.store.list(Some(prefix)),
                Some(after) => self.store.list_with_offset(Some(prefix), after),
            };
            while let Some(item) = listing.next().await {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let meta = match item {
                    Ok(meta) => meta,
                    Err(e) => {
                        let retryable = store_error_retryable(&e);
                        let resume = "Media listing failed; resuming after the last key.";
                        if retry.again(retryable, &e, resume).await {
                            continue 'pages;
                        }
                        return Err(storage_error("listing", retry.tries(), retryable, e));
                    }
                };
                retry.progressed();
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
            break;
        }
        if !batch.is_empty() && !stop.load(Ordering::Relaxed) {
            let _ = tx.send(batch).await;
        }
        Ok(())
    }

    async fn delete_batch(
        &self,
        mut pending: Vec<ObjectMeta>,
        retry: &MediaRetryConfig,
        totals: &Totals,
        fence: &dyn Fence,
        stop: &AtomicBool,
    ) -> Result<(), MediaError> {
        // Another batch already failed for good: the purge is over, a later call resumes.
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut retry = Retry::new(retry);
        loop {
            fence.check().map_err(MediaError::Fenced)?;
            let locations: Vec<_> = pending.iter().map(|m| Ok(m.location.clone())).collect();
            // At most 1,000 keys: object_store sends exactly one DeleteObjects request.
            let results: Vec<_> = self
                .store
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
            let again = "Media delete batch incomplete; retrying the failed keys.";
            if !retry.again(retryable, &error, again).await {
                let left = pending.len();
                let mut e = storage_error("delete", retry.tries(), retryable, error);
                if let MediaError::Storage { detail, .. } = &mut e {
                    *detail = format!("{left} objects left: {detail}");
                }
                return Err(e);
            }
        }
    }
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
