//! The media purge through the whole worker, against a real S3-compatible server (moto,
//! started by `scripts/s3-server`). Its own test binary: the media tests install a metrics
//! recorder of their own.

use std::process::Command;

mod common;

/// The whole worker against an S3 server that is down: the purge is retried, the final answer
/// is `500 Failed to delete media: ...` and the command is parked; once the server is up, the
/// parked command is replayed to success without deleting the chat a second time.
#[tokio::test]
async fn s3_outage_through_the_worker_is_answered_500_then_replayed_to_success() {
    use chat_delete_worker::{bus as broker, cli::parked, config::BrokerConfig};
    use common::{Command as Cmd, TestWorker, amqp_url, hash, header_int, status};

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bucket = format!("outage-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let token = "secret-tok-media";
    let cfg = format!(
        r#"
[retry]
in_process_attempts = 1
broker_delays_ms = [50, 50]
[pacing]
deletes_per_minute = "unlimited"
[media.retry]
attempts = 2
base_delay_ms = 10
[media.backend]
kind = "s3"
bucket = "{bucket}"
region = "us-east-1"
endpoint = "http://127.0.0.1:{port}"
path_style = true
allow_http = true
access_key_id = "test"
secret_access_key = "test"
request_timeout_ms = 2000
[instances.alpha]
kind = "simulated"
token_sha256 = "{hash}"
simulated = {{ effects_log = "{{dir}}/effects.log" }}
"#,
        hash = hash(token)
    );
    let w = TestWorker::start(&cfg).await;
    let body = br#"{"number": "5511999999999", "deleteMedia": true}"#;
    w.publish(Cmd::new("alpha", "media-1", token, body)).await;
    let failed = w.events.by_id("media-1").await;
    assert_eq!(status(&failed), 500);
    let message = body_of(&failed);
    assert!(message.starts_with("Failed to delete media: "), "{message}");
    assert!(
        !message.contains("127.0.0.1") && !message.contains("test"),
        "no address or key: {message}"
    );
    assert_eq!(
        header_int(&failed, "attempts"),
        Some(3),
        "one try per delivery, 2 broker retries"
    );

    // The server comes back, with media for this chat and for a neighbour.
    common::media::start_server_on(port, &[&bucket]);
    let put = |key: &str| {
        let ok = Command::new("curl")
            .args([
                "-sf",
                "-o",
                "/dev/null",
                "-X",
                "PUT",
                "--data",
                "x",
                &format!("http://127.0.0.1:{port}/{bucket}/{key}"),
            ])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    // The listing answers without credentials on moto; a GET of the object would not.
    let exists = |key: &str| {
        let out = Command::new("curl")
            .args([
                "-sf",
                &format!("http://127.0.0.1:{port}/{bucket}?list-type=2"),
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("<Key>{}</Key>", key.replace("%40", "@")))
    };
    put("alpha/5511999999999%40s.whatsapp.net/photo.jpg");
    put("alpha/55119999999990%40s.whatsapp.net/keep.jpg");
    assert!(exists("alpha/5511999999999%40s.whatsapp.net/photo.jpg"));

    let connection = broker::connect(
        &BrokerConfig {
            url: amqp_url(),
            ..Default::default()
        },
        "test",
    )
    .await
    .unwrap();
    common::wait_parked(&connection, &w.names, "media-1").await;
    assert_eq!(
        parked::replay(&connection, &w.names, &["media-1".into()])
            .await
            .unwrap(),
        1
    );
    let all = w
        .events
        .wait_until("the replayed answer", |all| all.len() >= 2)
        .await;
    assert_eq!(status(all.last().unwrap()), 200);
    assert!(!exists("alpha/5511999999999%40s.whatsapp.net/photo.jpg"));
    assert!(
        exists("alpha/55119999999990%40s.whatsapp.net/keep.jpg"),
        "another chat's media stays"
    );
    let deletes = std::fs::read_to_string(w.dir.path().join("effects.log")).unwrap();
    assert_eq!(deletes.lines().count(), 1, "the chat is deleted once");
    w.stop().await;
}

fn body_of(d: &common::Delivery) -> String {
    common::body(d)["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}
