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
    Ok(Connection::connect_with_config(&cfg.url, props, tls, runtime).await?)
}
