//! chat-delete-worker: consumes "delete entire chat" commands from RabbitMQ, applies each to the
//! owning WhatsApp instance, purges the chat's media when asked, and publishes a result event
//! that matches the documented HTTP payloads.
//!
//! # Layout
//!
//! One command's path, top to bottom:
//!
//! - [`worker`]: the process's life. [`run`] serves HTTP, then keeps one broker connection at a
//!   time ([`worker::connection`]), reconnecting with backoff ([`worker::reconnect`]).
//! - [`bus`]: RabbitMQ. [`bus::connect()`], [`bus::topology`] (the exchanges and queues, and
//!   [`bus::upgrade`] for an earlier version's), [`bus::consume`] (a consumer per queue, its
//!   prefetch sized by [`bus::prefetch`]), [`bus::settle`] (carry out a verdict, then ack or
//!   requeue: the one place that decides), [`bus::publisher`] (confirmed publishing) and
//!   [`bus::reply`] (`reply_to` copies, whose failures stay theirs).
//! - [`pipeline`]: the stages in the contract's order, run by [`pipeline::Pipeline::handle`]:
//!   [`pipeline::envelope`] (properties and headers), [`pipeline::auth`] (tokens),
//!   [`idempotency`] (claim, replay, remember), [`pipeline::request`] (the body, number → JID),
//!   [`pipeline::pacing`] (per-token budget), [`session`] (the delete on the instance's
//!   WhatsApp connection), [`media`] (the purge). [`pipeline::instances`] holds the hosted
//!   instances.
//! - [`contract`]: every outcome row and the one function that renders a result event
//!   ([`contract::outcome`]), and every name on the wire: headers, event types, exchanges and
//!   queues ([`contract::wire`]).
//!
//! Around it:
//!
//! - [`idempotency`]: the store trait and its two implementations, embedded (redb,
//!   `idempotency::embedded`: front end, writer thread, record codec) and Redis.
//! - [`session`]: the `ChatSession` trait; a scripted simulated session, and the real one
//!   through whatsapp-rust ([`session::whatsapp`]: an actor per instance,
//!   [`session::whatsapp::client`] for the client itself, [`session::whatsapp::resolve`] for
//!   the chat a number stands for, [`session::whatsapp::mutation`] for the `deleteChat` sent).
//! - [`media`]: the purge on disk or S3, with its config, errors, prefix template and retry.
//! - [`fence`]: what every effect checks first (the idempotency claim is held).
//! - [`ownership`]: which worker owns which instance when several share them: leases with a
//!   fencing generation in Redis, a balanced sticky plan, hand-over and failover.
//! - [`config`]: one typed struct from TOML and `CDW__*` environment overrides.
//! - [`telemetry`]: every metric name and description, the per-command log span, log setup;
//!   [`http`]: `/metrics`, `/healthz`, `/readyz`, `/instances`, `/admin/reload`.
//! - [`cli`]: every subcommand (run, topology, check-config, token-hash, publish, results,
//!   parked, pair, unpair, instances), each returning its exit code.

#![forbid(unsafe_code)]

pub mod bus;
pub mod cli;
pub mod config;
pub mod contract;
pub mod fence;
pub mod http;
pub mod idempotency;
pub mod media;
pub mod ownership;
pub mod pipeline;
pub mod session;
pub mod telemetry;
pub mod worker;

pub use worker::{Started, run};
