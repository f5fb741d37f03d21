//! TLS against a real listener: `scripts/tls-test` generates a CA, a server and a client
//! certificate, opens two TLS listeners on the local RabbitMQ (one that requires a client
//! certificate) and runs these tests with `--ignored`. Without it they have nothing to talk to.

mod common;

use std::path::PathBuf;

use chat_delete_worker::config::{BrokerConfig, Config};
use common::*;

const TOKEN: &str = "secret-tok-tls";

/// What `scripts/tls-test` set up: the certificate folder and the two listeners' ports.
struct Listeners {
    dir: PathBuf,
    server_auth_port: u16,
    mutual_port: u16,
    identity_password: String,
}

impl Listeners {
    fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| panic!("{name} is unset: run scripts/tls-test"))
        };
        Self {
            dir: var("TLS_TEST_DIR").into(),
            server_auth_port: var("TLS_TEST_PORT").parse().unwrap(),
            mutual_port: var("TLS_TEST_MUTUAL_PORT").parse().unwrap(),
            identity_password: var("TLS_TEST_IDENTITY_PASSWORD"),
        }
    }

    /// Broker settings for one listener; the host name is the one the server certificate names.
    fn broker(&self, port: u16, ca: &str, identity: bool) -> BrokerConfig {
        BrokerConfig {
            url: format!("amqps://guest:guest@localhost:{port}/%2f"),
            ca_file: Some(self.dir.join(ca)),
            client_identity_file: identity.then(|| self.dir.join("client.p12")),
            client_identity_password: identity.then(|| self.identity_password.clone()),
            ..BrokerConfig::default()
        }
    }
}

/// A worker whose own connection is `broker`; the test publishes and listens over plain AMQP.
async fn serves_a_command_over(broker: BrokerConfig) {
    let toml = format!(
        "[pacing]\ndeletes_per_minute = \"unlimited\"\n[instances.alpha]\ntoken_sha256 = \"{}\"\nkind = \"simulated\"\n",
        hash(TOKEN)
    );
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::from_toml(&format!(
        "[http]\nport = 0\nbind = \"127.0.0.1\"\n[store]\npath = \"{}\"\n{toml}",
        dir.path().display()
    ))
    .unwrap();
    config.broker = BrokerConfig {
        namespace: ns.clone(),
        ..broker
    };
    let w = TestWorker::start_with(config, ns, dir).await;
    w.publish(Command::new(
        "alpha",
        "tls-1",
        TOKEN,
        br#"{"number": "5511999999999"}"#,
    ))
    .await;
    let result = w.events.by_id("tls-1").await;
    assert_eq!(status(&result), 200, "{:?}", body(&result));
    w.stop().await;
}

async fn refusal(broker: &BrokerConfig) -> String {
    match chat_delete_worker::bus::connect(broker, "tls-test").await {
        Ok(_) => panic!("{} accepted the connection", broker.url),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
#[ignore = "needs the TLS listeners of scripts/tls-test"]
async fn amqps_with_the_brokers_ca_verifies_and_serves() {
    let l = Listeners::from_env();
    serves_a_command_over(l.broker(l.server_auth_port, "ca.pem", false)).await;
}

#[tokio::test]
#[ignore = "needs the TLS listeners of scripts/tls-test"]
async fn a_certificate_from_another_ca_is_refused_with_a_clear_error() {
    let l = Listeners::from_env();
    let error = refusal(&l.broker(l.server_auth_port, "other-ca.pem", false)).await;
    assert!(
        error.contains("certificate") && error.contains("UnknownIssuer"),
        "the error should say the broker's certificate is not trusted: {error}"
    );
}

#[tokio::test]
#[ignore = "needs the TLS listeners of scripts/tls-test"]
async fn mutual_tls_with_the_pkcs12_identity_serves() {
    let l = Listeners::from_env();
    serves_a_command_over(l.broker(l.mutual_port, "ca.pem", true)).await;
}

#[tokio::test]
#[ignore = "needs the TLS listeners of scripts/tls-test"]
async fn a_listener_that_requires_a_client_certificate_refuses_none() {
    let l = Listeners::from_env();
    let error = refusal(&l.broker(l.mutual_port, "ca.pem", false)).await;
    assert!(
        error.contains("CertificateRequired") || error.contains("client_identity_file"),
        "the error should point at the missing client certificate: {error}"
    );
}

#[tokio::test]
#[ignore = "needs the TLS listeners of scripts/tls-test"]
async fn a_wrong_identity_password_is_refused_before_connecting() {
    let l = Listeners::from_env();
    let mut broker = l.broker(l.mutual_port, "ca.pem", true);
    broker.client_identity_password = Some("not-the-password".into());
    let error = refusal(&broker).await;
    assert!(
        !error.contains("not-the-password") && !error.contains(&l.identity_password),
        "no password in errors: {error}"
    );
}
