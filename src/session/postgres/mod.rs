//! WhatsApp sessions in PostgreSQL, so that any worker that gains an instance can open its
//! session: whatsapp-rust's storage traits over one key-value table.
//!
//! Fencing happens in the database, not only before the call: opening a session counts an
//! opening for the instance (recording the opener's ownership generation), and every write runs
//! in a transaction that first checks (`FOR SHARE`) that its opening is still the latest.
//! A worker that lost the instance without knowing (paused past its lease, cut off) has every
//! write refused once the new owner opened the session, however late its writes arrive.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::error::{Result, StoreError};
use whatsapp_rust::wacore::store::traits::{
    AppStateSyncKey, AppSyncStore, DeviceListRecord, DeviceStore, LidPnMappingEntry,
    MsgSecretEntry, MsgSecretStore, ProtocolStore, SignalStore, TcTokenEntry,
};

mod keys;
mod protocol;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cdw_wa_owner (
    instance   text PRIMARY KEY,
    generation bigint NOT NULL,
    opening    bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS cdw_wa_kv (
    instance text   NOT NULL,
    space    text   NOT NULL,
    grp      text   NOT NULL DEFAULT '',
    key      text   NOT NULL,
    value    bytea  NOT NULL,
    flag     boolean NOT NULL DEFAULT false,
    ts       bigint NOT NULL DEFAULT 0,
    ts2      bigint,
    PRIMARY KEY (instance, space, grp, key)
);";

/// Why a session could not be opened, or a write was refused.
#[derive(Debug, thiserror::Error)]
pub enum PgSessionError {
    #[error("session database unreachable: {0}")]
    Connect(String),
    #[error("session database error: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("fenced: instance {0} was opened by another owner since")]
    Fenced(String),
}

/// The session database: one pool for every instance of the worker. Sessions are kept under
/// `<namespace>/<instance>` (the deployment's `broker.namespace`), so deployments sharing the
/// database never touch each other's sessions.
#[derive(Clone)]
pub struct PgSessions {
    pool: Pool,
    /// Set once the tables exist (created on first use).
    schema: Arc<tokio::sync::OnceCell<()>>,
    namespace: Option<Arc<str>>,
}

impl std::fmt::Debug for PgSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgSessions")
    }
}

impl PgSessions {
    /// The configured session database, if sessions are kept in PostgreSQL.
    pub fn from_config(
        config: &crate::config::Config,
    ) -> std::result::Result<Option<Self>, PgSessionError> {
        match (&config.sessions.store, &config.sessions.postgres_url) {
            (crate::config::SessionStoreKind::Postgres, Some(url)) => {
                Self::new(url).map(|sessions| Some(sessions.in_namespace(&config.broker.namespace)))
            }
            _ => Ok(None),
        }
    }

    /// Connects and creates the tables if they are missing.
    pub async fn connect(url: &str) -> std::result::Result<Self, PgSessionError> {
        let sessions = Self::new(url)?;
        sessions.ready().await?;
        Ok(sessions)
    }

    /// A pool that connects on first use.
    pub fn new(url: &str) -> std::result::Result<Self, PgSessionError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| PgSessionError::Connect(e.to_string()))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(8)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(std::time::Duration::from_secs(10)))
            .build()
            .map_err(|e| PgSessionError::Connect(e.to_string()))?;
        Ok(Self {
            pool,
            schema: Default::default(),
            namespace: None,
        })
    }

    /// The sessions of the deployment `namespace`.
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Where `instance`'s session is kept.
    fn key(&self, instance: &str) -> String {
        match &self.namespace {
            Some(namespace) => format!("{namespace}/{instance}"),
            None => instance.to_owned(),
        }
    }

    /// Moves a session kept before sessions were namespaced (under the bare instance name)
    /// to this deployment's key, unless one is there already. Only the deployment that used
    /// it should: run once, by the operator (`migrate-sessions --adopt-unnamespaced`).
    pub async fn adopt_unnamespaced(
        &self,
        instance: &str,
    ) -> std::result::Result<bool, PgSessionError> {
        self.ready().await?;
        let key = self.key(instance);
        if key == instance {
            return Ok(false);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let taken = tx
            .query_opt("SELECT 1 FROM cdw_wa_owner WHERE instance = $1", &[&key])
            .await?
            .is_some()
            || tx
                .query_opt(
                    "SELECT 1 FROM cdw_wa_kv WHERE instance = $1 LIMIT 1",
                    &[&key],
                )
                .await?
                .is_some();
        if taken {
            return Ok(false);
        }
        let mut moved = 0;
        for table in ["cdw_wa_owner", "cdw_wa_kv"] {
            let sql = format!("UPDATE {table} SET instance = $2 WHERE instance = $1");
            moved += tx.execute(sql.as_str(), &[&instance, &key]).await?;
        }
        tx.commit().await?;
        Ok(moved > 0)
    }

    async fn ready(&self) -> std::result::Result<(), PgSessionError> {
        self.schema
            .get_or_try_init(|| async {
                let mut client = self.client().await?;
                // Several workers starting at once: one creates, the others find it there.
                let tx = client.transaction().await?;
                tx.execute("SELECT pg_advisory_xact_lock(7262393021)", &[])
                    .await?;
                tx.batch_execute(SCHEMA).await?;
                tx.commit().await?;
                Ok(())
            })
            .await
            .map(drop)
    }

    /// A connection of the pool, with the store's session settings.
    pub async fn client(&self) -> std::result::Result<deadpool_postgres::Object, PgSessionError> {
        self.pool
            .get()
            .await
            .map_err(|e| PgSessionError::Connect(e.to_string()))
    }

    /// Opens an instance's session for writing, as owner `generation` (`None`: the CLI, which
    /// keeps the generation recorded). From now on every earlier opener's writes are refused.
    /// The fence is the opening count, which only the database assigns: a worker opens only
    /// while it holds the instance's lease, so openings follow ownership. Lease generations
    /// are recorded, not compared: they restart if Redis loses its keys, and a comparison
    /// would then lock every session out.
    pub async fn open(
        &self,
        instance: &str,
        generation: Option<u64>,
    ) -> std::result::Result<PgStore, PgSessionError> {
        self.ready().await?;
        let key = self.key(instance);
        let generation = generation.map(|g| i64::try_from(g).unwrap_or(i64::MAX));
        let client = self.client().await?;
        let row = client
            .query_one(
                "INSERT INTO cdw_wa_owner AS o (instance, generation, opening)
                 VALUES ($1, coalesce($2::bigint, 0), 1)
                 ON CONFLICT (instance) DO UPDATE
                   SET generation = coalesce($2::bigint, o.generation), opening = o.opening + 1
                 RETURNING generation, opening",
                &[&key, &generation],
            )
            .await?;
        let opening: i64 = row.get(1);
        if opening == 1 && key != instance {
            let earlier = client
                .query_opt(
                    "SELECT 1 FROM cdw_wa_kv WHERE instance = $1 LIMIT 1",
                    &[&instance],
                )
                .await?;
            if earlier.is_some() {
                tracing::warn!(
                    instance,
                    "A session kept before sessions were namespaced exists for this instance; if it is this deployment's, stop the workers and run `chat-delete-worker migrate-sessions --adopt-unnamespaced`"
                );
            }
        }
        Ok(self.store(&key, row.get(0), opening))
    }

    /// Reads an instance's session without taking it over (every write is refused).
    pub async fn reader(&self, instance: &str) -> std::result::Result<PgStore, PgSessionError> {
        self.ready().await?;
        Ok(self.store(&self.key(instance), -1, -1))
    }

    fn store(&self, instance: &str, generation: i64, opening: i64) -> PgStore {
        PgStore {
            pool: self.pool.clone(),
            instance: instance.into(),
            generation,
            opening,
            superseded: Arc::default(),
        }
    }
}

/// One instance's session, as opened by one owner.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    instance: Arc<str>,
    generation: i64,
    opening: i64,
    /// A write was refused: the session was opened again since this opening.
    superseded: Arc<AtomicBool>,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

fn db(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(Box::new(e))
}

fn ser(e: serde_json::Error) -> StoreError {
    StoreError::Serialization(Box::new(e))
}

fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(ser)
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(ser)
}

/// Prekey ids as keys that sort like numbers.
fn id_key(id: u32) -> String {
    format!("{id:010}")
}

/// Joins the parts of a composite key (JIDs and message ids hold no control characters).
fn joined(parts: &[&str]) -> String {
    parts.join("\u{1f}")
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

impl PgStore {
    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Connection(Box::new(e)))
    }

    /// Runs statements in one transaction, after checking that this opener still holds the
    /// session; the check's share lock keeps a new opener waiting until they commit.
    async fn write(&self, statements: &[(&str, Params<'_>)]) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        self.check(&tx).await?;
        let mut changed = 0;
        for (sql, params) in statements {
            changed += tx.execute(*sql, params).await.map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(changed)
    }

    /// One fenced statement that returns rows.
    async fn write_rows(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        self.check(&tx).await?;
        let rows = tx.query(sql, params).await.map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(rows)
    }

    /// Checks the opening, share-locking the owner row. A worker frozen inside a write
    /// (SIGSTOP, a long pause) holds that lock; the server ends such a transaction after a
    /// few seconds idle, so the next owner's opening waits seconds rather than for as long as
    /// the freeze lasts (the frozen write then fails to commit).
    async fn check(&self, tx: &deadpool_postgres::Transaction<'_>) -> Result<()> {
        let held = tx
            .query_opt(CHECK_OPENING, &[&&*self.instance, &self.opening])
            .await
            .map_err(db)?;
        match held {
            Some(_) => Ok(()),
            None => {
                self.superseded.store(true, Ordering::Relaxed);
                metrics::counter!(crate::telemetry::FENCED_SESSION_WRITES).increment(1);
                Err(StoreError::Database(Box::new(PgSessionError::Fenced(
                    self.instance.to_string(),
                ))))
            }
        }
    }

    async fn put(&self, space: &str, grp: &str, key: &str, value: &[u8]) -> Result<()> {
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, grp, key, value) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (instance, space, grp, key) DO UPDATE SET value = EXCLUDED.value",
            &[&&*self.instance, &space, &grp, &key, &value],
        )])
        .await
        .map(drop)
    }

    /// One row of a read: not fenced (a stale reader changes nothing).
    async fn read_one(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        self.client()
            .await?
            .query_opt(sql, params)
            .await
            .map_err(db)
    }

    /// A value stored as JSON.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        space: &str,
        grp: &str,
        key: &str,
    ) -> Result<Option<T>> {
        self.get(space, grp, key)
            .await?
            .map(|bytes| parse(&bytes))
            .transpose()
    }

    async fn get(&self, space: &str, grp: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let row = self
            .read_one(
                "SELECT value FROM cdw_wa_kv
                 WHERE instance = $1 AND space = $2 AND grp = $3 AND key = $4",
                &[&&*self.instance, &space, &grp, &key],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn delete(&self, space: &str, grp: &str, key: &str) -> Result<u64> {
        self.write(&[(
            "DELETE FROM cdw_wa_kv WHERE instance = $1 AND space = $2 AND grp = $3 AND key = $4",
            &[&&*self.instance, &space, &grp, &key],
        )])
        .await
    }

    /// Rows of a space (and group), as (grp, key, value, flag, ts, ts2).
    async fn scan(&self, space: &str, grp: Option<&str>) -> Result<Vec<Row>> {
        self.client()
            .await?
            .query(
                "SELECT grp, key, value, flag, ts, ts2 FROM cdw_wa_kv
                 WHERE instance = $1 AND space = $2 AND ($3::text IS NULL OR grp = $3)
                 ORDER BY grp, key",
                &[&&*self.instance, &space, &grp],
            )
            .await
            .map_err(db)
    }

    async fn delete_where(&self, space: &str, condition: &str, params: Params<'_>) -> Result<u32> {
        let sql = format!(
            "DELETE FROM cdw_wa_kv WHERE instance = $1 AND space = '{space}' AND ({condition})"
        );
        let instance: &str = &self.instance;
        let mut all: Vec<&(dyn ToSql + Sync)> = vec![&instance];
        all.extend_from_slice(params);
        let n = self.write(&[(sql.as_str(), &all)]).await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Removes everything of the instance's session (unpair), if this opener still holds it.
    pub async fn erase(&self) -> Result<()> {
        self.write(&[(
            "DELETE FROM cdw_wa_kv WHERE instance = $1",
            &[&&*self.instance],
        )])
        .await
        .map(drop)
    }

    /// A small fenced write of the worker's own (the simulated session records its deletes).
    pub async fn note(&self, key: &str, value: &[u8]) -> Result<()> {
        self.put("note", "", key, value).await
    }

    /// The chat index's rows (`session::whatsapp::chats`), and its coverage row.
    pub async fn chat_rows(&self) -> Result<(Vec<Vec<u8>>, Option<Vec<u8>>)> {
        let rows = self.scan(CHAT, None).await?;
        let chats = rows.into_iter().map(|row| row.get(2)).collect();
        Ok((chats, self.get(CHAT_COVERAGE, "", "").await?))
    }

    /// Saves the chat index's changes in one fenced transaction of at most three statements
    /// (a history sync brings thousands of chats at once): rows as (jid, last message time,
    /// value), the keys removed, and the coverage when it changed.
    pub async fn save_chat_rows(
        &self,
        upserts: &[(String, i64, Vec<u8>)],
        removed: &[String],
        coverage: Option<&[u8]>,
    ) -> Result<()> {
        const UPSERT: &str = "INSERT INTO cdw_wa_kv (instance, space, grp, key, value, ts)
             SELECT $1, $2, '', k, v, t FROM unnest($3::text[], $4::bytea[], $5::bigint[]) AS u(k, v, t)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts";
        const REMOVE: &str = "DELETE FROM cdw_wa_kv
             WHERE instance = $1 AND space = $2 AND grp = '' AND key = ANY($3::text[])";
        let instance: &str = &self.instance;
        let keys: Vec<&str> = upserts.iter().map(|(k, _, _)| k.as_str()).collect();
        let values: Vec<&[u8]> = upserts.iter().map(|(_, _, v)| v.as_slice()).collect();
        let times: Vec<i64> = upserts.iter().map(|(_, t, _)| *t).collect();
        let covered: (Vec<&str>, Vec<&[u8]>, Vec<i64>) =
            (vec![""], coverage.into_iter().collect(), vec![0]);
        let mut statements: Vec<(&str, Params<'_>)> = Vec::new();
        let rows: [&(dyn ToSql + Sync); 5] = [&instance, &CHAT, &keys, &values, &times];
        let gone: [&(dyn ToSql + Sync); 3] = [&instance, &CHAT, &removed];
        let state: [&(dyn ToSql + Sync); 5] = [
            &instance,
            &CHAT_COVERAGE,
            &covered.0,
            &covered.1,
            &covered.2,
        ];
        if !upserts.is_empty() {
            statements.push((UPSERT, &rows));
        }
        if !removed.is_empty() {
            statements.push((REMOVE, &gone));
        }
        if coverage.is_some() {
            statements.push((UPSERT, &state));
        }
        self.write(&statements).await.map(drop)
    }

    /// Whether a write was refused because the session was opened again since. An owner that
    /// still holds the lease was superseded by a worker that lost it without knowing (its
    /// open reached the database after the owner's): opening again fences that one out.
    pub fn superseded(&self) -> bool {
        self.superseded.load(Ordering::Relaxed)
    }

    /// The generation and opening this store writes as.
    pub fn token(&self) -> (i64, i64) {
        (self.generation, self.opening)
    }
}

/// The fence of every write: this opening is still the latest (share-locked until commit).
/// It also sets the transaction's idle timeout (3 s, well under an ownership lease) the way
/// `SET LOCAL` does: a startup option would be refused by poolers such as PgBouncer.
pub const CHECK_OPENING: &str =
    "SELECT set_config('idle_in_transaction_session_timeout', '3000', true)
     FROM cdw_wa_owner WHERE instance = $1 AND opening = $2 FOR SHARE";

const IDENTITY: &str = "identity";
const SESSION: &str = "session";
const PREKEY: &str = "prekey";
const SIGNED_PREKEY: &str = "signed_prekey";
const SENDER_KEY: &str = "sender_key";
const SYNC_KEY: &str = "sync_key";
const VERSION: &str = "version";
const MAC: &str = "mac";
const SENDER_KEY_DEVICE: &str = "sender_key_device";
const LID: &str = "lid";
const BASE_KEY: &str = "base_key";
const DEVICES: &str = "devices";
const GROUP: &str = "group";
const TC_TOKEN: &str = "tc_token";
const SENT: &str = "sent";
const PENDING: &str = "pending";
const MSG_SECRET: &str = "msg_secret";
const DEVICE: &str = "device";
const CHAT: &str = "chat";
const CHAT_COVERAGE: &str = "chat_coverage";
