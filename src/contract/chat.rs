//! A chat JID as the contract accepts it, and the number-to-JID normaliser.
//!
//! whatsapp-rust's own `Jid` parser accepts `abc@s.whatsapp.net` and `55 11 9@s.whatsapp.net`,
//! so validation is ours: a JID that leaves here holds only ASCII digits, at most one `-` (legacy
//! group ids) and one of three servers. It never holds a path separator or `..`, which matters
//! because it becomes part of media paths.

/// A validated, normalised chat JID (`<digits>@s.whatsapp.net`, `<digits>@lid`, `<id>@g.us`).
/// Deserialising validates again, so a stored JID is as safe as a fresh one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChatJid(String);

impl TryFrom<String> for ChatJid {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        normalise_number(&value).ok_or_else(|| "not a valid chat JID".to_owned())
    }
}

impl From<ChatJid> for String {
    fn from(jid: ChatJid) -> String {
        jid.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JidServer {
    Phone,
    Lid,
    Group,
}

impl ChatJid {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn user(&self) -> &str {
        self.0.split_once('@').map(|(u, _)| u).unwrap_or_default()
    }
    pub fn server(&self) -> JidServer {
        match self.0.rsplit_once('@').map(|(_, s)| s) {
            Some(PHONE_SERVER) => JidServer::Phone,
            Some(LID_SERVER) => JidServer::Lid,
            _ => JidServer::Group,
        }
    }
}

impl std::fmt::Display for ChatJid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

const PHONE_SERVER: &str = "s.whatsapp.net";
const LID_SERVER: &str = "lid";
const GROUP_SERVER: &str = "g.us";
/// Longest `number` looked at; anything longer is not a phone number or JID we support.
const MAX_NUMBER_CHARS: usize = 128;

/// A phone number (`+55 11 99999-9999` style) or a JID on a supported server, as a normalised
/// JID; `None` when it is neither.
pub fn normalise_number(input: &str) -> Option<ChatJid> {
    let input = input.trim();
    if input.len() > MAX_NUMBER_CHARS {
        return None;
    }
    match input.rsplit_once('@') {
        Some((user, server)) => {
            let server = server.to_ascii_lowercase();
            let ok = match server.as_str() {
                PHONE_SERVER | LID_SERVER => is_digits(user, 1, 20),
                GROUP_SERVER => is_group_id(user),
                _ => false,
            };
            ok.then(|| ChatJid(format!("{user}@{server}")))
        }
        None => {
            let digits = input.strip_prefix('+').unwrap_or(input);
            // Spaces and dashes are tolerated between digits, nothing else.
            if digits.starts_with([' ', '-']) {
                return None;
            }
            let digits: String = digits.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
            (is_digits(&digits, 7, 15) && !digits.starts_with('0'))
                .then(|| ChatJid(format!("{digits}@{PHONE_SERVER}")))
        }
    }
}

fn is_digits(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
}

/// `120363024567890123` or the legacy `<creator>-<timestamp>`.
fn is_group_id(user: &str) -> bool {
    match user.split_once('-') {
        Some((creator, created)) => is_digits(creator, 5, 20) && is_digits(created, 1, 20),
        None => is_digits(user, 5, 30),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jid(s: &str) -> Option<String> {
        normalise_number(s).map(|j| j.0)
    }

    #[test]
    fn phone_numbers_become_pn_jids() {
        assert_eq!(
            jid("5511999999999").unwrap(),
            "5511999999999@s.whatsapp.net"
        );
        assert_eq!(
            jid("+55 11 99999-9999").unwrap(),
            "5511999999999@s.whatsapp.net"
        );
        assert_eq!(
            jid("  5511999999999 ").unwrap(),
            "5511999999999@s.whatsapp.net"
        );
    }

    #[test]
    fn jids_are_kept_with_a_lower_case_server() {
        assert_eq!(jid("5511@s.whatsapp.net").unwrap(), "5511@s.whatsapp.net");
        assert_eq!(jid("5511@S.WhatsApp.NET").unwrap(), "5511@s.whatsapp.net");
        assert_eq!(jid("123456789012345@lid").unwrap(), "123456789012345@lid");
        assert_eq!(
            jid("120363024567890123@g.us").unwrap(),
            "120363024567890123@g.us"
        );
        assert_eq!(
            jid("5511999999999-1600000000@g.us").unwrap(),
            "5511999999999-1600000000@g.us"
        );
        let parsed = normalise_number("120363024567890123@g.us").unwrap();
        assert_eq!(parsed.server(), JidServer::Group);
        assert_eq!(parsed.user(), "120363024567890123");
    }

    #[test]
    fn everything_else_is_invalid() {
        for bad in [
            "abc@s.whatsapp.net",
            "55 11 99999@s.whatsapp.net",
            "@s.whatsapp.net",
            "s.whatsapp.net",
            "5511999999999:12@s.whatsapp.net",
            "5511@example.com",
            "5511@newsletter",
            "../5511@s.whatsapp.net",
            "5511/..@lid",
            "55\0 11",
            "abc",
            "55119999a9999",
            "123",
            "0551199999999",
            "5511999999999999999",
            "+",
            "-5511999999999",
            "5511999999999@g.us@g.us",
            "١٢٣٤٥٦٧٨",
        ] {
            assert_eq!(jid(bad), None, "{bad:?}");
        }
    }
}
