//! Every NATS subject and KV bucket name, built in one place from the
//! configurable prefix so several clusters can share one NATS.

use crate::ids::{NodeId, RoomId};

/// Why a subject prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("subject prefix must be 1-32 characters of A-Z, a-z, 0-9, '_' or '-'")]
pub struct PrefixError;

/// Subject and bucket names for one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Builds the names under `prefix` (a single subject token, also valid
    /// in a KV bucket name).
    ///
    /// # Errors
    /// When `prefix` is not 1-32 characters of `[A-Za-z0-9_-]`.
    pub fn new(prefix: &str) -> Result<Self, PrefixError> {
        if prefix.is_empty()
            || prefix.len() > 32
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(PrefixError);
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Commands for one room node (request/reply).
    pub fn node_inbox(&self, node: &NodeId) -> String {
        format!("{}.node.{}.in", self.prefix, node)
    }

    /// Committed events of one room, published by its owner.
    pub fn room_events(&self, room: &RoomId) -> String {
        format!("{}.room.{}.ev", self.prefix, room)
    }

    /// KV bucket where room nodes heartbeat.
    pub fn nodes_bucket(&self) -> String {
        format!("{}_nodes", self.prefix)
    }

    /// KV bucket where gateways heartbeat, so room nodes can drop the
    /// members of a gateway that died.
    pub fn gateways_bucket(&self) -> String {
        format!("{}_gateways", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let s = Subjects::new("chat").unwrap();
        let n = NodeId::new("n1").unwrap();
        let r = RoomId::new("lobby").unwrap();
        assert_eq!(s.node_inbox(&n), "chat.node.n1.in");
        assert_eq!(s.room_events(&r), "chat.room.lobby.ev");
        assert_eq!(s.nodes_bucket(), "chat_nodes");
        assert_eq!(s.gateways_bucket(), "chat_gateways");
        assert!(Subjects::new("a.b").is_err());
        assert!(Subjects::new("").is_err());
    }
}
