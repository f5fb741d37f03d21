//! `topology`, `check-config` and `token-hash`: setting a deployment up.

use std::io::Read;
use std::process::ExitCode;

use crate::bus::capacity::Verdict;
use crate::bus::{self, topology};
use crate::config::{CapacityCheck, Config, TokenHash};
use crate::contract::Names;

/// Declares the exchanges and queues of the configured instances; with `upgrade`, queues an
/// earlier version declared otherwise are declared anew, their messages kept.
pub async fn declare_topology(config: &Config, upgrade: bool) -> anyhow::Result<ExitCode> {
    let connection = bus::connect(&config.broker, "chat-delete-worker topology").await?;
    let names = Names::new(&config.broker.namespace);
    let instances: Vec<&str> = config.instances.keys().map(String::as_str).collect();
    let tiers = config.retry.tiers();
    let topology = topology::Topology::new(&config.broker, &names, &instances, &tiers);
    bus::capacity::enforce(&config.broker, &topology).await?;
    bus::policies::apply(&config.broker, &topology.policies).await?;
    if upgrade {
        let upgraded = bus::upgrade::upgrade(&connection, &topology).await?;
        for (queue, moved) in &upgraded.queues {
            println!("upgraded {queue}: {moved} message(s) kept");
        }
    } else {
        topology.declare(&connection).await?;
    }
    let _ = connection.close(200, "done".into()).await;
    println!(
        "declared {} and {} with {} instance queue(s)",
        names.commands_exchange(),
        names.events_exchange(),
        config.instances.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// The config is valid once it loaded; prints what this worker would host and (with
/// `broker.management_url`) whether its queues fit the broker's file handles.
pub async fn check_config(config: &Config) -> ExitCode {
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
    let instances: Vec<&str> = config.instances.keys().map(String::as_str).collect();
    let tiers = config.retry.tiers();
    let topology = topology::Topology::new(&config.broker, &names, &instances, &tiers);
    match bus::capacity::check(&config.broker, &topology).await {
        Verdict::Unknown(why) => println!("broker capacity: not checked ({why})"),
        Verdict::Fits { new_queues, free } => println!(
            "broker capacity: {new_queues} new queue(s) fit; {free} file handles left on the tightest node"
        ),
        Verdict::Tight(shortfall) => println!("broker capacity: tight: {shortfall}"),
        Verdict::Exceeds(shortfall) => {
            println!("broker capacity: refused: {shortfall}");
            if config.broker.capacity_check == CapacityCheck::Refuse {
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

/// Prints the SHA-256 of the token read from standard input (a trailing newline is not part
/// of it).
pub fn token_hash() -> ExitCode {
    let mut token = String::new();
    if let Err(error) = std::io::stdin().read_to_string(&mut token) {
        eprintln!("cannot read the token from standard input: {error}");
        return ExitCode::FAILURE;
    }
    let token = token.trim_end_matches(['\r', '\n']);
    println!("{}", hex::encode(TokenHash::of(token.as_bytes()).0));
    ExitCode::SUCCESS
}
