//! Where an instance's chat index is kept: with the session, in the same store. A table of
//! the session's SQLite file (held under the session's file lock), or rows of the shared
//! PostgreSQL store, written in the session's fenced transactions. Saved in batches: a crash
//! loses at most the last few seconds of messages, which only makes those chats' next range
//! the command's first-seen time.

use std::path::PathBuf;

use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};

use super::chats::{Changes, Chat, ChatIndex, Coverage};
use super::client::SessionHold;
use crate::session::postgres::PgStore;

/// Where one instance's index is kept.
#[derive(Clone)]
pub enum ChatStore {
    File(PathBuf),
    Shared(PgStore),
}

const SQLITE_SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS cdw_chat_index (
        jid TEXT PRIMARY KEY NOT NULL, last_s BIGINT NOT NULL, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS cdw_chat_coverage (
        id INTEGER PRIMARY KEY CHECK (id = 0), value TEXT NOT NULL)",
];

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    value: String,
}

impl ChatStore {
    pub fn of(hold: &SessionHold) -> Self {
        match hold {
            SessionHold::File { path, .. } => Self::File(path.clone()),
            SessionHold::Database(store) => Self::Shared(store.clone()),
        }
    }

    /// The index as saved, within `max` chats.
    pub async fn load(&self, max: usize) -> Result<ChatIndex, String> {
        let (chats, coverage) = match self {
            Self::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || load_file(&path))
                    .await
                    .map_err(|e| e.to_string())??
            }
            Self::Shared(store) => {
                let (rows, coverage) = store.chat_rows().await.map_err(|e| e.to_string())?;
                let chats = rows.iter().filter_map(|v| parse(v)).collect();
                let coverage = coverage.as_deref().and_then(parse).unwrap_or_default();
                (chats, coverage)
            }
        };
        Ok(ChatIndex::restore(chats, coverage, max))
    }

    /// Writes what changed (fenced: a superseded opener's save is refused).
    pub async fn save(&self, changes: Changes) -> Result<(), String> {
        if changes.is_empty() {
            return Ok(());
        }
        match self {
            Self::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || save_file(&path, &changes))
                    .await
                    .map_err(|e| e.to_string())?
            }
            Self::Shared(store) => {
                let upserts: Vec<(String, i64, Vec<u8>)> = changes
                    .upserts
                    .iter()
                    .map(|chat| (chat.jid.clone(), chat.last_s, json(chat)))
                    .collect();
                let coverage = changes.coverage.as_ref().map(json);
                store
                    .save_chat_rows(&upserts, &changes.removed, coverage.as_deref())
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("plain data serialises")
}

fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serialises")
}

/// A row written by an older or newer worker that does not parse is skipped, not fatal.
fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

fn open(path: &std::path::Path) -> Result<SqliteConnection, String> {
    let mut conn = SqliteConnection::establish(&path.to_string_lossy())
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let sql = |conn: &mut SqliteConnection, q: &str| {
        diesel::sql_query(q)
            .execute(conn)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    // The crate's own connections write to the same file.
    sql(&mut conn, "PRAGMA busy_timeout = 5000")?;
    for statement in SQLITE_SCHEMA {
        sql(&mut conn, statement)?;
    }
    Ok(conn)
}

fn load_file(path: &std::path::Path) -> Result<(Vec<Chat>, Coverage), String> {
    let mut conn = open(path)?;
    let rows: Vec<Row> = diesel::sql_query("SELECT value FROM cdw_chat_index")
        .load(&mut conn)
        .map_err(|e| e.to_string())?;
    let chats = rows
        .iter()
        .filter_map(|r| parse(r.value.as_bytes()))
        .collect();
    let coverage: Vec<Row> = diesel::sql_query("SELECT value FROM cdw_chat_coverage")
        .load(&mut conn)
        .map_err(|e| e.to_string())?;
    let coverage = coverage
        .first()
        .and_then(|r| parse(r.value.as_bytes()))
        .unwrap_or_default();
    Ok((chats, coverage))
}

fn save_file(path: &std::path::Path, changes: &Changes) -> Result<(), String> {
    let mut conn = open(path)?;
    conn.transaction::<_, diesel::result::Error, _>(|conn| {
        for chat in &changes.upserts {
            diesel::sql_query(
                "INSERT INTO cdw_chat_index (jid, last_s, value) VALUES (?, ?, ?)
                 ON CONFLICT (jid) DO UPDATE SET last_s = excluded.last_s, value = excluded.value",
            )
            .bind::<Text, _>(&chat.jid)
            .bind::<BigInt, _>(chat.last_s)
            .bind::<Text, _>(json_text(chat))
            .execute(conn)?;
        }
        for jid in &changes.removed {
            diesel::sql_query("DELETE FROM cdw_chat_index WHERE jid = ?")
                .bind::<Text, _>(jid)
                .execute(conn)?;
        }
        if let Some(coverage) = &changes.coverage {
            diesel::sql_query(
                "INSERT INTO cdw_chat_coverage (id, value) VALUES (0, ?)
                 ON CONFLICT (id) DO UPDATE SET value = excluded.value",
            )
            .bind::<Text, _>(json_text(coverage))
            .execute(conn)?;
        }
        Ok(())
    })
    .map_err(|e| e.to_string())
}
