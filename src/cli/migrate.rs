//! `migrate-sessions`: moves `whatsapp` instances' SQLite session files into the PostgreSQL
//! session store, so any worker can open them. The files are left in place (delete them once
//! the workers run on the new store).

use std::process::ExitCode;

use anyhow::Context;

use super::pair::whatsapp_options;
use crate::config::{Config, InstanceKind};
use crate::session::migrate::copy_sqlite_session;
use crate::session::postgres::PgSessions;
use crate::session::whatsapp::SessionLock;
use whatsapp_rust::wacore::store::traits::DeviceStore;

pub async fn run(config: &Config, only: &[String], adopt: bool) -> anyhow::Result<ExitCode> {
    let database = PgSessions::from_config(config)?.context(
        "sessions.store is not \"postgres\": set it and sessions.postgres_url to the target first",
    )?;
    if adopt {
        return adopt_unnamespaced(config, &database, only).await;
    }
    let names: Vec<&String> = match only {
        [] => config
            .instances
            .iter()
            .filter(|(_, cfg)| cfg.kind == InstanceKind::Whatsapp)
            .map(|(name, _)| name)
            .collect(),
        names => names.iter().collect(),
    };
    let mut failed = false;
    for name in names {
        whatsapp_options(config, name)?;
        let path = config.session_store_path(name);
        if !path.exists() {
            println!("{name}: no session file at {}; skipped.", path.display());
            continue;
        }
        // A worker (or `pair`) holding the file must stop first.
        let _lock = SessionLock::acquire(&path)?;
        if database.reader(name).await?.exists().await? {
            println!(
                "{name}: already in PostgreSQL; left as it is (unpair it there first to replace it)."
            );
            failed = true;
            continue;
        }
        let target = database.open(name, None).await?;
        let rows = copy_sqlite_session(&path, &target)
            .await
            .with_context(|| format!("migrating {name}"))?;
        println!(
            "{name}: {rows} rows moved from {} to PostgreSQL.",
            path.display()
        );
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Moves sessions kept under bare instance names (before sessions were namespaced) to this
/// deployment's keys. Run once, by the deployment that used them, with its workers stopped.
async fn adopt_unnamespaced(
    config: &Config,
    database: &PgSessions,
    only: &[String],
) -> anyhow::Result<ExitCode> {
    let names: Vec<&String> = match only {
        [] => config.instances.keys().collect(),
        names => names.iter().collect(),
    };
    for name in names {
        let adopted = database.adopt_unnamespaced(name).await?;
        let namespace = &config.broker.namespace;
        if adopted {
            println!("{name}: session moved to namespace {namespace}.");
        } else {
            println!("{name}: nothing to move (none kept before, or {namespace} has one).");
        }
    }
    Ok(ExitCode::SUCCESS)
}
