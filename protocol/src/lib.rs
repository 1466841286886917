//! The contract every chat process shares. No I/O lives here.
//!
//! # Layout
//! - [`ids`]: validated room, user and node identifiers.
//! - [`frames`]: client frames (`ClientFrame`, `ServerFrame`), error and
//!   close codes.
//! - [`bus`]: requests, replies and events between gateways and room nodes.
//! - [`subjects`]: every NATS subject and bucket name, from one prefix.
//! - [`placement`]: the consistent-hash ring that maps rooms to nodes.
//! - [`shard`]: a user's member shard in a big room (jump hash), and
//!   the ring key of each shard.

pub mod bus;
pub mod frames;
pub mod ids;
pub mod placement;
pub mod shard;
pub mod subjects;

pub use frames::{ClientFrame, ErrorCode, Message, ServerFrame};
pub use ids::{NodeId, RoomId, UserId};
