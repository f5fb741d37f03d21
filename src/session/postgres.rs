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

#[async_trait]
impl SignalStore for PgStore {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> Result<()> {
        self.put(IDENTITY, "", address, &key).await
    }

    async fn load_identity(&self, address: &str) -> Result<Option<[u8; 32]>> {
        match self.get(IDENTITY, "", address).await? {
            Some(bytes) => bytes
                .try_into()
                .map(Some)
                .map_err(|_| StoreError::Validation("identity key is not 32 bytes".into())),
            None => Ok(None),
        }
    }

    async fn delete_identity(&self, address: &str) -> Result<()> {
        self.delete(IDENTITY, "", address).await.map(drop)
    }

    async fn get_session(&self, address: &str) -> Result<Option<Bytes>> {
        Ok(self.get(SESSION, "", address).await?.map(Bytes::from))
    }

    async fn put_session(&self, address: &str, session: &[u8]) -> Result<()> {
        self.put(SESSION, "", address, session).await
    }

    async fn delete_session(&self, address: &str) -> Result<()> {
        self.delete(SESSION, "", address).await.map(drop)
    }

    async fn has_signal_state_for_user(&self, user: &str) -> Result<bool> {
        let row = self
            .read_one(
                "SELECT 1 FROM cdw_wa_kv WHERE instance = $1 AND space IN ($2, $3)
                 AND (key LIKE $4 || '@%' OR key LIKE $4 || ':%') LIMIT 1",
                &[&&*self.instance, &SESSION, &IDENTITY, &user],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn store_prekey(&self, id: u32, record: &[u8], uploaded: bool) -> Result<()> {
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, key, value, flag) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, flag = EXCLUDED.flag",
            &[&&*self.instance, &PREKEY, &id_key(id), &record, &uploaded],
        )])
        .await
        .map(drop)
    }

    async fn load_prekey(&self, id: u32) -> Result<Option<Bytes>> {
        Ok(self.get(PREKEY, "", &id_key(id)).await?.map(Bytes::from))
    }

    async fn mark_prekeys_uploaded(&self, ids: &[u32]) -> Result<()> {
        let keys: Vec<String> = ids.iter().map(|id| id_key(*id)).collect();
        self.write(&[(
            "UPDATE cdw_wa_kv SET flag = true WHERE instance = $1 AND space = $2 AND key = ANY($3)",
            &[&&*self.instance, &PREKEY, &keys],
        )])
        .await
        .map(drop)
    }

    async fn remove_prekey(&self, id: u32) -> Result<()> {
        self.delete(PREKEY, "", &id_key(id)).await.map(drop)
    }

    async fn get_max_prekey_id(&self) -> Result<u32> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT max(key) FROM cdw_wa_kv WHERE instance = $1 AND space = $2",
                &[&&*self.instance, &PREKEY],
            )
            .await
            .map_err(db)?;
        let max: Option<String> = row.get(0);
        Ok(max.and_then(|k| k.parse().ok()).unwrap_or(0))
    }

    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> Result<()> {
        self.put(SIGNED_PREKEY, "", &id_key(id), record).await
    }

    async fn load_signed_prekey(&self, id: u32) -> Result<Option<Vec<u8>>> {
        self.get(SIGNED_PREKEY, "", &id_key(id)).await
    }

    async fn load_all_signed_prekeys(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        let rows = self.scan(SIGNED_PREKEY, None).await?;
        rows.iter()
            .map(|r| {
                let key: String = r.get(1);
                let id = key
                    .parse()
                    .map_err(|_| StoreError::Validation(format!("bad signed prekey id {key}")))?;
                Ok((id, r.get(2)))
            })
            .collect()
    }

    async fn remove_signed_prekey(&self, id: u32) -> Result<()> {
        self.delete(SIGNED_PREKEY, "", &id_key(id)).await.map(drop)
    }

    async fn put_sender_key(&self, address: &str, record: &[u8]) -> Result<()> {
        self.put(SENDER_KEY, "", address, record).await
    }

    async fn get_sender_key(&self, address: &str) -> Result<Option<Vec<u8>>> {
        self.get(SENDER_KEY, "", address).await
    }

    async fn delete_sender_key(&self, address: &str) -> Result<()> {
        self.delete(SENDER_KEY, "", address).await.map(drop)
    }
}

#[async_trait]
impl AppSyncStore for PgStore {
    async fn get_sync_key(&self, key_id: &[u8]) -> Result<Option<AppStateSyncKey>> {
        self.get_json(SYNC_KEY, "", &hex::encode(key_id)).await
    }

    async fn set_sync_key(&self, key_id: &[u8], key: AppStateSyncKey) -> Result<()> {
        // `ts` orders the keys: the latest set is the latest key.
        let value = json(&key)?;
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, key, value, ts)
             VALUES ($1, $2, $3, $4, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts",
            &[&&*self.instance, &SYNC_KEY, &hex::encode(key_id), &value],
        )])
        .await
        .map(drop)
    }

    async fn get_version(&self, name: &str) -> Result<HashState> {
        Ok(self.get_json(VERSION, "", name).await?.unwrap_or_default())
    }

    async fn set_version(&self, name: &str, state: HashState) -> Result<()> {
        self.put(VERSION, "", name, &json(&state)?).await
    }

    async fn put_mutation_macs(
        &self,
        name: &str,
        version: u64,
        mutations: &[AppStateMutationMAC],
    ) -> Result<()> {
        let keys: Vec<String> = mutations
            .iter()
            .map(|m| hex::encode(&m.index_mac))
            .collect();
        let values: Vec<&[u8]> = mutations.iter().map(|m| m.value_mac.as_slice()).collect();
        let version = i64::try_from(version).unwrap_or(i64::MAX);
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, grp, key, value, ts)
             SELECT $1, $2, $3, k, v, $6 FROM unnest($4::text[], $5::bytea[]) AS m(k, v)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts",
            &[&&*self.instance, &MAC, &name, &keys, &values, &version],
        )])
        .await
        .map(drop)
    }

    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get(MAC, name, &hex::encode(index_mac)).await
    }

    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> Result<()> {
        let keys: Vec<String> = index_macs.iter().map(hex::encode).collect();
        self.delete_where(MAC, "grp = $2 AND key = ANY($3)", &[&name, &keys])
            .await
            .map(drop)
    }

    async fn clear_mutation_macs(&self, name: &str) -> Result<()> {
        self.delete_where(MAC, "grp = $2", &[&name]).await.map(drop)
    }

    async fn get_latest_sync_key_id(&self) -> Result<Option<Vec<u8>>> {
        let row = self
            .read_one(
                "SELECT key FROM cdw_wa_kv WHERE instance = $1 AND space = $2
                 ORDER BY ts DESC, key DESC LIMIT 1",
                &[&&*self.instance, &SYNC_KEY],
            )
            .await?;
        row.map(|r| hex::decode(r.get::<_, String>(0)))
            .transpose()
            .map_err(|e| StoreError::Serialization(Box::new(e)))
    }
}

#[async_trait]
impl ProtocolStore for PgStore {
    async fn get_sender_key_devices(&self, group_jid: &str) -> Result<Vec<(String, bool)>> {
        let rows = self.scan(SENDER_KEY_DEVICE, Some(group_jid)).await?;
        Ok(rows.iter().map(|r| (r.get(1), r.get(3))).collect())
    }

    async fn set_sender_key_status(&self, group_jid: &str, entries: &[(&str, bool)]) -> Result<()> {
        let devices: Vec<&str> = entries.iter().map(|(d, _)| *d).collect();
        let flags: Vec<bool> = entries.iter().map(|(_, f)| *f).collect();
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, grp, key, value, flag)
             SELECT $1, $2, $3, d, '', f FROM unnest($4::text[], $5::bool[]) AS e(d, f)
             ON CONFLICT (instance, space, grp, key) DO UPDATE SET flag = EXCLUDED.flag",
            &[
                &&*self.instance,
                &SENDER_KEY_DEVICE,
                &group_jid,
                &devices,
                &flags,
            ],
        )])
        .await
        .map(drop)
    }

    async fn clear_sender_key_devices(&self, group_jid: &str) -> Result<()> {
        self.delete_where(SENDER_KEY_DEVICE, "grp = $2", &[&group_jid])
            .await
            .map(drop)
    }

    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> Result<()> {
        let devices: Vec<&str> = device_jids.to_vec();
        self.delete_where(SENDER_KEY_DEVICE, "key = ANY($2)", &[&devices])
            .await
            .map(drop)
    }

    async fn clear_all_sender_key_devices(&self) -> Result<()> {
        self.delete_where(SENDER_KEY_DEVICE, "true", &[])
            .await
            .map(drop)
    }

    async fn get_lid_mapping(&self, lid: &str) -> Result<Option<LidPnMappingEntry>> {
        let row = self
            .read_one(
                "SELECT value FROM cdw_wa_kv WHERE instance = $1 AND space = $2 AND key = $3",
                &[&&*self.instance, &LID, &lid],
            )
            .await?;
        row.map(|r| parse(r.get::<_, &[u8]>(0))).transpose()
    }

    async fn get_pn_mapping(&self, phone: &str) -> Result<Option<LidPnMappingEntry>> {
        // The phone number is the row's group: the most recently updated LID wins.
        let row = self
            .read_one(
                "SELECT value FROM cdw_wa_kv WHERE instance = $1 AND space = $2 AND grp = $3
                 ORDER BY ts DESC LIMIT 1",
                &[&&*self.instance, &LID, &phone],
            )
            .await?;
        row.map(|r| parse(r.get::<_, &[u8]>(0))).transpose()
    }

    async fn put_lid_mapping(&self, entry: &LidPnMappingEntry) -> Result<()> {
        self.put_lid_mappings(std::slice::from_ref(entry)).await
    }

    async fn put_lid_mappings(&self, entries: &[LidPnMappingEntry]) -> Result<()> {
        let lids: Vec<&str> = entries.iter().map(|e| e.lid.as_str()).collect();
        let phones: Vec<&str> = entries.iter().map(|e| e.phone_number.as_str()).collect();
        let updated: Vec<i64> = entries.iter().map(|e| e.updated_at).collect();
        let values = entries.iter().map(json).collect::<Result<Vec<_>>>()?;
        // A LID maps to one number: its old row (under the old number) goes first.
        self.write(&[
            (
                "DELETE FROM cdw_wa_kv WHERE instance = $1 AND space = $2 AND key = ANY($3)",
                &[&&*self.instance, &LID, &lids],
            ),
            (
                "INSERT INTO cdw_wa_kv (instance, space, grp, key, value, ts)
                 SELECT DISTINCT ON (l) $1, $2, p, l, v, t
                 FROM unnest($3::text[], $4::text[], $5::bytea[], $6::bigint[])
                   WITH ORDINALITY AS e(l, p, v, t, n)
                 ORDER BY l, n DESC",
                &[&&*self.instance, &LID, &lids, &phones, &values, &updated],
            ),
        ])
        .await
        .map(drop)
    }

    async fn get_all_lid_mappings(&self) -> Result<Vec<LidPnMappingEntry>> {
        let rows = self.scan(LID, None).await?;
        rows.iter().map(|r| parse(r.get::<_, &[u8]>(2))).collect()
    }

    async fn save_base_key(&self, address: &str, message_id: &str, base_key: &[u8]) -> Result<()> {
        self.put(BASE_KEY, address, message_id, base_key).await
    }

    async fn has_same_base_key(
        &self,
        address: &str,
        message_id: &str,
        current_base_key: &[u8],
    ) -> Result<bool> {
        let stored = self.get(BASE_KEY, address, message_id).await?;
        Ok(stored.is_some_and(|s| s == current_base_key))
    }

    async fn delete_base_key(&self, address: &str, message_id: &str) -> Result<()> {
        self.delete(BASE_KEY, address, message_id).await.map(drop)
    }

    async fn update_device_list(&self, record: DeviceListRecord) -> Result<()> {
        self.put(DEVICES, "", &record.user, &json(&record)?).await
    }

    async fn get_devices(&self, user: &str) -> Result<Option<DeviceListRecord>> {
        self.get_json(DEVICES, "", user).await
    }

    async fn delete_devices(&self, user: &str) -> Result<()> {
        self.delete(DEVICES, "", user).await.map(drop)
    }

    async fn get_group_metadata(&self, group_jid: &str) -> Result<Option<Vec<u8>>> {
        self.get(GROUP, "", group_jid).await
    }

    async fn put_group_metadata(&self, group_jid: &str, blob: &[u8]) -> Result<()> {
        self.put(GROUP, "", group_jid, blob).await
    }

    async fn delete_group_metadata(&self, group_jid: &str) -> Result<()> {
        self.delete(GROUP, "", group_jid).await.map(drop)
    }

    async fn get_tc_token(&self, jid: &str) -> Result<Option<TcTokenEntry>> {
        let row = self
            .read_one(
                "SELECT value, ts, ts2 FROM cdw_wa_kv WHERE instance = $1 AND space = $2 AND key = $3",
                &[&&*self.instance, &TC_TOKEN, &jid],
            )
            .await?;
        Ok(row.map(|r| TcTokenEntry {
            token: r.get(0),
            token_timestamp: r.get(1),
            sender_timestamp: r.get(2),
        }))
    }

    async fn put_tc_token(&self, jid: &str, entry: &TcTokenEntry) -> Result<()> {
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, key, value, ts, ts2) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts, ts2 = EXCLUDED.ts2",
            &[
                &&*self.instance,
                &TC_TOKEN,
                &jid,
                &entry.token,
                &entry.token_timestamp,
                &entry.sender_timestamp,
            ],
        )])
        .await
        .map(drop)
    }

    async fn delete_tc_token(&self, jid: &str) -> Result<()> {
        self.delete(TC_TOKEN, "", jid).await.map(drop)
    }

    async fn get_all_tc_token_jids(&self) -> Result<Vec<String>> {
        let rows = self.scan(TC_TOKEN, None).await?;
        Ok(rows.iter().map(|r| r.get(1)).collect())
    }

    async fn delete_expired_tc_tokens(&self, token_cutoff: i64, sender_cutoff: i64) -> Result<u32> {
        self.delete_where(
            TC_TOKEN,
            "NOT ((length(value) > 0 AND ts >= $2) OR (ts2 IS NOT NULL AND ts2 >= $3))",
            &[&token_cutoff, &sender_cutoff],
        )
        .await
    }

    async fn touch_tc_token_sender_timestamp(
        &self,
        jid: &str,
        sender_timestamp: i64,
    ) -> Result<()> {
        // One upsert: the sender bucket only moves forward, the token bytes stay.
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, key, value, ts, ts2) VALUES ($1, $2, $3, '', $4, $4)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET ts2 = GREATEST(cdw_wa_kv.ts2, EXCLUDED.ts2)",
            &[&&*self.instance, &TC_TOKEN, &jid, &sender_timestamp],
        )])
        .await
        .map(drop)
    }

    async fn store_received_tc_token(
        &self,
        jid: &str,
        token: &[u8],
        token_timestamp: i64,
    ) -> Result<()> {
        // Newer wins; a placeholder never blocks the first real token; the sender bucket stays.
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, key, value, ts) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts
             WHERE length(cdw_wa_kv.value) = 0 OR EXCLUDED.ts >= cdw_wa_kv.ts",
            &[&&*self.instance, &TC_TOKEN, &jid, &token, &token_timestamp],
        )])
        .await
        .map(drop)
    }

    async fn store_sent_message(
        &self,
        chat_jid: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<()> {
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, grp, key, value, ts) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts",
            &[&&*self.instance, &SENT, &chat_jid, &message_id, &payload, &now_secs()],
        )])
        .await
        .map(drop)
    }

    async fn take_sent_message(&self, chat_jid: &str, message_id: &str) -> Result<Option<Vec<u8>>> {
        let rows = self
            .write_rows(
                "DELETE FROM cdw_wa_kv WHERE instance = $1 AND space = $2 AND grp = $3 AND key = $4
                 RETURNING value",
                &[&&*self.instance, &SENT, &chat_jid, &message_id],
            )
            .await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.delete_where(SENT, "ts < $2", &[&cutoff_timestamp])
            .await
    }

    async fn store_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
        message: &[u8],
    ) -> Result<()> {
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, grp, key, value, ts) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (instance, space, grp, key)
             DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts",
            &[
                &&*self.instance,
                &PENDING,
                &chat,
                &joined(&[sender, id]),
                &message,
                &now_secs(),
            ],
        )])
        .await
        .map(drop)
    }

    async fn get_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
    ) -> Result<Option<Vec<u8>>> {
        self.get(PENDING, chat, &joined(&[sender, id])).await
    }

    async fn delete_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> Result<()> {
        self.delete(PENDING, chat, &joined(&[sender, id]))
            .await
            .map(drop)
    }

    async fn delete_expired_pending_inbound(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.delete_where(PENDING, "ts < $2", &[&cutoff_timestamp])
            .await
    }
}

#[async_trait]
impl MsgSecretStore for PgStore {
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> Result<usize> {
        let chats: Vec<&str> = entries.iter().map(|e| &*e.chat).collect();
        let keys: Vec<String> = entries
            .iter()
            .map(|e| joined(&[&e.sender, &e.msg_id]))
            .collect();
        let secrets: Vec<&[u8]> = entries.iter().map(|e| e.secret.as_slice()).collect();
        let expires: Vec<i64> = entries.iter().map(|e| e.expires_at).collect();
        let message_ts: Vec<i64> = entries.iter().map(|e| e.message_ts).collect();
        // Merges as the trait says: "never" (0) wins, else the later deadline; the later
        // non-zero message time wins.
        self.write(&[(
            "INSERT INTO cdw_wa_kv AS o (instance, space, grp, key, value, ts, ts2)
             SELECT DISTINCT ON (c, k) $1, $2, c, k, s, x, m
             FROM unnest($3::text[], $4::text[], $5::bytea[], $6::bigint[], $7::bigint[])
               WITH ORDINALITY AS e(c, k, s, x, m, n)
             ORDER BY c, k, n DESC
             ON CONFLICT (instance, space, grp, key) DO UPDATE SET
               value = EXCLUDED.value,
               ts = CASE WHEN o.ts = 0 OR EXCLUDED.ts = 0 THEN 0 ELSE GREATEST(o.ts, EXCLUDED.ts) END,
               ts2 = GREATEST(o.ts2, EXCLUDED.ts2)",
            &[
                &&*self.instance,
                &MSG_SECRET,
                &chats,
                &keys,
                &secrets,
                &expires,
                &message_ts,
            ],
        )])
        .await?;
        Ok(entries.len())
    }

    async fn get_msg_secret(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<Vec<u8>>> {
        self.get(MSG_SECRET, chat, &joined(&[sender, msg_id])).await
    }

    async fn get_msg_secret_with_ts(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<(Vec<u8>, i64)>> {
        let row = self
            .read_one(
                "SELECT value, ts2 FROM cdw_wa_kv
                 WHERE instance = $1 AND space = $2 AND grp = $3 AND key = $4",
                &[
                    &&*self.instance,
                    &MSG_SECRET,
                    &chat,
                    &joined(&[sender, msg_id]),
                ],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get::<_, Option<i64>>(1).unwrap_or(0))))
    }

    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.delete_where(MSG_SECRET, "ts <> 0 AND ts <= $2", &[&cutoff_timestamp])
            .await
    }
}

#[async_trait]
impl DeviceStore for PgStore {
    async fn save(&self, device: &Device) -> Result<()> {
        self.put(DEVICE, "", "", &json(device)?).await
    }

    async fn load(&self) -> Result<Option<Device>> {
        self.get_json(DEVICE, "", "").await
    }

    async fn exists(&self) -> Result<bool> {
        Ok(self.get(DEVICE, "", "").await?.is_some())
    }

    async fn create(&self) -> Result<i32> {
        let device = json(&Device::new())?;
        self.write(&[(
            "INSERT INTO cdw_wa_kv (instance, space, key, value) VALUES ($1, $2, '', $3)
             ON CONFLICT DO NOTHING",
            &[&&*self.instance, &DEVICE, &device],
        )])
        .await?;
        Ok(1)
    }

    async fn resource_report(&self) -> whatsapp_rust::wacore::stats::StorageResourceReport {
        whatsapp_rust::wacore::stats::StorageResourceReport {
            memory_bytes: Some(0),
            ..Default::default()
        }
    }
}
