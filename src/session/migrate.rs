//! Moving a SQLite session file into the PostgreSQL store: every row the crate keeps, read
//! through the crate's own store where it can be asked by key (the keys are listed with SQL,
//! since the traits cannot enumerate), and written through the target's traits.

use std::path::Path;

use diesel::sql_types::Text;
use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};
use whatsapp_rust::store::SqliteStore;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::store::error::StoreError;
use whatsapp_rust::wacore::store::traits::{
    AppSyncStore, DeviceStore, MsgSecretEntry, MsgSecretStore, ProtocolStore, SignalStore,
};

use super::postgres::PgStore;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot read the session file: {0}")]
    Read(String),
    #[error("session store: {0}")]
    Store(#[from] StoreError),
    #[error("unexpected row in the session file: {0}")]
    Row(String),
}

#[derive(QueryableByName)]
struct Key {
    #[diesel(sql_type = Text)]
    k: String,
}

/// The file's rows, one text key each (parts joined by U+001F).
fn keys(conn: &mut SqliteConnection, sql: &str) -> Result<Vec<String>, MigrateError> {
    let rows: Vec<Key> = diesel::sql_query(sql)
        .load(conn)
        .map_err(|e| MigrateError::Read(e.to_string()))?;
    Ok(rows.into_iter().map(|r| r.k).collect())
}

fn parts<const N: usize>(key: &str) -> Result<[&str; N], MigrateError> {
    key.split('\u{1f}')
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| MigrateError::Row(key.to_owned()))
}

fn number<T: std::str::FromStr>(text: &str) -> Result<T, MigrateError> {
    text.parse().map_err(|_| MigrateError::Row(text.to_owned()))
}

fn bytes(text: &str) -> Result<Vec<u8>, MigrateError> {
    hex::decode(text).map_err(|_| MigrateError::Row(text.to_owned()))
}

/// Copies the session at `path` into `target`; returns the rows copied.
pub async fn copy_sqlite_session(path: &Path, target: &PgStore) -> Result<u64, MigrateError> {
    let url = path.to_string_lossy();
    let source = SqliteStore::new(&url)
        .await
        .map_err(|e| MigrateError::Read(e.to_string()))?;
    let mut conn =
        SqliteConnection::establish(&url).map_err(|e| MigrateError::Read(e.to_string()))?;
    let conn = &mut conn;
    let mut copied = 0u64;
    let mut count = |n: usize| copied += n as u64;
    const D: &str = "WHERE device_id = 1";

    if let Some(device) = source.load().await? {
        target.save(&device).await?;
        count(1);
    }
    for address in keys(conn, &format!("SELECT address AS k FROM identities {D}"))? {
        if let Some(key) = source.load_identity(&address).await? {
            target.put_identity(&address, key).await?;
            count(1);
        }
    }
    for address in keys(conn, &format!("SELECT address AS k FROM sessions {D}"))? {
        if let Some(record) = source.get_session(&address).await? {
            target.put_session(&address, &record).await?;
            count(1);
        }
    }
    let prekeys = format!("SELECT id || char(31) || uploaded AS k FROM prekeys {D}");
    for key in keys(conn, &prekeys)? {
        let [id, uploaded] = parts(&key)?;
        let id: u32 = number(id)?;
        if let Some(record) = source.load_prekey(id).await? {
            target.store_prekey(id, &record, uploaded == "1").await?;
            count(1);
        }
    }
    for (id, record) in source.load_all_signed_prekeys().await? {
        target.store_signed_prekey(id, &record).await?;
        count(1);
    }
    for address in keys(conn, &format!("SELECT address AS k FROM sender_keys {D}"))? {
        if let Some(record) = source.get_sender_key(&address).await? {
            target.put_sender_key(&address, &record).await?;
            count(1);
        }
    }
    // Ascending, so the latest key (the highest id, for the crate) is also the last set.
    let sync_keys = format!("SELECT hex(key_id) AS k FROM app_state_keys {D} ORDER BY key_id");
    for id in keys(conn, &sync_keys)? {
        let id = bytes(&id)?;
        if let Some(key) = source.get_sync_key(&id).await? {
            target.set_sync_key(&id, key).await?;
            count(1);
        }
    }
    for name in keys(
        conn,
        &format!("SELECT name AS k FROM app_state_versions {D}"),
    )? {
        target
            .set_version(&name, source.get_version(&name).await?)
            .await?;
        count(1);
    }
    let macs = format!(
        "SELECT name || char(31) || hex(index_mac) || char(31) || version AS k
         FROM app_state_mutation_macs {D}"
    );
    for key in keys(conn, &macs)? {
        let [name, index, version] = parts(&key)?;
        let index_mac = bytes(index)?;
        if let Some(value_mac) = source.get_mutation_mac(name, &index_mac).await? {
            let mac = AppStateMutationMAC {
                index_mac,
                value_mac,
            };
            target
                .put_mutation_macs(name, number(version)?, &[mac])
                .await?;
            count(1);
        }
    }
    let groups = format!("SELECT DISTINCT group_jid AS k FROM sender_key_devices {D}");
    for group in keys(conn, &groups)? {
        let devices = source.get_sender_key_devices(&group).await?;
        let entries: Vec<(&str, bool)> = devices.iter().map(|(d, k)| (d.as_str(), *k)).collect();
        target.set_sender_key_status(&group, &entries).await?;
        count(entries.len());
    }
    let mut mappings = source.get_all_lid_mappings().await?;
    mappings.sort_by_key(|m| m.updated_at);
    target.put_lid_mappings(&mappings).await?;
    count(mappings.len());
    let base_keys = format!(
        "SELECT address || char(31) || message_id || char(31) || hex(base_key) AS k
         FROM base_keys {D}"
    );
    for key in keys(conn, &base_keys)? {
        let [address, message_id, base_key] = parts(&key)?;
        target
            .save_base_key(address, message_id, &bytes(base_key)?)
            .await?;
        count(1);
    }
    for user in keys(
        conn,
        &format!("SELECT user_id AS k FROM device_registry {D}"),
    )? {
        if let Some(record) = source.get_devices(&user).await? {
            target.update_device_list(record).await?;
            count(1);
        }
    }
    for group in keys(
        conn,
        &format!("SELECT group_jid AS k FROM group_metadata {D}"),
    )? {
        if let Some(blob) = source.get_group_metadata(&group).await? {
            target.put_group_metadata(&group, &blob).await?;
            count(1);
        }
    }
    for jid in source.get_all_tc_token_jids().await? {
        if let Some(entry) = source.get_tc_token(&jid).await? {
            target.put_tc_token(&jid, &entry).await?;
            count(1);
        }
    }
    let sent = format!(
        "SELECT chat_jid || char(31) || message_id || char(31) || hex(payload) AS k
         FROM sent_messages {D}"
    );
    for key in keys(conn, &sent)? {
        let [chat, id, payload] = parts(&key)?;
        target
            .store_sent_message(chat, id, &bytes(payload)?)
            .await?;
        count(1);
    }
    let pending = format!(
        "SELECT chat || char(31) || sender || char(31) || id AS k FROM pending_inbound_messages {D}"
    );
    for key in keys(conn, &pending)? {
        let [chat, sender, id] = parts(&key)?;
        if let Some(message) = source.get_pending_inbound(chat, sender, id).await? {
            target
                .store_pending_inbound(chat, sender, id, &message)
                .await?;
            count(1);
        }
    }
    let secrets = format!(
        "SELECT chat || char(31) || sender || char(31) || msg_id || char(31) || hex(secret)
           || char(31) || expires_at || char(31) || message_ts AS k
         FROM msg_secrets {D}"
    );
    let mut entries = vec![];
    for key in keys(conn, &secrets)? {
        let [chat, sender, msg_id, secret, expires_at, message_ts] = parts(&key)?;
        entries.push(MsgSecretEntry {
            chat: chat.into(),
            sender: sender.into(),
            msg_id: msg_id.into(),
            secret: bytes(secret)?
                .try_into()
                .map_err(|_| MigrateError::Row(key.clone()))?,
            expires_at: number(expires_at)?,
            message_ts: number(message_ts)?,
        });
    }
    if !entries.is_empty() {
        count(target.put_msg_secrets(entries).await?);
    }
    Ok(copied)
}
