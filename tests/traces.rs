//! Traces across the bus, received by a real OTLP/HTTP endpoint (`scripts/otlp-receiver`,
//! decoding with the `opentelemetry-proto` package): a span per command, the publisher's as its
//! parent, a child per stage, and the result carrying the worker's span.
//! `scripts/trace-test` installs the package and runs these.

mod common;

use std::collections::HashMap;
use std::io::BufRead;
use std::time::Duration;

use common::*;
use lapin::types::AMQPValue;
use serde_json::Value;

const TOKEN: &str = "secret-tok-traces";
const OK: &[u8] = br#"{"number": "5511999999999"}"#;

/// The receiver, killed on drop; its spans are read from `out`.
struct Receiver {
    child: std::process::Child,
    endpoint: String,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("spans.jsonl");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/otlp-receiver");
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .arg("--out")
            .arg(&out)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs scripts/otlp-receiver");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let endpoint = line
            .trim()
            .strip_prefix("OTLP_ENDPOINT=")
            .unwrap_or_else(|| {
                panic!("the receiver did not start ({line:?}): pip install opentelemetry-proto")
            })
            .to_owned();
        Self {
            child,
            endpoint,
            out,
            _dir: dir,
        }
    }

    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The spans of `trace_id`, once `count` of them arrived.
    async fn trace(&self, trace_id: &str, count: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let spans: Vec<Value> = self
                .spans()
                .into_iter()
                .filter(|s| s["trace_id"] == trace_id)
                .collect();
            if spans.len() >= count {
                return spans;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {count} spans of {trace_id} arrived: {spans:#?}",
                spans.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn by_name(spans: &[Value]) -> HashMap<String, Value> {
    spans
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_owned(), s.clone()))
        .collect()
}

#[tokio::test]
#[ignore = "needs the opentelemetry-proto package: scripts/trace-test installs it and runs this"]
async fn a_command_is_one_span_under_its_publishers_with_a_child_per_stage() {
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint.clone();
    let cfg = format!(
        "[instances.alpha]\ntoken_sha256 = \"{}\"\nkind = \"simulated\"\n",
        hash(TOKEN)
    );
    let mut w = TestWorker::start_tuned(&cfg, move |config| {
        config.traces.otlp_endpoint = endpoint;
        config.traces.service_name = "cleanup-test".into();
    })
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let unsampled = "5bf92f3577b34da6a3ce929d0e0e4737";
    let text = |s: &str| AMQPValue::LongString(s.into());
    w.publish(Command {
        correlation_id: Some("corr-t1"),
        extra_headers: vec![
            ("traceparent", text(&format!("00-{trace_id}-{parent}-01"))),
            ("tracestate", text("vendor=abc")),
        ],
        ..Command::new(
            "alpha",
            "trace-1",
            TOKEN,
            br#"{"number": "5511999999999", "deleteMedia": true}"#,
        )
    })
    .await;
    w.publish(Command {
        extra_headers: vec![("traceparent", text(&format!("00-{unsampled}-{parent}-00")))],
        ..Command::new("alpha", "trace-2", TOKEN, OK)
    })
    .await;
    w.publish(Command::new(
        "alpha",
        "trace-3",
        TOKEN,
        br#"{"number": "x"}"#,
    ))
    .await;

    // The result names the worker's send span, in the publisher's trace, with its state.
    let result = w.events.by_id("trace-1").await;
    assert_eq!(status(&result), 200);
    let carried = header_str(&result, "traceparent").unwrap();
    let parts: Vec<&str> = carried.split('-').collect();
    assert_eq!(parts[1], trace_id, "{carried}");
    assert_ne!(parts[2], parent, "the result names the worker's span");
    assert_eq!(parts[3], "01");
    assert_eq!(
        header_str(&result, "tracestate").as_deref(),
        Some("vendor=abc")
    );
    let unsampled_result = w.events.by_id("trace-2").await;
    assert!(
        header_str(&unsampled_result, "traceparent")
            .unwrap()
            .contains(unsampled)
    );
    // Without a traceparent the worker starts a trace and the result joins it.
    let rooted = w.events.by_id("trace-3").await;
    assert_eq!(status(&rooted), 400);
    let root_trace =
        header_str(&rooted, "traceparent").expect("a trace of its own")[3..35].to_owned();

    // The exporter sends what is buffered when the worker stops.
    w.halt().await;
    let spans = receiver.trace(trace_id, 7).await;
    let named = by_name(&spans);
    let process = &named[&format!("process {}", w.names.commands_exchange())];
    assert_eq!(process["parent_span_id"], parent);
    assert_eq!(process["kind"], "SPAN_KIND_CONSUMER");
    assert_eq!(process["service"], "cleanup-test");
    let attributes = &process["attributes"];
    assert_eq!(attributes["messaging.system"], "rabbitmq");
    assert_eq!(attributes["messaging.operation.type"], "process");
    assert_eq!(attributes["messaging.message.id"], "trace-1");
    assert_eq!(attributes["messaging.message.conversation_id"], "corr-t1");
    assert_eq!(
        attributes["messaging.rabbitmq.destination.routing_key"],
        "alpha"
    );
    assert_eq!(attributes["chat_delete.instance"], "alpha");
    assert_eq!(attributes["chat_delete.status"], 200);
    assert_eq!(attributes["chat_delete.replayed"], false);
    let id = |name: &str| named[name]["span_id"].clone();
    let parent_of = |name: &str| named[name]["parent_span_id"].clone();
    for stage in [
        "claim",
        "whatsapp delete",
        "media purge",
        "remember",
        "send",
    ] {
        assert_eq!(parent_of(stage), process["span_id"], "{stage}: {spans:#?}");
    }
    assert_eq!(parent_of("resolve"), id("whatsapp delete"));
    assert_eq!(named["whatsapp delete"]["kind"], "SPAN_KIND_CLIENT");
    let send = &named["send"];
    assert_eq!(send["kind"], "SPAN_KIND_PRODUCER");
    assert_eq!(
        send["span_id"], parts[2],
        "the result carries the send span"
    );
    assert_eq!(
        send["attributes"]["messaging.destination.name"],
        w.names.events_exchange()
    );

    let rooted = receiver.trace(&root_trace, 1).await;
    let root = rooted
        .iter()
        .find(|s| s["kind"] == "SPAN_KIND_CONSUMER")
        .unwrap();
    assert_eq!(root["parent_span_id"], "");
    assert_eq!(root["attributes"]["chat_delete.status"], 400);
    assert!(
        receiver.spans().iter().all(|s| s["trace_id"] != unsampled),
        "a publisher's unsampled trace is not exported"
    );
    w.stop().await;
}
