//! The bus contract against the real RabbitMQ: every outcome row, the result's properties and
//! headers, routing, reply_to and correlation, instance independence, and no token in sight.

mod common;

use common::*;
use lapin::types::AMQPValue;
use serde_json::json;

const ALPHA: &str = "secret-tok-alpha";
const BETA: &str = "secret-tok-beta";
const ACME: &str = "secret-tok-acme";
const OTHER_ACCOUNT: &str = "secret-tok-other";

fn config() -> String {
    format!(
        r#"
[worker]
concurrency_per_instance = 4
[retry]
in_process_attempts = 2
in_process_min_delay_ms = 5
in_process_max_delay_ms = 10
broker_delays_ms = [50, 50]
[accounts.acme]
token_sha256 = "{acme}"
[accounts.other]
token_sha256 = "{other}"
[instances.alpha]
account = "acme"
token_sha256 = "{alpha}"
kind = "simulated"
[instances.beta]
account = "other"
token_sha256 = "{beta}"
kind = "simulated"
[instances.down]
account = "acme"
token_sha256 = "{alpha}"
kind = "simulated"
simulated = {{ connected = false }}
[instances.refused]
token_sha256 = "{alpha}"
kind = "simulated"
simulated = {{ fail_first = 1000000, failure = "rejected" }}
"#,
        acme = hash(ACME),
        other = hash(OTHER_ACCOUNT),
        alpha = hash(ALPHA),
        beta = hash(BETA),
    )
}

fn error(message: &str) -> serde_json::Value {
    json!({"success": false, "error": {"message": message}})
}

#[tokio::test]
async fn every_outcome_row_has_its_exact_status_and_body() {
    let w = TestWorker::start(&config()).await;
    let ok = br#"{"number": "5511999999999"}"#;
    let cases: Vec<(Command, i64, serde_json::Value)> = vec![
        (
            Command {
                id: None,
                correlation_id: Some("no-id"),
                ..Command::new("alpha", "", ALPHA, ok)
            },
            400,
            error("Idempotency id is required"),
        ),
        (
            Command::new("nobody-hosts-this", "r404", ALPHA, ok),
            404,
            error("Instance not found"),
        ),
        (
            Command {
                token: None,
                ..Command::new("nobody-hosts-this", "r404-no-token", "", ok)
            },
            404,
            error("Instance not found"),
        ),
        (
            Command {
                token: None,
                ..Command::new("alpha", "r401-missing", "", ok)
            },
            401,
            error("Invalid token"),
        ),
        (
            Command {
                token: Some(AMQPValue::LongInt(7)),
                ..Command::new("alpha", "r401-type", "", ok)
            },
            401,
            error("Invalid token"),
        ),
        (
            Command::new("alpha", "r401-unknown", "secret-tok-nope", ok),
            401,
            error("Invalid token"),
        ),
        (
            Command::new("alpha", "r401-other-instance", BETA, ok),
            401,
            error("Invalid token"),
        ),
        (
            Command::new("alpha", "r401-other-account", OTHER_ACCOUNT, ok),
            401,
            error("Invalid token"),
        ),
        (
            Command::new("alpha", "r400-json", ALPHA, b"{not json"),
            400,
            error("Invalid request body"),
        ),
        (
            Command::new("alpha", "r400-empty", ALPHA, b""),
            400,
            error("Invalid request body"),
        ),
        (
            Command::new("alpha", "r400-array", ALPHA, b"[1]"),
            400,
            error("Invalid request body"),
        ),
        (
            Command::new("alpha", "r400-type", ALPHA, br#"{"number": 5511999999999}"#),
            400,
            error("Invalid request body"),
        ),
        (
            Command::new(
                "alpha",
                "r400-media",
                ALPHA,
                br#"{"number": "5511999999999", "deleteMedia": "yes"}"#,
            ),
            400,
            error("Invalid request body"),
        ),
        (
            Command::new("alpha", "r400-missing", ALPHA, br#"{"deleteMedia": true}"#),
            400,
            error("Number is required"),
        ),
        (
            Command::new("alpha", "r400-blank", ALPHA, br#"{"number": "  "}"#),
            400,
            error("Number is required"),
        ),
        (
            Command::new(
                "alpha",
                "r400-letters",
                ALPHA,
                br#"{"number": "abc@s.whatsapp.net"}"#,
            ),
            400,
            error("Invalid number"),
        ),
        (
            Command::new(
                "alpha",
                "r400-traversal",
                ALPHA,
                br#"{"number": "../../etc@lid"}"#,
            ),
            400,
            error("Invalid number"),
        ),
        (
            Command::new("down", "r503", ALPHA, ok),
            503,
            error("Instance is not connected to WhatsApp"),
        ),
        (
            Command::new("refused", "r500", ALPHA, ok),
            500,
            error("Failed to delete chat: simulated rejection"),
        ),
        (
            Command::new(
                "alpha",
                "r200",
                ALPHA,
                br#"{"number": "+55 11 99999-9999"}"#,
            ),
            200,
            json!({"success": true, "message": "Chat deleted successfully", "chat_jid": "5511999999999@s.whatsapp.net", "delete_media": false}),
        ),
        (
            Command::new(
                "alpha",
                "r200-account-token",
                ACME,
                br#"{"number": "120363024567890123@G.US", "unknown": 1}"#,
            ),
            200,
            json!({"success": true, "message": "Chat deleted successfully", "chat_jid": "120363024567890123@g.us", "delete_media": false}),
        ),
        (
            Command::new(
                "alpha",
                "r200-media",
                ALPHA,
                br#"{"number": "123456789012345@lid", "deleteMedia": true}"#,
            ),
            200,
            json!({"success": true, "message": "Chat deleted successfully (including media)", "chat_jid": "123456789012345@lid", "delete_media": true}),
        ),
    ];
    let mut expected = vec![];
    for (cmd, status, body) in cases {
        let key = cmd
            .id
            .map(str::to_owned)
            .unwrap_or_else(|| cmd.correlation_id.unwrap().to_owned());
        w.publish(cmd).await;
        expected.push((key, status, body));
    }
    for (key, want_status, want_body) in expected {
        let d = if key == "no-id" {
            w.events.by_correlation(&key).await
        } else {
            w.events.by_id(&key).await
        };
        assert_eq!(status(&d), want_status, "{key}");
        assert_eq!(body(&d), want_body, "{key}");
        assert_matches_schema(&d);
    }
    w.stop().await;
}

#[tokio::test]
async fn result_properties_headers_and_routing_follow_the_contract() {
    let w = TestWorker::start(&config()).await;
    let (reply, replies) = private_queue(&w.channel, None).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    w.publish(Command {
        correlation_id: Some("corr-1"),
        reply_to: Some(reply.as_str()),
        extra_headers: vec![("traceparent", AMQPValue::LongString(traceparent.into()))],
        ..Command::new(
            "alpha",
            "ok-1",
            ALPHA,
            br#"{"number": "5511999999999", "deleteMedia": true}"#,
        )
    })
    .await;
    w.publish(Command::new("alpha", "bad-1", ALPHA, br#"{"number": "x"}"#))
        .await;

    let event = w.events.by_id("ok-1").await;
    let reply = replies.by_id("ok-1").await;
    for d in [&event, &reply] {
        let p = &d.properties;
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "corr-1");
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "chat.deleted");
        assert_eq!(p.app_id().as_ref().unwrap().as_str(), "chat-delete-worker");
        assert_eq!(*p.delivery_mode(), Some(2));
        let ts = p.timestamp().expect("timestamp");
        assert!((ts as i64 - chrono::Utc::now().timestamp()).abs() < 300);
        assert_eq!(status(d), 200);
        assert_eq!(header_str(d, "instance").unwrap(), "alpha");
        assert_eq!(header_str(d, "idempotency_id").unwrap(), "ok-1");
        assert_eq!(header_int(d, "attempts"), Some(1));
        assert_eq!(header(d, "replayed"), Some(&AMQPValue::Boolean(false)));
        assert_eq!(header_str(d, "cloudEvents_specversion").unwrap(), "1.0");
        assert_eq!(header_str(d, "cloudEvents_id").unwrap(), "ok-1");
        assert_eq!(
            header_str(d, "cloudEvents_source").unwrap(),
            "/instances/alpha"
        );
        assert_eq!(header_str(d, "cloudEvents_type").unwrap(), "chat.deleted");
        assert_eq!(
            header_str(d, "cloudEvents_subject").unwrap(),
            "5511999999999@s.whatsapp.net"
        );
        let time = header_str(d, "cloudEvents_time").unwrap();
        chrono::DateTime::parse_from_rfc3339(&time).expect("RFC 3339 time");
        assert_eq!(header_str(d, "traceparent").unwrap(), traceparent);
        assert!(header(d, "token").is_none());
    }
    assert_eq!(event.routing_key.as_str(), "chat.deleted.alpha");
    assert_eq!(event.exchange.as_str(), w.names.events_exchange());
    assert_eq!(reply.exchange.as_str(), "");

    let failed = w.events.by_id("bad-1").await;
    assert_eq!(failed.routing_key.as_str(), "chat.delete_failed.alpha");
    assert_eq!(
        failed.properties.kind().as_ref().unwrap().as_str(),
        "chat.delete_failed"
    );
    assert_eq!(
        header_str(&failed, "cloudEvents_type").unwrap(),
        "chat.delete_failed"
    );
    // Without a correlation id, the idempotency id stands in.
    assert_eq!(correlation_id(&failed), Some("bad-1"));
    // The chat is not known for an invalid number.
    assert!(header(&failed, "cloudEvents_subject").is_none());
    w.stop().await;
}

#[tokio::test]
async fn unknown_instances_are_answered_through_the_alternate_exchange() {
    let w = TestWorker::start(&config()).await;
    w.publish(Command::new(
        "ghost",
        "ghost-1",
        "anything",
        br#"{"number": "5511999999999"}"#,
    ))
    .await;
    // A routing key that is not a valid instance name is not echoed into routing keys.
    let long = "x".repeat(250);
    w.publish(Command::new(&long, "ghost-2", "anything", b"{}"))
        .await;
    let d = w.events.by_id("ghost-1").await;
    assert_eq!(status(&d), 404);
    assert_eq!(d.routing_key.as_str(), "chat.delete_failed.ghost");
    assert_eq!(header_str(&d, "instance").unwrap(), "ghost");
    assert_eq!(
        header_str(&d, "cloudEvents_source").unwrap(),
        "/instances/ghost"
    );
    let d = w.events.by_id("ghost-2").await;
    assert_eq!(status(&d), 404);
    assert_eq!(d.routing_key.as_str(), "chat.delete_failed._invalid");
    w.stop().await;
}

#[tokio::test]
async fn a_slow_instance_does_not_hold_up_another() {
    let slow = format!(
        r#"
[worker]
concurrency_per_instance = 1
shutdown_grace_ms = 100
[instances.slow]
token_sha256 = "{alpha}"
kind = "simulated"
simulated = {{ latency_ms = 60000 }}
[instances.fast]
token_sha256 = "{alpha}"
kind = "simulated"
"#,
        alpha = hash(ALPHA)
    );
    let w = TestWorker::start(&slow).await;
    for i in 0..3 {
        w.publish(Command::new(
            "slow",
            &format!("slow-{i}"),
            ALPHA,
            br#"{"number": "5511999999999"}"#,
        ))
        .await;
    }
    for i in 0..20 {
        w.publish(Command::new(
            "fast",
            &format!("fast-{i}"),
            ALPHA,
            br#"{"number": "5511999999999"}"#,
        ))
        .await;
    }
    let all = w
        .events
        .wait_until("all fast results", |all| {
            (0..20).all(|i| {
                all.iter()
                    .any(|d| message_id(d) == Some(format!("fast-{i}").as_str()))
            })
        })
        .await;
    assert!(
        all.iter()
            .all(|d| !message_id(d).unwrap().starts_with("slow"))
    );
    w.stop().await;
}

#[tokio::test]
async fn no_token_appears_in_results_or_logs() {
    let w = TestWorker::start(&config()).await;
    let tokens = [ALPHA, BETA, ACME, OTHER_ACCOUNT, "secret-tok-unknown"];
    for (i, token) in tokens.iter().enumerate() {
        for instance in ["alpha", "down", "ghost"] {
            let id = format!("tok-{i}-{instance}");
            w.publish(Command::new(
                instance,
                &id,
                token,
                br#"{"number": "5511999999999", "deleteMedia": true}"#,
            ))
            .await;
        }
    }
    let all = w
        .events
        .wait_until("15 results", |all| all.len() >= 15)
        .await;
    for d in &all {
        let props = format!("{:?}", d.properties);
        for token in tokens {
            assert!(!props.contains(token));
            assert!(!String::from_utf8_lossy(&d.data).contains(token));
            assert!(!props.contains(&hash(token)), "no token hash either");
        }
    }
    w.stop().await;
    let logs = String::from_utf8(captured_logs().lock().unwrap().clone()).unwrap();
    assert!(logs.contains("tok-0-alpha"), "the logs were captured");
    assert!(!logs.contains("secret-tok"), "a token leaked into the logs");
}

/// `chat_jid` is the JID deleted: a number resolves (here as scripted: the account is
/// registered without the ninth digit), and so does a user JID given explicitly (it was once
/// deleted as given: a 200 while the chat stayed); a group is used as given.
#[tokio::test]
async fn a_number_or_a_user_jid_is_answered_with_the_chat_it_resolved_to() {
    let cfg = format!(
        r#"
[instances.alpha]
token_sha256 = "{alpha}"
kind = "simulated"
simulated = {{ resolve = {{ "5531987654321" = "553187654321@s.whatsapp.net" }} }}
"#,
        alpha = hash(ALPHA)
    );
    let w = TestWorker::start(&cfg).await;
    for (id, number) in [
        ("by-number", "+55 31 98765-4321"),
        ("as-jid", "5531987654321@s.whatsapp.net"),
        ("unscripted", "5511987654321"),
        ("group", "120363024567890123@g.us"),
    ] {
        let body = json!({"number": number}).to_string();
        w.publish(Command::new("alpha", id, ALPHA, body.as_bytes()))
            .await;
    }
    for (id, deleted) in [
        ("by-number", "553187654321@s.whatsapp.net"),
        ("as-jid", "553187654321@s.whatsapp.net"),
        ("unscripted", "5511987654321@s.whatsapp.net"),
        ("group", "120363024567890123@g.us"),
    ] {
        let result = w.events.by_id(id).await;
        assert_eq!(status(&result), 200, "{id}");
        assert_eq!(body(&result)["chat_jid"], deleted, "{id}");
        assert_matches_schema(&result);
    }
    w.stop().await;
}

/// A 200 says what happened, without changing its documented body: whether the instance's chat
/// list held the chat, its kind, when WhatsApp accepted the delete and, with `deleteMedia`,
/// what the purge erased under the chat as given and as resolved. A replay repeats the first
/// answer's values.
#[tokio::test]
async fn a_200_carries_its_receipt_and_a_replay_repeats_it() {
    let token = "secret-tok-receipt";
    let cfg = format!(
        r#"
[pacing]
deletes_per_minute = "unlimited"
[media.backend]
kind = "disk"
root = "{{dir}}/media"
[instances.alpha]
token_sha256 = "{hash}"
kind = "simulated"
simulated = {{ resolve = {{ "5531987654321" = "553187654321@s.whatsapp.net" }}, chat_list = ["553187654321@s.whatsapp.net"] }}
[instances.beta]
token_sha256 = "{hash}"
kind = "simulated"
"#,
        hash = hash(token)
    );
    let w = TestWorker::start(&cfg).await;
    let media = w.dir.path().join("media/alpha");
    let put = |path: &str, bytes: usize| {
        let file = media.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, vec![7u8; bytes]).unwrap();
    };
    put("5531987654321@s.whatsapp.net/as-given.jpg", 10);
    put("553187654321@s.whatsapp.net/resolved.ogg", 5);
    put("5531999999999@s.whatsapp.net/another-chat.jpg", 3);

    let body = br#"{"number": "5531987654321", "deleteMedia": true}"#;
    w.publish(Command::new("alpha", "receipt-1", token, body))
        .await;
    let first = w.events.by_id("receipt-1").await;
    assert_eq!(status(&first), 200);
    assert_eq!(
        String::from_utf8_lossy(&first.data),
        r#"{"success":true,"message":"Chat deleted successfully (including media)","chat_jid":"553187654321@s.whatsapp.net","delete_media":true}"#
    );
    assert_eq!(header_str(&first, "chat_known").as_deref(), Some("true"));
    assert_eq!(header_str(&first, "chat_kind").as_deref(), Some("user"));
    let deleted_at = header_str(&first, "deleted_at").unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(&deleted_at).expect("RFC 3339");
    assert!((chrono::Utc::now() - at.to_utc()).num_seconds().abs() < 300);
    assert_eq!(header_int(&first, "media_objects_deleted"), Some(2));
    assert_eq!(header_int(&first, "media_bytes_deleted"), Some(15));
    assert!(!media.join("5531987654321@s.whatsapp.net").exists());
    assert!(!media.join("553187654321@s.whatsapp.net").exists());
    assert!(
        media
            .join("5531999999999@s.whatsapp.net/another-chat.jpg")
            .exists()
    );

    w.publish(Command {
        correlation_id: Some("again"),
        ..Command::new("alpha", "receipt-1", token, body)
    })
    .await;
    let again = w.events.by_correlation("again").await;
    assert_eq!(header(&again, "replayed"), Some(&AMQPValue::Boolean(true)));
    for key in ["chat_known", "chat_kind", "deleted_at"] {
        assert_eq!(header_str(&again, key), header_str(&first, key), "{key}");
    }
    for key in ["media_objects_deleted", "media_bytes_deleted"] {
        assert_eq!(header_int(&again, key), header_int(&first, key), "{key}");
    }

    // A chat list the instance does not keep, a group, no media asked: no media headers.
    let group = br#"{"number": "120363024567890123@g.us"}"#;
    w.publish(Command::new("beta", "receipt-2", token, group))
        .await;
    let other = w.events.by_id("receipt-2").await;
    assert_eq!(status(&other), 200);
    assert_eq!(header_str(&other, "chat_known").as_deref(), Some("unknown"));
    assert_eq!(header_str(&other, "chat_kind").as_deref(), Some("group"));
    assert!(header(&other, "media_objects_deleted").is_none());
    assert!(header(&other, "media_bytes_deleted").is_none());
    w.stop().await;
}
