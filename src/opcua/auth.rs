//! The authenticator of the OPC UA server: maps a user token (username and
//! password, or an X.509 user certificate) to a vendor of the current
//! policy. The user token async-opcua keeps for the session is the vendor's
//! name, so every later decision looks the vendor up again by name and a
//! reload that removes the vendor denies its open sessions.

use std::sync::Arc;

use async_trait::async_trait;
use opcua::crypto::{SecurityPolicy, Thumbprint};
use opcua::server::authenticator::{
    user_pass_security_policy_id, AuthManager, Password, UserToken,
};
use opcua::server::ServerEndpoint;
use opcua::types::{Error, StatusCode, UAString, UserTokenPolicy, UserTokenType};

use crate::detect::OpcuaDetector;
use crate::events::{Event, EventType};
use crate::modbus::generation::Shared;

/// The policy id async-opcua 0.19 gives X.509 user tokens.
const POLICY_ID_X509: &str = "x509";
/// Characters of a rejected username that its anomaly shows; a client
/// chooses the username, so the event stays bounded.
const MAX_USERNAME_SHOWN: usize = 64;
/// The policy id async-opcua 0.19 requires of anonymous tokens.
const POLICY_ID_ANONYMOUS: &str = "anonymous";

pub struct VendorAuthenticator {
    pub shared: Arc<Shared>,
    pub listener: Arc<str>,
    pub detector: Arc<OpcuaDetector>,
}

impl VendorAuthenticator {
    /// Checks that a vendor found by its user token may connect now.
    async fn admit(&self, vendor: usize, method: &'static str) -> Result<UserToken, Error> {
        // The client's address is not known here; a vendor limited to
        // source networks is checked on every operation instead.
        let name = self
            .shared
            .current
            .load()
            .policy
            .vendor_name(vendor)
            .clone();
        if self.shared.quarantine.is_quarantined(&name) {
            self.record_rejection(Some(name), method, "vendor quarantined")
                .await;
            return Err(Error::new(
                StatusCode::BadUserAccessDenied,
                "vendor quarantined",
            ));
        }
        let mut event = Event::new(EventType::Session);
        event.action = Some("open");
        event.listener = Some(self.listener.clone());
        event.vendor = Some(name.clone());
        event.detail = Some(serde_json::json!({ "identity": method }));
        if let Err(error) = self.shared.emitter.emit(event).await {
            tracing::error!(%error, "event not recorded");
        }
        Ok(UserToken(name.to_string()))
    }

    /// Records a user token that identifies no vendor: the session
    /// rejection and the anomalies the failure raises.
    async fn record_failure(&self, method: &'static str, reason: &str, detail: String) {
        self.record_rejection(None, method, reason).await;
        let mut findings = Vec::new();
        let config = *self.shared.current.load().policy.detect();
        self.detector
            .auth_failure(std::time::Instant::now(), detail, &config, &mut findings);
        for finding in findings {
            let mut event = Event::anomaly(finding.kind, finding.severity, finding.detail);
            event.listener = Some(self.listener.clone());
            if let Err(error) = self.shared.emitter.emit(event).await {
                tracing::error!(%error, "event not recorded");
            }
        }
    }

    async fn record_rejection(&self, vendor: Option<Arc<str>>, method: &'static str, reason: &str) {
        tracing::debug!(listener = %self.listener, method, reason, "OPC UA user token rejected");
        let mut event = Event::new(EventType::Session);
        event.action = Some("reject");
        event.listener = Some(self.listener.clone());
        event.vendor = vendor;
        event.reason = Some(reason.to_owned());
        event.detail = Some(serde_json::json!({ "identity": method }));
        if let Err(error) = self.shared.emitter.emit(event).await {
            tracing::error!(%error, "event not recorded");
        }
    }
}

#[async_trait]
impl AuthManager for VendorAuthenticator {
    /// Admits an anonymous session as the vendor with `opcua_anonymous`;
    /// rejects it when no vendor sets the key.
    async fn authenticate_anonymous_token(&self, _endpoint: &ServerEndpoint) -> Result<(), Error> {
        let vendor = self.shared.current.load().policy.opcua_anonymous_vendor();
        if let Some(vendor) = vendor {
            return self.admit(vendor, "anonymous").await.map(|_| ());
        }
        let reason = "anonymous sessions are not allowed";
        self.record_failure("anonymous", reason, format!("anonymous token: {reason}"))
            .await;
        Err(Error::new(
            StatusCode::BadIdentityTokenRejected,
            "anonymous sessions are not allowed",
        ))
    }

    async fn authenticate_username_identity_token(
        &self,
        _endpoint: &ServerEndpoint,
        username: &str,
        password: &Password,
    ) -> Result<UserToken, Error> {
        let found = {
            let generation = self.shared.current.load();
            generation
                .policy
                .opcua_user(username)
                .map(|(vendor, hash)| (vendor, hash.to_owned()))
        };
        // An unknown user is checked against a fixed hash, so that the time
        // taken does not tell which usernames exist.
        let (vendor, hash) = match found {
            Some((vendor, hash)) => (Some(vendor), hash),
            None => (None, UNKNOWN_USER_HASH.to_owned()),
        };
        let password = password.get().to_owned();
        let verified =
            tokio::task::spawn_blocking(move || super::password::verify_password(&password, &hash))
                .await
                .unwrap_or(false);
        match (vendor, verified) {
            (Some(vendor), true) => self.admit(vendor, "username").await,
            _ => {
                let reason = "unknown user or wrong password";
                let shown: String = username.chars().take(MAX_USERNAME_SHOWN).collect();
                let detail = format!("username {shown:?}: {reason}");
                self.record_failure("username", reason, detail).await;
                Err(Error::new(
                    StatusCode::BadUserAccessDenied,
                    "unknown user or wrong password",
                ))
            }
        }
    }

    async fn authenticate_x509_identity_token(
        &self,
        _endpoint: &ServerEndpoint,
        signing_thumbprint: &Thumbprint,
    ) -> Result<UserToken, Error> {
        let vendor = self
            .shared
            .current
            .load()
            .policy
            .opcua_certificate_vendor(signing_thumbprint.value());
        match vendor {
            Some(vendor) => self.admit(vendor, "x509").await,
            None => {
                let reason = "user certificate matches no vendor";
                let detail = format!(
                    "user certificate {}: {reason}",
                    hex::encode(signing_thumbprint.value())
                );
                self.record_failure("x509", reason, detail).await;
                Err(Error::new(
                    StatusCode::BadUserAccessDenied,
                    "user certificate matches no vendor",
                ))
            }
        }
    }

    /// Offers username and X.509 tokens, and anonymous tokens while a
    /// vendor of the current policy sets `opcua_anonymous`. The endpoint
    /// without security offers no username token: async-opcua accepts a
    /// plaintext password there, and it would cross the network in clear.
    fn user_token_policies(&self, endpoint: &ServerEndpoint) -> Vec<UserTokenPolicy> {
        let mut policies = Vec::new();
        if endpoint.security_policy() != SecurityPolicy::None {
            policies.push(UserTokenPolicy {
                policy_id: user_pass_security_policy_id(endpoint),
                token_type: UserTokenType::UserName,
                issued_token_type: UAString::null(),
                issuer_endpoint_url: UAString::null(),
                security_policy_uri: UAString::null(),
            });
        }
        policies.push(UserTokenPolicy {
            policy_id: UAString::from(POLICY_ID_X509),
            token_type: UserTokenType::Certificate,
            issued_token_type: UAString::null(),
            issuer_endpoint_url: UAString::null(),
            security_policy_uri: UAString::from(SecurityPolicy::Basic256Sha256.to_uri()),
        });
        let anonymous = self.shared.current.load().policy.opcua_anonymous_vendor();
        if anonymous.is_some() {
            policies.push(UserTokenPolicy {
                policy_id: UAString::from(POLICY_ID_ANONYMOUS),
                token_type: UserTokenType::Anonymous,
                issued_token_type: UAString::null(),
                issuer_endpoint_url: UAString::null(),
                security_policy_uri: UAString::null(),
            });
        }
        policies
    }
}

/// An argon2id hash of a discarded random password, with the default
/// parameters of `password::hash_password`.
const UNKNOWN_USER_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$YI9GbYkTtiPeD678GyxwIg$p4KmTluCkr8TvTAMwyqQBiQlhRO7mjYBKmRzVJZJkQU";

#[cfg(test)]
mod tests {
    use super::UNKNOWN_USER_HASH;

    #[test]
    fn unknown_user_hash_is_argon2id() {
        let hash = argon2::PasswordHash::new(UNKNOWN_USER_HASH).unwrap();
        assert_eq!(hash.algorithm.as_str(), "argon2id");
    }

    #[test]
    fn unknown_user_hash_rejects_empty_password() {
        assert!(!super::super::password::verify_password(
            "",
            UNKNOWN_USER_HASH
        ));
    }
}
