//! Media purge against a real S3-compatible HTTP server (moto, started by `scripts/s3-server`)
//! and against a real disk (tempfile).
//!
//! The shared server comes from `S3_ENDPOINT` (+ `S3_BUCKET`) when set, otherwise the tests start
//! one through the script. The outage test always starts its own, because it pauses it.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::net::TcpStream;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use chat_delete_worker::media::*;
use futures_util::{StreamExt, TryStreamExt, stream};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

const JID: &str = "5511@s.whatsapp.net";
const LONGER_JID: &str = "5511999999999@s.whatsapp.net";

// ---------------------------------------------------------------------------------------------
// Helpers: metrics

#[derive(Default)]
struct TestRecorder {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl TestRecorder {
    fn get(&self, name: &str) -> u64 {
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

fn recorder() -> &'static TestRecorder {
    static RECORDER: OnceLock<&'static TestRecorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder: &'static TestRecorder = Box::leak(Box::default());
        metrics::set_global_recorder(recorder).expect("no other recorder");
        recorder
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers: S3 server

struct Server {
    endpoint: String,
    bucket: String,
}

struct Started {
    endpoint: String,
    pid: u32,
    log: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3-server")
}

/// Runs `scripts/s3-server`; the server dies with this test process at the latest.
fn start_server(buckets: &[&str]) -> Started {
    let mut cmd = Command::new(script());
    cmd.env_remove("S3_PORT")
        .args(["--watch-pid", &std::process::id().to_string()]);
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

fn server() -> &'static Server {
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

fn s3_media_config(endpoint: &str, bucket: &str, key_prefix: &str) -> MediaConfig {
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
fn raw_store(endpoint: &str, bucket: &str) -> AmazonS3 {
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
async fn fresh_prefix(store: &AmazonS3, name: &str) -> String {
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
async fn seed(store: &AmazonS3, keys: &[String]) -> u64 {
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

async fn keys_under(store: &AmazonS3, prefix: &str) -> BTreeSet<String> {
    store
        .list(Some(&ObjectPath::parse(prefix).unwrap()))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

fn many_keys(base: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{base}/{}/{i:05}.jpg", ["img", "audio", "doc"][i % 3]))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Helpers: disk

fn disk_config(root: &Path) -> MediaConfig {
    MediaConfig {
        backend: MediaBackend::Disk(DiskConfig { root: root.into() }),
        ..MediaConfig::default()
    }
}

fn write(path: &Path, len: usize) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, vec![b'm'; len]).unwrap();
}

/// Every path under `dir` (files, folders and links, not following links), relative to `dir`.
fn tree(dir: &Path) -> BTreeSet<String> {
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

// ---------------------------------------------------------------------------------------------
// Disk

#[tokio::test]
async fn disk_prefix_isolation_and_empty_parents() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("media");
    write(&root.join("inst/5511@s.whatsapp.net/a.jpg"), 100);
    write(&root.join("inst/5511@s.whatsapp.net/sub/deeper/b.ogg"), 50);
    write(&root.join(format!("inst/{LONGER_JID}/keep.jpg")), 7);
    write(&root.join("inst/5511@s.whatsapp.net.bak/keep.jpg"), 7);
    write(&root.join("other/5511@s.whatsapp.net/keep.jpg"), 7);
    write(&root.join("solo/5511@s.whatsapp.net/x.jpg"), 3);
    let store = MediaStore::from_config(&disk_config(&root)).unwrap();

    let report = store.purge_chat("inst", JID).await.unwrap();
    assert_eq!(
        report,
        PurgeReport {
            objects: 2,
            bytes: 150
        }
    );
    let expected: BTreeSet<String> = [
        "inst",
        "inst/5511999999999@s.whatsapp.net",
        "inst/5511999999999@s.whatsapp.net/keep.jpg",
        "inst/5511@s.whatsapp.net.bak",
        "inst/5511@s.whatsapp.net.bak/keep.jpg",
        "other",
        "other/5511@s.whatsapp.net",
        "other/5511@s.whatsapp.net/keep.jpg",
        "solo",
        "solo/5511@s.whatsapp.net",
        "solo/5511@s.whatsapp.net/x.jpg",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(tree(&root), expected);

    // The only chat of an instance: the emptied instance folder goes too, the root stays.
    let report = store.purge_chat("solo", JID).await.unwrap();
    assert_eq!(report.objects, 1);
    assert!(!root.join("solo").exists());
    assert!(root.is_dir());
}

#[tokio::test]
async fn disk_no_media_is_ok() {
    let tmp = tempfile::tempdir().unwrap();
    let store = MediaStore::from_config(&disk_config(tmp.path())).unwrap();
    assert_eq!(
        store.purge_chat("inst", JID).await.unwrap(),
        PurgeReport::default()
    );
    let missing_root = MediaStore::from_config(&disk_config(&tmp.path().join("nope"))).unwrap();
    assert_eq!(
        missing_root.purge_chat("inst", JID).await.unwrap().objects,
        0
    );
    // An empty chat folder is removed, and reported as 0 objects.
    fs::create_dir_all(tmp.path().join("inst").join(JID)).unwrap();
    assert_eq!(store.purge_chat("inst", JID).await.unwrap().objects, 0);
    assert!(tree(tmp.path()).is_empty());
}

#[tokio::test]
async fn disk_many_files_all_gone_and_counted() {
    let recorder = recorder();
    let tmp = tempfile::tempdir().unwrap();
    let chat = tmp.path().join("inst").join(JID);
    let mut bytes = 0;
    for i in 0..2_600 {
        let len = 1 + i % 40;
        bytes += len as u64;
        write(
            &chat
                .join(["img", "audio", "doc"][i % 3])
                .join(format!("{i:05}.bin")),
            len,
        );
    }
    write(&tmp.path().join("inst/other@s.whatsapp.net/keep"), 1);
    let objects_before = recorder.get(chat_delete_worker::telemetry::MEDIA_OBJECTS_DELETED);
    let bytes_before = recorder.get(chat_delete_worker::telemetry::MEDIA_BYTES_DELETED);
    let store = MediaStore::from_config(&disk_config(tmp.path())).unwrap();

    let report = store.purge_chat("inst", JID).await.unwrap();
    assert_eq!(
        report,
        PurgeReport {
            objects: 2_600,
            bytes
        }
    );
    assert!(!chat.exists());
    assert!(tmp.path().join("inst/other@s.whatsapp.net/keep").exists());
    // Other tests add to the same global counters, never subtract.
    assert!(
        recorder.get(chat_delete_worker::telemetry::MEDIA_OBJECTS_DELETED) - objects_before
            >= 2_600
    );
    assert!(
        recorder.get(chat_delete_worker::telemetry::MEDIA_BYTES_DELETED) - bytes_before >= bytes
    );
}

#[tokio::test]
async fn disk_names_with_spaces_and_unicode() {
    let tmp = tempfile::tempdir().unwrap();
    let chat = tmp.path().join("inst").join(JID);
    for name in [
        "a b.jpg",
        "ção 📷.jpg",
        "  leading",
        "nested dir/ünï cødé.ogg",
        "-rf",
    ] {
        write(&chat.join(name), 5);
    }
    let store = MediaStore::from_config(&disk_config(tmp.path())).unwrap();
    assert_eq!(store.purge_chat("inst", JID).await.unwrap().objects, 5);
    assert!(tree(tmp.path()).is_empty());
}

/// Clears the immutable flag even when an assertion fails, so the temp folder can be removed.
struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[tokio::test]
async fn disk_failure_mid_purge_then_resume() {
    // On the target dir's file system (ext4 here); tmpfs may not support the immutable flag.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let chat = tmp.path().join("inst").join(JID);
    for i in 0..300 {
        write(&chat.join(format!("{i:03}.jpg")), 2);
    }
    let locked = chat.join("sub/locked.jpg");
    write(&locked, 9);
    let set = Command::new("chattr").arg("+i").arg(&locked).output();
    if !set.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: chattr +i is not available here ({set:?})");
        return;
    }
    let guard = Immutable(locked.clone());
    let store = MediaStore::from_config(&disk_config(tmp.path())).unwrap();

    let err = store.purge_chat("inst", JID).await.unwrap_err();
    assert!(matches!(err, MediaError::Disk { .. }), "{err}");
    assert!(
        !err.is_retryable(),
        "EPERM will not go away by itself: {err}"
    );
    assert_eq!(
        err.reason(),
        "disk unlink failed after 1 try (permission denied)"
    );
    assert!(!err.reason().contains(tmp.path().to_str().unwrap()));
    // Everything else went; the purge did not stop at the first failure.
    let left: BTreeSet<String> = ["sub", "sub/locked.jpg"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(tree(&chat), left);

    drop(guard);
    assert_eq!(
        store.purge_chat("inst", JID).await.unwrap(),
        PurgeReport {
            objects: 1,
            bytes: 9
        }
    );
    assert!(tree(tmp.path()).is_empty());
}

const BAD_INPUTS: &[(&str, &str)] = &[
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

#[tokio::test]
async fn disk_path_traversal_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("media");
    write(&root.join("inst").join(JID).join("a.jpg"), 1);
    write(&root.join("inst/other/a.jpg"), 1);
    write(&root.join("keep.jpg"), 1);
    write(&tmp.path().join("outside/other/a.jpg"), 1);
    write(&tmp.path().join("etc/passwd"), 1);
    let before = tree(tmp.path());
    let store = MediaStore::from_config(&disk_config(&root)).unwrap();
    for (instance, jid) in BAD_INPUTS {
        let err = store.purge_chat(instance, jid).await.expect_err(jid);
        assert!(
            matches!(err, MediaError::InvalidPrefix(_)),
            "{instance:?} {jid:?}: {err}"
        );
        assert!(!err.is_retryable());
        assert!(
            err.reason().starts_with("unsafe media prefix"),
            "{}",
            err.reason()
        );
    }
    assert_eq!(tree(tmp.path()), before, "a refused purge touched the disk");
}

#[tokio::test]
async fn disk_symlinks_are_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("media");
    let outside = tmp.path().join("outside");
    write(&outside.join("secret.txt"), 10);
    write(&outside.join("dir/inner.txt"), 10);
    let chat = root.join("inst").join(JID);
    write(&chat.join("real.jpg"), 4);
    symlink(outside.join("secret.txt"), chat.join("file-link")).unwrap();
    symlink(outside.join("dir"), chat.join("dir-link")).unwrap();
    symlink("/nonexistent/target", chat.join("dangling")).unwrap();
    let store = MediaStore::from_config(&disk_config(&root)).unwrap();

    let report = store.purge_chat("inst", JID).await.unwrap();
    // Links are objects of the chat (removed as links) but free no file bytes.
    assert_eq!(
        report,
        PurgeReport {
            objects: 4,
            bytes: 4
        }
    );
    assert!(!chat.exists());
    let outside_tree: BTreeSet<String> = ["dir", "dir/inner.txt", "secret.txt"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(tree(&outside), outside_tree);

    // The chat folder itself is a link to a folder outside the root: only the link goes.
    fs::create_dir_all(root.join("inst")).unwrap();
    symlink(&outside, &chat).unwrap();
    let report = store.purge_chat("inst", JID).await.unwrap();
    assert_eq!(report.objects, 1);
    assert!(fs::symlink_metadata(&chat).is_err(), "link left behind");
    assert_eq!(tree(&outside), outside_tree);

    // A folder above the chat folder is a link: refused, nothing deleted anywhere.
    write(&outside.join("inst2").join(JID).join("x.jpg"), 1);
    symlink(outside.join("inst2"), root.join("inst2")).unwrap();
    let err = store.purge_chat("inst2", JID).await.unwrap_err();
    assert!(matches!(err, MediaError::SymlinkInPath { .. }), "{err}");
    assert!(!err.is_retryable());
    assert!(outside.join("inst2").join(JID).join("x.jpg").exists());
}

#[tokio::test]
async fn disk_root_may_be_a_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("volume");
    write(&real.join("inst").join(JID).join("a.jpg"), 3);
    write(&real.join("keep.jpg"), 3);
    symlink(&real, tmp.path().join("media")).unwrap();
    let store = MediaStore::from_config(&disk_config(&tmp.path().join("media"))).unwrap();
    assert_eq!(store.purge_chat("inst", JID).await.unwrap().objects, 1);
    let expected: BTreeSet<String> = ["keep.jpg".to_string()].into();
    assert_eq!(tree(&real), expected);
}

// ---------------------------------------------------------------------------------------------
// S3 (moto)

#[tokio::test]
async fn s3_prefix_isolation() {
    let s = server();
    let raw = raw_store(&s.endpoint, &s.bucket);
    let kp = fresh_prefix(&raw, "isolation").await;
    let purged = [
        format!("{kp}/inst/{JID}/a.jpg"),
        format!("{kp}/inst/{JID}/sub/b.ogg"),
    ];
    let kept = [
        format!("{kp}/inst/{LONGER_JID}/keep.jpg"),
        format!("{kp}/inst/{JID}.bak/keep.jpg"),
        format!("{kp}/inst/{JID}x"),
        format!("{kp}/other/{JID}/keep.jpg"),
        format!("{kp}-sibling/inst/{JID}/keep.jpg"),
    ];
    let all: Vec<String> = purged.iter().chain(&kept).cloned().collect();
    seed(&raw, &all).await;
    // Outside the key prefix altogether (a store without key_prefix would match it).
    let bare = format!("inst/{JID}/isolation-keep.jpg");
    seed(&raw, std::slice::from_ref(&bare)).await;

    let store = MediaStore::from_config(&s3_media_config(&s.endpoint, &s.bucket, &kp)).unwrap();
    let report = store.purge_chat("inst", JID).await.unwrap();
    assert_eq!(report.objects, 2);
    assert_eq!(report.bytes, 10 + 11);

    let mut left = keys_under(&raw, &kp).await;
    left.extend(keys_under(&raw, &format!("{kp}-sibling")).await);
    assert_eq!(left, kept.iter().cloned().collect());
    assert!(
        keys_under(&raw, &format!("inst/{JID}"))
            .await
            .contains(&bare)
    );
    raw.delete(&ObjectPath::parse(&bare).unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn s3_no_media_is_ok() {
    let s = server();
    let raw = raw_store(&s.endpoint, &s.bucket);
    let kp = fresh_prefix(&raw, "empty").await;
    let store = MediaStore::from_config(&s3_media_config(&s.endpoint, &s.bucket, &kp)).unwrap();
    assert_eq!(
        store.purge_chat("inst", JID).await.unwrap(),
        PurgeReport::default()
    );
}

#[tokio::test]
async fn s3_many_objects_all_gone_and_counted() {
    let s = server();
    let raw = raw_store(&s.endpoint, &s.bucket);
    let kp = fresh_prefix(&raw, "many").await;
    let keys = many_keys(&format!("{kp}/inst/{JID}"), 2_600);
    let bytes = seed(&raw, &keys).await;
    seed(&raw, &[format!("{kp}/inst/{LONGER_JID}/keep.jpg")]).await;
    let mut config = s3_media_config(&s.endpoint, &s.bucket, &kp);
    config.concurrency = 3;
    let store = MediaStore::from_config(&config).unwrap();

    let report = store.purge_chat("inst", JID).await.unwrap();
    assert_eq!(
        report,
        PurgeReport {
            objects: 2_600,
            bytes
        }
    );
    assert!(
        keys_under(&raw, &format!("{kp}/inst/{JID}"))
            .await
            .is_empty()
    );
    assert_eq!(keys_under(&raw, &kp).await.len(), 1);
}

#[tokio::test]
async fn s3_keys_with_spaces_and_unicode() {
    let s = server();
    let raw = raw_store(&s.endpoint, &s.bucket);
    let kp = fresh_prefix(&raw, "unicode").await;
    let names = [
        "a b.jpg",
        "ção 📷.jpg",
        "nested dir/ünï cødé.ogg",
        "日本語.txt",
        "x+y=z&w.bin",
    ];
    let keys: Vec<String> = names
        .iter()
        .map(|n| format!("{kp}/inst/{JID}/{n}"))
        .collect();
    seed(&raw, &keys).await;
    assert_eq!(keys_under(&raw, &kp).await, keys.iter().cloned().collect());
    let store = MediaStore::from_config(&s3_media_config(&s.endpoint, &s.bucket, &kp)).unwrap();
    assert_eq!(store.purge_chat("inst", JID).await.unwrap().objects, 5);
    assert!(keys_under(&raw, &kp).await.is_empty());
}

#[tokio::test]
async fn s3_path_traversal_is_refused() {
    let s = server();
    let raw = raw_store(&s.endpoint, &s.bucket);
    let kp = fresh_prefix(&raw, "traversal").await;
    let keys = [format!("{kp}/inst/{JID}/a.jpg"), format!("{kp}/keep.jpg")];
    seed(&raw, &keys).await;
    let store = MediaStore::from_config(&s3_media_config(&s.endpoint, &s.bucket, &kp)).unwrap();
    for (instance, jid) in BAD_INPUTS {
        let err = store.purge_chat(instance, jid).await.expect_err(jid);
        assert!(
            matches!(err, MediaError::InvalidPrefix(_)),
            "{instance:?} {jid:?}: {err}"
        );
    }
    assert_eq!(keys_under(&raw, &kp).await, keys.iter().cloned().collect());
}

#[tokio::test]
async fn s3_missing_bucket_is_not_retryable() {
    let s = server();
    let store =
        MediaStore::from_config(&s3_media_config(&s.endpoint, "no-such-bucket-here", "x")).unwrap();
    let err = store.purge_chat("inst", JID).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert_eq!(
        err.reason(),
        "storage listing failed after 1 try (S3 error NoSuchBucket)"
    );
}

/// Kills the paused or running server even when an assertion fails half-way.
struct ServerGuard(u32);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        signal(self.0, "CONT");
        signal(self.0, "KILL");
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_stopped_mid_purge_then_resumed() {
    let bucket = "media-outage";
    let started = start_server(&[bucket]);
    let guard = ServerGuard(started.pid);
    let raw = raw_store(&started.endpoint, bucket);
    let total = 2_100;
    let keys = many_keys(&format!("kp/inst/{JID}"), total);
    seed(&raw, &keys).await;

    let mut config = s3_media_config(&started.endpoint, bucket, "kp");
    config.concurrency = 2;
    config.retry = MediaRetryConfig {
        attempts: 2,
        base_delay_ms: 50,
        max_delay_ms: 100,
    };
    if let MediaBackend::S3(s3) = &mut config.backend {
        s3.request_timeout_ms = 3_000;
    }
    let impatient = MediaStore::from_config(&config).unwrap();
    let purge = tokio::spawn(async move { impatient.purge_chat("inst", JID).await });

    // Pause the server right after it answered the first DeleteObjects request.
    let log = started.log.clone();
    wait_until("the first delete batch", Duration::from_secs(120), || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("?delete HTTP/1.1\" 200"))
    })
    .await;
    signal(started.pid, "STOP");

    let err = tokio::time::timeout(Duration::from_secs(60), purge)
        .await
        .expect("purge gave up within its retry budget")
        .unwrap()
        .expect_err("the server was paused mid-purge");
    assert!(err.is_retryable(), "{err}");
    assert!(err.reason().contains("after 2 tries"), "{}", err.reason());
    assert!(!err.reason().contains("127.0.0.1"), "{}", err.reason());

    signal(started.pid, "CONT");
    let left = keys_under(&raw, &format!("kp/inst/{JID}")).await.len();
    assert!(left > 0 && left < total, "left {left} of {total}");

    // Back up: a second call deletes what is left.
    if let MediaBackend::S3(s3) = &mut config.backend {
        s3.request_timeout_ms = 30_000;
    }
    config.retry = MediaRetryConfig::default();
    let patient = MediaStore::from_config(&config).unwrap();
    let report = patient.purge_chat("inst", JID).await.unwrap();
    // A delete sent before the pause may land after it, so `left` is an upper bound.
    assert!(
        report.objects > 0 && report.objects as usize <= left,
        "{report:?}, left {left}"
    );
    assert!(keys_under(&raw, &format!("kp/inst/{JID}")).await.is_empty());

    // Server gone for good: a fast, retryable "cannot connect".
    let port: u16 = started
        .endpoint
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    drop(guard);
    wait_until(
        "the server to close its port",
        Duration::from_secs(30),
        || TcpStream::connect(("127.0.0.1", port)).is_err(),
    )
    .await;
    let err = patient.purge_chat("inst", JID).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.reason().contains("cannot connect"), "{}", err.reason());
}
