//! Environment overrides: `CDW__SECTION__KEY=value` sets `section.key`.

use super::ConfigError;

/// `CDW__INSTANCES__DEMO__TOKEN_SHA256=...` sets `instances.demo.token_sha256`. Segments match
/// existing keys case-insensitively (environment names are usually upper case); new keys are
/// lower-cased. Values are read as TOML scalars when they parse as one, else as strings.
pub(super) fn apply_env_override(
    table: &mut toml::Table,
    var: &str,
    path: &str,
    raw: &str,
) -> Result<(), ConfigError> {
    let segments: Vec<&str> = path.split("__").collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(ConfigError::Env {
            var: var.to_owned(),
            message: "empty key segment".into(),
        });
    }
    let mut current = table;
    for (i, segment) in segments.iter().enumerate() {
        let key = current
            .keys()
            .find(|k| k.eq_ignore_ascii_case(segment))
            .cloned()
            .unwrap_or_else(|| segment.to_ascii_lowercase());
        if i + 1 == segments.len() {
            current.insert(key, parse_env_value(raw));
            return Ok(());
        }
        let entry = current
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
            var: var.to_owned(),
            message: format!("`{key}` is not a table"),
        })?;
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table())
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}
