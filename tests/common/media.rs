//! Helpers of the media tests: a metrics recorder of their own, an S3-compatible server
//! (moto, through `scripts/s3-server`) with a client to seed and inspect buckets, and disk
//! fixtures.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use chat_delete_worker::media::*;
use futures_util::{StreamExt, TryStreamExt, stream};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

pub const JID: &str = "5511@s.whatsapp.net";
pub const LONGER_JID: &str = "5511999999999@s.whatsapp.net";

/// Instance and chat values that must never reach the storage.
pub const BAD_INPUTS: &[(&str, &str)] = &[
    ("..", JID),
    ("inst", ".."),
    ("inst", "../other"),
    ("../inst", JID),
    ("inst", "5511@s.whatsapp.net/.."),
    ("inst", "a/b"),
    ("inst/other", JID),
    ("/etc", JID),
    ("inst", "/etc/passwd"),
    ("inst", "5511\0@s.whatsapp.net"),
    ("in\0st", JID),
    ("inst", "a\\..\\b"),
    ("", JID),
    ("inst", ""),
    ("inst", "."),
    ("inst", "5511 @s.whatsapp.net"),
    ("inst", "*"),
];

// ---- metrics ----

#[derive(Default)]
pub struct TestRecorder {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl TestRecorder {
    pub fn get(&self, name: &str) -> u64 {
        self.counter(name).load(Ordering::Relaxed)
    }
    fn counter(&self, name: &str) -> Arc<AtomicU64> {
        self.counters
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }
}

impl metrics::Recorder for TestRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        assert!(
            key.labels().next().is_none(),
            "media counters carry no labels"
        );
        metrics::Counter::from_arc(self.counter(key.name()))
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        panic!("unexpected gauge {}", key.name())
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        panic!("unexpected histogram {}", key.name())
    }
}

pub fn recorder() -> &'static TestRecorder {
    static RECORDER: OnceLock<&'static TestRecorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder: &'static TestRecorder = Box::leak(Box::default());
        metrics::set_global_recorder(recorder).expect("no other recorder");
        recorder
    })
}

// ---- S3 server ----

pub struct Server {
    pub endpoint: String,
    pub bucket: String,
}

pub struct Started {
    pub endpoint: String,
    pub pid: u32,
    pub log: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3-server")
}

/// Runs `scripts/s3-server` on a free port; the server dies with this test process at the
/// latest.
pub fn start_server(buckets: &[&str]) -> Started {
    start_server_on(0, buckets)
}

/// Runs `scripts/s3-server` on `port` (0: a free one).
pub fn start_server_on(port: u16, buckets: &[&str]) -> Started {
    let mut cmd = Command::new(script());
    cmd.env_remove("S3_PORT").args([
        "--port",
        &port.to_string(),
        "--watch-pid",
        &std::process::id().to_string(),
    ]);
    for bucket in buckets {
        cmd.args(["--bucket", bucket]);
    }
    let out = cmd.output().expect("run scripts/s3-server");
    assert!(
        out.status.success(),
        "scripts/s3-server failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in script output: {stdout}"))
            .to_owned()
    };
    Started {
        endpoint: field("S3_ENDPOINT"),
        pid: field("S3_PID").parse().unwrap(),
        log: field("S3_LOG").into(),
    }
}

pub fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| match std::env::var("S3_ENDPOINT") {
        Ok(endpoint) => {
            let bucket = std::env::var("S3_BUCKET").unwrap_or_else(|_| "media-tests".into());
            let status = Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-X",
                    "PUT",
                    &format!("{endpoint}/{bucket}"),
                ])
                .status()
                .unwrap();
            assert!(
                status.success(),
                "cannot create bucket {bucket} on {endpoint}"
            );
            Server { endpoint, bucket }
        }
        Err(_) => Server {
            endpoint: start_server(&["media-tests"]).endpoint,
            bucket: "media-tests".into(),
        },
    })
}

pub fn s3_media_config(endpoint: &str, bucket: &str, key_prefix: &str) -> MediaConfig {
    MediaConfig {
        backend: MediaBackend::S3(S3Config {
            bucket: bucket.into(),
            region: "us-east-1".into(),
            endpoint: Some(endpoint.into()),
            path_style: true,
            allow_http: true,
            access_key_id: Some("test".into()),
            secret_access_key: Some("test-secret".into()),
            key_prefix: Some(key_prefix.into()),
            request_timeout_ms: 30_000,
        }),
        retry: MediaRetryConfig {
            attempts: 3,
            base_delay_ms: 20,
            max_delay_ms: 200,
        },
        ..MediaConfig::default()
    }
}

/// A plain object_store client (its own default retries) to seed and inspect the bucket.
pub fn raw_store(endpoint: &str, bucket: &str) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_allow_http(true)
        .with_access_key_id("test")
        .with_secret_access_key("test-secret")
        .build()
        .unwrap()
}

/// Each test works under its own key prefix; leftovers of an earlier run are cleared first.
pub async fn fresh_prefix(store: &AmazonS3, name: &str) -> String {
    let prefix = format!("t-{name}");
    let old: Vec<_> = store
        .list(Some(&ObjectPath::from(prefix.as_str())))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .unwrap();
    let paths = stream::iter(old.into_iter().map(Ok)).boxed();
    store
        .delete_stream(paths)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    prefix
}

/// Uploads `keys` (full keys, parsed as-is so unicode stays unicode); returns the bytes written.
pub async fn seed(store: &AmazonS3, keys: &[String]) -> u64 {
    stream::iter(keys.iter().enumerate())
        .map(|(i, key)| async move {
            let body = vec![b'x'; 10 + i % 50];
            let len = body.len() as u64;
            store
                .put(&ObjectPath::parse(key).unwrap(), PutPayload::from(body))
                .await
                .unwrap();
            len
        })
        .buffer_unordered(16)
        .fold(0, |acc, n| async move { acc + n })
        .await
}

pub async fn keys_under(store: &AmazonS3, prefix: &str) -> BTreeSet<String> {
    store
        .list(Some(&ObjectPath::parse(prefix).unwrap()))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

pub fn many_keys(base: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{base}/{}/{i:05}.jpg", ["img", "audio", "doc"][i % 3]))
        .collect()
}

// ---- disk ----

pub fn disk_config(root: &Path) -> MediaConfig {
    MediaConfig {
        backend: MediaBackend::Disk(DiskConfig { root: root.into() }),
        ..MediaConfig::default()
    }
}

pub fn write(path: &Path, len: usize) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, vec![b'm'; len]).unwrap();
}

/// Every path under `dir` (files, folders and links, not following links), relative to `dir`.
pub fn tree(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let entry = entry.unwrap();
            let path = entry.path();
            out.insert(path.strip_prefix(base).unwrap().display().to_string());
            if entry.file_type().unwrap().is_dir() {
                walk(base, &path, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// No fence: every batch may go.
pub fn unfenced() -> Arc<dyn chat_delete_worker::fence::Fence> {
    Arc::new(chat_delete_worker::fence::Unfenced)
}

/// A fence that no longer holds: every batch is refused.
pub fn refused() -> Arc<dyn chat_delete_worker::fence::Fence> {
    struct Refused;
    impl chat_delete_worker::fence::Fence for Refused {
        fn check(&self) -> Result<(), chat_delete_worker::fence::Fenced> {
            Err(chat_delete_worker::fence::Fenced(
                "the claim was taken over",
            ))
        }
    }
    Arc::new(Refused)
}
