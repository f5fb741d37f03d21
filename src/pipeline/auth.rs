//! Token checks: a TokenInstance of this instance, or the TokenAccount of the account that owns
//! it. Only SHA-256 hashes are kept, and they are compared in constant time.

use subtle::ConstantTimeEq;

use crate::config::TokenHash;

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
}
