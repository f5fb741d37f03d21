//! The command line: the worker itself (`run`) and the tools around it (topology, bulk
//! publish and results, parking queue, pairing).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::bus::{self as broker, topology};
use crate::config::{Config, InstanceKind, TokenHash};
use crate::contract::Names;
use crate::session::{self, SessionOptions};
use crate::{batch, http, pairing, telemetry};

/// Consumes "delete entire chat" commands from RabbitMQ and publishes their results.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file; without one the worker runs its embedded demo defaults (one simulated
    /// instance `demo`, token `demo-token`).
    #[arg(long, short, global = true, env = "CHAT_DELETE_WORKER_CONFIG")]
    config: Option<PathBuf>,
    /// Log JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "CHAT_DELETE_WORKER_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker (the default).
    Run,
    /// Declare the exchanges and queues for the configured instances, then exit.
    Topology,
    /// Print the SHA-256 of a token, read from standard input, for the config's `token_sha256`.
    TokenHash,
    /// Validate the config and print what this worker would host.
    CheckConfig,
    /// Publish delete commands for one instance from a file or standard input (one number or
    /// JID per line, CSV with a column, or JSON lines). Re-publishing a batch never deletes
    /// twice: ids derive from instance, chat and batch name.
    Publish {
        /// The instance whose chats are deleted (the routing key).
        #[arg(long, short)]
        instance: String,
        /// Batch name: names the results queue and seeds the idempotency ids.
        #[arg(long, short)]
        batch: String,
        /// Input file; `-` or absent reads standard input.
        file: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "auto")]
        format: crate::batch::InputFormat,
        /// CSV column holding the number (default `number`).
        #[arg(long)]
        column: Option<String>,
        /// Also purge each chat's stored media (a JSON line's `deleteMedia` wins).
        #[arg(long)]
        delete_media: bool,
        /// Environment variable holding the token (never pass a token as an argument).
        #[arg(long, default_value = "CDW_TOKEN", conflicts_with = "token_file")]
        token_env: String,
        /// File holding the token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Follow the results after publishing, as `results` does.
        #[arg(long)]
        follow: bool,
    },
    /// Follow a batch's results: a live tally by status, then the failures; exits 1 if any
    /// command failed.
    Results {
        #[arg(long, short)]
        batch: String,
        /// Stop once this many commands are answered.
        #[arg(long)]
        expect: Option<usize>,
        /// Stop when no new result came for this many seconds.
        #[arg(long, default_value_t = 10)]
        idle_secs: u64,
        /// Print the tally as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Link a `whatsapp` instance to a phone: shows a QR code to scan (or, with --phone, a
    /// pairing code to type) and ends when the session is saved. Then reload a running worker
    /// (SIGHUP or `POST /admin/reload`).
    Pair {
        instance: String,
        /// Phone number (digits, with country code) to link with a pairing code instead of a QR.
        #[arg(long)]
        phone: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
    },
    /// List the configured instances with their state, paired number and last change (from
    /// the running worker when it answers on its HTTP port, else from the session files).
    Instances {
        #[arg(long)]
        json: bool,
    },
    /// Log a `whatsapp` instance out (when WhatsApp can be reached) and remove its session file.
    /// Stop the worker hosting it first.
    Unpair { instance: String },
    /// Inspect the parking queue, or move parked commands back for another try.
    Parked {
        #[command(subcommand)]
        action: ParkedAction,
    },
}

#[derive(Subcommand)]
enum ParkedAction {
    /// List parked commands (id, instance, final status); they stay parked.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Move parked commands back to their instance queue, retries reset.
    Replay {
        /// Idempotency ids to move back.
        #[arg(required_unless_present = "all")]
        ids: Vec<String>,
        /// Move every parked command back.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

/// Exit code for a bad config, as sysexits' EX_USAGE.
const EXIT_CONFIG: u8 = 64;

/// Parses the command line and runs the chosen subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::TokenHash) = cli.command {
        let mut token = String::new();
        if let Err(error) = std::io::stdin().read_to_string(&mut token) {
            eprintln!("cannot read the token from standard input: {error}");
            return ExitCode::FAILURE;
        }
        let token = token.trim_end_matches(['\r', '\n']);
        println!("{}", hex::encode(TokenHash::of(token.as_bytes()).0));
        return ExitCode::SUCCESS;
    }
    telemetry::init_logs(cli.log_json);
    let config = match Config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("invalid configuration: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => crate::run(config, shutdown_signal(), |_| {}).await,
            Command::Topology => declare_topology(&config).await,
            Command::CheckConfig => {
                check_config(&config);
                Ok(())
            }
            Command::Parked { action } => parked(&config, action).await,
            Command::Pair {
                instance,
                phone,
                timeout_secs,
            } => {
                let options = whatsapp_options(&config, &instance)?;
                let number = pairing::pair(
                    &options,
                    phone.as_deref(),
                    &mut std::io::stdout(),
                    std::time::Duration::from_secs(timeout_secs),
                )
                .await?;
                println!(
                    "Instance {instance} is paired as {number}; its session is saved in {}.\nReload a running worker: kill -HUP <pid>, or POST /admin/reload on its HTTP port.",
                    options.store_path.display()
                );
                Ok(())
            }
            Command::Unpair { instance } => {
                let options = whatsapp_options(&config, &instance)?;
                if session::whatsapp::unpair(&options).await? {
                    println!("Instance {instance} is unpaired; its session file is removed.");
                } else {
                    println!("Instance {instance} has no session file.");
                }
                Ok(())
            }
            Command::Instances { json } => list_instances(&config, json).await,
            Command::Publish {
                instance,
                batch,
                file,
                format,
                column,
                delete_media,
                token_env,
                token_file,
                follow,
            } => {
                let token = match token_file {
                    Some(path) => std::fs::read_to_string(&path)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
                        .trim()
                        .to_owned(),
                    None => std::env::var(&token_env).map_err(|_| {
                        anyhow::anyhow!("set the token in ${token_env} (or use --token-file)")
                    })?,
                };
                let input: Box<dyn std::io::BufRead> = match file.as_deref() {
                    None => Box::new(std::io::stdin().lock()),
                    Some(p) if p.as_os_str() == "-" => Box::new(std::io::stdin().lock()),
                    Some(p) => Box::new(std::io::BufReader::new(std::fs::File::open(p)?)),
                };
                let targets = batch::read_targets(input, format, column.as_deref(), delete_media)?;
                let connection =
                    broker::connect(&config.broker, "chat-delete-worker publish").await?;
                let names = Names::new(&config.broker.namespace);
                let summary =
                    batch::publish(&connection, &names, &instance, &batch, &token, &targets)
                        .await?;
                eprintln!(
                    "published {} command(s) for instance {} in batch {}; results go to {}",
                    summary.published, summary.instance, summary.batch, summary.results_queue
                );
                if follow {
                    let tally = batch::follow(
                        &connection,
                        &names,
                        &batch,
                        Some(targets.len()),
                        std::time::Duration::from_secs(60),
                        true,
                    )
                    .await?;
                    print_tally(&tally, false)?;
                    if tally.failed() {
                        std::process::exit(1);
                    }
                }
                Ok(())
            }
            Command::Results {
                batch,
                expect,
                idle_secs,
                json,
            } => {
                let connection =
                    broker::connect(&config.broker, "chat-delete-worker results").await?;
                let names = Names::new(&config.broker.namespace);
                let tally = batch::follow(
                    &connection,
                    &names,
                    &batch,
                    expect,
                    std::time::Duration::from_secs(idle_secs),
                    !json,
                )
                .await?;
                print_tally(&tally, json)?;
                if tally.failed() {
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::TokenHash => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn declare_topology(config: &Config) -> anyhow::Result<()> {
    let connection = broker::connect(&config.broker, "chat-delete-worker topology").await?;
    let names = Names::new(&config.broker.namespace);
    let instances: Vec<&str> = config.instances.keys().map(String::as_str).collect();
    topology::declare(
        &connection,
        &config.broker,
        &names,
        &instances,
        &topology::retry_tiers(&config.retry.broker_delays_ms),
    )
    .await?;
    let _ = connection.close(200, "done".into()).await;
    println!(
        "declared {} and {} with {} instance queue(s)",
        names.commands_exchange(),
        names.events_exchange(),
        config.instances.len()
    );
    Ok(())
}

async fn parked(config: &Config, action: ParkedAction) -> anyhow::Result<()> {
    let connection = broker::connect(&config.broker, "chat-delete-worker parked").await?;
    let names = Names::new(&config.broker.namespace);
    match action {
        ParkedAction::List { limit, json } => {
            let commands = crate::parked::list(&connection, &names, limit).await?;
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
        }
        ParkedAction::Replay { ids, all } => {
            let ids = if all { vec![] } else { ids };
            let moved = crate::parked::replay(&connection, &names, &ids).await?;
            println!("moved {moved} command(s) back");
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

fn whatsapp_options(config: &Config, instance: &str) -> anyhow::Result<SessionOptions> {
    let cfg = config
        .instances
        .get(instance)
        .ok_or_else(|| anyhow::anyhow!("no instance {instance:?} in the config"))?;
    anyhow::ensure!(
        cfg.kind == InstanceKind::Whatsapp,
        "instance {instance} is {:?}, not a whatsapp instance",
        cfg.kind
    );
    Ok(SessionOptions {
        store_path: config.session_store_path(instance),
        delete_timeout: std::time::Duration::from_millis(config.worker.delete_timeout_ms),
        shutdown_deadline: std::time::Duration::from_millis(config.worker.shutdown_grace_ms),
        transport_url: cfg.transport_url.clone(),
    })
}

/// Asks the running worker; falls back to reading the session files.
async fn list_instances(config: &Config, json: bool) -> anyhow::Result<()> {
    let views = match worker_instances(config.http.port).await {
        Some(views) => views,
        None => {
            let mut views = vec![];
            for (name, cfg) in &config.instances {
                let (state, paired_as, changed_at) = match cfg.kind {
                    InstanceKind::Simulated => ("simulated".to_owned(), None, None),
                    InstanceKind::Whatsapp => {
                        let options = whatsapp_options(config, name)?;
                        let changed = std::fs::metadata(&options.store_path)
                            .and_then(|m| m.modified())
                            .ok()
                            .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339());
                        match session::whatsapp::inspect(&options).await {
                            Ok(Some(number)) => ("paired".to_owned(), Some(number), changed),
                            Ok(None) => ("not_paired".to_owned(), None, changed),
                            Err(session::whatsapp::OpenError::Busy(_)) => {
                                ("in_use".to_owned(), None, changed)
                            }
                            Err(e) => (format!("error: {e}"), None, changed),
                        }
                    }
                };
                views.push(http::InstanceView {
                    name: name.clone(),
                    state,
                    paired_as,
                    changed_at,
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
        return Ok(());
    }
    println!(
        "{:<24} {:<12} {:<18} LAST CHANGE",
        "INSTANCE", "STATE", "PAIRED AS"
    );
    for v in views {
        println!(
            "{:<24} {:<12} {:<18} {}",
            v.name,
            v.state,
            v.paired_as.as_deref().unwrap_or("-"),
            v.changed_at.as_deref().unwrap_or("-")
        );
    }
    Ok(())
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

fn print_tally(tally: &batch::Tally, json: bool) -> anyhow::Result<()> {
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

fn check_config(config: &Config) {
    let names = Names::new(&config.broker.namespace);
    println!("config is valid");
    println!("commands exchange: {}", names.commands_exchange());
    println!("events exchange:   {}", names.events_exchange());
    for (name, instance) in &config.instances {
        println!(
            "instance {name}: kind={:?} account={} queue={}",
            instance.kind,
            instance.account.as_deref().unwrap_or("-"),
            names.instance_queue(name)
        );
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; stopping."),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; stopping."),
    }
}
