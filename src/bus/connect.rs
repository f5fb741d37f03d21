//! Opening a broker connection, plain or TLS, to one of the cluster's nodes.

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use super::BrokerError;
use crate::config::{BrokerConfig, host_port};

/// The addresses to try: `url`, then each of `nodes` with `url`'s credentials, vhost and TLS.
pub fn addresses(cfg: &BrokerConfig) -> Result<Vec<AMQPUri>, BrokerError> {
    let first: AMQPUri = cfg.url.parse().map_err(BrokerError::Url)?;
    let mut all = vec![first.clone()];
    for node in &cfg.nodes {
        let (host, port) = host_port(node)
            .ok_or_else(|| BrokerError::Url(format!("`{node}` is not host:port")))?;
        let mut uri = first.clone();
        uri.authority.host = host.to_owned();
        uri.authority.port = port;
        all.push(uri);
    }
    Ok(all)
}

/// Opens a connection to the first node that answers, starting at a random one so that
/// workers spread over the cluster (and so do the queue leaders they declare).
pub async fn connect(cfg: &BrokerConfig, connection_name: &str) -> Result<Connection, BrokerError> {
    let uris = addresses(cfg)?;
    let start = rand::random_range(0..uris.len());
    let mut failure = None;
    for uri in uris.iter().cycle().skip(start).take(uris.len()) {
        match connect_to(cfg, connection_name, uri.clone()).await {
            Ok(connection) => return Ok(connection),
            Err(error) if !error.is_retryable() => return Err(error),
            Err(error) => {
                if uris.len() > 1 {
                    tracing::warn!(host = %uri.authority.host, port = uri.authority.port, %error, "Broker node unreachable; trying the next.");
                }
                failure = Some(error);
            }
        }
    }
    Err(failure.unwrap_or(BrokerError::ConnectionLost))
}

async fn connect_to(
    cfg: &BrokerConfig,
    connection_name: &str,
    mut uri: AMQPUri,
) -> Result<Connection, BrokerError> {
    // Short heartbeats let the broker tell a frozen or cut-off worker from a quiet one within
    // seconds, and hand the queues it held (with their deliveries) to the next owners.
    if uri.query.heartbeat.is_none() && cfg.heartbeat_secs > 0 {
        uri.query.heartbeat = Some(cfg.heartbeat_secs);
    }
    let props = ConnectionProperties::default().with_connection_name(connection_name.into());
    if cfg.ca_file.is_none() && cfg.client_identity_file.is_none() {
        return Ok(Connection::connect_uri(uri, props).await?);
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| BrokerError::TlsFile(path.display().to_string(), e))
    };
    let cert_chain = match &cfg.ca_file {
        Some(path) => Some(String::from_utf8_lossy(&read(path)?).into_owned()),
        None => None,
    };
    let identity = match &cfg.client_identity_file {
        Some(path) => Some(OwnedIdentity::PKCS12 {
            der: read(path)?,
            password: cfg.client_identity_password.clone().unwrap_or_default(),
        }),
        None => None,
    };
    let tls = OwnedTLSConfig {
        identity,
        cert_chain,
    };
    let runtime = lapin::runtime::default_runtime()?;
    let without_identity = tls.identity.is_none();
    Connection::connect_uri_with_config(uri, props, tls, runtime)
        .await
        .map_err(|e| match closed_by_peer(&e) && without_identity {
            // A listener that requires a client certificate closes the connection; under
            // TLS 1.3 that can reach us as a reset rather than as its alert.
            true => BrokerError::TlsClosed(e),
            false => e.into(),
        })
}

fn closed_by_peer(e: &lapin::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    matches!(e.kind(), lapin::ErrorKind::IOError(io)
        if matches!(io.kind(), ConnectionReset | BrokenPipe | UnexpectedEof))
}
