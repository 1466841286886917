//! Validated identifiers. Each newtype checks its grammar once, on
//! construction, so every other layer can rely on it (room names become
//! NATS subject tokens, node ids become subject tokens and KV keys).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// A room name outside `[A-Za-z0-9_-]{1,128}`.
    #[error("room names are 1-128 characters of A-Z, a-z, 0-9, '_' or '-'")]
    Room,
    /// A user id that is empty, too long or holds control characters.
    #[error("user ids are 1-128 bytes of printable text")]
    User,
    /// A node id outside `[A-Za-z0-9_-]{1,64}`.
    #[error("node ids are 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")]
    Node,
}

fn is_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $check:expr, $err:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `s` and wraps it.
            ///
            /// # Errors
            /// When `s` breaks the grammar of this identifier.
            pub fn new(s: &str) -> Result<Self, IdError> {
                let check: fn(&str) -> bool = $check;
                if check(s) {
                    Ok(Self(Arc::from(s)))
                } else {
                    Err($err)
                }
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A room name: `[A-Za-z0-9_-]{1,128}`, safe as a NATS subject token.
    RoomId,
    |s| is_token(s, 128),
    IdError::Room
);
id_type!(
    /// A user id (dev-auth name or token subject): 1-128 bytes, no control
    /// characters, so it can be logged and stored as is.
    UserId,
    |s| !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control),
    IdError::User
);
id_type!(
    /// A room node or gateway id: `[A-Za-z0-9_-]{1,64}`, safe as a subject
    /// token and KV key.
    NodeId,
    |s| is_token(s, 64),
    IdError::Node
);

impl NodeId {
    /// Turns any host name into a valid node id: characters outside the
    /// grammar become `-`, and the result is cut to 64 characters.
    pub fn sanitised(raw: &str) -> Self {
        let mut s: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        if s.is_empty() {
            s.push_str("node");
        }
        Self(Arc::from(s.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_grammar() {
        assert!(RoomId::new("lobby-1_A").is_ok());
        assert_eq!(RoomId::new(""), Err(IdError::Room));
        assert_eq!(RoomId::new("a.b"), Err(IdError::Room));
        assert_eq!(RoomId::new("a*"), Err(IdError::Room));
        assert!(RoomId::new(&"x".repeat(128)).is_ok());
        assert!(RoomId::new(&"x".repeat(129)).is_err());
    }

    #[test]
    fn user_grammar() {
        assert!(UserId::new("Zoë 👋").is_ok());
        assert!(UserId::new("a\nb").is_err());
        assert!(UserId::new("").is_err());
    }

    #[test]
    fn node_sanitised() {
        assert_eq!(NodeId::sanitised("pod.chat-0").as_str(), "pod-chat-0");
        assert_eq!(NodeId::sanitised("").as_str(), "node");
    }

    #[test]
    fn deserialize_validates() {
        let r: Result<RoomId, _> = serde_json::from_str("\"a b\"");
        assert!(r.is_err());
    }
}
