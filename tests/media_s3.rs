//! The media purge against a real S3-compatible HTTP server (moto, started by
//! `scripts/s3-server`): prefix isolation, many objects, names, traversal, a missing bucket,
//! and a server stopped mid-purge.
//!
//! The shared server comes from `S3_ENDPOINT` (+ `S3_BUCKET`) when set, otherwise the tests start
//! one through the script. The outage test always starts its own, because it pauses it.

mod common;

use std::fs;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use chat_delete_worker::media::*;
use common::media::*;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use tokio::time::Instant;

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
    let report = store.purge_chat("inst", JID, unfenced()).await.unwrap();
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
        store.purge_chat("inst", JID, unfenced()).await.unwrap(),
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

    let report = store.purge_chat("inst", JID, unfenced()).await.unwrap();
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
    assert_eq!(
        store
            .purge_chat("inst", JID, unfenced())
            .await
            .unwrap()
            .objects,
        5
    );
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
        let err = store
            .purge_chat(instance, jid, unfenced())
            .await
            .expect_err(jid);
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
    let err = store.purge_chat("inst", JID, unfenced()).await.unwrap_err();
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
    // Enough pages that the pause lands before the last batch even when the machine is busy.
    let total = 5_100;
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
    let purge = tokio::spawn(async move { impatient.purge_chat("inst", JID, unfenced()).await });

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
    let report = patient.purge_chat("inst", JID, unfenced()).await.unwrap();
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
    let err = patient
        .purge_chat("inst", JID, unfenced())
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.reason().contains("cannot connect"), "{}", err.reason());
}

/// A purge sends no delete batch once its command's claim no longer holds.
#[tokio::test]
async fn s3_purge_stops_at_a_fence_that_no_longer_holds() {
    let s = server();
    let raw = raw_store(&s.endpoint, &s.bucket);
    let kp = fresh_prefix(&raw, "fenced").await;
    let keys = many_keys(&format!("{kp}/inst/{JID}"), 3);
    seed(&raw, &keys).await;
    let store = MediaStore::from_config(&s3_media_config(&s.endpoint, &s.bucket, &kp)).unwrap();
    let err = store.purge_chat("inst", JID, refused()).await.unwrap_err();
    assert!(matches!(err, MediaError::Fenced(_)), "{err}");
    assert_eq!(keys_under(&raw, &format!("{kp}/inst/{JID}")).await.len(), 3);
}
