//! The command line refuses a config that would break later: `check-config` and `run` both
//! exit with the usage code (64) and name the key, before touching the broker.

use std::process::Command;

fn worker(config: &str, subcommand: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let token = hex::encode(chat_delete_worker::config::TokenHash::of(b"t").0);
    let text = format!(
        "[broker]\nurl = \"amqp://127.0.0.1:1\"\n[http]\nenabled = false\n{config}\n[instances.a]\nkind = \"simulated\"\ntoken_sha256 = \"{token}\"\n"
    );
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chat-delete-worker"))
        .arg("--config")
        .arg(&path)
        .arg(subcommand)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn configs_that_would_break_later_are_refused_with_the_usage_code_and_the_key() {
    for (config, key) in [
        ("[retry]\nbroker_delays_ms = []", "retry.broker_delays_ms"),
        (
            "[media]\nprefix_template = \"media/{chat_jid}/\"",
            "media.prefix_template",
        ),
        (
            "[media]\nprefix_template = \"{instance}/\"",
            "media.prefix_template",
        ),
        ("[media]\nconcurrency = 0", "media.concurrency"),
        ("[idempotency]\nlease_secs = 1", "idempotency.lease_secs"),
    ] {
        for subcommand in ["check-config", "run"] {
            let (code, stderr) = worker(config, subcommand);
            assert_eq!(code, Some(64), "{subcommand} with {config}: {stderr}");
            assert!(stderr.contains(key), "{subcommand} with {config}: {stderr}");
        }
    }
    let (code, stderr) = worker("", "check-config");
    assert_eq!(code, Some(0), "{stderr}");
}
