//! `instances`: every configured instance with its state, paired number and last change, from
//! the running worker when it answers on its HTTP port, else from the session files.

use std::process::ExitCode;

use super::pair::whatsapp_options;
use crate::config::{Config, InstanceKind};
use crate::http;
use crate::session::SessionStore;
use crate::session::whatsapp::{OpenError, inspect};

/// Asks the running worker; falls back to reading the session files.
pub async fn run(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let views = match worker_instances(config.http.port).await {
        Some(views) => views,
        None => {
            let mut views = vec![];
            for (name, cfg) in &config.instances {
                let (state, paired_as, changed_at) = match cfg.kind {
                    InstanceKind::Simulated => ("simulated".to_owned(), None, None),
                    InstanceKind::Whatsapp => {
                        let options = whatsapp_options(config, name)?;
                        let changed = match &options.store {
                            SessionStore::Sqlite(path) => std::fs::metadata(path)
                                .and_then(|m| m.modified())
                                .ok()
                                .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339()),
                            SessionStore::Postgres { .. } => None,
                        };
                        match inspect(&options).await {
                            Ok(Some(number)) => ("paired".to_owned(), Some(number), changed),
                            Ok(None) => ("not_paired".to_owned(), None, changed),
                            Err(OpenError::Busy(_)) => ("in_use".to_owned(), None, changed),
                            Err(e) => (format!("error: {e}"), None, changed),
                        }
                    }
                };
                views.push(http::InstanceView {
                    name: name.clone(),
                    state,
                    paired_as,
                    changed_at,
                    throttled_until: None,
                    app_state_failed_at: None,
                    app_state_stuck_since: None,
                    chat_index: None,
                });
            }
            eprintln!(
                "(no worker answered on port {}; read from the session files)",
                config.http.port
            );
            views
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<12} {:<18} LAST CHANGE",
        "INSTANCE", "STATE", "PAIRED AS"
    );
    for v in views {
        let mut notes = match &v.throttled_until {
            Some(until) => format!(" (WhatsApp 429: deletes wait until {until})"),
            None => String::new(),
        };
        if let Some(at) = &v.app_state_failed_at {
            notes.push_str(&format!(" (chat list sync failed at {at})"));
        }
        if let Some(since) = &v.app_state_stuck_since {
            notes.push_str(&format!(
                " (chat list stuck at version 0 since {since}: unpair and pair again)"
            ));
        }
        if let Some(index) = &v.chat_index {
            let whole = if index.synced && !index.overflowed {
                "whole list"
            } else {
                "learning"
            };
            notes.push_str(&format!(" ({} chats indexed, {whole})", index.chats));
        }
        println!(
            "{:<24} {:<12} {:<18} {}{notes}",
            v.name,
            v.state,
            v.paired_as.as_deref().unwrap_or("-"),
            v.changed_at.as_deref().unwrap_or("-")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `GET /instances` of a worker on this host, if one answers.
async fn worker_instances(port: u16) -> Option<Vec<http::InstanceView>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .ok()?
    .ok()?;
    stream
        .write_all(b"GET /instances HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then_some(())?;
    serde_json::from_str(body).ok()
}
