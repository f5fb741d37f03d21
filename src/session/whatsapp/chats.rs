//! The instance's chat index: the chats the phone holds, under which key (a LID or a phone
//! number, and its twin), each one's last message (time and key) and whether it is pinned.
//! Metadata only, never a message's content. It is filled from history sync (the phone's chat
//! list, sent once at pairing), live messages and app-state updates (pins; deletes made on
//! other devices), kept in the session store (`chat_store.rs` beside it) and bounded.
//!
//! It decides what a delete names and covers: the key the phone holds, and the chat's last
//! message as of the command's first-seen time (the range the apps send). And what a 200 says
//! in `chat_known`: `true` when the index holds the chat; `false` when it holds the phone's
//! whole chat list and not this chat; `unknown` before that list has arrived (a session paired
//! before the index existed learns chats only as messages come) or once it overflowed.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use whatsapp_rust::Jid;
use whatsapp_rust::types::events::{Event, LazyHistorySync};
use whatsapp_rust::waproto::whatsapp as wa;

use super::mutation::Range;
use crate::contract::{ChatKnown, normalise_number};

/// The key of a chat's last message (no content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageKey {
    pub id: String,
    pub from_me: bool,
    /// The sender, in a group, of a message not sent by us.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participant: Option<String>,
}

/// One chat the phone holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chat {
    /// The key the phone holds it under (`…@s.whatsapp.net`, `…@lid` or `…@g.us`).
    pub jid: String,
    /// The same person under the other addressing (phone number for a LID, and back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin: Option<String>,
    /// The last message's time, Unix seconds (0: none known).
    pub last_s: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_key: Option<MessageKey>,
    #[serde(default)]
    pub pinned: bool,
}

impl Chat {
    fn new(jid: String, twin: Option<String>) -> Self {
        Self {
            jid,
            twin,
            last_s: 0,
            last_key: None,
            pinned: false,
        }
    }

    /// The range a delete of this chat sends when the command was first seen at `seen_ms`:
    /// its last message if it came before; otherwise (a message arrived since, and what came
    /// before it is not known) up to the first-seen time, so the newer message keeps the chat.
    pub fn range_as_of(&self, seen_ms: i64) -> Range {
        let seen_s = seen_ms.div_euclid(1000);
        match &self.last_key {
            Some(key) if self.last_s > 0 && self.last_s <= seen_s => Range {
                last_message_s: self.last_s,
                last_key: Some(wa::MessageKey {
                    remote_jid: Some(self.jid.clone()),
                    from_me: Some(key.from_me),
                    id: Some(key.id.clone()),
                    participant: key.participant.clone(),
                }),
            },
            _ => Range::until(seen_ms),
        }
    }
}

/// What the index knows of the phone's chat list as a whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    /// The phone's chat list arrived (history sync's initial bootstrap, to its end).
    pub synced: bool,
    /// Chats were dropped to stay within the bound: an absent chat may still exist.
    pub overflowed: bool,
}

/// What changed since the last save.
#[derive(Debug, Default)]
pub struct Changes {
    pub upserts: Vec<Chat>,
    pub removed: Vec<String>,
    pub coverage: Option<Coverage>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removed.is_empty() && self.coverage.is_none()
    }
}

/// The index of one instance.
#[derive(Debug)]
pub struct ChatIndex {
    chats: HashMap<String, Chat>,
    /// Twin key to the key the chat is held under.
    twins: HashMap<String, String>,
    coverage: Coverage,
    max: usize,
    dirty: HashSet<String>,
    coverage_dirty: bool,
}

impl ChatIndex {
    pub fn new(max: usize) -> Self {
        Self {
            chats: HashMap::new(),
            twins: HashMap::new(),
            coverage: Coverage::default(),
            max: max.max(1),
            dirty: HashSet::new(),
            coverage_dirty: false,
        }
    }

    /// The index as saved (nothing to save yet).
    pub fn restore(chats: Vec<Chat>, coverage: Coverage, max: usize) -> Self {
        let mut index = Self::new(max);
        index.coverage = coverage;
        for chat in chats {
            index.put(chat);
        }
        // Only what changes from here on is saved (a lowered bound's removals included).
        index.dirty.clear();
        index.bound();
        index
    }

    pub fn len(&self) -> usize {
        self.chats.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chats.is_empty()
    }

    pub fn coverage(&self) -> Coverage {
        self.coverage
    }

    /// The chat held under `jid`, or under its twin.
    pub fn find(&self, jid: &str) -> Option<&Chat> {
        self.chats
            .get(jid)
            .or_else(|| self.twins.get(jid).and_then(|key| self.chats.get(key)))
    }

    /// The first of `jids` the index holds.
    pub fn find_any<'a>(&self, jids: impl IntoIterator<Item = &'a str>) -> Option<&Chat> {
        jids.into_iter().find_map(|jid| self.find(jid))
    }

    /// Whether the phone holds a chat under one of `jids`.
    pub fn known<'a>(&self, jids: impl IntoIterator<Item = &'a str>) -> ChatKnown {
        if self.find_any(jids).is_some() {
            ChatKnown::True
        } else if self.coverage.synced && !self.coverage.overflowed {
            ChatKnown::False
        } else {
            ChatKnown::Unknown
        }
    }

    /// A message in `jid`'s chat (its twin, when the message names one).
    pub fn message(&mut self, jid: &str, twin: Option<&str>, at_s: i64, key: MessageKey) {
        let mut chat = self.take_for(jid, twin);
        if at_s >= chat.last_s {
            chat.last_s = at_s;
            chat.last_key = Some(key);
        }
        self.put(chat);
        self.bound();
    }

    /// A chat of the phone's chat list (history sync): what it says of the last message and
    /// the pin replaces nothing newer.
    pub fn conversation(&mut self, from_phone: Chat) {
        let mut chat = self.take_for(&from_phone.jid, from_phone.twin.as_deref());
        if from_phone.last_s >= chat.last_s {
            chat.last_s = from_phone.last_s;
            chat.last_key = from_phone.last_key;
        }
        chat.pinned = from_phone.pinned;
        self.put(chat);
    }

    /// The chat was pinned or unpinned on a device.
    pub fn pin(&mut self, jid: &str, pinned: bool) {
        if self.find(jid).is_none() && !pinned {
            return;
        }
        let mut chat = self.take_for(jid, None);
        chat.pinned = pinned;
        self.put(chat);
        self.bound();
    }

    /// The chat was deleted up to `up_to_s`: gone, unless a later message keeps it.
    pub fn deleted(&mut self, jid: &str, up_to_s: i64) {
        let Some(key) = self.find(jid).map(|chat| chat.jid.clone()) else {
            return;
        };
        if let Some(chat) = self.chats.get_mut(&key)
            && chat.last_s > up_to_s
        {
            // A newer message keeps the chat; it is no longer pinned.
            chat.pinned = false;
            self.dirty.insert(key);
            return;
        }
        self.remove(&key);
    }

    /// The phone's chat list has arrived whole.
    pub fn synced(&mut self) {
        if !self.coverage.synced {
            self.coverage.synced = true;
            self.coverage_dirty = true;
        }
    }

    /// What changed since the last call.
    pub fn changes(&mut self) -> Changes {
        let mut changes = Changes::default();
        for key in std::mem::take(&mut self.dirty) {
            match self.chats.get(&key) {
                Some(chat) => changes.upserts.push(chat.clone()),
                None => changes.removed.push(key),
            }
        }
        if std::mem::take(&mut self.coverage_dirty) {
            changes.coverage = Some(self.coverage);
        }
        changes
    }

    /// Takes the chat held under `jid` or `twin` (or under either's twin) out of the index,
    /// keyed by `jid` from now on: the latest addressing is the one the phone uses. Two
    /// entries that turn out to be one chat (learnt under each key before the twin was known)
    /// become one, with the newer last message.
    fn take_for(&mut self, jid: &str, twin: Option<&str>) -> Chat {
        let mut held: Vec<String> = [Some(jid), twin]
            .into_iter()
            .flatten()
            .filter_map(|k| self.find(k).map(|chat| chat.jid.clone()))
            .collect();
        held.dedup();
        let mut chat = Chat::new(jid.to_owned(), None);
        for key in held {
            let Some(found) = self.remove(&key) else {
                continue;
            };
            if found.last_s >= chat.last_s {
                chat.last_s = found.last_s;
                chat.last_key = found.last_key;
            }
            chat.pinned |= found.pinned;
            let other = if found.jid == jid {
                found.twin
            } else {
                Some(found.jid)
            };
            chat.twin = chat.twin.or(other);
        }
        if let Some(twin) = twin.filter(|t| *t != jid) {
            chat.twin = Some(twin.to_owned());
        }
        chat
    }

    fn put(&mut self, chat: Chat) {
        if let Some(twin) = &chat.twin {
            self.twins.insert(twin.clone(), chat.jid.clone());
        }
        self.dirty.insert(chat.jid.clone());
        self.chats.insert(chat.jid.clone(), chat);
    }

    fn remove(&mut self, key: &str) -> Option<Chat> {
        let chat = self.chats.remove(key)?;
        if let Some(twin) = &chat.twin {
            self.twins.remove(twin);
        }
        self.dirty.insert(key.to_owned());
        Some(chat)
    }

    /// Drops the chats quiet the longest, down to nine tenths of the bound, once it is passed.
    fn bound(&mut self) {
        if self.chats.len() <= self.max {
            return;
        }
        let mut by_age: Vec<(i64, String)> = self
            .chats
            .values()
            .map(|chat| (chat.last_s, chat.jid.clone()))
            .collect();
        by_age.sort_unstable();
        let keep = self.max - self.max / 10;
        let drop = by_age.len().saturating_sub(keep);
        for (_, key) in by_age.into_iter().take(drop) {
            self.remove(&key);
        }
        if !self.coverage.overflowed {
            self.coverage.overflowed = true;
            self.coverage_dirty = true;
        }
    }

    /// Applies an event the client delivered; history sync is read apart ([`from_history`]),
    /// off the async threads.
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Messages(batch) => {
                for message in batch.iter() {
                    if let Some((jid, twin, at_s, key)) = from_message(message) {
                        self.message(&jid, twin.as_deref(), at_s, key);
                    }
                }
            }
            Event::PinUpdate(update) => {
                if let Some(jid) = key_of(&update.jid) {
                    self.pin(&jid, update.action.pinned.unwrap_or(false));
                }
            }
            Event::DeleteChatUpdate(update) => {
                let range = update.action.message_range.as_option();
                let up_to_s = range
                    .and_then(|r| r.last_message_timestamp)
                    .unwrap_or(update.timestamp.timestamp());
                if let Some(jid) = key_of(&update.jid) {
                    self.deleted(&jid, up_to_s);
                }
            }
            _ => {}
        }
    }

    /// Merges what a history sync chunk said.
    pub fn merge(&mut self, history: History) {
        for chat in history.chats {
            self.conversation(chat);
        }
        if history.chat_list_complete {
            self.synced();
        }
        self.bound();
    }
}

/// The index key of a chat JID: the contract's normal form; `None` for what is not a chat a
/// command can name (status, broadcast lists, newsletters).
fn key_of(jid: &Jid) -> Option<String> {
    normalise_number(&jid.to_non_ad_string()).map(|chat| chat.as_str().to_owned())
}

fn key_of_text(jid: &str) -> Option<String> {
    jid.parse::<Jid>().ok().as_ref().and_then(key_of)
}

/// Whether a message shows in its chat as one (the apps name only those as a chat's last
/// message): not a protocol message (key shares, revokes, edits, history notifications), a
/// reaction, a poll vote, a keep or an in-chat pin, nor one that carries only a sender key.
fn shows_in_chat(message: &wa::Message) -> bool {
    let not_shown = message.protocol_message.as_option().is_some()
        || message.reaction_message.as_option().is_some()
        || message.enc_reaction_message.as_option().is_some()
        || message.poll_update_message.as_option().is_some()
        || message.keep_in_chat_message.as_option().is_some()
        || message.pin_in_chat_message.as_option().is_some()
        || message.enc_event_response_message.as_option().is_some();
    if not_shown {
        return false;
    }
    let mut content = message.clone();
    content.sender_key_distribution_message = Default::default();
    content.fast_ratchet_key_sender_key_distribution_message = Default::default();
    content.message_context_info = Default::default();
    content != wa::Message::default()
}

/// The chat, its twin, the time and the key of a live message; `None` for one that does not
/// show in its chat, or a chat no command can name.
fn from_message(
    message: &whatsapp_rust::types::events::InboundMessage,
) -> Option<(String, Option<String>, i64, MessageKey)> {
    if !shows_in_chat(&message.message) {
        return None;
    }
    let source = &message.info.source;
    let jid = key_of(&source.chat)?;
    let group = source.chat.server == whatsapp_rust::Server::Group;
    let twin = if group {
        None
    } else {
        let alt = if source.is_from_me {
            source.recipient_alt.as_ref()
        } else {
            source.sender_alt.as_ref()
        };
        alt.and_then(key_of)
            .filter(|alt| alt.ends_with("@lid") != jid.ends_with("@lid"))
    };
    let participant = (group && !source.is_from_me).then(|| source.sender.to_non_ad_string());
    let key = MessageKey {
        id: message.info.id.clone(),
        from_me: source.is_from_me,
        participant,
    };
    Some((jid, twin, message.info.timestamp.timestamp(), key))
}

/// What one history sync chunk says of the chat list.
#[derive(Debug, Default)]
pub struct History {
    pub chats: Vec<Chat>,
    /// The chunk ends the initial bootstrap: the index now holds the whole chat list.
    pub chat_list_complete: bool,
}

/// Reads a history sync chunk off the async threads (a chunk is megabytes of compressed
/// protobuf) and merges what it says into `index`.
pub async fn merge_history(index: &Mutex<ChatIndex>, sync: &LazyHistorySync) {
    let sync = sync.clone();
    if let Ok(history) = tokio::task::spawn_blocking(move || from_history(&sync)).await {
        index.lock().expect("index lock").merge(history);
    }
}

/// Reads a history sync chunk's conversations, one at a time, keeping only their metadata.
/// Blocking: run it off the async threads.
pub fn from_history(sync: &LazyHistorySync) -> History {
    let mut history = History {
        chats: Vec::new(),
        chat_list_complete: sync.sync_type()
            == wa::history_sync::HistorySyncType::InitialBootstrap as i32
            && sync.progress().is_some_and(|p| p >= 100),
    };
    let mut stream = sync.stream();
    loop {
        match stream.next_conversation() {
            Ok(Some(conversation)) => history.chats.extend(from_conversation(&conversation)),
            Ok(None) => break,
            Err(error) => {
                // What was read is kept; a chunk that did not read whole never makes the list
                // whole (chat_known stays unknown rather than a wrong false).
                tracing::warn!(%error, "A history sync chunk could not be read to its end.");
                history.chat_list_complete = false;
                break;
            }
        }
    }
    history
}

fn from_conversation(conversation: &wa::Conversation) -> Option<Chat> {
    let jid = key_of_text(&conversation.id)?;
    let twin = if jid.ends_with("@lid") {
        conversation.pn_jid.as_deref()
    } else if jid.ends_with("@s.whatsapp.net") {
        conversation.lid_jid.as_deref()
    } else {
        None
    }
    .and_then(key_of_text);
    let mut chat = Chat::new(jid, twin);
    for message in &conversation.messages {
        // A system message (a stub: no content) or one not shown is not the last message the
        // apps name.
        let Some(info) = message.message.as_option() else {
            continue;
        };
        if !info.message.as_option().is_some_and(shows_in_chat) {
            continue;
        }
        let at_s = info.message_timestamp.unwrap_or(0) as i64;
        let Some(key) = info.key.as_option() else {
            continue;
        };
        if at_s >= chat.last_s
            && let Some(id) = &key.id
        {
            chat.last_s = at_s;
            chat.last_key = Some(MessageKey {
                id: id.clone(),
                from_me: key.from_me.unwrap_or(false),
                participant: key.participant.clone().or(info.participant.clone()),
            });
        }
    }
    let listed = conversation
        .last_msg_timestamp
        .or(conversation.conversation_timestamp)
        .unwrap_or(0) as i64;
    if listed > chat.last_s {
        // A newer message than the chunk carries: its key is unknown.
        chat.last_s = listed;
        chat.last_key = None;
    }
    chat.pinned = conversation.pinned.unwrap_or(0) > 0;
    Some(chat)
}

#[cfg(test)]
#[path = "chats_tests.rs"]
pub(crate) mod tests;
