//! The queue settings operators tune per deployment (delivery limit, dead-lettering, leader
//! placement) as RabbitMQ policies, applied through the HTTP API: a policy can change on a
//! queue that exists, where a changed queue argument is refused (PRECONDITION_FAILED).

use lapin::types::AMQPValue;
use serde_json::{Map, Value, json};

use super::BrokerError;
use super::management::{Management, encode};
use crate::config::BrokerConfig;

/// One policy: the queues it matches and what it sets on them.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    pub pattern: String,
    /// The highest priority among matching policies wins (only one applies to a queue).
    pub priority: u8,
    pub definition: Map<String, Value>,
}

impl Policy {
    /// A policy holding what would otherwise be the queue's `x-` arguments.
    pub fn of_arguments(
        name: String,
        pattern: String,
        priority: u8,
        arguments: &[(&str, AMQPValue)],
    ) -> Self {
        let mut definition = Map::new();
        // "balanced" spreads quorum-queue (and stream) leaders over the nodes; the default,
        // client-local, puts them all on the node the declaring worker reached.
        definition.insert("queue-leader-locator".into(), json!("balanced"));
        for (key, value) in arguments {
            let value = match value {
                AMQPValue::LongString(s) => json!(s.to_string()),
                AMQPValue::LongLongInt(n) => json!(n),
                AMQPValue::Boolean(b) => json!(b),
                other => json!(format!("{other:?}")),
            };
            definition.insert(key.trim_start_matches("x-").to_owned(), value);
        }
        Self {
            name,
            pattern,
            priority,
            definition,
        }
    }
}

/// `.` and the other characters a namespace may hold, escaped for a policy's regex.
pub fn escape(name: &str) -> String {
    name.chars()
        .flat_map(|c| match c {
            '.' | '-' => vec!['\\', c],
            c => vec![c],
        })
        .collect()
}

/// Writes the policies through `broker.management_url`, with `broker.url`'s credentials and
/// virtual host.
pub async fn apply(cfg: &BrokerConfig, policies: &[Policy]) -> Result<(), BrokerError> {
    let Some(api) = Management::of(cfg)? else {
        return Ok(());
    };
    for policy in policies {
        let path = format!("/api/policies/{}/{}", api.vhost, encode(&policy.name));
        let body = json!({
            "pattern": policy.pattern,
            "definition": policy.definition,
            "priority": policy.priority,
            "apply-to": "queues",
        });
        let response = api
            .request(reqwest::Method::PUT, &path)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| BrokerError::Policy(e.without_url().to_string()))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(BrokerError::Policy(format!(
                "policy {} refused ({status}): {}",
                policy.name,
                text.chars().take(300).collect::<String>()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_become_a_definition_with_leaders_balanced() {
        let policy = Policy::of_arguments(
            "chat.commands".into(),
            format!("^{}\\.delete\\.", escape("chat.v2")),
            1,
            &[
                ("x-delivery-limit", AMQPValue::LongLongInt(20)),
                (
                    "x-dead-letter-exchange",
                    AMQPValue::LongString("chat.dead".into()),
                ),
            ],
        );
        assert_eq!(policy.pattern, "^chat\\.v2\\.delete\\.");
        assert_eq!(
            Value::Object(policy.definition),
            json!({
                "queue-leader-locator": "balanced",
                "delivery-limit": 20,
                "dead-letter-exchange": "chat.dead",
            })
        );
    }
}
