//! `parked list` and `parked replay`: the parking stream holds commands whose retries ran out
//! (after their final result was published) and commands that crash-looped (answered by the
//! dead-letter inbox); they are listed, without side effects, and moved back on request.

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};

use crate::bus::confirm::{confirm_channel, publish_confirmed};
use crate::bus::{self, BrokerError};
use crate::config::Config;
use crate::contract::Names;
use crate::contract::wire::{
    ATTEMPTS_SO_FAR_HEADER, DEATH_HEADER_PREFIXES, ORIGINAL_ROUTING_KEY_HEADER,
    PARKED_OUTCOME_HEADER, PARKED_REPLAYED_HEADER, PARKED_STATUS_HEADER, RETRIES_HEADER,
    STREAM_OFFSET_HEADER, int_header, text_header,
};

/// Entries read from the stream per credit round.
const STREAM_CREDIT: u16 = 500;
/// How long to wait for the stream's first entry, and then for each next one, before taking
/// it as the end.
const FIRST_ENTRY_WAIT: Duration = Duration::from_secs(2);
const NEXT_ENTRY_WAIT: Duration = Duration::from_millis(500);

/// What `parked list` shows of one command (never its token).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParkedCommand {
    /// Its place in the parking stream.
    pub offset: i64,
    pub idempotency_id: Option<String>,
    pub instance: Option<String>,
    pub status: Option<i64>,
    pub outcome: Option<String>,
    /// Why the broker parked it, when it did (`delivery_limit`, `rejected`).
    pub dead_letter_reason: Option<String>,
}

impl ParkedCommand {
    fn of(offset: i64, props: &BasicProperties) -> Self {
        let headers = props.headers().clone().unwrap_or_default();
        let text = |key: &str| text_header(&headers, key);
        let death = first_death(&headers);
        Self {
            offset,
            idempotency_id: props.message_id().as_ref().map(|s| s.as_str().to_owned()),
            instance: text(ORIGINAL_ROUTING_KEY_HEADER)
                .or_else(|| death.as_ref().and_then(|d| death_text(d, "routing-keys"))),
            status: int_header(&headers, PARKED_STATUS_HEADER).map(i64::from),
            outcome: text(PARKED_OUTCOME_HEADER),
            dead_letter_reason: death.as_ref().and_then(|d| death_text(d, "reason")),
        }
    }
}

fn first_death(headers: &FieldTable) -> Option<FieldTable> {
    match headers.inner().get(DEATH_HEADER_PREFIXES[0])? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().first()? {
            AMQPValue::FieldTable(t) => Some(t.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn death_text(death: &FieldTable, key: &str) -> Option<String> {
    match death.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::FieldArray(a) => match a.as_slice().first()? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            _ => None,
        },
        _ => None,
    }
}

/// One entry of the parking stream.
struct Entry {
    offset: i64,
    properties: BasicProperties,
    body: Vec<u8>,
}

/// Reads the whole parking stream, from its first entry: the parked commands, and the offsets
/// of those already replayed (a replay appends a marker naming the offset). Reading a stream
/// is not a delivery: it changes nothing and can be done any number of times.
async fn read(
    connection: &Connection,
    names: &Names,
) -> Result<(Vec<Entry>, HashSet<i64>), BrokerError> {
    let queue = names.parked_queue();
    let (channel, mut consumer) = bus::read_stream(connection, &queue, STREAM_CREDIT).await?;
    let (mut entries, mut replayed) = (vec![], HashSet::new());
    // AMQP 0-9-1 does not tell where a stream ends: it ends when nothing more comes for a
    // while (the broker sends what it has at once, within the credit).
    let mut quiet = FIRST_ENTRY_WAIT;
    while let Ok(Some(delivery)) = tokio::time::timeout(quiet, consumer.next()).await {
        let delivery = delivery?;
        quiet = NEXT_ENTRY_WAIT;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let offset = long_header(&headers, STREAM_OFFSET_HEADER).unwrap_or(-1);
        match long_header(&headers, PARKED_REPLAYED_HEADER) {
            Some(of) => {
                replayed.insert(of);
            }
            None => entries.push(Entry {
                offset,
                properties: delivery.properties.clone(),
                body: delivery.data.clone(),
            }),
        }
        delivery.ack(BasicAckOptions::default()).await?;
    }
    let _ = channel.close(200, "read".into()).await;
    Ok((entries, replayed))
}

/// A header's value as a signed 64-bit integer (stream offsets are).
fn long_header(headers: &FieldTable, key: &str) -> Option<i64> {
    match headers.inner().get(key)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        _ => None,
    }
}

/// Every parked command not replayed yet (up to `limit`), oldest first.
pub async fn list(
    connection: &Connection,
    names: &Names,
    limit: usize,
) -> Result<Vec<ParkedCommand>, BrokerError> {
    let (entries, replayed) = read(connection, names).await?;
    Ok(entries
        .iter()
        .filter(|e| !replayed.contains(&e.offset))
        .take(limit)
        .map(|e| ParkedCommand::of(e.offset, &e.properties))
        .collect())
}

/// Moves parked commands back to the commands exchange for another try: those whose
/// idempotency id is in `ids`, or all of them when `ids` is empty. Their retry count starts
/// over; each replay is marked in the stream, so the command is no longer listed. Returns how
/// many were moved.
pub async fn replay(
    connection: &Connection,
    names: &Names,
    ids: &[String],
) -> Result<usize, BrokerError> {
    let (entries, replayed) = read(connection, names).await?;
    let publisher = confirm_channel(connection).await?;
    let mut moved = 0;
    for entry in entries.iter().filter(|e| !replayed.contains(&e.offset)) {
        let parked = ParkedCommand::of(entry.offset, &entry.properties);
        let wanted = ids.is_empty()
            || parked
                .idempotency_id
                .as_ref()
                .is_some_and(|id| ids.contains(id));
        let (true, Some(instance)) = (wanted, parked.instance) else {
            continue;
        };
        let mut kept = FieldTable::default();
        for (key, value) in entry.properties.headers().iter().flat_map(|h| h.inner()) {
            let ours = [
                ATTEMPTS_SO_FAR_HEADER,
                RETRIES_HEADER,
                PARKED_STATUS_HEADER,
                PARKED_OUTCOME_HEADER,
                ORIGINAL_ROUTING_KEY_HEADER,
                STREAM_OFFSET_HEADER,
            ];
            let dead_lettering = DEATH_HEADER_PREFIXES
                .iter()
                .any(|prefix| key.as_str().starts_with(prefix));
            if !ours.contains(&key.as_str()) && !dead_lettering {
                kept.insert(key.clone(), value.clone());
            }
        }
        let props = entry.properties.clone().with_headers(kept);
        let exchange = names.commands_exchange();
        publish_confirmed(&publisher, &exchange, &instance, &entry.body, props).await?;
        let mut marker = FieldTable::default();
        marker.insert(
            PARKED_REPLAYED_HEADER.into(),
            AMQPValue::LongLongInt(entry.offset),
        );
        let marker = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(marker);
        publish_confirmed(&publisher, "", &names.parked_queue(), &[], marker).await?;
        moved += 1;
    }
    let _ = publisher.close(200, "replayed".into()).await;
    Ok(moved)
}

/// `parked list`: one line (or JSON object) per parked command; they stay parked.
pub async fn run_list(config: &Config, limit: usize, json: bool) -> anyhow::Result<ExitCode> {
    let connection = bus::connect(&config.broker, "chat-delete-worker parked").await?;
    let names = Names::new(&config.broker.namespace);
    let commands = list(&connection, &names, limit).await?;
    for c in &commands {
        if json {
            println!("{}", serde_json::to_string(c)?);
        } else {
            println!(
                "{}\toffset={}\tinstance={}\tstatus={}\toutcome={}{}",
                c.idempotency_id.as_deref().unwrap_or("-"),
                c.offset,
                c.instance.as_deref().unwrap_or("-"),
                c.status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
                c.outcome.as_deref().unwrap_or("-"),
                c.dead_letter_reason
                    .as_deref()
                    .map(|r| format!("\tdead_lettered={r}"))
                    .unwrap_or_default(),
            );
        }
    }
    if !json {
        eprintln!(
            "{} parked command(s) in {}",
            commands.len(),
            names.parked_queue()
        );
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(ExitCode::SUCCESS)
}

/// `parked replay`: moves the commands with these ids (all of them when `ids` is empty) back.
pub async fn run_replay(config: &Config, ids: Vec<String>) -> anyhow::Result<ExitCode> {
    let connection = bus::connect(&config.broker, "chat-delete-worker parked").await?;
    let names = Names::new(&config.broker.namespace);
    let moved = replay(&connection, &names, &ids).await?;
    println!("moved {moved} command(s) back");
    let _ = connection.close(200, "done".into()).await;
    Ok(ExitCode::SUCCESS)
}
