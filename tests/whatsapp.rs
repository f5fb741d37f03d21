//! The real whatsapp-rust adapter, offline: never-paired sessions answer 503 (one and a hundred
//! of them, through the whole worker), the real `delete_chat` with app-state keys but no
//! connection is "not connected", a client pointed at a closed port stays down and stops
//! promptly, sessions survive a restart, and events drive the instance's state.

mod common;

use std::time::Duration;

use chat_delete_worker::contract::normalise_number;
use chat_delete_worker::session::whatsapp::mutation::{Mutation, Range};
use chat_delete_worker::session::whatsapp::{self, Directory, SessionLock};
use chat_delete_worker::session::{
    ChatSession, SessionError, SessionOptions, SessionState, SessionStatus, SessionStore,
    WhatsappSession,
};
use common::*;
use whatsapp_rust::prelude::Event;
use whatsapp_rust::store::traits::{AppStateSyncKey, AppSyncStore};
use whatsapp_rust::types::events::{
    ConnectFailureReason, Connected, Disconnected, LoggedOut, StreamError, StreamReplaced,
    TempBanReason, TemporaryBan,
};
use whatsapp_rust::{ErrorChainExt, Jid};

const TOKEN: &str = "secret-tok-wa";

fn options(dir: &std::path::Path, name: &str) -> SessionOptions {
    SessionOptions {
        store: SessionStore::Sqlite(dir.join(format!("{name}.db"))),
        owner: None,
        delete_timeout: Duration::from_secs(5),
        shutdown_deadline: Duration::from_secs(2),
        // Nothing listens on port 1: connecting fails at once, offline.
        transport_url: Some("ws://127.0.0.1:1".into()),
        lookup: whatsapp::LookupLimits {
            cache_ttl: Duration::from_secs(60),
            per_minute: 60,
        },
        chat_index_max: 1_000,
    }
}

fn store_path(options: &SessionOptions) -> std::path::PathBuf {
    match &options.store {
        SessionStore::Sqlite(path) => path.clone(),
        SessionStore::Postgres { .. } => unreachable!("these tests keep sessions in files"),
    }
}

async fn hold(options: &SessionOptions) -> whatsapp::SessionHold {
    whatsapp::SessionHold::acquire(options).await.unwrap()
}

/// Writes a paired device (its phone number) into a session file, as pairing would.
async fn seed_paired(options: &SessionOptions, number: &str) {
    let bot = whatsapp::build_bot(options, &hold(options).await, &[], None, |_| {})
        .await
        .unwrap();
    let client = bot.client();
    client
        .persistence_manager()
        .modify_device(|device| device.pn = Some(Jid::pn(number.to_owned())))
        .await;
    client.persistence_manager().flush().await.unwrap();
}

#[tokio::test]
async fn a_hundred_never_paired_instances_start_answer_503_and_stop() {
    let mut cfg = String::from(
        "[retry]\nin_process_attempts = 1\nbroker_delays_ms = [10]\n[pacing]\ndeletes_per_minute = \"unlimited\"\n",
    );
    for i in 0..100 {
        cfg.push_str(&format!(
            "[instances.wa{i}]\nkind = \"whatsapp\"\ntoken_sha256 = \"{}\"\n",
            hash(TOKEN)
        ));
    }
    let w = TestWorker::start(&cfg).await;
    for i in 0..100 {
        w.publish(Command::new(
            &format!("wa{i}"),
            &format!("wa-{i}"),
            TOKEN,
            br#"{"number": "5511999999999"}"#,
        ))
        .await;
    }
    let all = w
        .events
        .wait_until("100 results", |all| all.len() >= 100)
        .await;
    for d in &all {
        assert_eq!(status(d), 503);
        assert_eq!(
            body(d)["error"]["message"],
            "Instance is not connected to WhatsApp"
        );
    }
    let listed = http_get(w.http_addr.unwrap(), "/instances").await.unwrap();
    let json: serde_json::Value =
        serde_json::from_str(listed.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 100);
    assert!(
        json.as_array()
            .unwrap()
            .iter()
            .all(|i| i["state"] == "not_paired")
    );
    assert!(
        w.dir.path().join("sessions/wa0.db").exists(),
        "session stores are created"
    );
    tokio::time::timeout(Duration::from_secs(30), w.stop())
        .await
        .expect("stops promptly");
}

#[tokio::test]
async fn app_state_keys_without_a_connection_are_not_connected_through_the_real_delete() {
    let dir = tempfile::tempdir().unwrap();
    let options = options(dir.path(), "keyed");
    let at_ms = 1_700_000_000_000;
    let mutation = Mutation::delete_chat(&Jid::pn("5511999999999"), &Range::until(at_ms), at_ms);
    let timeout = Duration::from_secs(5);

    // Never paired: the crate has no app-state key, which is "not connected" for us.
    let gate = std::sync::Arc::new(whatsapp::SendGate::default());
    let bot = whatsapp::build_gated_bot(&options, &hold(&options).await, gate.clone(), |_| {})
        .await
        .unwrap();
    let device = whatsapp::Linked::new(bot.client(), gate);
    let result = whatsapp::Device::send(&device, &mutation, timeout, None).await;
    assert_eq!(result, Err(SessionError::NotConnected));
    drop(device);
    drop(bot);

    // With a key in the store, the real delete gets as far as the connection.
    let store = whatsapp_rust::store::SqliteStore::new(&store_path(&options).to_string_lossy())
        .await
        .unwrap();
    store
        .set_sync_key(
            b"key-1",
            AppStateSyncKey {
                key_data: vec![7; 32],
                fingerprint: vec![1, 2, 3],
                timestamp: 1,
            },
        )
        .await
        .unwrap();
    drop(store);
    let bot = whatsapp::build_bot(&options, &hold(&options).await, &[], None, |_| {})
        .await
        .unwrap();
    let client = bot.client();
    let raw = client
        .chat_actions()
        .delete_chat(&Jid::pn("5511999999999"), true, None)
        .await
        .unwrap_err();
    assert!(
        !matches!(raw, whatsapp_rust::AppStateError::InvalidRequest(_)),
        "the key was found: {raw}"
    );
    assert!(raw.is_transport_unavailable(), "{raw}");
    drop(client);
    drop(bot);
    let gate = std::sync::Arc::new(whatsapp::SendGate::default());
    let bot = whatsapp::build_gated_bot(&options, &hold(&options).await, gate.clone(), |_| {})
        .await
        .unwrap();
    let device = whatsapp::Linked::new(bot.client(), gate);
    let result = whatsapp::Device::send(&device, &mutation, timeout, None).await;
    assert_eq!(result, Err(SessionError::NotConnected));
    // A send whose fence ended while the crate waited to send it: the patch is never built,
    // so nothing goes out (the crate's own path, stopped at its last store read).
    let ended = tokio::time::Instant::now();
    let result = whatsapp::Device::send(&device, &mutation, timeout, Some(ended)).await;
    assert!(matches!(result, Err(SessionError::Fenced(_))), "{result:?}");
    // Resolution offline: nothing known locally, and a lookup is transient, never final.
    assert_eq!(Directory::known_lid(&device, "5511999999999").await, None);
    let lookup = Directory::lookup(&device, &["5511999999999".to_owned()]).await;
    assert!(
        lookup.as_ref().is_err_and(SessionError::is_retryable),
        "{lookup:?}"
    );
}

#[tokio::test]
async fn a_paired_session_survives_a_restart_and_a_dead_endpoint_keeps_it_down() {
    let dir = tempfile::tempdir().unwrap();
    let options = options(dir.path(), "paired");
    seed_paired(&options, "5511988887777").await;
    assert_eq!(
        whatsapp::inspect(&options).await.unwrap().as_deref(),
        Some("+5511988887777")
    );

    let session = WhatsappSession::start("paired", options.clone()).await;
    assert_eq!(
        session.status().paired_as.as_deref(),
        Some("+5511988887777")
    );
    assert_eq!(session.state(), SessionState::Connecting);
    // While the worker holds the session, nobody else may open it.
    assert!(SessionLock::acquire(&store_path(&options)).is_err());
    let chat = normalise_number("5511999999999").unwrap();
    assert_eq!(
        session
            .delete_chat(
                &chat,
                false,
                std::sync::Arc::new(chat_delete_worker::fence::Unfenced)
            )
            .await,
        Err(SessionError::NotConnected)
    );
    assert_ne!(session.state(), SessionState::Connected);
    tokio::time::timeout(Duration::from_secs(5), session.shutdown())
        .await
        .expect("stops promptly");
    assert_eq!(session.state(), SessionState::Stopped);

    // Restarted: the paired-ness is read back from the file.
    assert!(
        SessionLock::acquire(&store_path(&options)).is_ok(),
        "the lock is released"
    );
    let again = WhatsappSession::start("paired", options.clone()).await;
    assert_eq!(again.status().paired_as.as_deref(), Some("+5511988887777"));
    again.shutdown().await;

    // Unpairing removes the file (WhatsApp cannot be told offline).
    assert!(whatsapp::unpair(&options).await.unwrap());
    assert!(!store_path(&options).exists());
    assert_eq!(whatsapp::inspect(&options).await.unwrap(), None);
}

async fn wait_state(session: &WhatsappSession, want: SessionState) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while session.state() != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "state {:?}, wanted {want:?}",
            session.state()
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A paired session told it is connected (nothing listens: the client itself stays down).
async fn connected(dir: &std::path::Path, name: &str, number: &str) -> WhatsappSession {
    let options = options(dir, name);
    seed_paired(&options, number).await;
    let session = WhatsappSession::start(name, options).await;
    session.inject_event(Event::Connected(Connected::builder().build()));
    wait_state(&session, SessionState::Connected).await;
    session
}

/// Waits until the session's status satisfies `done`.
async fn wait_status(session: &WhatsappSession, what: &str, done: impl Fn(&SessionStatus) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done(&session.status()) {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn events_drive_the_state_and_parking_stops_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let options = options(dir.path(), "actor");
    seed_paired(&options, "5511977776666").await;
    let session = WhatsappSession::start("actor", options.clone()).await;
    let before = session.status().changed_at;

    session.inject_event(Event::Connected(Connected::builder().build()));
    wait_state(&session, SessionState::Connected).await;
    assert!(session.status().changed_at >= before);
    session.inject_event(Event::Disconnected(
        Disconnected::builder()
            .reason(whatsapp_rust::wacore::net::DisconnectReason::StreamEnded)
            .build(),
    ));
    wait_state(&session, SessionState::Connecting).await;

    session.inject_event(Event::LoggedOut(
        LoggedOut::builder()
            .on_connect(false)
            .reason(ConnectFailureReason::LoggedOut)
            .build(),
    ));
    wait_state(&session, SessionState::LoggedOut).await;
    // Parked: the client is stopped and its file released, so no retry storm.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while SessionLock::acquire(&store_path(&options)).is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the parked client keeps its file"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let chat = normalise_number("5511999999999").unwrap();
    assert_eq!(
        session
            .delete_chat(
                &chat,
                false,
                std::sync::Arc::new(chat_delete_worker::fence::Unfenced)
            )
            .await,
        Err(SessionError::NotConnected)
    );

    // A reload (SIGHUP) opens the session again.
    session.reload().await;
    assert_eq!(session.state(), SessionState::Connecting);
    session.inject_event(Event::StreamReplaced(StreamReplaced::builder().build()));
    wait_state(&session, SessionState::Replaced).await;
    session.reload().await;
    session.inject_event(Event::TemporaryBan(
        TemporaryBan::builder()
            .code(TempBanReason::SentToTooManyPeople)
            .expire(chrono::TimeDelta::seconds(60))
            .build(),
    ));
    wait_state(&session, SessionState::Banned).await;
    session.shutdown().await;
}

/// Defect (issue: throttling invisible): WhatsApp's 429 changed nothing, so the worker kept
/// sending at the rate that drew it. Now it is counted, shown with the instance, and holds the
/// instance's deletes back (a retryable error naming it), with the session still connected.
#[tokio::test]
async fn a_429_is_counted_shown_and_holds_the_instances_deletes_back() {
    let metrics = chat_delete_worker::telemetry::prometheus();
    let dir = tempfile::tempdir().unwrap();
    let session = connected(dir.path(), "throttled", "5511977775555").await;
    assert_eq!(session.status().throttled_until, None);

    session.inject_event(Event::StreamError(
        StreamError::builder().code("429".to_owned()).build(),
    ));
    wait_status(&session, "the 429 was not seen", |s| {
        s.throttled_until.is_some()
    })
    .await;
    let until = session.status().throttled_until.unwrap();
    assert!(until > chrono::Utc::now() + chrono::TimeDelta::seconds(20));
    assert_eq!(session.state(), SessionState::Connected);
    let chat = normalise_number("5511999999999").unwrap();
    let refused = session
        .delete_chat(
            &chat,
            false,
            std::sync::Arc::new(chat_delete_worker::fence::Unfenced),
        )
        .await;
    match refused {
        Err(error @ SessionError::Server(_)) => {
            assert!(error.is_retryable());
            assert!(error.reason().contains("429"), "{error}");
        }
        other => panic!("a delete went on while throttled: {other:?}"),
    }
    let text = metrics.render();
    assert_eq!(
        metric(
            &text,
            "chat_delete_whatsapp_throttled_total{wa_instance=\"throttled\"}"
        ),
        1.0
    );
    session.shutdown().await;
}

/// Defect (issue: a stuck collection looks connected): when the chat list's app state
/// (`regular_high`) did not sync, nothing showed it while every delete failed. It is counted
/// and shown with the instance now.
#[tokio::test]
async fn a_chat_list_that_did_not_sync_is_counted_and_shown() {
    use whatsapp_rust::types::events::AppStateSyncFailed;
    let metrics = chat_delete_worker::telemetry::prometheus();
    let dir = tempfile::tempdir().unwrap();
    let session = connected(dir.path(), "unsynced", "5511977774444").await;
    let failed = AppStateSyncFailed::builder()
        .fatal(vec!["regular_high".to_owned()])
        .retryable(vec![])
        .skipped(vec![])
        .connected(true)
        .build();
    session.inject_event(Event::AppStateSyncFailed(failed));
    let seen = |s: &SessionStatus| s.app_state_failed_at.is_some();
    wait_status(&session, "the failed sync was not seen", seen).await;
    let series =
        "chat_delete_app_state_sync_failures_total{wa_instance=\"unsynced\",how=\"fatal\"}";
    assert_eq!(metric(&metrics.render(), series), 1.0);
    session.shutdown().await;
}
