//! The command line: the worker itself (`run`) and the tools around it. One file per group of
//! subcommands: [`publish`] and [`results`] for bulk clean-up, [`parked`] for the parking
//! queue, [`pair`] (pair, unpair) and `instances` for WhatsApp sessions, `setup` (topology,
//! check-config, token-hash). Each returns its exit code.

mod instances;
mod migrate;
pub mod pair;
pub mod parked;
pub mod publish;
pub mod results;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::telemetry;

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
    Topology {
        /// Upgrade queues an earlier version declared with other arguments, keeping their
        /// messages (stop every worker first).
        #[arg(long)]
        upgrade: bool,
    },
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
        format: publish::InputFormat,
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
    /// Move `whatsapp` instances' SQLite session files (all, or those named) into the
    /// PostgreSQL session store of `[sessions]`. Stop the workers using the files first.
    MigrateSessions {
        instances: Vec<String>,
        /// Instead: move sessions kept in PostgreSQL under bare instance names (before
        /// sessions were kept per `broker.namespace`) to this deployment's keys. Run once, by
        /// the deployment that used them.
        #[arg(long)]
        adopt_unnamespaced: bool,
    },
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
pub const EXIT_CONFIG: u8 = 64;

/// Parses the command line and runs the chosen subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::TokenHash) = cli.command {
        return setup::token_hash();
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
    let result = runtime.block_on(dispatch(config, cli.command.unwrap_or(Command::Run)));
    result.unwrap_or_else(|error| {
        eprintln!("error: {error:#}");
        ExitCode::FAILURE
    })
}

async fn dispatch(config: Config, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run => {
            crate::run(config, shutdown_signal(), |_| {}).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology { upgrade } => setup::declare_topology(&config, upgrade).await,
        Command::CheckConfig => Ok(setup::check_config(&config).await),
        Command::TokenHash => Ok(setup::token_hash()),
        Command::Parked { action } => match action {
            ParkedAction::List { limit, json } => parked::run_list(&config, limit, json).await,
            ParkedAction::Replay { ids, all } => {
                parked::run_replay(&config, if all { vec![] } else { ids }).await
            }
        },
        Command::Pair {
            instance,
            phone,
            timeout_secs,
        } => {
            let limit = Duration::from_secs(timeout_secs);
            pair::run_pair(&config, &instance, phone.as_deref(), limit).await
        }
        Command::Unpair { instance } => pair::run_unpair(&config, &instance).await,
        Command::MigrateSessions {
            instances,
            adopt_unnamespaced,
        } => migrate::run(&config, &instances, adopt_unnamespaced).await,
        Command::Instances { json } => instances::run(&config, json).await,
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
            let input = publish::Input {
                file,
                format,
                column,
                delete_media,
            };
            let token = publish::read_token(&token_env, token_file.as_deref())?;
            let published = publish::run(&config, &instance, &batch, &token, input).await?;
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            let expect = Some(published);
            results::run(&config, &batch, expect, Duration::from_secs(60), false).await
        }
        Command::Results {
            batch,
            expect,
            idle_secs,
            json,
        } => {
            results::run(
                &config,
                &batch,
                expect,
                Duration::from_secs(idle_secs),
                json,
            )
            .await
        }
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
