//! `results`: follows a bulk batch's answers on its results queue, to a tally by status and
//! the list of failures.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Connection;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use super::publish::{BatchError, Progress, declare_results_queue, results_queue};
use crate::bus;
use crate::config::Config;
use crate::contract::Names;
use crate::contract::wire::{REPLAYED_HEADER, STATUS_HEADER, int_header, is_true_header};

/// The tally of a batch's results.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Tally {
    /// Commands answered (the latest answer per idempotency id counts).
    pub answered: usize,
    pub by_status: BTreeMap<u16, usize>,
    pub replayed: usize,
    /// id, status, error message of every command whose latest answer is not 200.
    pub failures: Vec<FailedCommand>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FailedCommand {
    pub id: String,
    pub status: u16,
    pub message: String,
}

impl Tally {
    pub fn failed(&self) -> bool {
        !self.failures.is_empty()
    }
}

/// Reads the batch's results until `expect` commands are answered and nothing more is waiting,
/// or no new result came for `idle`. Results stay in the queue (nothing is acked), so following again shows them again.
pub async fn follow(
    connection: &Connection,
    names: &Names,
    batch: &str,
    expect: Option<usize>,
    idle: Duration,
    show_progress: bool,
) -> Result<Tally, BatchError> {
    let queue = results_queue(names, batch)?;
    let channel = connection.create_channel().await?;
    declare_results_queue(&channel, &queue).await?;
    channel.basic_qos(0, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut latest: BTreeMap<String, (u16, bool, String)> = BTreeMap::new();
    let progress = Progress::new(expect.unwrap_or(0), "answered");
    loop {
        // Once every command is answered, read on only while more is already there: an
        // earlier run's answers may come first, and the latest answer per id counts.
        let wait = if expect.is_some_and(|n| latest.len() >= n) {
            idle.min(Duration::from_millis(300))
        } else {
            idle
        };
        let delivery = match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) | Err(_) => break,
        };
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let status = int_header(&headers, STATUS_HEADER)
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or(0);
        let replayed = is_true_header(&headers, REPLAYED_HEADER);
        let message = serde_json::from_slice::<serde_json::Value>(&delivery.data)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        latest.insert(id, (status, replayed, message));
        if show_progress {
            let ok = latest.values().filter(|(s, ..)| *s == 200).count();
            progress.update(
                latest.len(),
                &format!("({ok} ok, {} failed)", latest.len() - ok),
            );
        }
    }
    if show_progress {
        progress.finish();
    }
    let _ = channel.close(200, "followed".into()).await;
    let mut tally = Tally {
        answered: latest.len(),
        ..Default::default()
    };
    for (id, (status, replayed, message)) in latest {
        *tally.by_status.entry(status).or_default() += 1;
        tally.replayed += usize::from(replayed);
        if status != 200 {
            tally.failures.push(FailedCommand {
                id,
                status,
                message,
            });
        }
    }
    Ok(tally)
}

/// Prints the tally (as JSON with `json`).
pub fn print_tally(tally: &Tally, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(tally)?);
        return Ok(());
    }
    let statuses: Vec<String> = tally
        .by_status
        .iter()
        .map(|(status, n)| format!("{status}: {n}"))
        .collect();
    println!(
        "{} answered ({}), {} replayed",
        tally.answered,
        statuses.join(", "),
        tally.replayed
    );
    for f in &tally.failures {
        println!("FAILED {}\t{}\t{}", f.id, f.status, f.message);
    }
    Ok(())
}

/// `results`: follows the batch's answers and prints the tally; exit code 1 when any command
/// failed.
pub async fn run(
    config: &Config,
    batch: &str,
    expect: Option<usize>,
    idle: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let connection = bus::connect(&config.broker, "chat-delete-worker results").await?;
    let names = Names::new(&config.broker.namespace);
    let tally = follow(&connection, &names, batch, expect, idle, !json).await?;
    let _ = connection.close(200, "followed".into()).await;
    print_tally(&tally, json)?;
    Ok(if tally.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
