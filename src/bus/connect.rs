//! Opening a broker connection, plain or TLS.

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};

use super::BrokerError;
use crate::config::BrokerConfig;

/// Opens a connection; `amqps://` URLs use the configured CA and client identity.
pub async fn connect(cfg: &BrokerConfig, connection_name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(connection_name.into());
    if cfg.ca_file.is_none() && cfg.client_identity_file.is_none() {
        return Ok(Connection::connect(&cfg.url, props).await?);
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
    Connection::connect_with_config(&cfg.url, props, tls, runtime)
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
