//! `publish`: bulk clean-up of one instance's chats from a file. Every command of a batch asks
//! for its answer on the batch's own durable results queue (`<ns>.results.<batch>`, read by
//! `results`), and its idempotency id is derived from instance, chat and batch name, so
//! publishing the same batch again never deletes twice: the worker replays the remembered
//! answers.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection};
use sha2::{Digest, Sha256};

use crate::bus;
use crate::config::Config;
use crate::contract::Names;
use crate::contract::normalise_number;
use crate::contract::wire::TOKEN_HEADER;

/// One chat to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub number: String,
    pub delete_media: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// JSON lines if the first line is an object, CSV if a column is named, else plain lines.
    Auto,
    /// One number or JID per line.
    Lines,
    /// CSV with a header row; the number is in `--column`.
    Csv,
    /// One JSON object per line: `{"number": "...", "deleteMedia": true}`.
    Jsonl,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("line {line}: {message}")]
    Input { line: usize, message: String },
    #[error("reading input: {0}")]
    Io(#[from] std::io::Error),
    #[error("batch names are 1 to 64 letters, digits, '-' or '_'")]
    BatchName,
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker did not confirm command {0}")]
    NotConfirmed(String),
}

/// Reads the targets: blank lines and `#` comments are skipped.
pub fn read_targets(
    input: impl BufRead,
    format: InputFormat,
    column: Option<&str>,
    delete_media: bool,
) -> Result<Vec<Target>, BatchError> {
    let mut lines = vec![];
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        let trimmed = line.trim();
        if !trimmed.is_empty() && !trimmed.starts_with('#') {
            lines.push((i + 1, trimmed.to_owned()));
        }
    }
    let format = match format {
        InputFormat::Auto if lines.first().is_some_and(|(_, l)| l.starts_with('{')) => {
            InputFormat::Jsonl
        }
        InputFormat::Auto if column.is_some() => InputFormat::Csv,
        InputFormat::Auto => InputFormat::Lines,
        other => other,
    };
    match format {
        InputFormat::Lines | InputFormat::Auto => Ok(lines
            .into_iter()
            .map(|(_, number)| Target {
                number,
                delete_media,
            })
            .collect()),
        InputFormat::Jsonl => lines
            .into_iter()
            .map(|(line, text)| {
                #[derive(serde::Deserialize)]
                struct Row {
                    number: String,
                    #[serde(rename = "deleteMedia")]
                    delete_media: Option<bool>,
                }
                let row: Row = serde_json::from_str(&text).map_err(|e| BatchError::Input {
                    line,
                    message: e.to_string(),
                })?;
                Ok(Target {
                    number: row.number,
                    delete_media: row.delete_media.unwrap_or(delete_media),
                })
            })
            .collect(),
        InputFormat::Csv => {
            let mut rows = lines.into_iter();
            let Some((line, header)) = rows.next() else {
                return Ok(vec![]);
            };
            let wanted = column.unwrap_or("number");
            let index = split_csv(&header)
                .iter()
                .position(|c| c == wanted)
                .ok_or_else(|| BatchError::Input {
                    line,
                    message: format!("no column named {wanted:?}"),
                })?;
            rows.map(|(line, text)| {
                let cells = split_csv(&text);
                let number = cells.get(index).cloned().ok_or_else(|| BatchError::Input {
                    line,
                    message: format!("no value in column {wanted:?}"),
                })?;
                Ok(Target {
                    number,
                    delete_media,
                })
            })
            .collect()
        }
    }
}

/// Splits one CSV line (quoted cells may hold commas; `""` is a quote).
fn split_csv(line: &str) -> Vec<String> {
    let mut cells = vec![];
    let mut cell = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cell.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => cells.push(std::mem::take(&mut cell).trim().to_owned()),
            (c, _) => cell.push(c),
        }
    }
    cells.push(cell.trim().to_owned());
    cells
}

/// The idempotency id of one chat of a batch: the same instance, chat and batch always give
/// the same id (numbers are normalised first, so `+55 11 9...` and `55119...` agree).
pub fn batch_id(instance: &str, number: &str, batch: &str) -> String {
    let chat = normalise_number(number)
        .map(|j| j.to_string())
        .unwrap_or_else(|| number.to_owned());
    let digest = Sha256::digest(format!("{instance}\0{chat}\0{batch}"));
    format!("{batch}-{}", &hex::encode(digest)[..24])
}

pub fn results_queue(names: &Names, batch: &str) -> Result<String, BatchError> {
    if !crate::contract::wire::is_valid_instance_name(batch) {
        return Err(BatchError::BatchName);
    }
    Ok(names.results_queue(batch))
}

pub(super) async fn declare_results_queue(
    channel: &lapin::Channel,
    queue: &str,
) -> Result<(), BatchError> {
    let mut args = FieldTable::default();
    // Forgotten a week after its last use.
    args.insert(
        ShortString::from("x-expires"),
        AMQPValue::LongLongInt(7 * 24 * 3600 * 1000),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    Ok(())
}

/// Shows progress on a terminal, or a plain line every so often otherwise.
pub struct Progress {
    total: usize,
    terminal: bool,
    label: &'static str,
}

impl Progress {
    pub fn new(total: usize, label: &'static str) -> Self {
        Self {
            total,
            terminal: std::io::stderr().is_terminal(),
            label,
        }
    }

    pub fn update(&self, done: usize, extra: &str) {
        if self.terminal {
            let width = 30;
            let filled = (done * width).checked_div(self.total).unwrap_or(width);
            eprint!(
                "\r[{}{}] {done}/{} {} {extra}   ",
                "#".repeat(filled),
                "-".repeat(width - filled),
                self.total,
                self.label
            );
            let _ = std::io::stderr().flush();
        } else if done == self.total || done.is_multiple_of(1000) {
            eprintln!("{done}/{} {} {extra}", self.total, self.label);
        }
    }

    pub fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}

/// What `publish` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PublishSummary {
    pub batch: String,
    pub instance: String,
    pub published: usize,
    pub results_queue: String,
}

/// Publishes one command per target, with confirms (at most 1,000 unconfirmed at a time).
pub async fn publish(
    connection: &Connection,
    names: &Names,
    instance: &str,
    batch: &str,
    token: &str,
    targets: &[Target],
) -> Result<PublishSummary, BatchError> {
    let queue = results_queue(names, batch)?;
    let channel = connection.create_channel().await?;
    declare_results_queue(&channel, &queue).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let progress = Progress::new(targets.len(), "published");
    let mut pending = std::collections::VecDeque::new();
    for (i, target) in targets.iter().enumerate() {
        let id = batch_id(instance, &target.number, batch);
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(TOKEN_HEADER),
            AMQPValue::LongString(token.into()),
        );
        let props = BasicProperties::default()
            .with_message_id(id.as_str().into())
            .with_reply_to(queue.as_str().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let body = serde_json::json!({"number": target.number, "deleteMedia": target.delete_media});
        let confirm = channel
            .basic_publish(
                names.commands_exchange().into(),
                instance.into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                props,
            )
            .await?;
        pending.push_back((id, confirm));
        if pending.len() >= 1000 {
            let (id, confirm) = pending.pop_front().expect("not empty");
            expect_ack(id, confirm.await?)?;
        }
        progress.update(i + 1, "");
    }
    for (id, confirm) in pending {
        expect_ack(id, confirm.await?)?;
    }
    progress.finish();
    let _ = channel.close(200, "published".into()).await;
    Ok(PublishSummary {
        batch: batch.to_owned(),
        instance: instance.to_owned(),
        published: targets.len(),
        results_queue: queue,
    })
}

fn expect_ack(id: String, confirmation: Confirmation) -> Result<(), BatchError> {
    match confirmation {
        Confirmation::Ack(_) => Ok(()),
        _ => Err(BatchError::NotConfirmed(id)),
    }
}

/// Where `publish` reads its targets.
pub struct Input {
    /// `None` or `-` reads standard input.
    pub file: Option<PathBuf>,
    pub format: InputFormat,
    pub column: Option<String>,
    pub delete_media: bool,
}

/// The token from the environment variable `token_env`, or from `token_file` (never an
/// argument: it would show in the process list).
pub fn read_token(token_env: &str, token_file: Option<&Path>) -> anyhow::Result<String> {
    match token_file {
        Some(path) => Ok(std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
            .trim()
            .to_owned()),
        None => std::env::var(token_env)
            .map_err(|_| anyhow::anyhow!("set the token in ${token_env} (or use --token-file)")),
    }
}

/// `publish`: reads the targets and publishes them; returns how many were published.
pub async fn run(
    config: &Config,
    instance: &str,
    batch: &str,
    token: &str,
    input: Input,
) -> anyhow::Result<usize> {
    let reader: Box<dyn BufRead> = match input.file.as_deref() {
        Some(p) if p.as_os_str() != "-" => {
            Box::new(std::io::BufReader::new(std::fs::File::open(p)?))
        }
        _ => Box::new(std::io::stdin().lock()),
    };
    let targets = read_targets(
        reader,
        input.format,
        input.column.as_deref(),
        input.delete_media,
    )?;
    let connection = bus::connect(&config.broker, "chat-delete-worker publish").await?;
    let names = Names::new(&config.broker.namespace);
    let summary = publish(&connection, &names, instance, batch, token, &targets).await?;
    let _ = connection.close(200, "published".into()).await;
    eprintln!(
        "published {} command(s) for instance {} in batch {}; results go to {}",
        summary.published, summary.instance, summary.batch, summary.results_queue
    );
    Ok(summary.published)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lines_csv_and_json_lines() {
        let lines = "# chats\n5511999999999\n\n+55 11 98888-7777\n";
        let t = read_targets(lines.as_bytes(), InputFormat::Auto, None, true).unwrap();
        assert_eq!(t.len(), 2);
        assert!(t.iter().all(|t| t.delete_media));
        let csv = "name,phone\n\"Doe, J\",5511999999999\nX,120363024567890123@g.us\n";
        let t = read_targets(csv.as_bytes(), InputFormat::Auto, Some("phone"), false).unwrap();
        assert_eq!(t[0].number, "5511999999999");
        assert_eq!(t[1].number, "120363024567890123@g.us");
        let err = read_targets(csv.as_bytes(), InputFormat::Csv, Some("nope"), false).unwrap_err();
        assert!(err.to_string().starts_with("line 1"), "{err}");
        let jsonl = "{\"number\": \"5511999999999\", \"deleteMedia\": true}\n{\"number\": \"1\"}\n";
        let t = read_targets(jsonl.as_bytes(), InputFormat::Auto, None, false).unwrap();
        assert!(t[0].delete_media && !t[1].delete_media);
        assert!(read_targets("{bad".as_bytes(), InputFormat::Jsonl, None, false).is_err());
    }

    #[test]
    fn batch_ids_are_deterministic_and_normalised() {
        let a = batch_id("sales", "+55 11 99999-9999", "june");
        assert_eq!(a, batch_id("sales", "5511999999999", "june"));
        assert!(a.starts_with("june-"));
        assert_ne!(a, batch_id("sales", "5511999999999", "july"));
        assert_ne!(a, batch_id("support", "5511999999999", "june"));
    }
}
