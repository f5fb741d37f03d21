//! `parked list` and `parked replay`: the parking queue holds commands whose retries ran out
//! (after their final result was published) or that hit the broker's delivery limit; they are
//! listed and moved back on request.

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use std::process::ExitCode;

use crate::bus::{self, BrokerError, Publisher};
use crate::config::Config;
use crate::contract::Names;
use crate::contract::wire::{
    ATTEMPTS_SO_FAR_HEADER, DEATH_HEADER_PREFIXES, ORIGINAL_ROUTING_KEY_HEADER,
    PARKED_OUTCOME_HEADER, PARKED_STATUS_HEADER, RETRIES_HEADER, int_header, text_header,
};

/// What `parked list` shows of one command (never its token).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParkedCommand {
    pub idempotency_id: Option<String>,
    pub instance: Option<String>,
    pub status: Option<i64>,
    pub outcome: Option<String>,
    /// Why the broker parked it, when it did (`delivery_limit`, `rejected`).
    pub dead_letter_reason: Option<String>,
}

impl ParkedCommand {
    fn of(props: &BasicProperties) -> Self {
        let headers = props.headers().clone().unwrap_or_default();
        let text = |key: &str| text_header(&headers, key);
        let death = first_death(&headers);
        Self {
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

/// Reads every parked command (up to `limit`) without removing any: they are held unacked and
/// handed back when the channel closes.
pub async fn list(
    connection: &Connection,
    names: &Names,
    limit: usize,
) -> Result<Vec<ParkedCommand>, BrokerError> {
    let channel = connection.create_channel().await?;
    let mut out = vec![];
    while out.len() < limit {
        let Some(message) = channel
            .basic_get(names.parked_queue().into(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        out.push(ParkedCommand::of(&message.delivery.properties));
    }
    let _ = channel.close(200, "listed".into()).await;
    Ok(out)
}

/// Moves parked commands back to the commands exchange for another try: those whose
/// idempotency id is in `ids`, or all of them when `ids` is empty. Their retry count starts
/// over. Returns how many were moved.
pub async fn replay(
    connection: &Connection,
    names: &Names,
    ids: &[String],
) -> Result<usize, BrokerError> {
    let channel = connection.create_channel().await?;
    let publisher = Publisher::open(connection, &names.events_exchange()).await?;
    let mut moved = 0;
    loop {
        let Some(message) = channel
            .basic_get(names.parked_queue().into(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        let delivery = &message.delivery;
        let parked = ParkedCommand::of(&delivery.properties);
        let wanted = ids.is_empty()
            || parked
                .idempotency_id
                .as_ref()
                .is_some_and(|id| ids.contains(id));
        // Not wanted, or nowhere to send it: left unacked, so it goes back when we close.
        let (true, Some(instance)) = (wanted, parked.instance) else {
            continue;
        };
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let mut kept = FieldTable::default();
        for (key, value) in headers.inner() {
            let ours = [
                ATTEMPTS_SO_FAR_HEADER,
                RETRIES_HEADER,
                PARKED_STATUS_HEADER,
                PARKED_OUTCOME_HEADER,
                ORIGINAL_ROUTING_KEY_HEADER,
            ];
            let dead_lettering = DEATH_HEADER_PREFIXES
                .iter()
                .any(|prefix| key.as_str().starts_with(prefix));
            if !ours.contains(&key.as_str()) && !dead_lettering {
                kept.insert(key.clone(), value.clone());
            }
        }
        headers = kept;
        let props = delivery.properties.clone().with_headers(headers);
        publisher
            .publish_confirmed(&names.commands_exchange(), &instance, &delivery.data, props)
            .await?;
        delivery.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    let _ = channel.close(200, "replayed".into()).await;
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
                "{}\tinstance={}\tstatus={}\toutcome={}{}",
                c.idempotency_id.as_deref().unwrap_or("-"),
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
