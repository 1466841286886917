//! The gateway's configuration: every setting a flag with an environment
//! fallback (names and defaults from the contract).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use chat_protocol::subjects::Subjects;
use chat_protocol::NodeId;
use chat_room_node::config::{redact_url, DEFAULT_FLUSH_INTERVAL_MS, DEFAULT_NATS_URL};
use chat_room_node::ratelimit::RateLimit;
use chat_room_node::room::RoomConfig;
use chat_room_node::telemetry::LogFormat;
use clap::Parser;

/// Cluster-mode listen address.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8080);
/// Embedded-mode listen address: loopback only.
pub const DEFAULT_STANDALONE_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);

/// Gateway settings.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "chat-gateway",
    version,
    about = "WebSocket gateway of the chat cluster (or the whole chat in one process with --standalone)"
)]
pub struct Config {
    /// HTTP and WebSocket address [default: 0.0.0.0:8080; 127.0.0.1:8080 standalone].
    #[arg(long, env = "CHAT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Run a room node, an in-process bus and SQLite in this process.
    #[arg(long, env = "CHAT_STANDALONE", default_value_t = false)]
    pub standalone: bool,
    /// Where the embedded mode keeps its SQLite file.
    #[arg(long, env = "CHAT_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// NATS server (2.10 or newer, with JetStream).
    #[arg(long, env = "CHAT_NATS_URL", default_value = DEFAULT_NATS_URL)]
    pub nats_url: String,
    /// NATS credentials file (`.creds`) for the account.
    #[arg(long, env = "CHAT_NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,
    /// PEM CA bundle for a NATS server certificate from a private CA (TLS required then).
    #[arg(long, env = "CHAT_NATS_CA_FILE")]
    pub nats_ca_file: Option<PathBuf>,
    /// Prefix of every subject and bucket.
    #[arg(long, env = "CHAT_SUBJECT_PREFIX", default_value = "chat")]
    pub subject_prefix: String,
    /// This gateway's id in room rosters [default: host name plus a random suffix].
    #[arg(long, env = "CHAT_GATEWAY_ID")]
    pub gateway_id: Option<String>,
    /// Accept `?user=NAME` as identity. For development only [default: false; true standalone on loopback].
    #[arg(long, env = "CHAT_DEV_AUTH")]
    pub dev_auth: Option<bool>,
    /// Allow dev auth on a non-loopback address (logs a warning).
    #[arg(long, env = "CHAT_DEV_AUTH_PUBLIC", default_value_t = false)]
    pub dev_auth_public: bool,
    /// HS256 secret for client tokens (at least 16 bytes).
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key (RSA → RS256, EC P-256 → ES256) for client tokens.
    #[arg(long, env = "CHAT_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Bearer key of the server API (`/api/...`); the API is off without it.
    #[arg(long, env = "CHAT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Browser origins allowed to open WebSockets, comma-separated [default: any].
    #[arg(long, env = "CHAT_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,
    /// Most WebSocket connections from one client address; more close with 4029.
    #[arg(long, env = "CHAT_MAX_CONNS_PER_IP", default_value_t = 1000)]
    pub max_conns_per_ip: usize,
    /// Proxies (CIDRs, comma-separated) whose X-Forwarded-For names the client.
    #[arg(long, env = "CHAT_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,
    /// Joins per second per connection (burst twice that); 0 disables.
    #[arg(long, env = "CHAT_JOIN_RATE_PER_SEC", default_value_t = 10.0)]
    pub join_rate_per_sec: f64,
    /// History requests per second per connection (burst twice that); 0 disables.
    #[arg(long, env = "CHAT_HISTORY_RATE_PER_SEC", default_value_t = 5.0)]
    pub history_rate_per_sec: f64,
    /// Largest WebSocket frame; larger closes with 1009.
    #[arg(long, env = "CHAT_MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub max_frame_bytes: usize,
    /// Largest message text; larger gets `too_large`.
    #[arg(long, env = "CHAT_MAX_MESSAGE_BYTES", default_value_t = 16_384)]
    pub max_message_bytes: usize,
    /// Smallest frame sent compressed to clients that negotiated
    /// permessage-deflate (each frame is compressed once for all of them);
    /// 0 turns compression off and declines every offer.
    #[arg(long, env = "CHAT_COMPRESS_MIN_BYTES", default_value_t = 1024)]
    pub compress_min_bytes: usize,
    /// Seconds a client has to send a whole HTTP request head (the upgrade
    /// request included); slower connections are closed.
    #[arg(long, env = "CHAT_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Most rooms one connection may join.
    #[arg(long, env = "CHAT_MAX_ROOMS_PER_CONN", default_value_t = 100)]
    pub max_rooms_per_conn: usize,
    /// Outbound frames queued per connection; overflow closes with 4008.
    #[arg(long, env = "CHAT_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,
    /// Seconds between server pings.
    #[arg(long, env = "CHAT_PING_INTERVAL_SECS", default_value_t = 25)]
    pub ping_interval_secs: u64,
    /// Seconds without any frame from the client before closing with 4000.
    #[arg(long, env = "CHAT_PING_TIMEOUT_SECS", default_value_t = 60)]
    pub ping_timeout_secs: u64,
    /// Milliseconds a room node has to answer one try of a request.
    #[arg(long, env = "CHAT_REQUEST_TIMEOUT_MS", default_value_t = 5000)]
    pub request_timeout_ms: u64,
    /// A room node whose heartbeat is older than this leaves the ring, in ms.
    #[arg(long, env = "CHAT_NODE_TTL_MS", default_value_t = 5000)]
    pub node_ttl_ms: u64,
    /// Bound on the drain at shutdown, in seconds.
    #[arg(long, env = "CHAT_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,
    /// Embedded room node: users present above which a room is split into
    /// member shards (with one node, they all run in this process).
    #[arg(long, env = "CHAT_SHARD_THRESHOLD", default_value_t = 5000)]
    pub shard_threshold: usize,
    /// Embedded room node: max messages in one room's batch.
    #[arg(long, env = "CHAT_FLUSH_BATCH", default_value_t = 50)]
    pub flush_batch: usize,
    /// Embedded room node: the room alarm, in ms.
    #[arg(long, env = "CHAT_FLUSH_INTERVAL_MS", default_value_t = DEFAULT_FLUSH_INTERVAL_MS)]
    pub flush_interval_ms: u64,
    /// Embedded room node: messages per second per user per room; 0 disables.
    #[arg(long, env = "CHAT_RATE_LIMIT_PER_SEC", default_value_t = 10.0)]
    pub rate_limit_per_sec: f64,
    /// Embedded room node: burst of the per-user limit.
    #[arg(long, env = "CHAT_RATE_LIMIT_BURST", default_value_t = 20.0)]
    pub rate_limit_burst: f64,
    /// Log format: plain or json (level from RUST_LOG).
    #[arg(long, env = "CHAT_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// The address to listen on.
    pub fn listen(&self) -> SocketAddr {
        self.listen.unwrap_or(if self.standalone {
            DEFAULT_STANDALONE_LISTEN
        } else {
            DEFAULT_LISTEN
        })
    }

    /// Whether `?user=` identity is accepted.
    pub fn dev_auth(&self) -> bool {
        self.dev_auth
            .unwrap_or(self.standalone && self.listen().ip().is_loopback())
    }

    /// This gateway's id.
    ///
    /// # Errors
    /// When a configured id breaks the node-id grammar.
    pub fn gateway_id(&self) -> Result<NodeId, ConfigError> {
        match &self.gateway_id {
            Some(id) => NodeId::new(id).map_err(|e| ConfigError(format!("CHAT_GATEWAY_ID: {e}"))),
            None => {
                let host = hostname_or_default();
                let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
                let base: String = NodeId::sanitised(&host).as_str().chars().take(55).collect();
                Ok(NodeId::sanitised(&format!("{base}-{suffix}")))
            }
        }
    }

    /// The token verifier, when keys are configured.
    ///
    /// # Errors
    /// When the secret is too short or the key file is not a public key.
    pub fn jwt(&self) -> Result<Option<crate::auth::JwtVerifier>, ConfigError> {
        crate::auth::JwtVerifier::from_config(
            self.jwt_secret.as_deref(),
            self.jwt_public_key_file.as_deref(),
        )
        .map_err(|e| ConfigError(e.to_string()))
    }

    /// The trusted proxy networks.
    ///
    /// # Errors
    /// When an entry is not a CIDR or an address.
    pub fn trusted_proxies(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        let Some(list) = &self.trusted_proxies else {
            return Ok(Vec::new());
        };
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| ConfigError(format!("CHAT_TRUSTED_PROXIES: {s:?} is not a CIDR")))
            })
            .collect()
    }

    /// The allowed browser origins; `None` allows any.
    pub fn allowed_origins(&self) -> Option<Vec<String>> {
        self.allowed_origins.as_ref().map(|l| {
            l.split(',')
                .map(|s| s.trim().trim_end_matches('/').to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
    }

    /// Checks every setting before anything binds or connects.
    ///
    /// # Errors
    /// The first setting that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.shard_threshold == 0 {
            return Err(ConfigError("CHAT_SHARD_THRESHOLD must be positive".into()));
        }
        self.gateway_id()?;
        self.jwt()?;
        self.trusted_proxies()?;
        if self.api_key.as_ref().is_some_and(|k| k.len() < 16) {
            return Err(ConfigError(
                "CHAT_API_KEY must be at least 16 characters".into(),
            ));
        }
        if self.max_conns_per_ip == 0 {
            return Err(ConfigError("CHAT_MAX_CONNS_PER_IP must be positive".into()));
        }
        for (name, v) in [
            ("CHAT_JOIN_RATE_PER_SEC", self.join_rate_per_sec),
            ("CHAT_HISTORY_RATE_PER_SEC", self.history_rate_per_sec),
        ] {
            if v < 0.0 || !v.is_finite() {
                return Err(ConfigError(format!("{name} must be 0 or positive")));
            }
        }
        Subjects::new(&self.subject_prefix)
            .map_err(|e| ConfigError(format!("CHAT_SUBJECT_PREFIX: {e}")))?;
        if self.dev_auth() && !self.listen().ip().is_loopback() && !self.dev_auth_public {
            return Err(ConfigError(format!(
                "dev auth lets anyone claim any name; refusing it on {} (not loopback) without CHAT_DEV_AUTH_PUBLIC=true",
                self.listen()
            )));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_frame_bytes) {
            return Err(ConfigError(
                "CHAT_MAX_FRAME_BYTES must be 1 KiB-16 MiB".into(),
            ));
        }
        if self.max_message_bytes == 0 || self.max_message_bytes + 1024 > self.max_frame_bytes {
            return Err(ConfigError(
                "CHAT_MAX_MESSAGE_BYTES must be positive and at least 1 KiB below CHAT_MAX_FRAME_BYTES".into(),
            ));
        }
        // A message frame must fit in one bus reply page.
        if self.max_message_bytes > 256 * 1024 {
            return Err(ConfigError(
                "CHAT_MAX_MESSAGE_BYTES may be at most 256 KiB".into(),
            ));
        }
        if self.max_rooms_per_conn == 0 || self.outbound_queue < 16 {
            return Err(ConfigError(
                "CHAT_MAX_ROOMS_PER_CONN must be positive and CHAT_OUTBOUND_QUEUE at least 16"
                    .into(),
            ));
        }
        if self.ping_interval_secs == 0 || self.ping_timeout_secs <= self.ping_interval_secs {
            return Err(ConfigError(
                "CHAT_PING_TIMEOUT_SECS must exceed CHAT_PING_INTERVAL_SECS (> 0)".into(),
            ));
        }
        if self.request_timeout_ms < 100 || self.node_ttl_ms < 2000 {
            return Err(ConfigError(
                "CHAT_REQUEST_TIMEOUT_MS must be >= 100 and CHAT_NODE_TTL_MS >= 2000".into(),
            ));
        }
        if !(1..=10_000).contains(&self.flush_batch)
            || !(1..=60_000).contains(&self.flush_interval_ms)
        {
            return Err(ConfigError(
                "CHAT_FLUSH_BATCH must be 1-10000 and CHAT_FLUSH_INTERVAL_MS 1-60000".into(),
            ));
        }
        if self.rate_limit_per_sec < 0.0
            || !self.rate_limit_per_sec.is_finite()
            || self.rate_limit_burst < 0.0
        {
            return Err(ConfigError("rate limits must be 0 or positive".into()));
        }
        if self.rate_limit_per_sec > 0.0 && self.rate_limit_burst < 1.0 {
            return Err(ConfigError(
                "CHAT_RATE_LIMIT_BURST must be at least 1 when the limit is on".into(),
            ));
        }
        Ok(())
    }

    /// Ping interval.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs)
    }

    /// Room actor settings of the embedded node.
    pub fn room_config(&self) -> RoomConfig {
        RoomConfig {
            flush_batch: self.flush_batch,
            flush_interval: Duration::from_millis(self.flush_interval_ms),
            rate: RateLimit {
                per_sec: self.rate_limit_per_sec,
                burst: self.rate_limit_burst,
            },
            shard_threshold: self.shard_threshold,
            ..RoomConfig::default()
        }
    }

    /// NATS credentials and CA settings.
    pub fn nats_auth(&self) -> chat_room_node::bus::nats::NatsAuth {
        chat_room_node::bus::nats::NatsAuth {
            creds_file: self.nats_creds_file.clone(),
            ca_file: self.nats_ca_file.clone(),
        }
    }

    /// The config as logged at start, secrets hidden.
    pub fn redacted(&self) -> String {
        let mut c = self.clone();
        c.nats_url = redact_url(&c.nats_url);
        if c.jwt_secret.is_some() {
            c.jwt_secret = Some("***".into());
        }
        if c.api_key.is_some() {
            c.api_key = Some("***".into());
        }
        format!("{c:?}")
    }
}

fn hostname_or_default() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "gateway".into())
}

/// Limits a session enforces, copied out of [`Config`].
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Largest WebSocket frame.
    pub max_frame_bytes: usize,
    /// Largest text.
    pub max_message_bytes: usize,
    /// Most rooms per connection.
    pub max_rooms_per_conn: usize,
    /// Smallest frame compressed (0: compression off).
    pub compress_min_bytes: usize,
    /// Outbound queue length.
    pub outbound_queue: usize,
    /// Time between pings.
    pub ping_interval: Duration,
    /// Silence before closing.
    pub ping_timeout: Duration,
    /// Joins per second per connection (0: off).
    pub join_rate: f64,
    /// History requests per second per connection (0: off).
    pub history_rate: f64,
}

impl From<&Config> for SessionLimits {
    fn from(c: &Config) -> Self {
        Self {
            max_frame_bytes: c.max_frame_bytes,
            max_message_bytes: c.max_message_bytes,
            max_rooms_per_conn: c.max_rooms_per_conn,
            compress_min_bytes: c.compress_min_bytes,
            outbound_queue: c.outbound_queue,
            ping_interval: c.ping_interval(),
            ping_timeout: Duration::from_secs(c.ping_timeout_secs),
            join_rate: c.join_rate_per_sec,
            history_rate: c.history_rate_per_sec,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_defaults_to_loopback_with_dev_auth() {
        let c = Config::try_parse_from(["x", "--standalone"]).unwrap();
        assert_eq!(c.listen(), DEFAULT_STANDALONE_LISTEN);
        assert!(c.dev_auth());
        c.validate().unwrap();
        let c = Config::try_parse_from(["x"]).unwrap();
        assert_eq!(c.listen(), DEFAULT_LISTEN);
        assert!(!c.dev_auth());
    }

    #[test]
    fn the_embedded_node_gets_the_room_settings() {
        let c = Config::try_parse_from([
            "x",
            "--standalone",
            "--shard-threshold",
            "6",
            "--flush-batch",
            "7",
        ])
        .unwrap();
        let r = c.room_config();
        assert_eq!(r.shard_threshold, 6);
        assert_eq!(r.flush_batch, 7);
        let c = Config::try_parse_from(["x", "--shard-threshold", "0"]).unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn dev_auth_off_loopback_needs_the_explicit_flag() {
        let c =
            Config::try_parse_from(["x", "--dev-auth", "true", "--listen", "0.0.0.0:1"]).unwrap();
        assert!(c.validate().is_err());
        let c = Config::try_parse_from([
            "x",
            "--dev-auth",
            "true",
            "--listen",
            "0.0.0.0:1",
            "--dev-auth-public",
        ])
        .unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn secrets_are_redacted_and_lists_parsed() {
        let c = Config::try_parse_from([
            "x",
            "--jwt-secret",
            "0123456789abcdef-secret",
            "--api-key",
            "0123456789abcdef-key",
            "--trusted-proxies",
            "10.0.0.0/8, 127.0.0.1",
            "--allowed-origins",
            "https://a.example/, https://b.example",
        ])
        .unwrap();
        c.validate().unwrap();
        let r = c.redacted();
        assert!(!r.contains("0123456789abcdef"), "{r}");
        assert_eq!(c.trusted_proxies().unwrap().len(), 2);
        assert_eq!(
            c.allowed_origins().unwrap(),
            vec!["https://a.example", "https://b.example"]
        );
        let bad = Config::try_parse_from(["x", "--trusted-proxies", "nope"]).unwrap();
        assert!(bad.validate().is_err());
        let bad = Config::try_parse_from(["x", "--jwt-secret", "short"]).unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn message_limit_must_fit_the_frame_limit() {
        let c = Config::try_parse_from(["x", "--max-message-bytes", "65536"]).unwrap();
        assert!(c.validate().is_err());
    }
}
