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
    /// Phone number to LID, as the session's store maps them.
    lids: Mutex<Vec<(String, String)>>,
    /// Every mutation sent, as the actor handed it over.
    mutations: Mutex<Vec<Mutation>>,
    /// Sends fail with this while set.
    failing: Mutex<Option<SessionError>>,
    stuck: std::sync::atomic::AtomicBool,
    /// The account keys one-to-one chats by LID.
    migrated: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Directory for Scripted {
    async fn known_lid(&self, phone: &str) -> Option<String> {
        let lids = self.lids.lock().unwrap();
        lids.iter()
            .find(|(p, _)| p == phone)
            .map(|(_, lid)| lid.clone())
    }
    async fn known_phone(&self, _: &str) -> Option<String> {
        None
    }
    async fn lid_migrated(&self) -> bool {
        self.migrated.load(std::sync::atomic::Ordering::Relaxed)
    }
    async fn lookup(&self, _: &[String]) -> Result<Vec<Account>, SessionError> {
        Ok(vec![])
    }
}

#[async_trait::async_trait]
impl Device for Scripted {
    async fn send(
        &self,
        mutation: &Mutation,
        _: Duration,
        _: Option<tokio::time::Instant>,
    ) -> Result<(), SessionError> {
        tokio::time::sleep(self.latency).await;
        if let Some(error) = self.failing.lock().unwrap().clone() {
            return Err(error);
        }
        self.sent.lock().unwrap().push(describe(mutation));
        self.mutations.lock().unwrap().push(mutation.clone());
        let stamp = mutation.value.timestamp.unwrap_or_default();
        self.stamps.lock().unwrap().push(stamp);
        Ok(())
    }

    async fn catch_up(&self, _: Duration) {
        self.sent.lock().unwrap().push("catch up".into());
    }

    async fn chat_list_stuck(&self) -> bool {
        self.stuck.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// `<jid> 0` for a delete (its index arguments), with ` @<last message id>` when its range
/// names one; `unpin <jid>` for an unpin.
fn describe(mutation: &Mutation) -> String {
    let args = mutation.index_args().join(" ");
    if mutation.value.pin_action.as_option().is_some() {
        return format!("unpin {args}");
    }
    let action = mutation.value.delete_chat_action.as_option().unwrap();
    let range = action.message_range.as_option().unwrap();
    match range.messages.first() {
        Some(m) => format!("{args} @{}", m.key.as_option().unwrap().id.clone().unwrap()),
        None => args,
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
        lids: Mutex::new(vec![]),
        mutations: Mutex::new(vec![]),
        failing: Mutex::new(None),
        stuck: Default::default(),
        migrated: Default::default(),
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
        chat_index_max: 1_000,
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
            "unpin 5511000000001@s.whatsapp.net",
            "5511000000003@s.whatsapp.net 0",
            "unpin 5511000000003@s.whatsapp.net"
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
    let sends = || device.stamps.lock().unwrap().len();
    let went_on = tokio::time::timeout(Duration::from_secs(10), async {
        while sends() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    went_on.await.expect("the delete and the unpin went on");
    let again = session
        .delete_chat_as_of(&chat, false, seen_ms, Arc::new(Unfenced))
        .await;
    assert_eq!(again.map(|d| d.chat), Ok(chat));
    let stamps = device.stamps.lock().unwrap().clone();
    // A delete and the (blind) unpin, each try.
    assert_eq!(stamps, [seen_ms as i64; 4], "the same mutations both times");
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
        [
            "catch up",
            "120363024567890123@g.us 0",
            "unpin 120363024567890123@g.us"
        ]
    );
}

const LID: &str = "123456789012345@lid";
const PN: &str = "5511987654321@s.whatsapp.net";
const SEEN_MS: u64 = 1_733_000_000_000;
const SEEN_S: i64 = (SEEN_MS / 1000) as i64;

/// Waits (bounded) until the actor has applied what was injected.
async fn until(done: impl Fn() -> bool) {
    let wait = tokio::time::timeout(Duration::from_secs(10), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    wait.await.expect("the event was applied in time");
}

fn sent(device: &Scripted) -> Vec<String> {
    device.sent.lock().unwrap().clone()
}

/// The defect: the worker kept no chat list. A number whose chat the phone holds under its
/// LID was deleted under the number (a silent no-op there), with a range of "now" that also
/// swallowed what came after the command. The index picks the key the phone holds and the
/// chat's last message, with no lookup.
#[tokio::test]
async fn a_chat_the_index_holds_is_deleted_under_its_key_with_the_range_the_apps_send() {
    let (session, device) = session(0);
    session.inject_event(chats::tests::message(
        LID,
        Some(PN),
        "A1",
        SEEN_S - 60,
        false,
    ));
    let number = normalise_number("+55 11 98765-4321").unwrap();
    let deleted = session
        .delete_chat_as_of(&number, true, SEEN_MS, Arc::new(Unfenced))
        .await;
    let held = Deleted {
        chat: normalise_number(LID).unwrap(),
        known: ChatKnown::True,
    };
    assert_eq!(deleted, Ok(held), "chat_jid is the key deleted");
    assert_eq!(sent(&device), ["catch up", &format!("{LID} 0 @A1")]);
    let again = session
        .delete_chat_as_of(&number, true, SEEN_MS + 1_000, Arc::new(Unfenced))
        .await
        .unwrap();
    assert_eq!(
        again.known,
        ChatKnown::Unknown,
        "gone from the index; the chat list never synced"
    );
}

fn indexed(session: &WhatsappSession) -> usize {
    session.status().chat_index.map_or(0, |index| index.chats)
}

/// The defect: `chat_known` was read before the delete, from the JID as given. A number whose
/// chat the index holds under a LID it learnt no twin for read `unknown` (or `false` once
/// synced), though resolution then found and deleted that chat. It is now what the delete
/// found.
#[tokio::test]
async fn a_number_resolved_to_a_chat_the_index_holds_is_known() {
    let (session, device) = session(0);
    device
        .migrated
        .store(true, std::sync::atomic::Ordering::Relaxed);
    device
        .lids
        .lock()
        .unwrap()
        .push(("5511987654321".into(), "123456789012345".into()));
    session.inject_event(chats::tests::message(LID, None, "A1", SEEN_S - 60, false));
    until(|| indexed(&session) == 1).await;
    let number = normalise_number(PN).unwrap();
    let keys = keys_for(&number);
    let read_before = session
        .index
        .lock()
        .unwrap()
        .known(keys.iter().map(String::as_str));
    assert_eq!(read_before, ChatKnown::Unknown, "what the old read said");
    let deleted = session
        .delete_chat_as_of(&number, true, SEEN_MS, Arc::new(Unfenced))
        .await
        .unwrap();
    assert_eq!(deleted.chat.as_str(), LID);
    assert_eq!(deleted.known, ChatKnown::True);
    assert_eq!(sent(&device), ["catch up", &format!("{LID} 0 @A1")]);
}

/// A message that arrived after the command was first seen keeps the chat, as on WhatsApp:
/// the range stops at the first-seen time, and the index keeps the chat.
#[tokio::test]
async fn a_message_after_the_command_was_seen_keeps_the_chat() {
    let (session, device) = session(0);
    session.inject_event(chats::tests::message(LID, None, "LATE", SEEN_S + 30, false));
    let chat = normalise_number(LID).unwrap();
    until(|| indexed(&session) == 1).await;
    let deleted = session
        .delete_chat_as_of(&chat, true, SEEN_MS, Arc::new(Unfenced))
        .await;
    let known = ChatKnown::True;
    assert_eq!(deleted, Ok(Deleted { chat, known }));
    assert_eq!(
        sent(&device),
        ["catch up", &format!("{LID} 0")],
        "no key: up to the first-seen time"
    );
    assert_eq!(indexed(&session), 1, "the newer message keeps it");
}

/// The defect: the chat's pin stayed, so a chat that came back came back pinned.
#[tokio::test]
async fn a_pinned_chat_is_unpinned_with_its_delete() {
    let (session, device) = session(0);
    session.inject_event(chats::tests::message(LID, None, "A1", SEEN_S - 5, false));
    session.inject_event(chats::tests::pin(LID, true));
    let chat = normalise_number(LID).unwrap();
    let deleted = session
        .delete_chat_as_of(&chat, true, SEEN_MS, Arc::new(Unfenced))
        .await;
    assert_eq!(deleted.map(|d| d.chat), Ok(chat));
    assert_eq!(
        sent(&device),
        ["catch up", &format!("{LID} 0 @A1"), &format!("unpin {LID}")]
    );
}

/// Without the phone's chat list the key stays uncertain: the chat is deleted under the key
/// resolved and under its twin (a key the phone does not hold is a no-op there). Once the
/// chat list has synced, a chat it does not hold is `false` and only the key resolved is sent.
#[tokio::test]
async fn without_the_chat_list_the_twin_is_deleted_too() {
    use whatsapp_rust::waproto::whatsapp::history_sync::HistorySyncType;
    let (session, device) = session(0);
    device
        .lids
        .lock()
        .unwrap()
        .push(("5511987654321".into(), "123456789012345".into()));
    let number = normalise_number(PN).unwrap();
    let deleted = session
        .delete_chat_as_of(&number, true, SEEN_MS, Arc::new(Unfenced))
        .await;
    let unknown = Deleted {
        chat: number.clone(),
        known: ChatKnown::Unknown,
    };
    assert_eq!(deleted, Ok(unknown));
    assert_eq!(
        sent(&device),
        [
            "catch up",
            &format!("{PN} 0"),
            &format!("{LID} 0"),
            &format!("unpin {PN}")
        ]
    );

    device.sent.lock().unwrap().clear();
    let end = chats::tests::history(vec![], HistorySyncType::InitialBootstrap, Some(100));
    session.inject_event(Event::HistorySync(Box::new(end)));
    // The history chunk is read off the actor's thread: wait until it is applied.
    until(|| {
        session
            .status()
            .chat_index
            .is_some_and(|index| index.synced)
    })
    .await;
    let deleted = session
        .delete_chat_as_of(&number, true, SEEN_MS, Arc::new(Unfenced))
        .await
        .unwrap();
    assert_eq!(deleted.known, ChatKnown::False);
    assert_eq!(sent(&device), [format!("{PN} 0")]);
}

/// whatsapp-rust 0.7.0 can keep the chat list at version 0 for ever; every delete then
/// conflicts while the instance shows connected. It is shown, and cleared once a delete
/// goes through.
#[tokio::test]
async fn a_chat_list_stuck_at_version_zero_is_shown_and_cleared() {
    let (session, device) = session(0);
    let conflict = SessionError::Server(
        "app-state patch for regular_high still conflicting after 3 attempts".into(),
    );
    *device.failing.lock().unwrap() = Some(conflict.clone());
    device
        .stuck
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let chat = normalise_number(PN).unwrap();
    let failed = session.delete_chat(&chat, true, Arc::new(Unfenced)).await;
    assert_eq!(failed, Err(conflict));
    assert!(session.status().app_state_stuck_since.is_some(), "shown");
    assert_eq!(session.state(), SessionState::Connected);

    *device.failing.lock().unwrap() = None;
    device
        .stuck
        .store(false, std::sync::atomic::Ordering::Relaxed);
    session
        .delete_chat(&chat, true, Arc::new(Unfenced))
        .await
        .unwrap();
    assert!(session.status().app_state_stuck_since.is_none(), "cleared");
}

/// The worker's patches for Baileys' decoder (`scripts/golden-decode`): the mutations the actor
/// hands the device for a phone-number chat, a LID chat (pinned) and a group chat the index
/// holds, built into patches by the crate's own patch builder over a real session store that
/// holds the golden key, written as JSON with what each must decode to.
#[tokio::test]
#[ignore = "run by scripts/golden-decode, which decodes the output with Baileys"]
async fn golden_worker_patches_for_baileys() {
    use whatsapp_rust::TokioRuntime;
    use whatsapp_rust::store::SqliteStore;
    use whatsapp_rust::wacore::appstate::encode::encode_record;
    use whatsapp_rust::wacore::appstate::keys::expand_app_state_keys;
    use whatsapp_rust::wacore::appstate_sync::AppStateProcessor;
    use whatsapp_rust::wacore::store::traits::{AppStateSyncKey, AppSyncStore};
    use whatsapp_rust::waproto::whatsapp as wa;

    let out = std::env::var("CDW_GOLDEN_OUT").expect("CDW_GOLDEN_OUT: where to write the patches");
    const GROUP: &str = "120363024567890123@g.us";
    const MEMBER: &str = "5511900000000@s.whatsapp.net";
    let (key_data, key_id, iv) = (
        [7u8; 32],
        hex::decode("000000001234").unwrap(),
        [0x42u8; 16],
    );

    // What the chats held, as the session saw it.
    let (session, device) = session(0);
    let seen_ms = SEEN_MS;
    session.inject_event(chats::tests::message(
        PN,
        None,
        "PN-LAST",
        SEEN_S - 100,
        true,
    ));
    session.inject_event(chats::tests::message(
        LID,
        Some(MEMBER),
        "LID-LAST",
        SEEN_S - 50,
        false,
    ));
    session.inject_event(chats::tests::pin(LID, true));
    let Event::Messages(batch) = chats::tests::message(GROUP, None, "G-LAST", SEEN_S - 10, false)
    else {
        unreachable!()
    };
    let mut info = (*batch.messages[0].info).clone();
    info.source.sender = MEMBER.parse().unwrap();
    session.inject_event(Event::Messages(
        whatsapp_rust::types::events::MessageBatch::builder()
            .messages(Arc::from(vec![
                whatsapp_rust::types::events::InboundMessage::builder()
                    .message(batch.messages[0].message.clone())
                    .info(Arc::new(info))
                    .build(),
            ]))
            .origin(whatsapp_rust::types::events::BatchOrigin::Live)
            .build(),
    ));
    until(|| session.status().chat_index.is_some_and(|i| i.chats == 3)).await;
    for chat in ["5511987654321", LID, GROUP] {
        let chat = normalise_number(chat).unwrap();
        session
            .delete_chat_as_of(&chat, true, seen_ms, Arc::new(Unfenced))
            .await
            .unwrap();
    }
    let mutations = device.mutations.lock().unwrap().clone();
    assert_eq!(mutations.len(), 4, "three deletes and one unpin");

    // The crate's own patch builder over a session store holding the golden key.
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::new(&dir.path().join("golden.db").to_string_lossy())
        .await
        .unwrap();
    let key = AppStateSyncKey {
        key_data: key_data.to_vec(),
        fingerprint: vec![],
        timestamp: 0,
    };
    store.set_sync_key(&key_id, key).await.unwrap();
    let processor = AppStateProcessor::new(Arc::new(store), Arc::new(TokioRuntime));
    let keys = expand_app_state_keys(&key_data);
    let mut cases = Vec::new();
    for mutation in &mutations {
        let schema = mutation.schema();
        let index = Mutation::index_parts(schema, &mutation.index_args());
        let (record, _) = encode_record(
            wa::syncd_mutation::SyncdOperation::SET,
            &serde_json::to_vec(&index).unwrap(),
            &mutation.value,
            &keys,
            &key_id,
            &iv,
            schema.version as i32,
        );
        let collection = schema.collection.as_str();
        let (patch, base) = processor
            .build_patch(collection, vec![record])
            .await
            .unwrap();
        assert_eq!(base, 0);
        cases.push(serde_json::json!({
            "collection": collection,
            "index": index,
            "patch_bytes": hex::encode(patch),
        }));
    }
    // What each must decode to, from the inputs above (not from the mutations).
    let expect = [
        serde_json::json!({"last_message_s": SEEN_S - 100, "key": {"remoteJid": PN, "id": "PN-LAST", "fromMe": true}}),
        serde_json::json!({"last_message_s": SEEN_S - 50, "key": {"remoteJid": LID, "id": "LID-LAST", "fromMe": false}}),
        serde_json::json!({"pinned": false}),
        serde_json::json!({"last_message_s": SEEN_S - 10, "key": {"remoteJid": GROUP, "id": "G-LAST", "fromMe": false, "participant": MEMBER}}),
    ];
    for (case, expect) in cases.iter_mut().zip(expect) {
        case["expect"] = expect;
    }
    let doc = serde_json::json!({
        "key_data": hex::encode(key_data),
        "key_id": hex::encode(&key_id),
        "timestamp_ms": seen_ms,
        "cases": cases,
    });
    std::fs::write(&out, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
}
