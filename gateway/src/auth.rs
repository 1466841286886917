//! Who is connecting. Authentication sits behind [`Authenticator`] so the
//! upgrade handler does not care whether identity came from a dev-mode
//! `?user=` or (later) a signed token.

use std::collections::HashMap;

use axum::http::HeaderMap;
use chat_protocol::UserId;

/// An authenticated connection's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user; the only source of a message's sender.
    pub user: UserId,
}

/// Why a connection was refused (HTTP 401 before upgrade).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials at all.
    #[error("missing credentials")]
    Missing,
    /// Credentials that do not check out.
    #[error("invalid credentials: {0}")]
    Invalid(String),
}

/// Turns an upgrade request into an identity.
pub trait Authenticator: Send + Sync + 'static {
    /// Checks the request's headers and query.
    ///
    /// # Errors
    /// [`AuthError`] when the request carries no acceptable identity.
    fn authenticate(
        &self,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
    ) -> Result<Identity, AuthError>;
}

/// Development identity: `?user=NAME`, trusted as is. Only enabled
/// explicitly (or in the embedded mode on loopback).
#[derive(Debug, Clone, Copy, Default)]
pub struct DevAuth;

impl Authenticator for DevAuth {
    fn authenticate(
        &self,
        _headers: &HeaderMap,
        query: &HashMap<String, String>,
    ) -> Result<Identity, AuthError> {
        let name = query.get("user").ok_or(AuthError::Missing)?;
        let user = UserId::new(name).map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok(Identity { user })
    }
}

/// Refuses everyone: the gateway runs without any identity source
/// configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAuth;

impl Authenticator for NoAuth {
    fn authenticate(
        &self,
        _headers: &HeaderMap,
        _query: &HashMap<String, String>,
    ) -> Result<Identity, AuthError> {
        Err(AuthError::Invalid(
            "no authentication method is configured on this gateway".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_auth_reads_the_query() {
        let h = HeaderMap::new();
        let mut q = HashMap::new();
        assert_eq!(DevAuth.authenticate(&h, &q), Err(AuthError::Missing));
        q.insert("user".into(), "ann".into());
        assert_eq!(DevAuth.authenticate(&h, &q).unwrap().user.as_str(), "ann");
        q.insert("user".into(), "".into());
        assert!(matches!(
            DevAuth.authenticate(&h, &q),
            Err(AuthError::Invalid(_))
        ));
        assert!(NoAuth.authenticate(&h, &q).is_err());
    }
}
