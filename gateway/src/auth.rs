//! Who is connecting, and what they may join. Authentication sits behind
//! [`Authenticator`] so the upgrade handler and the session do not care
//! whether identity came from a signed token or a dev-mode `?user=`.
//!
//! Tokens are JWTs: HS256 with a shared secret (`CHAT_JWT_SECRET`), or
//! RS256/ES256 with a public key (`CHAT_JWT_PUBLIC_KEY_FILE`). Each key
//! accepts exactly its own algorithm, so a token cannot pick a weaker one
//! (`alg: none`, or HS256 signed with a public key). Claims: `sub` (the
//! user, the only source of a message's sender), `exp` (required; no
//! leeway), optional `rooms` (allow-list of names or `prefix-*` patterns)
//! and `name`.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap};
use chat_protocol::{RoomId, UserId};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Rooms a token allows: exact names, or prefixes written `prefix*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomAcl {
    patterns: Vec<String>,
}

impl RoomAcl {
    /// An allow-list from the token's `rooms` claim.
    pub fn new(patterns: Vec<String>) -> Self {
        Self { patterns }
    }

    /// Whether `room` is allowed.
    pub fn allows(&self, room: &RoomId) -> bool {
        let room = room.as_str();
        self.patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => room.starts_with(prefix),
            None => room == p,
        })
    }
}

/// An authenticated connection's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user; the only source of a message's sender.
    pub user: UserId,
    /// When the credentials expire (seconds since the Unix epoch); the
    /// connection is closed with 4001 then unless refreshed.
    pub exp: Option<u64>,
    /// Rooms allowed; `None` allows every room.
    pub rooms: Option<RoomAcl>,
}

impl Identity {
    /// Whether this identity may join or read `room`.
    pub fn may_access(&self, room: &RoomId) -> bool {
        self.rooms.as_ref().is_none_or(|acl| acl.allows(room))
    }
}

/// Why credentials were refused (HTTP 401 before upgrade).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials at all.
    #[error("missing credentials: send Authorization: Bearer <token> or ?token=")]
    Missing,
    /// Credentials that do not check out.
    #[error("invalid credentials: {0}")]
    Invalid(String),
}

/// Turns requests and tokens into identities.
pub trait Authenticator: Send + Sync + 'static {
    /// Checks an upgrade request's headers and query.
    ///
    /// # Errors
    /// [`AuthError`] when the request carries no acceptable identity.
    fn authenticate(
        &self,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
    ) -> Result<Identity, AuthError>;

    /// Checks a token presented on a live connection (`refresh`).
    ///
    /// # Errors
    /// [`AuthError::Invalid`] for a bad token, or when tokens are not in use.
    fn verify_token(&self, token: &str) -> Result<Identity, AuthError>;
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

/// Why the token configuration cannot work.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The public key file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Neither an RSA nor an EC public key in PEM.
    #[error("{0} holds no RSA or EC public key in PEM form")]
    Pem(String),
    /// The secret is unusable.
    #[error("CHAT_JWT_SECRET: {0}")]
    Secret(String),
}

/// Verifies JWTs against the configured keys.
#[derive(Clone)]
pub struct JwtVerifier {
    keys: Vec<(DecodingKey, Validation)>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algs: Vec<Algorithm> = self.keys.iter().map(|(_, v)| v.algorithms[0]).collect();
        f.debug_struct("JwtVerifier")
            .field("algorithms", &algs)
            .finish()
    }
}

fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    v.leeway = 0;
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp", "sub"]);
    v
}

impl JwtVerifier {
    /// A verifier from an HS256 secret and/or a PEM public key (RSA →
    /// RS256, EC P-256 → ES256). `None` when neither is configured.
    ///
    /// # Errors
    /// When the secret is empty or the key file is unreadable or not a key.
    pub fn from_config(
        secret: Option<&str>,
        public_key_file: Option<&std::path::Path>,
    ) -> Result<Option<Self>, KeyError> {
        let mut keys = Vec::new();
        if let Some(secret) = secret {
            if secret.len() < 16 {
                return Err(KeyError::Secret("must be at least 16 bytes".into()));
            }
            let key = DecodingKey::from_secret(secret.as_bytes())
                .map_err(|e| KeyError::Secret(e.to_string()))?;
            keys.push((key, validation(Algorithm::HS256)));
        }
        if let Some(path) = public_key_file {
            let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                path: path.display().to_string(),
                source,
            })?;
            if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                keys.push((key, validation(Algorithm::RS256)));
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                keys.push((key, validation(Algorithm::ES256)));
            } else {
                return Err(KeyError::Pem(path.display().to_string()));
            }
        }
        Ok((!keys.is_empty()).then_some(Self { keys }))
    }

    /// Checks signature, algorithm and expiry; returns the identity.
    ///
    /// # Errors
    /// [`AuthError::Invalid`] with the reason.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let (key, validation) = self
            .keys
            .iter()
            .find(|(_, v)| v.algorithms[0] == header.alg)
            .ok_or_else(|| {
                AuthError::Invalid(format!("algorithm {:?} is not accepted", header.alg))
            })?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let c = data.claims;
        let user = UserId::new(&c.sub).map_err(|e| AuthError::Invalid(format!("sub: {e}")))?;
        Ok(Identity {
            user,
            exp: Some(c.exp),
            rooms: c.rooms.map(RoomAcl::new),
        })
    }
}

/// The gateway's authenticator: tokens when keys are configured, and dev
/// `?user=NAME` identities only when explicitly enabled.
#[derive(Debug, Clone)]
pub struct Auth {
    jwt: Option<JwtVerifier>,
    dev: bool,
}

impl Auth {
    /// An authenticator with the given token verifier and dev mode.
    pub fn new(jwt: Option<JwtVerifier>, dev: bool) -> Self {
        Self { jwt, dev }
    }

    /// Whether any way in exists.
    pub fn accepts_anyone(&self) -> bool {
        self.jwt.is_some() || self.dev
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Authenticator for Auth {
    fn authenticate(
        &self,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
    ) -> Result<Identity, AuthError> {
        let token = bearer(headers).or_else(|| query.get("token").map(String::as_str));
        if let Some(token) = token {
            return self.verify_token(token);
        }
        if self.dev {
            if let Some(name) = query.get("user") {
                // The query is percent-decoded lossily: bytes that are not
                // UTF-8 arrive as U+FFFD, and different garbage would
                // collapse into one identity.
                if name.contains(char::REPLACEMENT_CHARACTER) {
                    return Err(AuthError::Invalid(
                        "?user= must be percent-encoded UTF-8".into(),
                    ));
                }
                let user = UserId::new(name).map_err(|e| AuthError::Invalid(e.to_string()))?;
                return Ok(Identity {
                    user,
                    exp: None,
                    rooms: None,
                });
            }
        }
        Err(AuthError::Missing)
    }

    fn verify_token(&self, token: &str) -> Result<Identity, AuthError> {
        match &self.jwt {
            Some(v) => v.verify(token),
            None => Err(AuthError::Invalid(
                "this gateway does not accept tokens".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "a-test-secret-of-32-bytes-length";

    fn hs(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn auth() -> Auth {
        Auth::new(JwtVerifier::from_config(Some(SECRET), None).unwrap(), false)
    }

    fn query(k: &str, v: &str) -> HashMap<String, String> {
        HashMap::from([(k.to_owned(), v.to_owned())])
    }

    #[test]
    fn valid_token_in_header_or_query() {
        let t = hs(json!({"sub": "ann", "exp": now_secs() + 60, "rooms": ["team-42-*", "lobby"]}));
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        let id = auth().authenticate(&h, &HashMap::new()).unwrap();
        assert_eq!(id.user.as_str(), "ann");
        assert!(id.may_access(&RoomId::new("team-42-general").unwrap()));
        assert!(id.may_access(&RoomId::new("lobby").unwrap()));
        assert!(!id.may_access(&RoomId::new("lobby2").unwrap()));
        assert!(!id.may_access(&RoomId::new("team-43-x").unwrap()));
        assert_eq!(
            auth()
                .authenticate(&HeaderMap::new(), &query("token", &t))
                .unwrap()
                .user
                .as_str(),
            "ann"
        );
    }

    #[test]
    fn bad_tokens_are_refused() {
        let a = auth();
        let none = HeaderMap::new();
        // expired
        let t = hs(json!({"sub": "ann", "exp": now_secs() - 1}));
        assert!(matches!(
            a.authenticate(&none, &query("token", &t)),
            Err(AuthError::Invalid(_))
        ));
        // no exp
        let t = hs(json!({"sub": "ann"}));
        assert!(a.authenticate(&none, &query("token", &t)).is_err());
        // wrong signature
        let other = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "ann", "exp": now_secs() + 60}),
            &EncodingKey::from_secret(b"another-secret-of-enough-length").unwrap(),
        )
        .unwrap();
        assert!(a.authenticate(&none, &query("token", &other)).is_err());
        // wrong algorithm
        let t = encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": "ann", "exp": now_secs() + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(a.authenticate(&none, &query("token", &t)).is_err());
        // alg: none (unsigned)
        let unsigned = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&json!({"sub": "ann", "exp": now_secs() + 60}).to_string())
        );
        assert!(a.authenticate(&none, &query("token", &unsigned)).is_err());
        // garbage
        assert!(a.authenticate(&none, &query("token", "x.y.z")).is_err());
        // dev names are refused without dev auth
        assert_eq!(
            a.authenticate(&none, &query("user", "ann")),
            Err(AuthError::Missing)
        );
    }

    fn b64(s: &str) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &x)| acc | (u32::from(x) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn dev_auth_reads_the_query_only_when_enabled() {
        let dev = Auth::new(None, true);
        let h = HeaderMap::new();
        assert_eq!(
            dev.authenticate(&h, &HashMap::new()),
            Err(AuthError::Missing)
        );
        assert_eq!(
            dev.authenticate(&h, &query("user", "ann"))
                .unwrap()
                .user
                .as_str(),
            "ann"
        );
        assert!(matches!(
            dev.authenticate(&h, &query("user", "")),
            Err(AuthError::Invalid(_))
        ));
        // What `?user=%ff` decodes to.
        assert!(matches!(
            dev.authenticate(&h, &query("user", "\u{fffd}")),
            Err(AuthError::Invalid(_))
        ));
        assert!(dev.verify_token("x").is_err());
        assert!(!Auth::new(None, false).accepts_anyone());
    }

    #[test]
    fn short_secrets_and_bad_keys_are_config_errors() {
        assert!(JwtVerifier::from_config(Some("short"), None).is_err());
        assert!(
            JwtVerifier::from_config(None, Some(std::path::Path::new("/nonexistent.pem"))).is_err()
        );
        assert!(JwtVerifier::from_config(None, None).unwrap().is_none());
    }
}
