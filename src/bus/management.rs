//! RabbitMQ's HTTP API (`broker.management_url`), reached with `broker.url`'s credentials.

use std::time::Duration;

use super::BrokerError;
use crate::config::BrokerConfig;

pub struct Management {
    client: reqwest::Client,
    api: String,
    username: String,
    password: String,
    /// `broker.url`'s virtual host, encoded for a path segment.
    pub vhost: String,
}

/// A name encoded for one path segment of the API.
pub fn encode(segment: &str) -> String {
    segment.replace('%', "%25").replace('/', "%2F")
}

impl Management {
    /// The API of `cfg`, if it names one.
    pub fn of(cfg: &BrokerConfig) -> Result<Option<Self>, BrokerError> {
        let Some(api) = &cfg.management_url else {
            return Ok(None);
        };
        let uri: lapin::uri::AMQPUri = cfg.url.parse().map_err(BrokerError::Url)?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| BrokerError::Policy(e.to_string()))?;
        Ok(Some(Self {
            client,
            api: api.trim_end_matches('/').to_owned(),
            username: uri.authority.userinfo.username,
            password: uri.authority.userinfo.password,
            vhost: encode(&uri.vhost),
        }))
    }

    /// A request to `path` (which starts with `/api/`), authenticated.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.api))
            .basic_auth(&self.username, Some(&self.password))
    }
}
