//! chat-delete-worker: consumes "delete entire chat" commands from RabbitMQ, applies each to the
//! owning WhatsApp instance, purges the chat's media when asked, and publishes a result event
//! that matches the documented HTTP payloads.
//!
//! # Layout
//!
//! Modules form one dependency order, bottom first; a module imports only modules before it
//! (`tests/layers.rs` checks it against `ARCHITECTURE.md`):
//!
//! 1. [`contract`]: the bus contract: the chat a command names, its body, every outcome row and
//!    the one renderer of result events, the receipt of a 200, every name on the wire.
//! 2. [`fence`]: what every effect checks first: an idempotency claim, this worker's lease on
//!    the instance ([`fence::Lease`]).
//! 3. [`telemetry`]: every metric name and description, the per-command log span, log setup.
//! 4. [`media`]: the purge on disk or S3, with its config, errors, prefix template and retry.
//! 5. [`config`]: one typed struct from TOML and `CDW__*` environment overrides.
//! 6. [`auth`]: tokens and the command's envelope (its properties and headers).
//! 7. [`idempotency`]: the store trait, embedded (redb) and Redis; claims and their renewal.
//! 8. [`session`]: the `ChatSession` trait: a scripted simulated session, and the real one
//!    through whatsapp-rust ([`session::whatsapp`]), its sessions kept in SQLite or PostgreSQL.
//! 9. [`instances`]: the hosted instances: name, credentials, session and lease.
//! 10. [`pipeline`]: the stages of one command in the contract's order, to a `Verdict`; it never
//!     touches the broker.
//! 11. [`bus`]: RabbitMQ: connect, topology, consumers, and [`bus::settle`], the one place that
//!     carries out a verdict and acks or requeues.
//! 12. [`ownership`]: which worker owns which instance: fenced leases in Redis, a balanced
//!     sticky plan, hand-over and failover.
//! 13. [`http`]: `/metrics`, `/healthz`, `/readyz`, `/instances`, `/admin/reload`.
//! 14. [`worker`]: the process's life: [`run`] serves HTTP, coordinates ownership and keeps one
//!     broker connection at a time.
//! 15. [`cli`]: every subcommand, each returning its exit code.

#![forbid(unsafe_code)]

pub mod auth;
pub mod bus;
pub mod cli;
pub mod config;
pub mod contract;
pub mod fence;
pub mod http;
pub mod idempotency;
pub mod instances;
pub mod media;
pub mod ownership;
pub mod pipeline;
pub mod session;
pub mod telemetry;
pub mod worker;

pub use worker::{Started, run};
