//! WhatsApp sessions in PostgreSQL (the real server on this machine): the storage traits behave
//! as the crate's own SQLite store does (the same assertions run against both), and a writer
//! whose ownership is older than the session's current opener is refused by the database.

use std::sync::Arc;
use std::time::Duration;

use chat_delete_worker::contract::normalise_number;
use chat_delete_worker::fence::Lease;
use chat_delete_worker::session::postgres::PgSessions;
use chat_delete_worker::session::whatsapp;
use chat_delete_worker::session::{
    ChatSession, SessionError, SessionOptions, SessionState, SessionStore, WhatsappSession,
};
use whatsapp_rust::Jid;
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::store::SqliteStore;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::store::traits::{
    AppStateSyncKey, AppSyncStore, Backend, DeviceInfo, DeviceListRecord, DeviceStore,
    LidPnMappingEntry, MsgSecretEntry, MsgSecretStore, ProtocolStore, SignalStore,
};

fn postgres_url() -> String {
    std::env::var("CDW_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn mapping(lid: &str, phone: &str, updated_at: i64) -> LidPnMappingEntry {
    LidPnMappingEntry {
        lid: lid.into(),
        phone_number: phone.into(),
        created_at: 1,
        updated_at,
        learning_source: "usync".into(),
    }
}

/// What the client relies on, asked through the traits only.
async fn exercise(store: &dyn Backend) {
    // Device: created once, then saved and loaded whole.
    assert!(!store.exists().await.unwrap());
    store.create().await.unwrap();
    assert!(store.exists().await.unwrap());
    let mut device = store.load().await.unwrap().expect("a created device loads");
    device.push_name = "Clean-up bot".into();
    device.registration_id = 4242;
    store.save(&device).await.unwrap();
    let loaded = store.load().await.unwrap().unwrap();
    assert_eq!(loaded.push_name, "Clean-up bot");
    assert_eq!(loaded.registration_id, 4242);
    assert_eq!(
        loaded.identity_key.public_key.public_key_bytes(),
        device.identity_key.public_key.public_key_bytes()
    );

    // Identities and sessions.
    let address = "5511999990001.0:1";
    store.put_identity(address, [7; 32]).await.unwrap();
    assert_eq!(store.load_identity(address).await.unwrap(), Some([7; 32]));
    store.delete_identity(address).await.unwrap();
    assert_eq!(store.load_identity(address).await.unwrap(), None);
    let first: Arc<str> = "5511999990001@s.whatsapp.net.0".into();
    store
        .put_sessions_batch(&[(first.clone(), Bytes::from_static(b"one"))])
        .await
        .unwrap();
    store.put_session(&first, b"two").await.unwrap();
    assert_eq!(
        store.get_session(&first).await.unwrap(),
        Some(Bytes::from_static(b"two"))
    );
    assert!(store.has_session(&first).await.unwrap());
    store.delete_session(&first).await.unwrap();
    assert!(!store.has_session(&first).await.unwrap());

    // Prekeys: the highest id, the uploaded flag, removal.
    assert_eq!(store.get_max_prekey_id().await.unwrap(), 0);
    store
        .store_prekeys_batch(
            &[
                (9, Bytes::from_static(b"p9")),
                (10, Bytes::from_static(b"p10")),
            ],
            false,
        )
        .await
        .unwrap();
    store.store_prekey(2, b"p2", true).await.unwrap();
    assert_eq!(store.get_max_prekey_id().await.unwrap(), 10);
    store.mark_prekeys_uploaded(&[9, 10]).await.unwrap();
    assert_eq!(
        store.load_prekey(10).await.unwrap(),
        Some(Bytes::from_static(b"p10"))
    );
    store.remove_prekey(10).await.unwrap();
    assert_eq!(store.load_prekey(10).await.unwrap(), None);
    assert_eq!(store.get_max_prekey_id().await.unwrap(), 9);

    // Signed prekeys and sender keys.
    store.store_signed_prekey(3, b"s3").await.unwrap();
    store.store_signed_prekey(1, b"s1").await.unwrap();
    let mut all = store.load_all_signed_prekeys().await.unwrap();
    all.sort();
    assert_eq!(all, vec![(1, b"s1".to_vec()), (3, b"s3".to_vec())]);
    store.remove_signed_prekey(1).await.unwrap();
    assert_eq!(store.load_signed_prekey(1).await.unwrap(), None);
    store.put_sender_key("group::sender", b"sk").await.unwrap();
    assert_eq!(
        store.get_sender_key("group::sender").await.unwrap(),
        Some(b"sk".to_vec())
    );
    store.delete_sender_key("group::sender").await.unwrap();
    assert_eq!(store.get_sender_key("group::sender").await.unwrap(), None);

    // App state: sync keys, versions, mutation MACs.
    assert_eq!(store.get_latest_sync_key_id().await.unwrap(), None);
    let key = AppStateSyncKey {
        key_data: vec![1; 32],
        fingerprint: vec![4],
        timestamp: 99,
    };
    store.set_sync_key(&[0, 1], key.clone()).await.unwrap();
    store.set_sync_key(&[0, 2], key.clone()).await.unwrap();
    assert_eq!(
        store.get_sync_key(&[0, 2]).await.unwrap().unwrap().key_data,
        vec![1; 32]
    );
    assert_eq!(
        store.get_latest_sync_key_id().await.unwrap(),
        Some(vec![0, 2])
    );
    // The latest key is the highest key id (the crate's SQLite store's rule), not the last one
    // stored: keys arrive in any order (a key share, a resync, a migration).
    store.set_sync_key(&[0, 9], key.clone()).await.unwrap();
    store.set_sync_key(&[0, 3], key.clone()).await.unwrap();
    assert_eq!(
        store.get_latest_sync_key_id().await.unwrap(),
        Some(vec![0, 9]),
        "the highest key id is the latest"
    );
    assert_eq!(store.get_version("regular_high").await.unwrap().version, 0);
    let state = HashState {
        version: 17,
        ..Default::default()
    };
    store.set_version("regular_high", state).await.unwrap();
    assert_eq!(store.get_version("regular_high").await.unwrap().version, 17);
    let macs = [
        AppStateMutationMAC {
            index_mac: vec![1; 32],
            value_mac: vec![10],
        },
        AppStateMutationMAC {
            index_mac: vec![2; 32],
            value_mac: vec![20],
        },
    ];
    store
        .put_mutation_macs("regular_high", 17, &macs)
        .await
        .unwrap();
    assert_eq!(
        store
            .get_mutation_mac("regular_high", &[2; 32])
            .await
            .unwrap(),
        Some(vec![20])
    );
    let found = store
        .get_mutation_macs("regular_high", &[[1; 32], [3; 32]])
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    store
        .delete_mutation_macs("regular_high", &[vec![1; 32]])
        .await
        .unwrap();
    assert_eq!(
        store
            .get_mutation_mac("regular_high", &[1; 32])
            .await
            .unwrap(),
        None
    );
    store.clear_mutation_macs("regular_high").await.unwrap();
    assert_eq!(
        store
            .get_mutation_mac("regular_high", &[2; 32])
            .await
            .unwrap(),
        None
    );

    // Sender key devices of a group.
    let group = "120363000000000001@g.us";
    store
        .set_sender_key_status(group, &[("a:1@s.whatsapp.net", true), ("b:2@lid", false)])
        .await
        .unwrap();
    let mut devices = store.get_sender_key_devices(group).await.unwrap();
    devices.sort();
    assert_eq!(
        devices,
        vec![
            ("a:1@s.whatsapp.net".to_string(), true),
            ("b:2@lid".to_string(), false)
        ]
    );
    store
        .delete_sender_key_device_rows(&["b:2@lid"])
        .await
        .unwrap();
    assert_eq!(store.get_sender_key_devices(group).await.unwrap().len(), 1);
    store.clear_all_sender_key_devices().await.unwrap();
    assert!(
        store
            .get_sender_key_devices(group)
            .await
            .unwrap()
            .is_empty()
    );

    // LID <-> phone mappings: a LID that moves to another number leaves the old one.
    store
        .put_lid_mapping(&mapping("100001", "5511999990001", 10))
        .await
        .unwrap();
    store
        .put_lid_mappings(&[
            mapping("100002", "5511999990002", 20),
            mapping("100001", "5511999990003", 30),
        ])
        .await
        .unwrap();
    assert_eq!(
        store
            .get_lid_mapping("100001")
            .await
            .unwrap()
            .unwrap()
            .phone_number,
        "5511999990003"
    );
    assert_eq!(
        store
            .get_pn_mapping("5511999990002")
            .await
            .unwrap()
            .unwrap()
            .lid,
        "100002"
    );
    assert!(
        store
            .get_pn_mapping("5511999990001")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.get_all_lid_mappings().await.unwrap().len(), 2);

    // Base keys, device lists, group metadata.
    store.save_base_key("addr", "m1", b"base").await.unwrap();
    assert!(
        store
            .has_same_base_key("addr", "m1", b"base")
            .await
            .unwrap()
    );
    assert!(
        !store
            .has_same_base_key("addr", "m1", b"other")
            .await
            .unwrap()
    );
    store.delete_base_key("addr", "m1").await.unwrap();
    assert!(
        !store
            .has_same_base_key("addr", "m1", b"base")
            .await
            .unwrap()
    );
    let record = DeviceListRecord {
        user: "5511999990001".into(),
        devices: vec![DeviceInfo::new(0, None), DeviceInfo::new(3, Some(1))],
        timestamp: 5,
        phash: Some("2:abc".into()),
        raw_id: None,
    };
    store.update_device_list(record).await.unwrap();
    let got = store.get_devices("5511999990001").await.unwrap().unwrap();
    assert_eq!(got.devices.len(), 2);
    assert_eq!(got.phash.as_deref(), Some("2:abc"));
    store.delete_devices("5511999990001").await.unwrap();
    assert!(store.get_devices("5511999990001").await.unwrap().is_none());
    store.put_group_metadata(group, b"v1").await.unwrap();
    store.put_group_metadata(group, b"v2").await.unwrap();
    assert_eq!(
        store.get_group_metadata(group).await.unwrap(),
        Some(b"v2".to_vec())
    );

    // Trusted-contact tokens: each writer owns its field; newer wins; expiry needs both stale.
    store
        .touch_tc_token_sender_timestamp("100001@lid", 50)
        .await
        .unwrap();
    store
        .store_received_tc_token("100001@lid", b"tok", 40)
        .await
        .unwrap();
    store
        .touch_tc_token_sender_timestamp("100001@lid", 45)
        .await
        .unwrap();
    let token = store.get_tc_token("100001@lid").await.unwrap().unwrap();
    assert_eq!(
        (
            token.token.as_slice(),
            token.token_timestamp,
            token.sender_timestamp
        ),
        (&b"tok"[..], 40, Some(50))
    );
    store
        .store_received_tc_token("100001@lid", b"old", 30)
        .await
        .unwrap();
    assert_eq!(
        store
            .get_tc_token("100001@lid")
            .await
            .unwrap()
            .unwrap()
            .token,
        b"tok"
    );
    assert_eq!(
        store.get_all_tc_token_jids().await.unwrap(),
        vec!["100001@lid".to_string()]
    );
    assert_eq!(store.delete_expired_tc_tokens(41, 40).await.unwrap(), 0);
    assert_eq!(store.delete_expired_tc_tokens(41, 51).await.unwrap(), 1);

    // Sent messages are taken once.
    store
        .store_sent_message("chat", "id1", b"payload")
        .await
        .unwrap();
    assert_eq!(
        store.take_sent_message("chat", "id1").await.unwrap(),
        Some(b"payload".to_vec())
    );
    assert_eq!(store.take_sent_message("chat", "id1").await.unwrap(), None);

    // Message secrets: "never" and later deadlines win; expiry spares "never".
    let secret = |expires_at, message_ts| MsgSecretEntry {
        chat: "chat@s.whatsapp.net".into(),
        sender: "me@s.whatsapp.net".into(),
        msg_id: "M1".into(),
        secret: [9; 32],
        expires_at,
        message_ts,
    };
    assert_eq!(
        store.put_msg_secrets(vec![secret(100, 7)]).await.unwrap(),
        1
    );
    store.put_msg_secrets(vec![secret(50, 0)]).await.unwrap();
    assert_eq!(
        store
            .get_msg_secret_with_ts("chat@s.whatsapp.net", "me@s.whatsapp.net", "M1")
            .await
            .unwrap(),
        Some((vec![9; 32], 7))
    );
    assert_eq!(store.delete_expired_msg_secrets(99).await.unwrap(), 0);
    assert_eq!(store.delete_expired_msg_secrets(100).await.unwrap(), 1);
}

#[tokio::test]
async fn the_crate_s_sqlite_store_passes_the_storage_checks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let store = SqliteStore::new(&path.to_string_lossy()).await.unwrap();
    exercise(&store).await;
}

#[tokio::test]
async fn the_postgres_store_passes_the_same_storage_checks() {
    let sessions = PgSessions::connect(&postgres_url()).await.unwrap();
    let store = sessions.open(&unique("contract"), Some(1)).await.unwrap();
    exercise(&store).await;
}

#[tokio::test]
async fn a_writer_from_an_older_opening_is_refused_by_the_database() {
    let sessions = PgSessions::connect(&postgres_url()).await.unwrap();
    let instance = unique("fence");
    let old = sessions.open(&instance, Some(3)).await.unwrap();
    old.create().await.unwrap();
    old.put_session("peer", b"from the old owner")
        .await
        .unwrap();

    // Another worker gains the instance with a newer lease, then the old one wakes up.
    let new = sessions.open(&instance, Some(4)).await.unwrap();
    let refused = old.put_session("peer", b"stale").await.unwrap_err();
    assert!(refused.to_string().contains("database"), "{refused}");
    assert!(
        old.take_sent_message("c", "m").await.is_err(),
        "reads that write are fenced too"
    );
    assert_eq!(
        new.get_session("peer").await.unwrap(),
        Some(Bytes::from_static(b"from the old owner"))
    );
    new.put_session("peer", b"from the new owner")
        .await
        .unwrap();

    // A reader (the CLI's `instances`) sees everything and writes nothing.
    let reader = sessions.reader(&instance).await.unwrap();
    assert!(reader.exists().await.unwrap());
    assert!(reader.put_session("peer", b"reader").await.is_err());
    assert_eq!(
        new.get_session("peer").await.unwrap(),
        Some(Bytes::from_static(b"from the new owner"))
    );

    // Re-opening with the same generation (a lone worker reopening), or the CLI taking the
    // session over at the current one, fences the earlier opening.
    let again = sessions.open(&instance, Some(4)).await.unwrap();
    assert!(new.put_session("peer", b"x").await.is_err());
    again.put_session("peer", b"y").await.unwrap();
    let cli = sessions.open(&instance, None).await.unwrap();
    assert_eq!(cli.token().0, 4);
    assert!(again.put_session("peer", b"z").await.is_err());
    cli.put_session("peer", b"paired again").await.unwrap();
}

/// The chat index lives with the session in PostgreSQL: saved in the session's fenced
/// transactions (a superseded opening's save is refused), read back whole by the next owner,
/// and a chat deleted since is gone there too.
#[tokio::test]
async fn the_chat_index_is_kept_with_the_session_and_fenced() {
    use chat_delete_worker::contract::ChatKnown;
    use chat_delete_worker::session::whatsapp::chat_store::ChatStore;
    use chat_delete_worker::session::whatsapp::chats::MessageKey;

    const LID: &str = "123456789012345@lid";
    const PN: &str = "5511987654321@s.whatsapp.net";
    let key = |id: &str| MessageKey {
        id: id.into(),
        from_me: false,
        participant: None,
    };
    let sessions = PgSessions::connect(&postgres_url()).await.unwrap();
    let instance = unique("chats");
    let old = ChatStore::Shared(sessions.open(&instance, Some(1)).await.unwrap());
    let mut index = old.load(100).await.unwrap();
    assert!(index.is_empty());
    index.message(LID, Some(PN), 1_700_000_000, key("A1"));
    index.synced();
    old.save(index.changes()).await.unwrap();

    let new = ChatStore::Shared(sessions.open(&instance, Some(2)).await.unwrap());
    index.message(
        "5511900000000@s.whatsapp.net",
        None,
        1_700_000_100,
        key("B1"),
    );
    let refused = old.save(index.changes()).await;
    assert!(refused.is_err(), "a superseded owner's save is refused");

    let mut read = new.load(100).await.unwrap();
    assert_eq!(read.len(), 1);
    let chat = read.find(PN).expect("found under its twin");
    assert_eq!(chat.jid, LID);
    assert_eq!(chat.last_key.as_ref().unwrap().id, "A1");
    assert!(read.coverage().synced);
    assert_eq!(
        read.known(["5511900000000@s.whatsapp.net"]),
        ChatKnown::False,
        "the refused write left nothing"
    );

    read.deleted(LID, 1_700_000_000);
    new.save(read.changes()).await.unwrap();
    assert!(new.load(100).await.unwrap().is_empty());

    // A history sync's worth at once, in one transaction.
    let mut bulk = new.load(5_000).await.unwrap();
    for n in 0..3_000 {
        bulk.message(
            &format!("55119{n:08}@s.whatsapp.net"),
            None,
            1_700_000_000 + n,
            key("M"),
        );
    }
    new.save(bulk.changes()).await.unwrap();
    let read = new.load(5_000).await.unwrap();
    assert_eq!(read.len(), 3_000);
    assert!(read.find("5511900002999@s.whatsapp.net").is_some());
}

fn pg_options(sessions: &PgSessions, instance: &str, owner: Option<Arc<Lease>>) -> SessionOptions {
    SessionOptions {
        store: SessionStore::Postgres {
            sessions: sessions.clone(),
            instance: instance.to_owned(),
        },
        owner,
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

/// The real whatsapp-rust client over the PostgreSQL store, offline: a never-paired instance
/// gets its device created in the database and answers "not connected" (503).
#[tokio::test]
async fn the_real_client_opens_a_never_paired_session_from_postgres() {
    let sessions = PgSessions::connect(&postgres_url()).await.unwrap();
    let instance = unique("never-paired");
    let options = pg_options(&sessions, &instance, Some(Arc::new(Lease::permanent())));
    let session = WhatsappSession::start(&instance, options.clone()).await;
    assert_eq!(session.state(), SessionState::NotPaired);
    let chat = normalise_number("5511999999999").unwrap();
    let refused = session
        .delete_chat(&chat, false, Arc::new(Lease::permanent()))
        .await;
    assert_eq!(refused, Err(SessionError::NotConnected));
    let reader = sessions.reader(&instance).await.unwrap();
    assert!(
        reader.exists().await.unwrap(),
        "the client created its device row"
    );
    assert_eq!(whatsapp::inspect(&options).await.unwrap(), None);
    session.shutdown().await;
}

/// `instances` reads a paired session's number without taking the session from its holder;
/// `unpair` takes it over (the holder's writes are refused from then on) and removes it.
#[tokio::test]
async fn inspect_reads_without_taking_over_and_unpair_removes_the_session() {
    let sessions = PgSessions::connect(&postgres_url()).await.unwrap();
    let instance = unique("paired");
    let options = pg_options(&sessions, &instance, None);
    let hold = whatsapp::SessionHold::acquire(&options).await.unwrap();
    let bot = whatsapp::build_bot(&options, &hold, &[], None, |_| {})
        .await
        .unwrap();
    let client = bot.client();
    client
        .persistence_manager()
        .modify_device(|device| device.pn = Some(Jid::pn("5511988887777".to_owned())))
        .await;
    client.persistence_manager().flush().await.unwrap();
    let whatsapp::SessionHold::Database(holder) = &hold else {
        panic!("a database session is held in the database")
    };

    assert_eq!(
        whatsapp::inspect(&options).await.unwrap().as_deref(),
        Some("+5511988887777")
    );
    holder.put_session("peer", b"still mine").await.unwrap();

    drop(bot);
    assert!(whatsapp::unpair(&options).await.unwrap());
    assert!(holder.put_session("peer", b"late").await.is_err());
    assert_eq!(whatsapp::inspect(&options).await.unwrap(), None);
    assert!(!whatsapp::unpair(&options).await.unwrap());
}

/// A session kept in a SQLite file moves into PostgreSQL whole: what the client reads back
/// through the traits is the same on both sides.
#[tokio::test]
async fn a_sqlite_session_migrates_into_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let source = SqliteStore::new(&path.to_string_lossy()).await.unwrap();
    source.create().await.unwrap();
    let mut device = source.load().await.unwrap().unwrap();
    device.pn = Some(Jid::pn("5511977776666".to_owned()));
    source.save(&device).await.unwrap();
    source.put_identity("a.0:1", [3; 32]).await.unwrap();
    source.put_session("a.0:1", b"ratchet").await.unwrap();
    source.store_prekey(5, b"pk5", true).await.unwrap();
    source.store_prekey(6, b"pk6", false).await.unwrap();
    source.store_signed_prekey(1, b"spk").await.unwrap();
    source.put_sender_key("g::a", b"sk").await.unwrap();
    let key = |n: u8| AppStateSyncKey {
        key_data: vec![n; 32],
        fingerprint: vec![n],
        timestamp: i64::from(n),
    };
    source.set_sync_key(&[0, 9], key(9)).await.unwrap();
    source.set_sync_key(&[0, 3], key(3)).await.unwrap();
    let state = HashState {
        version: 42,
        ..Default::default()
    };
    source.set_version("regular", state).await.unwrap();
    let mac = AppStateMutationMAC {
        index_mac: vec![4; 32],
        value_mac: vec![44],
    };
    source
        .put_mutation_macs("regular", 42, &[mac])
        .await
        .unwrap();
    source
        .set_sender_key_status("g@g.us", &[("a:1@lid", true)])
        .await
        .unwrap();
    source
        .put_lid_mapping(&mapping("777", "5511977776666", 5))
        .await
        .unwrap();
    source.save_base_key("a.0:1", "m", b"bk").await.unwrap();
    source.put_group_metadata("g@g.us", b"meta").await.unwrap();
    source
        .store_received_tc_token("777@lid", b"tc", 10)
        .await
        .unwrap();
    source.store_sent_message("c", "s1", b"sent").await.unwrap();
    source
        .put_msg_secrets(vec![MsgSecretEntry {
            chat: "c".into(),
            sender: "me".into(),
            msg_id: "m1".into(),
            secret: [5; 32],
            expires_at: 0,
            message_ts: 9,
        }])
        .await
        .unwrap();
    drop(source);

    let sessions = PgSessions::connect(&postgres_url()).await.unwrap();
    let instance = unique("migrated");
    let target = sessions.open(&instance, None).await.unwrap();
    let rows = chat_delete_worker::session::migrate::copy_sqlite_session(&path, &target)
        .await
        .unwrap();
    assert!(rows >= 17, "{rows}");

    let moved = target.load().await.unwrap().unwrap();
    assert_eq!(moved.pn.unwrap().user, "5511977776666");
    assert_eq!(
        moved.identity_key.public_key.public_key_bytes(),
        device.identity_key.public_key.public_key_bytes()
    );
    assert_eq!(target.load_identity("a.0:1").await.unwrap(), Some([3; 32]));
    assert_eq!(
        target.get_session("a.0:1").await.unwrap(),
        Some(Bytes::from_static(b"ratchet"))
    );
    assert_eq!(target.get_max_prekey_id().await.unwrap(), 6);
    assert_eq!(
        target.load_signed_prekey(1).await.unwrap(),
        Some(b"spk".to_vec())
    );
    assert_eq!(
        target.get_sender_key("g::a").await.unwrap(),
        Some(b"sk".to_vec())
    );
    assert_eq!(
        target.get_latest_sync_key_id().await.unwrap(),
        Some(vec![0, 9]),
        "the highest key id stays the latest"
    );
    assert_eq!(target.get_version("regular").await.unwrap().version, 42);
    assert_eq!(
        target.get_mutation_mac("regular", &[4; 32]).await.unwrap(),
        Some(vec![44])
    );
    assert_eq!(
        target.get_sender_key_devices("g@g.us").await.unwrap(),
        vec![("a:1@lid".to_string(), true)]
    );
    assert_eq!(
        target
            .get_pn_mapping("5511977776666")
            .await
            .unwrap()
            .unwrap()
            .lid,
        "777"
    );
    assert!(target.has_same_base_key("a.0:1", "m", b"bk").await.unwrap());
    assert_eq!(
        target.get_group_metadata("g@g.us").await.unwrap(),
        Some(b"meta".to_vec())
    );
    assert_eq!(
        target.get_tc_token("777@lid").await.unwrap().unwrap().token,
        b"tc"
    );
    assert_eq!(
        target.take_sent_message("c", "s1").await.unwrap(),
        Some(b"sent".to_vec())
    );
    assert_eq!(
        target
            .get_msg_secret_with_ts("c", "me", "m1")
            .await
            .unwrap(),
        Some((vec![5; 32], 9))
    );
}

/// A worker frozen in the middle of a write (SIGSTOP while its transaction holds the owner
/// row) does not keep the next owner from opening the session for longer than a few seconds,
/// and its write does not land once it resumes.
#[tokio::test]
async fn a_frozen_writer_does_not_block_the_next_owner() {
    let sessions = PgSessions::connect(&postgres_url()).await.unwrap();
    let instance = unique("frozen");
    let old = sessions.open(&instance, Some(1)).await.unwrap();
    old.put_session("peer", b"before").await.unwrap();

    // The frozen worker: one of the store's connections, in a transaction that share-locked
    // the owner row (as every write does first), then went quiet.
    let frozen = sessions.client().await.unwrap();
    frozen.batch_execute("BEGIN").await.unwrap();
    frozen
        .query(
            chat_delete_worker::session::postgres::CHECK_OPENING,
            &[&instance, &old.token().1],
        )
        .await
        .unwrap();

    let new = tokio::time::timeout(Duration::from_secs(15), sessions.open(&instance, Some(2)))
        .await
        .expect("the next owner opens within seconds")
        .unwrap();
    assert!(frozen.batch_execute("COMMIT").await.is_err() || frozen.is_closed());
    assert!(old.put_session("peer", b"stale").await.is_err());
    assert_eq!(
        new.get_session("peer").await.unwrap(),
        Some(Bytes::from_static(b"before"))
    );
}

/// A simulated session kept in the shared store records each delete there first: once a newer
/// owner opened the session, the old owner's delete is refused by the database.
#[tokio::test]
async fn a_simulated_session_in_the_shared_store_is_fenced_by_the_database() {
    use chat_delete_worker::config::SimulatedConfig;
    use chat_delete_worker::session::SimulatedSession;
    let sessions = PgSessions::connect(&postgres_url()).await.unwrap();
    let instance = unique("simulated");
    let lease = Arc::new(Lease::permanent());
    let old = SimulatedSession::new(&instance, &SimulatedConfig::default())
        .unwrap()
        .owned_through(lease.clone())
        .in_database(&instance, sessions.clone());
    let chat = normalise_number("5511999999999").unwrap();
    tokio::time::timeout(Duration::from_secs(10), old.open())
        .await
        .expect("opens");
    assert_eq!(
        old.delete_chat(&chat, false, lease.clone()).await,
        Ok(chat.clone())
    );

    let new = SimulatedSession::new(&instance, &SimulatedConfig::default())
        .unwrap()
        .owned_through(lease.clone())
        .in_database(&instance, sessions.clone());
    new.open().await;
    assert!(matches!(
        old.delete_chat(&chat, false, lease.clone()).await,
        Err(SessionError::Fenced(_))
    ));
    assert_eq!(new.delete_chat(&chat, false, lease).await, Ok(chat));
}

/// A PgBouncer of the test's own (Debian's `pgbouncer`, which `scripts/services` installs) in
/// front of the local PostgreSQL, pooling by transaction as deployments commonly do.
struct PgBouncer {
    port: u16,
    _dir: tempfile::TempDir,
    child: std::process::Child,
}

impl PgBouncer {
    async fn start() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        std::fs::write(path.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        let ini = format!(
            "[databases]\ntest = host=127.0.0.1 port=5432 dbname=test user=postgres\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\n\
             auth_file = {users}\npool_mode = transaction\nunix_socket_dir =\n\
             logfile = {log}\n",
            users = path.join("users.txt").display(),
            log = path.join("pgbouncer.log").display(),
        );
        std::fs::write(path.join("pgbouncer.ini"), ini).unwrap();
        for entry in [
            path.to_owned(),
            path.join("users.txt"),
            path.join("pgbouncer.ini"),
        ] {
            let mode = if entry.is_dir() { 0o777 } else { 0o644 };
            std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let mut command = std::process::Command::new("pgbouncer");
        // PgBouncer refuses to run as root.
        if std::env::var("USER").as_deref() == Ok("root") || unsafe_is_root() {
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(path.join("pgbouncer.ini"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("pgbouncer (scripts/services installs it)");
        let bouncer = Self {
            port,
            _dir: dir,
            child,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "pgbouncer did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bouncer
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/test", self.port)
    }
}

fn unsafe_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Defect (found by review): the idle timeout of write transactions was set through the
/// connection's startup options, which PgBouncer refuses: behind a pooler every session open
/// failed. It is set inside each write transaction now.
#[tokio::test]
async fn sessions_open_and_write_through_pgbouncer() {
    let bouncer = PgBouncer::start().await;
    let sessions = PgSessions::connect(&bouncer.url()).await.unwrap();
    let instance = unique("bouncer");
    let store = sessions.open(&instance, Some(1)).await.unwrap();
    store
        .put_session("peer", b"through the pooler")
        .await
        .unwrap();
    assert_eq!(
        store.get_session("peer").await.unwrap(),
        Some(Bytes::from_static(b"through the pooler"))
    );
}
