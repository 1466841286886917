//! The room node's configuration: every setting a flag with an environment
//! fallback (names and defaults from the contract).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chat_protocol::subjects::Subjects;
use chat_protocol::NodeId;
use clap::Parser;

use crate::ratelimit::RateLimit;
use crate::room::RoomConfig;
use crate::telemetry::LogFormat;

/// Default NATS URL.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Default database URL.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/chat";
/// Default flush alarm. A few milliseconds: under load batches fill by
/// themselves long before it fires, and when quiet it is the latency a
/// message pays for batching. The original design's 5 s served per-write
/// billing, not users.
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 5;

/// Room node settings.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "chat-room-node",
    version,
    about = "Owns chat rooms: sequencing, persistence, fan-out events"
)]
pub struct Config {
    /// NATS server (2.10 or newer, with JetStream).
    #[arg(long, env = "CHAT_NATS_URL", default_value = DEFAULT_NATS_URL)]
    pub nats_url: String,
    /// NATS credentials file (`.creds`) for the account.
    #[arg(long, env = "CHAT_NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,
    /// PEM CA bundle for a NATS server certificate from a private CA (TLS required then).
    #[arg(long, env = "CHAT_NATS_CA_FILE")]
    pub nats_ca_file: Option<PathBuf>,
    /// Prefix of every subject and bucket, so clusters can share one NATS.
    #[arg(long, env = "CHAT_SUBJECT_PREFIX", default_value = "chat")]
    pub subject_prefix: String,
    /// This node's id, unique among live nodes (default: the host name).
    #[arg(long, env = "CHAT_NODE_ID")]
    pub node_id: Option<String>,
    /// Postgres URL.
    #[arg(long, env = "CHAT_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// Largest database connection pool.
    #[arg(long, env = "CHAT_DATABASE_MAX_CONNECTIONS", default_value_t = 8)]
    pub database_max_connections: u32,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "CHAT_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// Max messages in one room's batch.
    #[arg(long, env = "CHAT_FLUSH_BATCH", default_value_t = 50)]
    pub flush_batch: usize,
    /// The room alarm: longest wait of a buffered message, in ms.
    #[arg(long, env = "CHAT_FLUSH_INTERVAL_MS", default_value_t = DEFAULT_FLUSH_INTERVAL_MS)]
    pub flush_interval_ms: u64,
    /// Buffered messages per room above which sends get `overloaded`.
    #[arg(long, env = "CHAT_BUFFER_HIGH_WATER", default_value_t = 10_000)]
    pub buffer_high_water: usize,
    /// Members above which a room is sharded.
    #[arg(long, env = "CHAT_SHARD_THRESHOLD", default_value_t = 5000)]
    pub shard_threshold: usize,
    /// Messages per second per user per room; 0 disables the limit.
    #[arg(long, env = "CHAT_RATE_LIMIT_PER_SEC", default_value_t = 10.0)]
    pub rate_limit_per_sec: f64,
    /// Burst of the per-user limit.
    #[arg(long, env = "CHAT_RATE_LIMIT_BURST", default_value_t = 20.0)]
    pub rate_limit_burst: f64,
    /// A node whose heartbeat is older than this leaves the ring, in ms.
    #[arg(long, env = "CHAT_NODE_TTL_MS", default_value_t = 5000)]
    pub node_ttl_ms: u64,
    /// Seconds an empty room's actor lives on before it stops.
    #[arg(long, env = "CHAT_ROOM_IDLE_SECS", default_value_t = 60)]
    pub room_idle_secs: u64,
    /// Bound on the drain at shutdown, in seconds.
    #[arg(long, env = "CHAT_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,
    /// Log format: plain or json (level from RUST_LOG).
    #[arg(long, env = "CHAT_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// The node id: the configured one, or the host name sanitised.
    ///
    /// # Errors
    /// When a configured id breaks the grammar.
    pub fn node_id(&self) -> Result<NodeId, ConfigError> {
        match &self.node_id {
            Some(id) => NodeId::new(id).map_err(|e| ConfigError(format!("CHAT_NODE_ID: {e}"))),
            None => {
                let host = hostname::get()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Ok(NodeId::sanitised(&host))
            }
        }
    }

    /// Checks every setting before anything binds or connects.
    ///
    /// # Errors
    /// The first setting that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.node_id()?;
        Subjects::new(&self.subject_prefix)
            .map_err(|e| ConfigError(format!("CHAT_SUBJECT_PREFIX: {e}")))?;
        if !self.database_url.starts_with("postgres://")
            && !self.database_url.starts_with("postgresql://")
        {
            return Err(ConfigError(
                "CHAT_DATABASE_URL must be a postgres:// URL".into(),
            ));
        }
        if !(1..=10_000).contains(&self.flush_batch) {
            return Err(ConfigError("CHAT_FLUSH_BATCH must be 1-10000".into()));
        }
        if !(1..=60_000).contains(&self.flush_interval_ms) {
            return Err(ConfigError("CHAT_FLUSH_INTERVAL_MS must be 1-60000".into()));
        }
        if self.rate_limit_per_sec < 0.0
            || self.rate_limit_burst < 0.0
            || !self.rate_limit_per_sec.is_finite()
        {
            return Err(ConfigError("rate limits must be 0 or positive".into()));
        }
        if self.rate_limit_per_sec > 0.0 && self.rate_limit_burst < 1.0 {
            return Err(ConfigError(
                "CHAT_RATE_LIMIT_BURST must be at least 1 when the limit is on".into(),
            ));
        }
        if self.node_ttl_ms < 2000 {
            return Err(ConfigError(
                "CHAT_NODE_TTL_MS must be at least 2000 (two heartbeats)".into(),
            ));
        }
        if self.buffer_high_water < self.flush_batch {
            return Err(ConfigError(
                "CHAT_BUFFER_HIGH_WATER must be at least CHAT_FLUSH_BATCH".into(),
            ));
        }
        if self.shard_threshold == 0 {
            return Err(ConfigError("CHAT_SHARD_THRESHOLD must be positive".into()));
        }
        Ok(())
    }

    /// The room actor settings.
    pub fn room_config(&self) -> RoomConfig {
        RoomConfig {
            flush_batch: self.flush_batch,
            flush_interval: Duration::from_millis(self.flush_interval_ms),
            rate: RateLimit {
                per_sec: self.rate_limit_per_sec,
                burst: self.rate_limit_burst,
            },
            high_water: self.buffer_high_water,
            idle_timeout: Duration::from_secs(self.room_idle_secs),
            shard_threshold: self.shard_threshold,
            ..RoomConfig::default()
        }
    }

    /// NATS credentials and CA settings.
    pub fn nats_auth(&self) -> crate::bus::nats::NatsAuth {
        crate::bus::nats::NatsAuth {
            creds_file: self.nats_creds_file.clone(),
            ca_file: self.nats_ca_file.clone(),
        }
    }

    /// The config as logged at start, with the database password hidden.
    pub fn redacted(&self) -> String {
        let mut c = self.clone();
        c.database_url = redact_url(&c.database_url);
        c.nats_url = redact_url(&c.nats_url);
        format!("{c:?}")
    }
}

/// Hides the password of `scheme://user:password@host/...`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((creds, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match creds.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_refused() {
        let c = Config::try_parse_from(["x", "--node-id", "n1"]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.flush_batch, 50);
        assert_eq!(c.flush_interval_ms, DEFAULT_FLUSH_INTERVAL_MS);
        let bad = Config::try_parse_from(["x", "--node-id", "a.b"]).unwrap();
        assert!(bad.validate().is_err());
        let bad = Config::try_parse_from(["x", "--node-id", "n", "--flush-batch", "0"]).unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
