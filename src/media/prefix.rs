//! The prefix of one chat's media: a template of whole path segments (`{instance}/{chat_jid}/`
//! by default), so it always ends at a separator. Values that could change the shape of the
//! prefix are refused before any storage call.

use super::MediaError;

/// Instance names are at most 64 bytes and JIDs far shorter; anything longer is not ours.
const MAX_VALUE_LEN: usize = 128;

/// One segment of the prefix template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    Literal(String),
    Instance,
    ChatJid,
}

/// The template's segments, or why it is refused.
pub(super) fn parse_template(template: &str) -> Result<Vec<Segment>, String> {
    let bad = |why: &str| format!("{template:?} {why}");
    if template.starts_with('/') {
        return Err(bad("must be relative"));
    }
    // One trailing `/` is the usual spelling; the prefix ends at a separator either way.
    let body = template.strip_suffix('/').unwrap_or(template);
    if body.is_empty() {
        return Err(bad("is empty"));
    }
    let mut segments = Vec::new();
    for part in body.split('/') {
        let segment = match part {
            "{instance}" => Segment::Instance,
            "{chat_jid}" => Segment::ChatJid,
            _ if part.contains(['{', '}']) => {
                return Err(bad(
                    "placeholders must be whole segments: {instance} or {chat_jid}",
                ));
            }
            _ => {
                Segment::Literal(check_literal(part).map_err(|why| format!("{template:?}: {why}"))?)
            }
        };
        segments.push(segment);
    }
    // Both, so that a purge never covers another chat, nor the same chat of another instance.
    if !segments.contains(&Segment::ChatJid) {
        return Err(bad("must contain {chat_jid}"));
    }
    if !segments.contains(&Segment::Instance) {
        return Err(bad("must contain {instance}"));
    }
    Ok(segments)
}

/// Literal segments from the config: nothing that changes the path shape or that object_store
/// would percent-encode (the key on S3 must be exactly what the operator wrote).
pub(super) fn check_literal(part: &str) -> Result<String, String> {
    const AVOID: &[char] = &[
        '\\', '{', '}', '^', '%', '`', '[', ']', '"', '<', '>', '~', '#', '|', '*', '?',
    ];
    if part.is_empty() {
        Err("empty segment (`//`)".into())
    } else if part == "." || part == ".." {
        Err(format!("`{part}` segment"))
    } else if part.chars().any(|c| c.is_control() || AVOID.contains(&c)) {
        Err(format!(
            "segment {part:?} has a control or reserved character"
        ))
    } else {
        Ok(part.to_owned())
    }
}

/// Caller-supplied values; the caller validates too, this is the last line of defence.
fn check_value(what: &str, value: &str) -> Result<(), MediaError> {
    let why = if value.is_empty() {
        "is empty"
    } else if value.len() > MAX_VALUE_LEN {
        "is too long"
    } else if value.contains('\0') {
        "contains NUL"
    } else if value.contains('/') {
        "contains '/'"
    } else if value.contains('\\') {
        "contains '\\'"
    } else if value.contains("..") {
        "contains '..'"
    } else if value.starts_with('.') {
        "starts with '.'"
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'@' | b'.' | b'_' | b'-'))
    {
        "has a character outside [A-Za-z0-9@._-]"
    } else {
        return Ok(());
    };
    Err(MediaError::InvalidPrefix(format!("{what} {why}")))
}

pub(super) fn expand(
    template: &[Segment],
    instance: &str,
    chat_jid: &str,
) -> Result<Vec<String>, MediaError> {
    check_value("instance", instance)?;
    check_value("chat_jid", chat_jid)?;
    Ok(template
        .iter()
        .map(|s| match s {
            Segment::Literal(text) => text.clone(),
            Segment::Instance => instance.to_owned(),
            Segment::ChatJid => chat_jid.to_owned(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_whole_segments_with_a_chat() {
        assert_eq!(
            parse_template("media/{instance}/{chat_jid}/").unwrap(),
            vec![
                Segment::Literal("media".into()),
                Segment::Instance,
                Segment::ChatJid
            ]
        );
        for bad in [
            "{instance}/",
            "/{instance}/{chat_jid}/",
            "media/../{chat_jid}/",
            "./{chat_jid}",
            "{instance}//{chat_jid}/",
            "{instance}-{chat_jid}/",
            "{unknown}/{chat_jid}/",
            "a\\b/{chat_jid}/",
            "",
            "media/{chat_jid}/",
        ] {
            assert!(parse_template(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn values_that_would_change_the_prefix_are_refused() {
        let template = parse_template("{instance}/{chat_jid}/").unwrap();
        assert_eq!(
            expand(&template, "sales", "5511@s.whatsapp.net").unwrap(),
            ["sales", "5511@s.whatsapp.net"]
        );
        for (instance, chat) in [
            ("sales", "../x@s.whatsapp.net"),
            ("sales", "a/b"),
            ("sales", ""),
            ("..", "5511@s.whatsapp.net"),
            ("sales", ".hidden"),
            ("sales", "nul\0"),
        ] {
            let err = expand(&template, instance, chat).unwrap_err();
            assert!(matches!(err, MediaError::InvalidPrefix(_)), "{chat}: {err}");
        }
    }
}
