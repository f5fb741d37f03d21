//! The app-state mutations the worker sends (`deleteChat`, and `pin_v1` to unpin), built here
//! (not inside the crate's helpers) so that what the worker sends is exactly what the golden
//! vectors check.

use whatsapp_rust::waproto::whatsapp as wa;
use whatsapp_rust::{Jid, message_range, schemas};

use crate::contract::{ChatJid, JidServer};

/// The crate's JID for a validated chat, device-free by construction.
pub(crate) fn to_jid(chat: &ChatJid) -> Jid {
    let user = chat.user().to_owned();
    match chat.server() {
        JidServer::Phone => Jid::pn(user),
        JidServer::Lid => Jid::lid(user),
        JidServer::Group => Jid::group(user),
    }
}

/// The last message of a chat a delete covers: WhatsApp Web deletes the whole chat only when
/// the range encloses every message it holds, so a message newer than this keeps the chat.
#[derive(Debug, Clone, PartialEq)]
pub struct Range {
    /// Unix seconds.
    pub last_message_s: i64,
    /// The last message's key, when the chat index has it (what the apps send).
    pub last_key: Option<wa::MessageKey>,
}

impl Range {
    /// A range that ends at `at_ms`, with no message known (what WhatsApp Web and whatsmeow
    /// send when they know no better).
    pub fn until(at_ms: i64) -> Self {
        Self {
            last_message_s: at_ms.div_euclid(1000),
            last_key: None,
        }
    }
}

/// One app-state mutation the worker sends: `deleteChat`, or the `pin_v1` that unpins the chat
/// deleted (as WhatsApp Web does, so a chat that comes back does not come back pinned).
#[derive(Debug, Clone)]
pub struct Mutation {
    schema: &'static schemas::Schema,
    args: Vec<String>,
    pub value: wa::SyncActionValue,
}

/// The index's media flag asks every linked device (the phone too) to delete the chat's media.
/// The API this worker mirrors says the phone's storage is independent and `deleteMedia` only
/// concerns the service's own media, so it is never set.
const KEEP_MEDIA_ON_DEVICES: &str = "0";

impl Mutation {
    /// Deletes `jid`'s chat up to `range`; `at_ms` stamps the action (the command's first-seen
    /// time, so every try sends the same bytes).
    pub fn delete_chat(jid: &Jid, range: &Range, at_ms: i64) -> Self {
        let messages = match &range.last_key {
            Some(key) => vec![(key.clone(), range.last_message_s)],
            None => vec![],
        };
        let range = message_range(range.last_message_s, None, messages);
        let value = wa::SyncActionValue {
            delete_chat_action: Some(wa::sync_action_value::DeleteChatAction {
                message_range: Some(range).into(),
            })
            .into(),
            timestamp: Some(at_ms),
            ..Default::default()
        };
        Self {
            schema: &schemas::DELETE_CHAT,
            args: vec![jid.to_string(), KEEP_MEDIA_ON_DEVICES.to_owned()],
            value,
        }
    }

    /// Unpins `jid`'s chat.
    pub fn unpin(jid: &Jid, at_ms: i64) -> Self {
        let value = wa::SyncActionValue {
            pin_action: Some(wa::sync_action_value::PinAction {
                pinned: Some(false),
            })
            .into(),
            timestamp: Some(at_ms),
            ..Default::default()
        };
        Self {
            schema: &schemas::PIN,
            args: vec![jid.to_string()],
            value,
        }
    }

    /// The schema's index arguments in order (`deleteChat`: chat JID, media flag).
    pub fn index_args(&self) -> Vec<&str> {
        self.args.iter().map(String::as_str).collect()
    }

    pub fn schema(&self) -> &'static schemas::Schema {
        self.schema
    }

    /// The index as the crate builds it (its own builder is crate-private): the schema's parts,
    /// literals in place and `args` for the rest.
    #[cfg(test)]
    pub(crate) fn index_parts<'a>(schema: &'a schemas::Schema, args: &[&'a str]) -> Vec<&'a str> {
        let mut args = args.iter();
        schema
            .index_parts
            .iter()
            .map(|part| match part {
                schemas::IndexPart::Literal { value } => *value,
                _ => args.next().expect("an argument per part"),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    //! Golden vectors from Baileys (`tests/fixtures/golden/`, see its README), a client known to
    //! work with WhatsApp. The worker's mutation must carry exactly what Baileys' does: the same
    //! index bytes and index MAC, and a value that the crate's own decoder, validating every
    //! MAC, reads out of Baileys' patch field for field. Baileys' LT hash, snapshot MAC and
    //! patch MAC are recomputed by the crate's code from Baileys' bytes.
    //!
    //! One byte-level difference is expected and pinned: the crate (like whatsmeow) writes the
    //! empty `padding` of `SyncActionData` as an explicit empty field (`1a 00`), Baileys omits
    //! it; both decode to the same message and WhatsApp accepts both. So the encrypted value
    //! differs from Baileys' by those two plaintext bytes, and everything else is compared
    //! byte for byte.

    use serde_json::Value;
    use whatsapp_rust::wacore::appstate::decode::decode_record;
    use whatsapp_rust::wacore::appstate::encode::encode_record;
    use whatsapp_rust::wacore::appstate::hash::{HashState, generate_patch_mac};
    use whatsapp_rust::wacore::appstate::keys::{ExpandedAppStateKeys, expand_app_state_keys};
    use whatsapp_rust::waproto::codec;
    use whatsapp_rust::waproto::whatsapp as wa;

    use super::*;
    use crate::contract::normalise_number;

    const FIXTURE: &str = include_str!("../../../tests/fixtures/golden/delete_chat.json");
    const SET: wa::syncd_mutation::SyncdOperation = wa::syncd_mutation::SyncdOperation::SET;
    const COLLECTION: &str = "regular_high";

    struct Golden {
        cases: Vec<Value>,
        keys: ExpandedAppStateKeys,
        key_id: Vec<u8>,
        iv: [u8; 16],
        now_ms: i64,
    }

    fn golden() -> Golden {
        let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
        let inputs = &fixture["inputs"];
        let now_ms = inputs["sync_action_timestamp"].as_i64().unwrap();
        assert_eq!(
            now_ms / 1000,
            inputs["last_message_timestamp"].as_i64().unwrap()
        );
        Golden {
            cases: fixture["cases"].as_array().unwrap().clone(),
            keys: expand_app_state_keys(&bytes(&inputs["app_state_key_data"])),
            key_id: bytes(&inputs["app_state_key_id"]),
            iv: bytes(&inputs["iv"]).try_into().unwrap(),
            now_ms,
        }
    }

    fn bytes(v: &Value) -> Vec<u8> {
        hex::decode(v.as_str().unwrap()).unwrap()
    }

    /// The index JSON the crate builds for a `deleteChat`.
    fn index_json(args: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&Mutation::index_parts(&schemas::DELETE_CHAT, args)).unwrap()
    }

    fn record(mutation: &wa::SyncdMutation) -> &wa::SyncdRecord {
        mutation.record.as_option().unwrap()
    }

    /// Checks one case against the worker's value under `index`.
    fn check(golden: &Golden, case: &Value, index: &[u8], value: &wa::SyncActionValue) {
        let name = case["name"].as_str().unwrap();
        let version = schemas::DELETE_CHAT.version;
        assert_eq!(case["collection"], COLLECTION, "{name}");
        assert_eq!(case["action_version"], version, "{name}");
        assert_eq!(
            std::str::from_utf8(index).unwrap(),
            case["index_json"].as_str().unwrap(),
            "{name}: index"
        );

        // Ours, through the crate's encoder, with the fixture's key and IV.
        let (ours, _) = encode_record(
            SET,
            index,
            value,
            &golden.keys,
            &golden.key_id,
            &golden.iv,
            version as i32,
        );
        let ours = record(&ours);
        let index_mac = ours.index.as_option().unwrap().blob.clone().unwrap();
        assert_eq!(
            hex::encode(index_mac),
            case["index_mac"].as_str().unwrap(),
            "{name}"
        );

        // Baileys' patch: the crate recomputes its LT hash and MACs, and decodes it with every
        // MAC validated into exactly our action.
        let patch = codec::syncd_patch_decode(&bytes(&case["patch_bytes"])).unwrap();
        assert_eq!(patch.mutations.len(), 1, "{name}");
        let mut state = HashState::default();
        let (_, updated) = state.update_hash(&patch.mutations, |_, _| Ok(None));
        updated.unwrap();
        state.version += 1;
        assert_eq!(state.version, case["patch_version"].as_u64().unwrap());
        assert_eq!(
            hex::encode(state.hash),
            case["lt_hash"].as_str().unwrap(),
            "{name}"
        );
        let snapshot_mac = state.generate_snapshot_mac(COLLECTION, &golden.keys.snapshot_mac);
        assert_eq!(
            hex::encode(&snapshot_mac),
            case["snapshot_mac"].as_str().unwrap()
        );
        let patch_mac =
            generate_patch_mac(&patch, COLLECTION, &golden.keys.patch_mac, state.version);
        assert_eq!(
            hex::encode(patch_mac),
            case["patch_mac"].as_str().unwrap(),
            "{name}"
        );
        let theirs = record(&patch.mutations[0]);
        let (decoded, macs) = decode_record(SET, theirs, &golden.keys, &golden.key_id, true)
            .unwrap_or_else(|e| panic!("{name}: the crate refuses Baileys' record: {e}"));
        assert_eq!(
            hex::encode(&macs.value_mac),
            case["value_mac"].as_str().unwrap()
        );
        assert_eq!(decoded.action_value.as_ref(), Some(value), "{name}: value");
        let parts: Vec<String> = serde_json::from_slice(index).unwrap();
        assert_eq!(decoded.index, parts, "{name}: index parts");

        // The plaintexts differ only by the explicit empty padding.
        let plain = |blob: &[u8]| {
            let (iv, rest) = blob.split_at(16);
            let mut out = Vec::new();
            let ciphertext = &rest[..rest.len() - 32];
            whatsapp_rust::wacore::libsignal::crypto::aes_256_cbc_decrypt_into(
                ciphertext,
                &golden.keys.value_encryption,
                iv,
                &mut out,
            )
            .unwrap();
            out
        };
        let their_blob = theirs.value.as_option().unwrap().blob.clone().unwrap();
        assert_eq!(
            hex::encode(&their_blob),
            case["value_blob"].as_str().unwrap()
        );
        let their_plain = plain(&their_blob);
        assert_eq!(
            hex::encode(&their_plain),
            case["sync_action_data"].as_str().unwrap()
        );
        let our_blob = ours.value.as_option().unwrap().blob.clone().unwrap();
        assert!(our_blob.starts_with(&golden.iv));
        let our_plain = plain(&our_blob);
        let version_field = [0x20, version as u8];
        assert!(their_plain.ends_with(&version_field) && our_plain.ends_with(&version_field));
        let mut expected = their_plain[..their_plain.len() - 2].to_vec();
        expected.extend_from_slice(&[0x1a, 0x00]);
        expected.extend_from_slice(&version_field);
        assert_eq!(
            hex::encode(&our_plain),
            hex::encode(expected),
            "{name}: plaintext"
        );
        let ours_decoded = codec::sync_action_data_decode(&our_plain).unwrap();
        let theirs_decoded = codec::sync_action_data_decode(&their_plain).unwrap();
        assert_eq!(ours_decoded.index, theirs_decoded.index);
        assert_eq!(ours_decoded.value, theirs_decoded.value);
        assert_eq!(ours_decoded.version, theirs_decoded.version);
        assert!(ours_decoded.padding.unwrap_or_default().is_empty());
        assert!(theirs_decoded.padding.unwrap_or_default().is_empty());
    }

    fn worker_mutation(golden: &Golden, case: &Value) -> Mutation {
        let chat = normalise_number(case["jid"].as_str().unwrap()).unwrap();
        Mutation::delete_chat(&to_jid(&chat), &Range::until(golden.now_ms), golden.now_ms)
    }

    /// PN, LID and group chats: the worker's own mutations.
    #[test]
    fn golden_delete_chat_mutations_match_baileys() {
        let golden = golden();
        let mut checked = 0;
        for case in golden.cases.iter().filter(|c| c["media_flag"] == "0") {
            let mutation = worker_mutation(&golden, case);
            check(
                &golden,
                case,
                &index_json(&mutation.index_args()),
                &mutation.value,
            );
            checked += 1;
        }
        assert_eq!(checked, 3, "pn, lid and group");
    }

    /// The media flag encodes as Baileys does, and the worker never sets it: a command with
    /// `deleteMedia: true` sends the same mutation as one without.
    #[test]
    fn golden_the_media_flag_encodes_like_baileys_and_the_worker_never_sets_it() {
        let golden = golden();
        let mut checked = 0;
        for case in golden.cases.iter().filter(|c| c["media_flag"] == "1") {
            let mutation = worker_mutation(&golden, case);
            let [jid, flag] = mutation.index_args()[..] else {
                panic!("deleteChat has two index arguments")
            };
            assert_eq!(flag, "0", "the phone is never asked to delete media");
            check(&golden, case, &index_json(&[jid, "1"]), &mutation.value);
            checked += 1;
        }
        assert_eq!(checked, 3);
    }

    #[test]
    fn validated_chats_map_to_device_free_crate_jids() {
        for (input, server) in [
            ("5511999999999", whatsapp_rust::Server::Pn),
            ("123456789012345@lid", whatsapp_rust::Server::Lid),
            ("120363024567890123@g.us", whatsapp_rust::Server::Group),
        ] {
            let chat = normalise_number(input).unwrap();
            let jid = to_jid(&chat);
            assert_eq!(jid.to_string(), chat.as_str());
            assert_eq!(jid.server, server);
            assert_eq!(jid.device, 0);
        }
    }
}
