//! The actor over a scripted device: queued deletes, fences, state events, the mutation sent.
use std::path::PathBuf;
use std::sync::Mutex;

use super::*;
use crate::contract::normalise_number;
use crate::fence::{Fenced, Unfenced};

/// A device that takes `latency` per delete, knows no accounts, and records the index
/// arguments it was sent.
struct Scripted {
    latency: Duration,
    sent: Mutex<Vec<String>>,
    /// The timestamp of each mutation sent.
    stamps: Mutex<Vec<i64>>,
}

#[async_trait::async_trait]
impl Directory for Scripted {
    async fn known_lid(&self, _: &str) -> Option<String> {
        None
    }
    async fn known_phone(&self, _: &str) -> Option<String> {
        None
    }
    async fn lid_migrated(&self) -> bool {
        false
    }
    async fn lookup(&self, _: &[String]) -> Result<Vec<Account>, SessionError> {
        Ok(vec![])
    }
}

#[async_trait::async_trait]
impl Device for Scripted {
    async fn send(
        &self,
        mutation: &DeleteChat,
        _: Duration,
        _: Option<tokio::time::Instant>,
    ) -> Result<(), SessionError> {
        tokio::time::sleep(self.latency).await;
        self.sent
            .lock()
            .unwrap()
            .push(mutation.index_args().join(" "));
        let stamp = mutation.value.timestamp.unwrap_or_default();
        self.stamps.lock().unwrap().push(stamp);
        Ok(())
    }

    async fn catch_up(&self, _: Duration) {
        self.sent.lock().unwrap().push("catch up".into());
    }
}

struct Refused;

impl Fence for Refused {
    fn check(&self) -> Result<(), Fenced> {
        Err(Fenced("the claim was taken over"))
    }
}

fn session(latency_ms: u64) -> (WhatsappSession, Arc<Scripted>) {
    let device = Arc::new(Scripted {
        latency: Duration::from_millis(latency_ms),
        sent: Mutex::new(vec![]),
        stamps: Mutex::new(vec![]),
    });
    let options = SessionOptions {
        store: crate::session::SessionStore::Sqlite(PathBuf::from("unused.db")),
        owner: None,
        delete_timeout: Duration::from_secs(5),
        shutdown_deadline: Duration::from_secs(1),
        transport_url: None,
        lookup: LookupLimits {
            cache_ttl: Duration::from_secs(60),
            per_minute: 60,
        },
    };
    let session = WhatsappSession::connected("scripted", options, device.clone());
    (session, device)
}

/// Deletes wait in the session one at a time; one whose requester gave up while it waited
/// (a command handed back) is never sent.
#[tokio::test(start_paused = true)]
async fn a_queued_delete_whose_requester_has_gone_is_not_sent() {
    let (session, device) = session(1_000);
    let session = Arc::new(session);
    let chat = |n: &str| normalise_number(n).unwrap();
    let first = tokio::spawn({
        let session = session.clone();
        async move {
            session
                .delete_chat(&chat("5511000000001"), false, Arc::new(Unfenced))
                .await
        }
    });
    tokio::task::yield_now().await;
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        session.delete_chat(&chat("5511000000002"), false, Arc::new(Unfenced)),
    )
    .await;
    assert!(gave_up.is_err(), "the second delete waits behind the first");
    let third = session
        .delete_chat(&chat("5511000000003"), false, Arc::new(Unfenced))
        .await;
    assert_eq!(first.await.unwrap(), Ok(chat("5511000000001")));
    assert_eq!(third, Ok(chat("5511000000003")));
    assert_eq!(
        *device.sent.lock().unwrap(),
        [
            "catch up",
            "5511000000001@s.whatsapp.net 0",
            "5511000000003@s.whatsapp.net 0"
        ]
    );
}

/// Defect (found by review): the delete runs in the actor, outside the command's future.
/// A command dropped while its delete was being sent (a hard stop) left the send going,
/// and the next try sent a new mutation stamped with the time of that try, which also
/// deletes what arrived in between. Every try of one command (the same first-seen time)
/// sends the same mutation.
#[tokio::test]
async fn a_delete_tried_again_after_its_command_was_dropped_sends_the_same_mutation() {
    let (session, device) = session(1_000);
    let chat = normalise_number("5511000000001").unwrap();
    let seen_ms = 1_733_000_000_123;
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        session.delete_chat_as_of(&chat, false, seen_ms, Arc::new(Unfenced)),
    )
    .await;
    assert!(dropped.is_err(), "the first try was dropped mid-send");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(device.stamps.lock().unwrap().len(), 1, "the send went on");
    let again = session
        .delete_chat_as_of(&chat, false, seen_ms, Arc::new(Unfenced))
        .await;
    assert_eq!(again, Ok(chat));
    let stamps = device.stamps.lock().unwrap().clone();
    assert_eq!(
        stamps,
        [seen_ms as i64, seen_ms as i64],
        "the same mutation both times"
    );
}

/// A fence whose end has (nearly) come.
struct Ending;

impl Fence for Ending {
    fn check(&self) -> Result<(), Fenced> {
        Ok(())
    }

    fn valid_until(&self) -> Option<tokio::time::Instant> {
        Some(tokio::time::Instant::now() + Duration::from_millis(500))
    }
}

/// Defect (found by review): the fence was checked before the crate waited for its own
/// send lock and any running sync; only the delete timeout (longer than the lease) bounded
/// that wait, so a send could start after the lease and the claim ended. A fence that ends
/// within the send margin is not sent at all; the device is told the deadline otherwise.
#[tokio::test]
async fn a_delete_is_not_sent_when_its_fence_ends_before_it_could_be() {
    let (session, device) = session(0);
    let chat = normalise_number("5511000000001").unwrap();
    let refused = session.delete_chat(&chat, false, Arc::new(Ending)).await;
    assert!(
        matches!(refused, Err(SessionError::Fenced(_))),
        "{refused:?}"
    );
    assert_eq!(*device.sent.lock().unwrap(), ["catch up"]);
}

#[tokio::test]
async fn a_delete_whose_fence_no_longer_holds_is_not_sent() {
    let (session, device) = session(0);
    let chat = normalise_number("5511000000001").unwrap();
    let refused = session.delete_chat(&chat, false, Arc::new(Refused)).await;
    assert_eq!(
        refused,
        Err(SessionError::Fenced(Fenced("the claim was taken over")))
    );
    assert_eq!(*device.sent.lock().unwrap(), ["catch up"]);
    assert_eq!(session.state(), SessionState::Connected);
}

/// The defect: events reached the actor through `try_send` on the 256-slot mailbox, so a
/// backlog of deletes made it drop a `LoggedOut`, and the instance kept "connected".
#[tokio::test(start_paused = true)]
async fn state_events_are_never_dropped_behind_a_backlog_of_deletes() {
    use whatsapp_rust::types::events::{ConnectFailureReason, LoggedOut};

    let (session, device) = session(1_000);
    let session = Arc::new(session);
    let mut waiting = Vec::new();
    for n in 0..300 {
        let session = session.clone();
        waiting.push(tokio::spawn(async move {
            let chat = normalise_number(&format!("55110000{n:05}")).unwrap();
            session.delete_chat(&chat, true, Arc::new(Unfenced)).await
        }));
    }
    while session.mailbox.capacity() > 0 {
        tokio::task::yield_now().await;
    }
    session.inject_event(Event::LoggedOut(
        LoggedOut::builder()
            .on_connect(false)
            .reason(ConnectFailureReason::LoggedOut)
            .build(),
    ));
    let mut not_connected = 0;
    for delete in waiting {
        if delete.await.unwrap() == Err(SessionError::NotConnected) {
            not_connected += 1;
        }
    }
    assert_eq!(session.state(), SessionState::LoggedOut);
    assert!(
        not_connected >= 298,
        "{not_connected}: the logout was applied at once"
    );
    assert!(device.sent.lock().unwrap().len() <= 3);
}

/// The defect: `deleteMedia` went into the mutation's index ("1"), asking the phone and
/// every linked device to delete the chat's media too.
#[tokio::test]
async fn the_phone_is_never_asked_to_delete_media() {
    let (session, device) = session(0);
    let chat = normalise_number("120363024567890123@g.us").unwrap();
    let deleted = session.delete_chat(&chat, false, Arc::new(Unfenced)).await;
    assert_eq!(deleted, Ok(chat));
    assert_eq!(
        *device.sent.lock().unwrap(),
        ["catch up", "120363024567890123@g.us 0"]
    );
}
