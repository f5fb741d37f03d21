//! From a phone number to the chat the phone actually holds.
//!
//! WhatsApp's app-state server sees only an HMAC of the chat JID, so a delete for a JID the
//! phone does not hold is accepted and changes nothing. Every user chat is resolved, whether
//! it came as a number or as a JID (services pass JIDs they took from webhooks and CRMs, keyed
//! however that account keyed them then). Rules, in order:
//! - a group (`@g.us`) is used as given;
//! - a LID (`@lid`) on an account migrated to LIDs is used as given; on an account not
//!   migrated, the phone number the session maps it to, if it knows one (else as given);
//! - a phone number (bare or `@s.whatsapp.net`): its candidates are the number itself and,
//!   for a Brazilian mobile number, the same
//!   number with or without the ninth digit (accounts are often registered without it);
//! - a candidate the session already maps to a LID, on an account migrated to LIDs, is that
//!   LID (the key the phone uses for migrated one-to-one chats), with no query;
//! - otherwise one usync query (`is_on_whatsapp`) carries all candidates; the first registered
//!   account wins (the number as given, if both are): its LID on a migrated account, else the phone number the server returned;
//! - no registered account: the literal number (a departed contact's chat can still exist).
//!
//! Results are cached per instance for a while and queries are rate-bound: lookups cost the
//! account's standing with WhatsApp. A failed query is transient (retried like "not connected").

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::contract::{ChatJid, JidServer, normalise_number};
use crate::session::SessionError;

/// An account WhatsApp returned for a queried number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The phone number's digits as the server knows them.
    pub phone: String,
    pub lid: Option<String>,
}

/// What resolution needs of a session: the seam a test scripts.
#[async_trait::async_trait]
pub trait Directory: Send + Sync {
    /// The LID the session's own store maps this phone number to (no network).
    async fn known_lid(&self, phone: &str) -> Option<String>;
    /// The phone number the session's own store maps this LID to (no network).
    async fn known_phone(&self, lid: &str) -> Option<String>;
    /// Whether the account keys one-to-one chats by LID.
    async fn lid_migrated(&self) -> bool;
    /// One query for these numbers; the registered accounts the server returned for them.
    async fn lookup(&self, phones: &[String]) -> Result<Vec<Account>, SessionError>;
}

/// How much lookups may cost.
#[derive(Debug, Clone, Copy)]
pub struct LookupLimits {
    pub cache_ttl: Duration,
    /// Queries per minute, with a burst of a tenth of that (at least one).
    pub per_minute: u32,
}

/// One instance's resolver: cache and query budget.
pub struct Resolver {
    limits: LookupLimits,
    cache: HashMap<String, (Instant, ChatJid)>,
    tokens: f64,
    refilled: Instant,
}

impl Resolver {
    pub fn new(limits: LookupLimits) -> Self {
        Self {
            limits,
            cache: HashMap::new(),
            tokens: Self::burst(limits),
            refilled: Instant::now(),
        }
    }

    fn burst(limits: LookupLimits) -> f64 {
        f64::from((limits.per_minute / 10).max(1))
    }

    /// The JID to delete for `chat`; without `lookup` (tools) it is used as given.
    pub async fn resolve(
        &mut self,
        chat: &ChatJid,
        lookup: bool,
        directory: &dyn Directory,
    ) -> Result<ChatJid, SessionError> {
        match chat.server() {
            _ if !lookup => return Ok(chat.clone()),
            JidServer::Group => return Ok(chat.clone()),
            JidServer::Lid => {
                if directory.lid_migrated().await {
                    return Ok(chat.clone());
                }
                return match directory.known_phone(chat.user()).await {
                    Some(phone) => jid(&format!("{phone}@s.whatsapp.net")),
                    None => Ok(chat.clone()),
                };
            }
            JidServer::Phone => {}
        }
        let number = chat.user();
        if let Some((at, jid)) = self.cache.get(number)
            && at.elapsed() < self.limits.cache_ttl
        {
            return Ok(jid.clone());
        }
        let resolved = self.ask(chat, directory).await?;
        if self.cache.len() >= 100_000 {
            let ttl = self.limits.cache_ttl;
            self.cache.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        self.cache
            .insert(number.to_owned(), (Instant::now(), resolved.clone()));
        Ok(resolved)
    }

    async fn ask(
        &mut self,
        chat: &ChatJid,
        directory: &dyn Directory,
    ) -> Result<ChatJid, SessionError> {
        let candidates = candidates(chat.user());
        let migrated = directory.lid_migrated().await;
        if migrated {
            for phone in &candidates {
                if let Some(lid) = directory.known_lid(phone).await {
                    return jid(&format!("{lid}@lid"));
                }
            }
        }
        self.spend().await;
        let found = directory.lookup(&candidates).await?;
        // Two registered variants are two accounts: the number as given wins.
        let account = found
            .iter()
            .find(|a| a.phone == chat.user())
            .or(found.first());
        match account {
            Some(Account { lid: Some(lid), .. }) if migrated => jid(&format!("{lid}@lid")),
            Some(account) => jid(&format!("{}@s.whatsapp.net", account.phone)),
            None => Ok(chat.clone()),
        }
    }

    /// Waits for a token of the query budget.
    async fn spend(&mut self) {
        let rate = f64::from(self.limits.per_minute.max(1)) / 60.0;
        let burst = Self::burst(self.limits);
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate).min(burst);
        self.refilled = now;
        if self.tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - self.tokens) / rate);
            tokio::time::sleep(wait).await;
            self.tokens = 1.0;
            self.refilled = Instant::now();
        }
        self.tokens -= 1.0;
    }
}

/// The same person under the other addressing, as the session's own store maps it.
pub async fn twin(chat: &ChatJid, directory: &dyn Directory) -> Option<ChatJid> {
    let twin = match chat.server() {
        JidServer::Phone => {
            format!("{}@lid", directory.known_lid(chat.user()).await?)
        }
        JidServer::Lid => {
            format!(
                "{}@s.whatsapp.net",
                directory.known_phone(chat.user()).await?
            )
        }
        JidServer::Group => return None,
    };
    normalise_number(&twin)
}

/// A server answer that does not make a valid JID is a server fault, not ours to delete.
fn jid(text: &str) -> Result<ChatJid, SessionError> {
    normalise_number(text)
        .ok_or_else(|| SessionError::Server("WhatsApp returned an unusable account".into()))
}

/// The number and, for a Brazilian mobile number, its twin with or without the ninth digit:
/// `55` + two-digit area code (11-99) + `9` + eight digits starting 6-9, or the same without
/// the `9`. Landlines (first digit 2-5) have no ninth digit.
pub fn candidates(number: &str) -> Vec<String> {
    let mut out = vec![number.to_owned()];
    let Some(rest) = number.strip_prefix("55") else {
        return out;
    };
    let area_ok = rest.len() >= 2 && rest.as_bytes()[0] != b'0' && rest.as_bytes()[1] != b'0';
    if !area_ok {
        return out;
    }
    let (area, subscriber) = rest.split_at(2);
    let mobile = |s: &str| matches!(s.as_bytes().first(), Some(b'6'..=b'9'));
    match subscriber.len() {
        9 if subscriber.starts_with('9') && mobile(&subscriber[1..]) => {
            out.push(format!("55{area}{}", &subscriber[1..]));
        }
        8 if mobile(subscriber) => out.push(format!("55{area}9{subscriber}")),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A directory with scripted accounts that records its queries.
    #[derive(Default)]
    struct Scripted {
        migrated: bool,
        known: HashMap<String, String>,
        accounts: HashMap<String, Account>,
        down: bool,
        queries: Mutex<Vec<Vec<String>>>,
    }

    #[async_trait::async_trait]
    impl Directory for Scripted {
        async fn known_lid(&self, phone: &str) -> Option<String> {
            self.known.get(phone).cloned()
        }
        async fn known_phone(&self, lid: &str) -> Option<String> {
            self.known
                .iter()
                .find(|(_, l)| l.as_str() == lid)
                .map(|(phone, _)| phone.clone())
        }
        async fn lid_migrated(&self) -> bool {
            self.migrated
        }
        async fn lookup(&self, phones: &[String]) -> Result<Vec<Account>, SessionError> {
            self.queries.lock().unwrap().push(phones.to_vec());
            if self.down {
                return Err(SessionError::NotConnected);
            }
            Ok(phones
                .iter()
                .filter_map(|p| self.accounts.get(p).cloned())
                .collect())
        }
    }

    fn limits() -> LookupLimits {
        LookupLimits {
            cache_ttl: Duration::from_secs(3600),
            per_minute: 60,
        }
    }

    fn chat(text: &str) -> ChatJid {
        normalise_number(text).unwrap()
    }

    fn account(phone: &str, lid: Option<&str>) -> Account {
        Account {
            phone: phone.into(),
            lid: lid.map(Into::into),
        }
    }

    #[test]
    fn brazilian_mobiles_get_their_twin_and_nothing_else_does() {
        for (number, expected) in [
            ("5531987654321", vec!["5531987654321", "553187654321"]),
            ("553187654321", vec!["553187654321", "5531987654321"]),
            ("5511987654321", vec!["5511987654321", "551187654321"]),
            // Landline, a nine not followed by a mobile digit, other countries: alone.
            ("553132654321", vec!["553132654321"]),
            ("5531912345678", vec!["5531912345678"]),
            ("14155550123", vec!["14155550123"]),
            ("5501987654321", vec!["5501987654321"]),
        ] {
            assert_eq!(candidates(number), expected, "{number}");
        }
    }

    /// The defect: the worker deleted `5531987654321@s.whatsapp.net`, which WhatsApp accepts
    /// and which changes nothing on a phone whose contact is registered without the nine.
    #[tokio::test]
    async fn a_brazilian_number_resolves_to_the_account_the_server_returns() {
        let directory = Scripted {
            accounts: [("553187654321".into(), account("553187654321", Some("99")))].into(),
            ..Default::default()
        };
        let mut resolver = Resolver::new(limits());
        let got = resolver
            .resolve(&chat("5531987654321"), true, &directory)
            .await;
        assert_eq!(got, Ok(chat("553187654321@s.whatsapp.net")));
        assert_eq!(
            *directory.queries.lock().unwrap(),
            [vec!["5531987654321".to_owned(), "553187654321".to_owned()]],
            "one query carries both variants"
        );
    }

    /// The defect: a JID given explicitly was deleted as given, so a service that passed a
    /// phone-number JID for an account registered without the nine, a phone-number JID on an
    /// account migrated to LIDs, or a LID on an account not migrated got a 200 and the chat
    /// stayed. A JID goes through the same rules as a number.
    #[tokio::test]
    async fn a_jid_given_explicitly_is_resolved_as_a_number_is() {
        let directory = Scripted {
            accounts: [("553187654321".into(), account("553187654321", Some("99")))].into(),
            known: [("5511987654321".into(), "777".into())].into(),
            ..Default::default()
        };
        let mut resolver = Resolver::new(limits());
        let by_jid = chat("5531987654321@s.whatsapp.net");
        let got = resolver.resolve(&by_jid, true, &directory).await;
        assert_eq!(got, Ok(chat("553187654321@s.whatsapp.net")));
        // A LID on an account not migrated: the phone number the session maps it to.
        let got = resolver.resolve(&chat("777@lid"), true, &directory).await;
        assert_eq!(got, Ok(chat("5511987654321@s.whatsapp.net")));
        // One it knows nothing of stays as given; a group is never resolved.
        let got = resolver.resolve(&chat("888@lid"), true, &directory).await;
        assert_eq!(got, Ok(chat("888@lid")));
        let group = chat("120363024567890123@g.us");
        assert_eq!(resolver.resolve(&group, true, &directory).await, Ok(group));
        // On a migrated account, a phone-number JID becomes its LID, and a LID stays.
        let migrated = Scripted {
            migrated: true,
            known: [("5511987654321".into(), "777".into())].into(),
            ..Default::default()
        };
        let mut resolver = Resolver::new(limits());
        let got = resolver
            .resolve(&chat("5511987654321@s.whatsapp.net"), true, &migrated)
            .await;
        assert_eq!(got, Ok(chat("777@lid")));
        let got = resolver.resolve(&chat("777@lid"), true, &migrated).await;
        assert_eq!(got, Ok(chat("777@lid")));
    }

    #[tokio::test]
    async fn a_migrated_account_deletes_by_lid_and_a_known_mapping_needs_no_query() {
        let mut directory = Scripted {
            migrated: true,
            accounts: [(
                "5511987654321".into(),
                account("5511987654321", Some("777")),
            )]
            .into(),
            ..Default::default()
        };
        let mut resolver = Resolver::new(limits());
        let got = resolver
            .resolve(&chat("5511987654321"), true, &directory)
            .await;
        assert_eq!(got, Ok(chat("777@lid")));
        let again = resolver
            .resolve(&chat("5511987654321"), true, &directory)
            .await;
        assert_eq!(again, Ok(chat("777@lid")), "cached");
        directory.known = [("551187654321".into(), "888".into())].into();
        let mut fresh = Resolver::new(limits());
        let got = fresh.resolve(&chat("551187654321"), true, &directory).await;
        assert_eq!(got, Ok(chat("888@lid")));
        assert_eq!(directory.queries.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn explicit_jids_are_kept_and_unknown_numbers_fall_back_to_the_literal_jid() {
        let directory = Scripted::default();
        let mut resolver = Resolver::new(limits());
        for given in [
            "5531987654321@s.whatsapp.net",
            "123@lid",
            "120363024567890123@g.us",
        ] {
            assert_eq!(
                resolver.resolve(&chat(given), false, &directory).await,
                Ok(chat(given))
            );
        }
        assert!(directory.queries.lock().unwrap().is_empty());
        let got = resolver
            .resolve(&chat("5531987654321"), true, &directory)
            .await;
        assert_eq!(got, Ok(chat("5531987654321@s.whatsapp.net")));
    }

    #[tokio::test]
    async fn a_failed_lookup_is_transient_and_not_cached() {
        let mut directory = Scripted {
            down: true,
            ..Default::default()
        };
        let mut resolver = Resolver::new(limits());
        let got = resolver
            .resolve(&chat("5531987654321"), true, &directory)
            .await;
        assert!(got.as_ref().unwrap_err().is_retryable(), "{got:?}");
        directory.down = false;
        directory.accounts = [("553187654321".into(), account("553187654321", None))].into();
        let got = resolver
            .resolve(&chat("5531987654321"), true, &directory)
            .await;
        assert_eq!(got, Ok(chat("553187654321@s.whatsapp.net")));
    }

    /// Results are cached until their TTL; queries beyond the burst wait for the budget.
    #[tokio::test(start_paused = true)]
    async fn lookups_are_cached_and_rate_bound() {
        let directory = Scripted::default();
        let mut resolver = Resolver::new(LookupLimits {
            cache_ttl: Duration::from_secs(60),
            per_minute: 60,
        });
        let started = Instant::now();
        for _ in 0..5 {
            resolver
                .resolve(&chat("14155550123"), true, &directory)
                .await
                .unwrap();
        }
        assert_eq!(directory.queries.lock().unwrap().len(), 1, "cached");
        for n in 0..10 {
            let number = format!("1415555{n:04}");
            resolver
                .resolve(&chat(&number), true, &directory)
                .await
                .unwrap();
        }
        // Burst of 6 (a tenth of 60), then one a second: 11 queries take at least 5 s.
        assert_eq!(directory.queries.lock().unwrap().len(), 11);
        assert!(
            started.elapsed() >= Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        resolver
            .resolve(&chat("14155550123"), true, &directory)
            .await
            .unwrap();
        assert_eq!(directory.queries.lock().unwrap().len(), 12, "expired");
    }
}
