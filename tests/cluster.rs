//! Across machines, on the 3-node RabbitMQ cluster of `scripts/cluster` (the test script starts
//! it; `CDW_CLUSTER_AMQP_URLS` and `CDW_CLUSTER_MANAGEMENT_URLS` point elsewhere): queue
//! settings come from policies, quorum-queue leaders spread over the nodes, and a worker
//! connects to whichever node answers.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chat_delete_worker::bus::topology::Topology;
use chat_delete_worker::bus::{self, policies};
use chat_delete_worker::config::BrokerConfig;
use chat_delete_worker::contract::Names;
use common::amqp_url;
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions, BasicRejectOptions};
use serde_json::Value;

fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(str::to_owned)
        .collect()
}

fn cluster() -> (Vec<String>, Vec<String>) {
    (
        list(
            "CDW_CLUSTER_AMQP_URLS",
            "amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,amqp://guest:guest@127.0.0.1:5683/%2f",
        ),
        list(
            "CDW_CLUSTER_MANAGEMENT_URLS",
            "http://127.0.0.1:15681,http://127.0.0.1:15682,http://127.0.0.1:15683",
        ),
    )
}

fn host_port(url: &str) -> String {
    let uri: lapin::uri::AMQPUri = url.parse().unwrap();
    format!("{}:{}", uri.authority.host, uri.authority.port)
}

async fn api(method: reqwest::Method, url: String) -> Value {
    let response = reqwest::Client::new()
        .request(method, &url)
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e} (is the cluster up? scripts/cluster start)"));
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// The namespace's queues as the management API shows them, by name.
async fn queues(management: &str, ns: &str) -> Vec<Value> {
    let all = api(
        reqwest::Method::GET,
        format!(
            "{management}/api/queues/%2F?columns=name,policy,effective_policy_definition,leader,arguments"
        ),
    )
    .await;
    all.as_array()
        .unwrap()
        .iter()
        .filter(|q| q["name"].as_str().unwrap().starts_with(&format!("{ns}.")))
        .cloned()
        .collect()
}

/// The index of the node leading the most queues now (ties: the first).
async fn busiest_node(management: &str) -> usize {
    let all = api(
        reqwest::Method::GET,
        format!("{management}/api/queues/%2F?columns=name,leader"),
    )
    .await;
    let mut counts = [0usize; 3];
    for queue in all.as_array().unwrap() {
        if let Some(leader) = queue["leader"].as_str()
            && let Some(n) = (1..=3).find(|n| leader == format!("cdw{n}@localhost"))
        {
            counts[n - 1] += 1;
        }
    }
    (0..3)
        .max_by_key(|&i| (counts[i], std::cmp::Reverse(i)))
        .unwrap()
}

#[tokio::test]
async fn queue_settings_come_from_policies_and_leaders_spread_over_the_nodes() {
    let (urls, management) = cluster();
    let ns = format!("cl{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let cfg = BrokerConfig {
        url: urls[0].clone(),
        nodes: urls[1..].iter().map(|u| host_port(u)).collect(),
        management_url: Some(management[0].clone()),
        namespace: ns.clone(),
        delivery_limit: 3,
        ..Default::default()
    };
    let names = Names::new(&ns);
    let instances: Vec<String> = (0..9).map(|i| format!("i{i}")).collect();
    let refs: Vec<&str> = instances.iter().map(String::as_str).collect();
    let topology = Topology::new(&cfg, &names, &refs, &[200]);
    policies::apply(&cfg, &topology.policies).await.unwrap();
    // Declare through the node that already leads the most queues: with the default
    // (client-local) every new leader would land there; balanced places them elsewhere.
    let busiest = busiest_node(&management[0]).await;
    let through = BrokerConfig {
        url: urls[busiest].clone(),
        nodes: vec![],
        ..cfg.clone()
    };
    let connection = bus::connect(&through, "cluster test").await.unwrap();
    topology.declare(&connection).await.unwrap();

    // The API's statistics lag a few seconds: wait until every queue shows its policy.
    let expected = |name: &str| {
        if name == names.dead_queue() {
            format!("{ns}.dead")
        } else if name == names.parked_queue() {
            format!("{ns}.parked")
        } else if name.starts_with(&format!("{ns}.delete.retry.")) {
            format!("{ns}.retry")
        } else {
            format!("{ns}.commands")
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let shown = loop {
        let shown = queues(&management[0], &ns).await;
        let settled = shown.len() == topology.queues.len()
            && shown.iter().all(|q| {
                let name = q["name"].as_str().unwrap();
                // A stream shows no leader here.
                q["policy"].as_str() == Some(&expected(name))
                    && (name == names.parked_queue() || q["leader"].is_string())
            });
        if settled {
            break shown;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "policies not applied: {shown:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut leaders = BTreeSet::new();
    for queue in &shown {
        let name = queue["name"].as_str().unwrap();
        let arguments = queue["arguments"].as_object().unwrap();
        assert!(
            !arguments.contains_key("x-delivery-limit")
                && !arguments.contains_key("x-dead-letter-exchange"),
            "{name} declared with what policies carry: {arguments:?}"
        );
        let definition = &queue["effective_policy_definition"];
        if expected(name).ends_with(".commands") {
            assert_eq!(definition["delivery-limit"], 3, "{name}");
            assert_eq!(definition["dead-letter-exchange"], names.dead_exchange());
            assert_eq!(definition["queue-leader-locator"], "balanced");
            leaders.insert(queue["leader"].as_str().unwrap().to_owned());
        }
        if name == names.dead_queue() {
            assert_eq!(definition["dead-letter-routing-key"], names.parked_queue());
        }
    }
    assert_ne!(
        leaders,
        BTreeSet::from([format!("cdw{}@localhost", busiest + 1)]),
        "every leader on the declaring node despite the balanced locator"
    );

    // The policy's delivery limit is in force: a command rejected past it is dead-lettered.
    // (The unrouted queue has the instance queues' policy, and no single active consumer,
    // which basic.get would be refused on.)
    let channel = connection.create_channel().await.unwrap();
    let queue = names.unrouted_queue();
    channel
        .basic_publish(
            names.commands_exchange().as_str().into(),
            "no-such-instance".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let mut rejected = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        match channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            Some(message) => {
                message
                    .delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: true })
                    .await
                    .unwrap();
                rejected += 1;
            }
            None => {
                let dead = channel
                    .basic_get(
                        names.dead_queue().as_str().into(),
                        BasicGetOptions::default(),
                    )
                    .await
                    .unwrap();
                if dead.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(
        (1..=4).contains(&rejected),
        "dead-lettered after {rejected} deliveries (limit 3)"
    );

    for queue in &topology.queues {
        api(
            reqwest::Method::DELETE,
            format!("{}/api/queues/%2F/{}", management[0], queue.name),
        )
        .await;
    }
    for policy in &topology.policies {
        api(
            reqwest::Method::DELETE,
            format!("{}/api/policies/%2F/{}", management[0], policy.name),
        )
        .await;
    }
}

/// With a node down (here: nothing listens on the first address), the worker's connection
/// goes to the next one, whichever address it tries first.
#[tokio::test]
async fn a_connection_goes_to_a_node_that_answers() {
    let live = host_port(&amqp_url());
    let cfg = BrokerConfig {
        url: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
        nodes: vec!["127.0.0.1:2".into(), live],
        ..Default::default()
    };
    for _ in 0..6 {
        let connection = bus::connect(&cfg, "failover test").await.unwrap();
        assert!(connection.status().connected());
        let _ = connection.close(200, "done".into()).await;
    }
    let down = BrokerConfig {
        nodes: vec!["127.0.0.1:2".into()],
        ..cfg
    };
    assert!(bus::connect(&down, "failover test").await.is_err());
}

/// The least free file handles among the running nodes.
async fn tightest_free(management: &str) -> u64 {
    let nodes = api(reqwest::Method::GET, format!("{management}/api/nodes")).await;
    nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["running"].as_bool() == Some(true))
        .map(|n| n["fd_total"].as_u64().unwrap() - n["fd_used"].as_u64().unwrap())
        .min()
        .unwrap()
}

/// Defect (a bench with 1,000 instances on a broker limited to 1,024 open files took it down:
/// the broker accepted no connection until restarted, and nothing said why): a topology the
/// broker's file handles cannot hold is refused before anything is declared, by `topology`
/// and `check-config`, with the fix; one that fits is declared as before.
#[tokio::test]
async fn queues_the_brokers_file_handles_cannot_hold_are_refused_before_declaring() {
    let (urls, management) = cluster();
    let ns = format!("cap{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    // A quorum queue takes three handles on every node: a third of the free ones, and more.
    let too_many = tightest_free(&management[0]).await / 3 + 50;
    let dir = tempfile::tempdir().unwrap();
    let token = hex::encode(chat_delete_worker::config::TokenHash::of(b"t").0);
    let config = |instances: u64| {
        let mut text = format!(
            "[broker]\nurl = \"{}\"\nmanagement_url = \"{}\"\nnamespace = \"{ns}\"\n[http]\nenabled = false\n",
            urls[0], management[0]
        );
        for i in 0..instances {
            text.push_str(&format!(
                "[instances.i{i}]\nkind = \"simulated\"\ntoken_sha256 = \"{token}\"\n"
            ));
        }
        let path = dir.path().join(format!("{instances}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let run = |path: &std::path::Path, subcommand: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chat-delete-worker"))
            .arg("--config")
            .arg(path)
            .arg(subcommand)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };

    let crowded = config(too_many);
    for subcommand in ["check-config", "topology"] {
        let (ok, text) = run(&crowded, subcommand);
        assert!(!ok, "{subcommand} went ahead: {text}");
        assert!(
            text.contains("file handles") && text.contains("LimitNOFILE"),
            "{subcommand}: {text}"
        );
    }
    let names = Names::new(&ns);
    let declared = api(
        reqwest::Method::GET,
        format!(
            "{}/api/exchanges/%2F/{}",
            management[0],
            names.commands_exchange()
        ),
    )
    .await;
    assert_eq!(declared["error"], "Object Not Found", "nothing declared");

    let (ok, text) = run(&config(3), "check-config");
    assert!(ok && text.contains("new queue(s) fit"), "{text}");
    let (ok, text) = run(&config(3), "topology");
    assert!(ok, "{text}");
    let connection = bus::connect(
        &BrokerConfig {
            url: urls[0].clone(),
            ..Default::default()
        },
        "cluster test",
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let topology = Topology::new(
        &BrokerConfig::default(),
        &names,
        &["i0", "i1", "i2"],
        &chat_delete_worker::config::RetryConfig::default().tiers(),
    );
    for queue in &topology.queues {
        channel
            .queue_delete(queue.name.as_str().into(), Default::default())
            .await
            .unwrap();
    }
    for exchange in [
        names.commands_exchange(),
        names.unrouted_exchange(),
        names.events_exchange(),
        names.dead_exchange(),
    ] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    }
    for tier in chat_delete_worker::config::RetryConfig::default().tiers() {
        let _ = channel
            .exchange_delete(
                names.retry_exchange(tier).as_str().into(),
                Default::default(),
            )
            .await;
    }
}
