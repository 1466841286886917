//! Placement: which room node owns a room. Every process builds the same
//! ring from the same live node set, so they all agree without talking.

use consistent_hash_ring::{Ring, RingBuilder};

use crate::ids::{NodeId, RoomId};

/// Virtual nodes per room node: enough that three nodes split rooms within
/// a few percent of evenly, small enough that rebuilding the ring is cheap.
pub const VNODES: usize = 64;

/// A consistent-hash ring over room nodes. Built with FNV hashing, which is
/// deterministic across processes and builds.
#[derive(Clone)]
pub struct Placement {
    ring: Ring<String>,
    nodes: Vec<NodeId>,
    /// Live nodes of a release without batches (see
    /// `crate::bus::NodeHeartbeat::batches`); empty once all are upgraded.
    unbatched: Vec<NodeId>,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("nodes", &self.nodes)
            .finish()
    }
}

impl Placement {
    /// A ring over `nodes` (order does not matter; duplicates are ignored).
    pub fn new(nodes: impl IntoIterator<Item = NodeId>) -> Self {
        let mut nodes: Vec<NodeId> = nodes.into_iter().collect();
        nodes.sort();
        nodes.dedup();
        let ring = RingBuilder::default()
            .vnodes(VNODES)
            .nodes_iter(nodes.iter().map(|n| n.as_str().to_owned()))
            .build();
        Self {
            ring,
            nodes,
            unbatched: Vec::new(),
        }
    }

    /// The same ring, noting which of its nodes take no batches.
    pub fn with_unbatched(mut self, nodes: Vec<NodeId>) -> Self {
        self.unbatched = nodes;
        self
    }

    /// Whether `node` takes batched sends (every node of this release does).
    pub fn batches(&self, node: &NodeId) -> bool {
        !self.unbatched.contains(node)
    }

    /// The node that owns `room`, or `None` when no node is live.
    pub fn owner(&self, room: &RoomId) -> Option<NodeId> {
        self.owner_of(room.as_str())
    }

    /// The node that owns placement key `key`: a room name, or a member
    /// shard's `room#k` (`crate::shard::shard_key`).
    pub fn owner_of(&self, key: &str) -> Option<NodeId> {
        let owner = self.ring.try_get(key)?;
        self.nodes.iter().find(|n| n.as_str() == owner).cloned()
    }

    /// The live nodes, sorted.
    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    /// Number of live nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is live.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn nodes_take_batches_unless_noted() {
        let p = Placement::new([n("a"), n("b")]).with_unbatched(vec![n("b")]);
        assert!(p.batches(&n("a")));
        assert!(!p.batches(&n("b")));
    }

    #[test]
    fn empty_ring_has_no_owner() {
        assert_eq!(Placement::new([]).owner(&RoomId::new("a").unwrap()), None);
    }

    #[test]
    fn same_set_same_owner_in_any_order() {
        let a = Placement::new([n("a"), n("b"), n("c")]);
        let b = Placement::new([n("c"), n("a"), n("b"), n("a")]);
        for i in 0..500 {
            let r = RoomId::new(&format!("room-{i}")).unwrap();
            assert_eq!(a.owner(&r), b.owner(&r));
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_rooms_and_spreads_evenly() {
        let all = Placement::new([n("a"), n("b"), n("c")]);
        let two = Placement::new([n("a"), n("b")]);
        let mut per_node = std::collections::HashMap::new();
        for i in 0..3000 {
            let r = RoomId::new(&format!("room-{i}")).unwrap();
            let before = all.owner(&r).unwrap();
            *per_node.entry(before.clone()).or_insert(0) += 1;
            if before.as_str() != "c" {
                assert_eq!(two.owner(&r), Some(before));
            }
        }
        for count in per_node.values() {
            assert!(*count > 600, "uneven spread: {per_node:?}");
        }
    }
}
