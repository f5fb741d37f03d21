//! The broker a run uses: its file handles are looked at before anything is declared (a broker
//! past its limit accepts no connection, and every run after it hangs), and everything of the
//! run's namespace is deleted at the end, also when the run failed.

use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use tokio::process::Command;

use super::{Args, connect};

/// Handles a quorum queue holds on each node (RabbitMQ 3.10), and what the run's connections
/// and the broker's own needs take besides.
const HANDLES_PER_QUEUE: u64 = 3;
const HANDLES_BESIDES: u64 = 100;

/// Why the broker cannot take `queues` more quorum queues, with the fix; `None` when it can
/// (or its figures cannot be read).
pub async fn blocker(args: &Args, queues: usize) -> Option<String> {
    let (used, limit) = handles(args).await?;
    let needed = queues as u64 * HANDLES_PER_QUEUE + HANDLES_BESIDES;
    // Past about 90 % RabbitMQ 3.10 stops accepting connections.
    (used + needed > limit * 9 / 10).then(|| {
        format!(
            "the broker has {} of {limit} file handles free, too few for this run's {queues} queues \
             (~{needed}): delete queues left behind (`rabbitmqctl list_queues name`; an earlier \
             harness's start with harness), or restart it with a higher limit \
             (`scripts/services --restart-rabbitmq` raises it to the hard one)",
            limit.saturating_sub(used)
        )
    })
}

/// (used, limit) of the tightest node's file handles.
async fn handles(args: &Args) -> Option<(u64, u64)> {
    if let Some(cluster) = &args.cluster {
        let nodes = management(&cluster.management_url, "/api/nodes").await?;
        return nodes
            .as_array()?
            .iter()
            .filter_map(|n| Some((n["fd_used"].as_u64()?, n["fd_total"].as_u64()?)))
            .max_by_key(|(used, limit)| used * 1000 / limit.max(&1));
    }
    let out = Command::new("rabbitmqctl")
        .args(["-q", "eval", "file_handle_cache:info()."])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let figure = |key: &str| -> Option<u64> {
        let start = text.find(&format!("{{{key},"))? + key.len() + 2;
        text[start..].split('}').next()?.trim().parse().ok()
    };
    Some((figure("total_used")?, figure("total_limit")?))
}

async fn management(api: &str, path: &str) -> Option<serde_json::Value> {
    let response = reqwest::Client::new()
        .get(format!("{api}{path}"))
        .basic_auth("guest", Some("guest"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    serde_json::from_str(&response.text().await.ok()?).ok()
}

/// The names of the broker's queues and exchanges.
async fn names(args: &Args) -> (Vec<String>, Vec<String>) {
    let named = |value: Option<serde_json::Value>| -> Vec<String> {
        value
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|q| q["name"].as_str().map(str::to_owned))
            .collect()
    };
    if let Some(cluster) = &args.cluster {
        let api = &cluster.management_url;
        return (
            named(management(api, "/api/queues?columns=name").await),
            named(management(api, "/api/exchanges?columns=name").await),
        );
    }
    let list = |what: &'static str| async move {
        let out = Command::new("rabbitmqctl")
            .args(["-q", what, "name", "--no-table-headers"])
            .output()
            .await;
        out.map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
    };
    (list("list_queues").await, list("list_exchanges").await)
}

/// Deletes every queue and exchange whose name starts with `ns` (the run's namespaces, its
/// neighbour's and its results queue).
pub async fn sweep(args: &Args, ns: &str) {
    let (queues, exchanges) = names(args).await;
    let connection = connect(&args.amqp).await;
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    let mut deleted = 0;
    for queue in queues.iter().filter(|q| q.starts_with(ns)) {
        let options = QueueDeleteOptions::default();
        if channel
            .queue_delete(queue.as_str().into(), options)
            .await
            .is_ok()
        {
            deleted += 1;
        }
    }
    for exchange in exchanges.iter().filter(|e| e.starts_with(ns)) {
        let options = ExchangeDeleteOptions::default();
        let _ = channel
            .exchange_delete(exchange.as_str().into(), options)
            .await;
    }
    if deleted > 0 {
        eprintln!("harness: deleted {deleted} queue(s) of {ns} left on the broker");
    }
    let _ = connection.close(200, "swept".into()).await;
}
