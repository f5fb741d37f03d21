//! Token checks: a TokenInstance of this instance, or the TokenAccount of the account that owns
//! it. Only SHA-256 hashes are kept, and they are compared in constant time.
//!
//! The worker's own copies of a command (retried, parked) never carry the token: they carry a
//! [`TokenProof`] instead, which opens that same command again and nothing else.

pub mod envelope;

pub use envelope::Envelope;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::TokenHash;

/// An HMAC-SHA256, keyed with the hash of the token that opened a command, over its instance,
/// idempotency id and body. Only a holder of the config's token hashes can make one, and a
/// different instance, id or body does not match it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenProof([u8; 32]);

impl TokenProof {
    pub fn new(key: &TokenHash, instance: &str, id: &str, body: &[u8]) -> Self {
        Self::of_digest(key, instance, id, &Sha256::digest(body).into())
    }

    fn of_digest(key: &TokenHash, instance: &str, id: &str, body_digest: &[u8; 32]) -> Self {
        let mut mac = Hmac::<Sha256>::new_from_slice(&key.0).expect("any key length");
        mac.update(b"chat-delete-worker token proof\0");
        mac.update(instance.as_bytes());
        mac.update(&[0]);
        mac.update(id.as_bytes());
        mac.update(&[0]);
        mac.update(body_digest);
        Self(mac.finalize().into_bytes().into())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    /// Read from a header's bytes (hex); `None` when they are not a proof.
    pub fn from_hex(text: &[u8]) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(Self(out))
    }
}

impl std::fmt::Debug for TokenProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenProof(..)")
    }
}

/// The hashes that open one instance.
#[derive(Debug, Clone)]
pub struct InstanceCredentials {
    pub instance_token: TokenHash,
    pub account_token: Option<TokenHash>,
}

impl InstanceCredentials {
    /// The hash of the presented token when it is valid for this instance. Both comparisons
    /// always run, so timing does not tell which one matched.
    pub fn authenticate(&self, token: Option<&[u8]>) -> Option<TokenHash> {
        let presented = TokenHash::of(token?);
        let instance = presented.0.ct_eq(&self.instance_token.0);
        let account = match &self.account_token {
            Some(hash) => presented.0.ct_eq(&hash.0),
            None => subtle::Choice::from(0),
        };
        bool::from(instance | account).then_some(presented)
    }

    /// The hash whose proof `proof` is for this command, when it is one of this instance's.
    /// Both candidates are always checked, in constant time.
    pub fn verify(
        &self,
        proof: &TokenProof,
        instance: &str,
        id: &str,
        body: &[u8],
    ) -> Option<TokenHash> {
        let digest: [u8; 32] = Sha256::digest(body).into();
        let check = |hash: &TokenHash| {
            let expected = TokenProof::of_digest(hash, instance, id, &digest);
            expected.0.ct_eq(&proof.0)
        };
        let instance_matches = check(&self.instance_token);
        let account_matches = match &self.account_token {
            Some(hash) => check(hash),
            None => subtle::Choice::from(0),
        };
        if bool::from(instance_matches) {
            Some(self.instance_token)
        } else if bool::from(account_matches) {
            self.account_token
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_or_owning_account_token() {
        let creds = InstanceCredentials {
            instance_token: TokenHash::of(b"inst"),
            account_token: Some(TokenHash::of(b"acct")),
        };
        assert!(creds.authenticate(Some(b"inst")).is_some());
        assert!(creds.authenticate(Some(b"acct")).is_some());
        assert!(creds.authenticate(Some(b"other")).is_none());
        assert!(creds.authenticate(Some(b"")).is_none());
        assert!(creds.authenticate(None).is_none());
        let no_account = InstanceCredentials {
            account_token: None,
            ..creds
        };
        assert!(no_account.authenticate(Some(b"acct")).is_none());
    }

    #[test]
    fn a_proof_opens_its_own_command_and_nothing_else() {
        let creds = InstanceCredentials {
            instance_token: TokenHash::of(b"inst"),
            account_token: Some(TokenHash::of(b"acct")),
        };
        let body = br#"{"number": "5511999999999"}"#;
        let by_account = TokenProof::new(&TokenHash::of(b"acct"), "a", "id-1", body);
        assert_eq!(
            creds.verify(&by_account, "a", "id-1", body),
            Some(TokenHash::of(b"acct"))
        );
        let by_instance = TokenProof::new(&TokenHash::of(b"inst"), "a", "id-1", body);
        assert_eq!(
            creds.verify(&by_instance, "a", "id-1", body),
            Some(TokenHash::of(b"inst"))
        );
        assert_eq!(creds.verify(&by_instance, "b", "id-1", body), None);
        assert_eq!(creds.verify(&by_instance, "a", "id-2", body), None);
        assert_eq!(creds.verify(&by_instance, "a", "id-1", b"{}"), None);
        let stranger = TokenProof::new(&TokenHash::of(b"other"), "a", "id-1", body);
        assert_eq!(creds.verify(&stranger, "a", "id-1", body), None);
        assert_eq!(
            TokenProof::from_hex(by_instance.to_hex().as_bytes()),
            Some(by_instance)
        );
        assert!(!format!("{by_instance:?}").contains(&by_instance.to_hex()));
    }
}
