//! The chat index: what it learns from each event, the range it picks, its bound, and its
//! store (a real SQLite file).
use std::sync::Arc;

use chrono::TimeZone;
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::types::events::{
    BatchOrigin, DeleteChatUpdate, InboundMessage, MessageBatch, PinUpdate,
};
use whatsapp_rust::types::message::{MessageInfo, MessageSource};

use super::*;

const LID: &str = "123456789012345@lid";
const PN: &str = "5511987654321@s.whatsapp.net";
const GROUP: &str = "120363024567890123@g.us";

fn jid(text: &str) -> Jid {
    text.parse().unwrap()
}

/// A live message in `chat` at `at_s`, from the other side unless `from_me`; `alt` is the
/// sender's (or recipient's) other JID as the server sends it.
pub(crate) fn message(chat: &str, alt: Option<&str>, id: &str, at_s: i64, from_me: bool) -> Event {
    message_with(chat, alt, id, at_s, from_me, text("hello"))
}

fn text(body: &str) -> wa::Message {
    wa::Message {
        conversation: Some(body.to_owned()),
        ..Default::default()
    }
}

fn message_with(
    chat: &str,
    alt: Option<&str>,
    id: &str,
    at_s: i64,
    from_me: bool,
    content: wa::Message,
) -> Event {
    let mut source = MessageSource {
        chat: jid(chat),
        sender: jid(chat),
        is_from_me: from_me,
        ..Default::default()
    };
    if from_me {
        source.recipient_alt = alt.map(jid);
    } else {
        source.sender_alt = alt.map(jid);
    }
    let info = MessageInfo {
        source,
        id: id.to_owned(),
        timestamp: chrono::Utc.timestamp_opt(at_s, 0).unwrap(),
        ..Default::default()
    };
    let inbound = InboundMessage::builder()
        .message(Arc::new(content))
        .info(Arc::new(info))
        .build();
    Event::Messages(
        MessageBatch::builder()
            .messages(Arc::from(vec![inbound]))
            .origin(BatchOrigin::Live)
            .build(),
    )
}

/// The chat was pinned or unpinned on a device.
pub(crate) fn pin(chat: &str, pinned: bool) -> Event {
    Event::PinUpdate(
        PinUpdate::builder()
            .jid(jid(chat))
            .timestamp(chrono::Utc::now())
            .action(Box::new(wa::sync_action_value::PinAction {
                pinned: Some(pinned),
            }))
            .from_full_sync(false)
            .build(),
    )
}

/// A history sync chunk with these conversations, zlib-wrapped as the phone sends it.
pub(crate) fn history(
    conversations: Vec<wa::Conversation>,
    kind: wa::history_sync::HistorySyncType,
    progress: Option<u32>,
) -> LazyHistorySync {
    let sync = wa::HistorySync {
        sync_type: kind,
        conversations,
        ..Default::default()
    };
    let mut raw = Vec::new();
    whatsapp_rust::waproto::codec::history_sync_encode_into(&sync, &mut raw);
    LazyHistorySync::new(zlib_stored(&raw), raw.len(), kind as i32, Some(1), progress)
}

/// zlib with stored (uncompressed) deflate blocks: no compressor needed in tests.
fn zlib_stored(raw: &[u8]) -> Bytes {
    let mut out = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = raw.chunks(65_535).collect();
    let chunks = if chunks.is_empty() {
        vec![&raw[..0]]
    } else {
        chunks
    };
    for (n, chunk) in chunks.iter().enumerate() {
        out.push(u8::from(n + 1 == chunks.len()));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for byte in raw {
        a = (a + u32::from(*byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    Bytes::from(out)
}

pub(crate) fn conversation(
    id: &str,
    twin: Option<&str>,
    last: Option<(&str, u64)>,
) -> wa::Conversation {
    let messages = last
        .map(|(msg_id, at_s)| wa::HistorySyncMsg {
            message: Some(wa::WebMessageInfo {
                key: Some(wa::MessageKey {
                    remote_jid: Some(id.to_owned()),
                    from_me: Some(false),
                    id: Some(msg_id.to_owned()),
                    participant: None,
                })
                .into(),
                message_timestamp: Some(at_s),
                message: Some(text("from history")).into(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into_iter()
        .collect();
    let mut conversation = wa::Conversation {
        id: id.to_owned(),
        messages,
        ..Default::default()
    };
    if id.ends_with("@lid") {
        conversation.pn_jid = twin.map(str::to_owned);
    } else {
        conversation.lid_jid = twin.map(str::to_owned);
    }
    conversation
}

#[test]
fn a_message_indexes_its_chat_under_the_key_it_came_with_and_its_twin() {
    let mut index = ChatIndex::new(100);
    assert_eq!(index.known([LID]), ChatKnown::Unknown, "nothing synced yet");
    index.apply(&message(LID, Some(PN), "A1", 1_700_000_000, false));
    let chat = index.find(PN).expect("found under its phone number");
    assert_eq!(chat.jid, LID);
    assert_eq!(chat.last_s, 1_700_000_000);
    assert_eq!(chat.last_key.as_ref().unwrap().id, "A1");
    assert_eq!(index.known([PN]), ChatKnown::True);

    // An older message does not move the last one; a newer one does.
    index.apply(&message(LID, None, "A0", 1_600_000_000, false));
    index.apply(&message(LID, None, "A2", 1_700_000_100, true));
    let chat = index.find(LID).unwrap();
    assert_eq!(chat.last_key.as_ref().unwrap().id, "A2");
    assert!(chat.last_key.as_ref().unwrap().from_me);
    assert_eq!(chat.twin.as_deref(), Some(PN), "the twin is kept");
    assert_eq!(index.len(), 1);
}

#[test]
fn protocol_messages_and_chats_no_command_can_name_are_not_indexed() {
    let mut index = ChatIndex::new(100);
    let protocol = wa::Message {
        protocol_message: Some(wa::message::ProtocolMessage::default()).into(),
        ..Default::default()
    };
    index.apply(&message_with(PN, None, "K", 1, false, protocol));
    index.apply(&message("status@broadcast", None, "S", 1, false));
    assert!(index.is_empty());
}

/// The apps name a chat's last message as the user saw it: a reaction or a message carrying
/// only a sender key is not one (a range naming it would name a message the phone does not
/// list).
#[test]
fn reactions_and_sender_key_shares_do_not_move_the_last_message() {
    let mut index = ChatIndex::new(100);
    index.apply(&message(GROUP, None, "SEEN", 1_000, false));
    let reaction = wa::Message {
        reaction_message: Some(wa::message::ReactionMessage::default()).into(),
        ..Default::default()
    };
    let key_share = wa::Message {
        sender_key_distribution_message: Some(Default::default()).into(),
        ..Default::default()
    };
    let mut text_with_key = text("hi");
    text_with_key.sender_key_distribution_message = Some(Default::default()).into();
    index.apply(&message_with(GROUP, None, "R", 2_000, false, reaction));
    index.apply(&message_with(GROUP, None, "K", 3_000, false, key_share));
    assert_eq!(
        index.find(GROUP).unwrap().last_key.as_ref().unwrap().id,
        "SEEN"
    );
    index.apply(&message_with(GROUP, None, "T", 4_000, false, text_with_key));
    assert_eq!(
        index.find(GROUP).unwrap().last_key.as_ref().unwrap().id,
        "T"
    );
}

#[test]
fn in_a_group_the_last_message_names_its_sender() {
    let mut index = ChatIndex::new(100);
    let Event::Messages(batch) = message(GROUP, None, "G1", 5, false) else {
        unreachable!()
    };
    let mut info = (*batch.messages[0].info).clone();
    info.source.sender = jid("5511900000000:3@s.whatsapp.net");
    let inbound = InboundMessage::builder()
        .message(batch.messages[0].message.clone())
        .info(Arc::new(info))
        .build();
    let event = Event::Messages(
        MessageBatch::builder()
            .messages(Arc::from(vec![inbound]))
            .origin(BatchOrigin::Live)
            .build(),
    );
    index.apply(&event);
    let key = index.find(GROUP).unwrap().last_key.clone().unwrap();
    assert_eq!(
        key.participant.as_deref(),
        Some("5511900000000@s.whatsapp.net")
    );
}

/// The range the apps send: the last message the user saw, never one that arrived after the
/// command was first seen (that message keeps the chat).
#[test]
fn the_range_is_the_last_message_before_the_command_was_seen() {
    let mut index = ChatIndex::new(100);
    index.apply(&message(LID, None, "A1", 1_700_000_000, false));
    let chat = index.find(LID).unwrap().clone();
    let range = chat.range_as_of(1_700_000_050_000);
    assert_eq!(range.last_message_s, 1_700_000_000);
    let key = range.last_key.unwrap();
    assert_eq!(key.id.as_deref(), Some("A1"));
    assert_eq!(key.remote_jid.as_deref(), Some(LID));
    assert_eq!(key.from_me, Some(false));

    let later = chat.range_as_of(1_699_999_990_000);
    assert_eq!(later, Range::until(1_699_999_990_000));
}

#[test]
fn history_sync_fills_the_chat_list_and_its_end_makes_absent_chats_false() {
    use wa::history_sync::HistorySyncType;
    let mut index = ChatIndex::new(100);
    let mut pinned = conversation(GROUP, None, Some(("G9", 1_650_000_000)));
    pinned.pinned = Some(1_650_000_001);
    let first = history(
        vec![
            conversation(LID, Some(PN), Some(("H1", 1_600_000_000))),
            pinned,
        ],
        HistorySyncType::InitialBootstrap,
        Some(50),
    );
    index.merge(from_history(&first));
    assert_eq!(index.len(), 2);
    assert!(!index.coverage().synced, "half way through");
    assert_eq!(
        index.known(["5511000000000@s.whatsapp.net"]),
        ChatKnown::Unknown
    );
    assert_eq!(index.find(PN).unwrap().last_key.as_ref().unwrap().id, "H1");
    assert!(index.find(GROUP).unwrap().pinned);

    let last = history(vec![], HistorySyncType::InitialBootstrap, Some(100));
    index.merge(from_history(&last));
    assert!(index.coverage().synced);
    assert_eq!(
        index.known(["5511000000000@s.whatsapp.net"]),
        ChatKnown::False
    );
    assert_eq!(index.known([PN]), ChatKnown::True);
}

#[test]
fn pins_and_deletes_from_other_devices_are_followed() {
    let mut index = ChatIndex::new(100);
    index.apply(&message(PN, None, "P1", 1_000, false));
    index.apply(&pin(PN, true));
    assert!(index.find(PN).unwrap().pinned);
    let deleted = |up_to_s| {
        Event::DeleteChatUpdate(
            DeleteChatUpdate::builder()
                .jid(jid(PN))
                .delete_media(false)
                .timestamp(chrono::Utc::now())
                .action(Box::new(wa::sync_action_value::DeleteChatAction {
                    message_range: Some(whatsapp_rust::message_range(up_to_s, None, vec![])).into(),
                }))
                .from_full_sync(false)
                .build(),
        )
    };
    index.apply(&deleted(999));
    let kept = index.find(PN).expect("a newer message keeps the chat");
    assert!(!kept.pinned, "but not its pin");
    index.apply(&deleted(1_000));
    assert!(index.find(PN).is_none());
}

#[test]
fn the_index_is_bounded_and_then_no_longer_says_false() {
    let mut index = ChatIndex::new(10);
    index.synced();
    for n in 0..12 {
        let chat = format!("55119000000{n:02}@s.whatsapp.net");
        index.apply(&message(&chat, None, "M", 1_000 + n, false));
    }
    assert!(index.len() <= 10, "{}", index.len());
    assert!(
        index.find("5511900000011@s.whatsapp.net").is_some(),
        "the newest stay"
    );
    assert!(
        index.find("5511900000000@s.whatsapp.net").is_none(),
        "the quietest go"
    );
    assert!(index.coverage().overflowed);
    assert_eq!(
        index.known(["5511900000000@s.whatsapp.net"]),
        ChatKnown::Unknown
    );
}

/// The index survives a restart: saved to the session's SQLite file, read back, and a chat
/// removed since is gone from the file too.
#[tokio::test]
async fn the_index_is_kept_in_the_session_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = super::super::chat_store::ChatStore::File(dir.path().join("one.db"));
    let mut index = store.load(100).await.unwrap();
    assert!(index.is_empty());
    index.apply(&message(LID, Some(PN), "A1", 1_700_000_000, false));
    index.apply(&message(GROUP, None, "G1", 1_700_000_001, false));
    index.synced();
    store.save(index.changes()).await.unwrap();
    index.deleted(GROUP, 1_700_000_001);
    store.save(index.changes()).await.unwrap();

    let again = store.load(100).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again.find(PN), index.find(PN));
    assert!(again.coverage().synced);
    assert_eq!(again.known([GROUP]), ChatKnown::False);
}

/// A chat learnt under its phone number, then under its LID before the two were known to be
/// one: the message that names both makes them one entry, under the key it came with.
#[test]
fn two_entries_of_one_chat_become_one_when_their_twin_is_learnt() {
    let mut index = ChatIndex::new(100);
    index.apply(&message(PN, None, "OLD", 1_000, false));
    index.apply(&message(LID, None, "NEW", 2_000, false));
    assert_eq!(index.len(), 2);
    index.apply(&message(LID, Some(PN), "NEWER", 3_000, false));
    assert_eq!(index.len(), 1);
    let chat = index.find(PN).unwrap();
    assert_eq!(chat.jid, LID);
    assert_eq!(chat.last_key.as_ref().unwrap().id, "NEWER");
    assert_eq!(
        index.changes().removed,
        [PN.to_owned()],
        "the old entry goes from the store"
    );
}

/// In history sync too, a system message (a stub, no content) is not the last message named.
#[test]
fn a_system_message_in_history_is_not_the_last_message_named() {
    let mut with_stub = conversation(GROUP, None, Some(("REAL", 100)));
    with_stub.messages.push(wa::HistorySyncMsg {
        message: Some(wa::WebMessageInfo {
            key: Some(wa::MessageKey {
                id: Some("STUB".into()),
                ..Default::default()
            })
            .into(),
            message_timestamp: Some(200),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    });
    let chat = from_conversation(&with_stub).unwrap();
    assert_eq!(chat.last_key.unwrap().id, "REAL");
    assert_eq!(chat.last_s, 100);
}

/// A chunk that does not read to its end never makes the chat list whole: a wrong `false`
/// would say a chat the phone holds is not there.
#[test]
fn a_torn_history_chunk_never_completes_the_chat_list() {
    use wa::history_sync::HistorySyncType;
    let whole = history(
        vec![conversation(LID, None, Some(("H1", 1_600_000_000)))],
        HistorySyncType::InitialBootstrap,
        Some(100),
    );
    assert!(from_history(&whole).chat_list_complete);
    let raw = whole.decompress().unwrap();
    let torn = &raw[..raw.len() - 3];
    let torn = LazyHistorySync::new(
        zlib_stored(torn),
        torn.len(),
        HistorySyncType::InitialBootstrap as i32,
        Some(1),
        Some(100),
    );
    let read = from_history(&torn);
    assert!(!read.chat_list_complete);
}
