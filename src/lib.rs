//! chat-delete-worker: consumes "delete entire chat" commands from RabbitMQ, applies each to the
//! owning WhatsApp instance, purges the chat's media when asked, and publishes a result event
//! that matches the documented HTTP payloads.
//!
//! # Layout
//! - `config`: the typed configuration (TOML + `CDW__*` environment overrides).
//! - `topology`: exchange and queue names, and their declaration.
//! - `decode` → `auth` → `command` → `session` → `media`: the pipeline stages, driven by
//!   `pipeline`; `outcome` turns the result into the event; `consume` settles deliveries.
//! - `broker`: the RabbitMQ connection and confirmed publishing; `http`: health and metrics.

#![forbid(unsafe_code)]

pub mod bus;
pub mod cli;
pub mod config;
pub mod contract;
pub mod http;
pub mod idempotency;
pub mod media;
pub mod pipeline;
pub mod session;
pub mod telemetry;
pub mod worker;

pub use worker::{Started, run};
