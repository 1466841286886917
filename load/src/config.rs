//! Command-line settings of a load run.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::Error;

/// Default length of every message text, in bytes (the benchmark goals use
/// 100-byte messages).
pub const DEFAULT_MESSAGE_BYTES: usize = 100;
/// Default seconds of the measured phase.
pub const DEFAULT_DURATION_SECS: u64 = 10;
/// Default connects in flight at once while the load ramps up.
pub const DEFAULT_CONNECT_CONCURRENCY: usize = 256;
/// Default WebSocket read buffer per connection. Small on purpose: the
/// tool must hold 100,000 connections (tungstenite's default is 128 KiB).
pub const DEFAULT_READ_BUFFER: usize = 4096;
/// Default connections per loopback source address. The gateway's
/// default `CHAT_MAX_CONNS_PER_IP` is 1000, and one address has about
/// 28,000 ephemeral ports; staying well below both lets any N connect.
pub const DEFAULT_CONNS_PER_SOURCE: usize = 500;
/// Default most unacknowledged sends per sender.
pub const DEFAULT_WINDOW: usize = 64;

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// N connections joined to rooms, application pings only: memory per
    /// connection.
    Idle,
    /// One room, N members, `--senders` of them sending `--rate` msgs/s in
    /// total: fan-out throughput and latency.
    Fanout,
    /// `--rooms` rooms of `--conns / --rooms` members, `--rate` msgs/s
    /// into each room: the many-small-rooms workload.
    Rooms,
    /// Like `rooms`, while non-sending members disconnect and come back
    /// (`--churn-rate` per second in total), resuming with `since`.
    Churn,
}

/// Settings of one run. Every flag has a default that makes a small run
/// against a local gateway.
#[derive(Debug, Clone, Parser, serde::Serialize)]
#[command(
    name = "chat-load",
    version,
    about = "Load generator for the chat cluster",
    long_about = "Opens many WebSocket connections to one or more gateways, runs a scenario, \
                  checks that every member received every message exactly once in seq order, \
                  and reports throughput, send→receive latency, errors, close codes and server \
                  memory and CPU."
)]
pub struct LoadConfig {
    /// The scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Gateway WebSocket URLs (comma list); connection i uses URL i mod n.
    /// `ws://` to gateways directly, `wss://` through a TLS ingress (see
    /// `--ca-file`).
    #[arg(
        long = "url",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/ws"
    )]
    pub urls: Vec<String>,
    /// Connections in total (fan-out: the room's members).
    #[arg(long, default_value_t = 100)]
    pub conns: usize,
    /// Rooms the connections are spread over (member i joins room i mod
    /// rooms). Default: 1 for fan-out, conns/10 otherwise.
    #[arg(long)]
    pub rooms: Option<usize>,
    /// Messages per second into each room (0: as fast as the window
    /// allows).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Sending members per room. Default: 1 for fan-out and churn, every
    /// member for rooms, none for idle.
    #[arg(long)]
    pub senders: Option<usize>,
    /// Most unacknowledged sends per sender; a sender waits when it is
    /// reached (so an overloaded server slows the load instead of drowning).
    #[arg(long, default_value_t = DEFAULT_WINDOW)]
    pub window: usize,
    /// Churn: disconnects per second over all non-sending members; each
    /// reconnects at once and resumes with `since`.
    #[arg(long, default_value_t = 10.0)]
    pub churn_rate: f64,
    /// Length of the measured phase, in seconds.
    #[arg(long, default_value_t = DEFAULT_DURATION_SECS)]
    pub duration: u64,
    /// Bytes of every message text (a send timestamp plus padding).
    #[arg(long, default_value_t = DEFAULT_MESSAGE_BYTES)]
    pub message_bytes: usize,
    /// Offer permessage-deflate at connect, to measure what negotiating it
    /// costs a connection. The tool cannot read compressed frames, so keep
    /// every frame under the gateway's `CHAT_COMPRESS_MIN_BYTES` (the
    /// default 1024 is well above a 100-byte message); a compressed frame
    /// fails the run as an error.
    #[arg(long)]
    pub offer_deflate: bool,
    /// Seconds between application pings of each connection.
    #[arg(long, default_value_t = 20)]
    pub ping_secs: u64,
    /// Connects (TCP + upgrade + join) in flight at once during ramp-up.
    #[arg(long, default_value_t = DEFAULT_CONNECT_CONCURRENCY)]
    pub connect_concurrency: usize,
    /// Connections per loopback source address (127.0.0.1, 127.0.0.2, ...);
    /// passes the per-address ephemeral-port limit and
    /// `CHAT_MAX_CONNS_PER_IP`.
    #[arg(long, default_value_t = DEFAULT_CONNS_PER_SOURCE)]
    pub conns_per_source: usize,
    /// First source address. A loopback one (the default) walks 127/8 as
    /// above; any other is counted up from, one address per
    /// `--conns-per-source` connections, and those addresses must be on
    /// an interface of the tool's host (the client side of the veth pair
    /// that `scripts/bench-cluster.sh` makes with `CLIENT_NETNS=1`).
    ///
    /// Unset: connections to a loopback gateway walk 127/8 from 127.0.0.1,
    /// and connections to any other host leave the source to the
    /// operating system (a remote gateway cannot answer a loopback
    /// source).
    #[arg(long)]
    pub source_base: Option<Ipv4Addr>,
    /// WebSocket read buffer per connection, in bytes.
    #[arg(long, default_value_t = DEFAULT_READ_BUFFER)]
    pub read_buffer: usize,
    /// Seconds to wait for every connection to be joined.
    #[arg(long, default_value_t = 120)]
    pub connect_timeout: u64,
    /// Seconds to wait after the load stops for acks and deliveries.
    #[arg(long, default_value_t = 15)]
    pub drain_timeout: u64,
    /// Seconds to wait with every connection joined before memory is read
    /// (lets allocators and queues settle).
    #[arg(long, default_value_t = 2)]
    pub settle: u64,
    /// HS256 secret: connect with `?token=JWT` instead of dev auth
    /// `?user=NAME`.
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true)]
    #[serde(skip)]
    pub jwt_secret: Option<String>,
    /// Private key (PEM, PKCS#8 or PKCS#1) for a cluster that checks
    /// tokens with `CHAT_JWT_PUBLIC_KEY_FILE`: every connection signs its
    /// own `?token=` with it, RS256 for an RSA key and ES256 for a P-256
    /// one. It takes precedence over `--jwt-secret` (which a shell may
    /// have in its environment as `CHAT_JWT_SECRET`).
    #[arg(long)]
    pub jwt_key_file: Option<PathBuf>,
    /// PEM certificates to trust for `wss://` besides the public roots: the
    /// CA of an ingress with a private certificate.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Gateway process ids: their RSS (VmRSS) per connection is reported.
    #[arg(long = "gateway-pid", value_delimiter = ',')]
    pub gateway_pids: Vec<u32>,
    /// Room-node process ids: their RSS per connection is reported.
    #[arg(long = "node-pid", value_delimiter = ',')]
    pub node_pids: Vec<u32>,
    /// Every server-side process id (gateway, room node, nats-server,
    /// postmaster): CPU over the measured phase is summed over them and
    /// their child processes (Postgres backends).
    #[arg(long = "server-pid", value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// Gateway metrics URLs (`http://host:port/metrics`, comma list), for
    /// a cluster whose processes are not on this host: memory per
    /// connection from their `process_resident_memory_bytes` (when no
    /// `--gateway-pid` is given), CPU over the measured phase from
    /// `process_cpu_seconds_total`, and their connection count.
    #[arg(long = "gateway-metrics", value_delimiter = ',')]
    pub gateway_metrics: Vec<String>,
    /// Room-node metrics URLs (the admin listener's `/metrics`), read like
    /// `--gateway-metrics`. In the embedded mode the gateway's endpoint
    /// covers both: give it once.
    #[arg(long = "node-metrics", value_delimiter = ',')]
    pub node_metrics: Vec<String>,
    /// The core the server side is pinned to: its busy, softirq and steal
    /// shares over the measured phase go into the results. On a virtual
    /// machine steal (the hypervisor running someone else) explains runs
    /// that are slow for no reason of the server's.
    #[arg(long)]
    pub server_core: Option<usize>,
    /// Server settings this run relies on (e.g.
    /// `CHAT_RATE_LIMIT_PER_SEC=0`), copied into the results so they say
    /// under which limits they were measured.
    #[arg(long = "server-setting", value_delimiter = ',')]
    pub server_settings: Vec<String>,
    /// Free text copied into the results (machine, pinning, build).
    #[arg(long)]
    pub note: Option<String>,
    /// Directory for `results.json`, `summary.txt` and `plot.png`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No per-second progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl LoadConfig {
    /// Parses command-line style arguments (the first is the program
    /// name), for callers that run the tool as a library, like the smoke
    /// tests.
    ///
    /// # Errors
    /// [`Error::Config`] with clap's message.
    pub fn from_args<I, T>(args: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::try_parse_from(args).map_err(|e| Error::Config(e.to_string()))
    }

    /// Rooms of the run after defaults.
    pub fn room_count(&self) -> usize {
        match (self.scenario, self.rooms) {
            (Scenario::Fanout, _) => 1,
            (_, Some(r)) => r.max(1),
            (_, None) => (self.conns / 10).max(1),
        }
    }

    /// Sending members per room after defaults (never more than members).
    pub fn senders_per_room(&self) -> usize {
        let members = self.conns / self.room_count();
        let s = match (self.scenario, self.senders) {
            (Scenario::Idle, _) => 0,
            (_, Some(s)) => s,
            (Scenario::Rooms, None) => members,
            (Scenario::Fanout | Scenario::Churn, None) => 1,
        };
        s.min(members)
    }

    /// Checks the settings before any connection is made.
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad setting.
    pub fn validate(&self) -> Result<(), Error> {
        if self.conns == 0 {
            return Err(Error::Config("--conns must be at least 1".into()));
        }
        if self.conns < self.room_count() {
            return Err(Error::Config(format!(
                "--conns {} is fewer than --rooms {}",
                self.conns,
                self.room_count()
            )));
        }
        if self.message_bytes < 20 {
            return Err(Error::Config(
                "--message-bytes must be at least 20 (the timestamp)".into(),
            ));
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            return Err(Error::Config("--rate must be a number >= 0".into()));
        }
        if self.window == 0 || self.conns_per_source == 0 || self.connect_concurrency == 0 {
            return Err(Error::Config(
                "--window, --conns-per-source and --connect-concurrency must be >= 1".into(),
            ));
        }
        if self.urls.is_empty() {
            return Err(Error::Config("--url is empty".into()));
        }
        if self.scenario != Scenario::Idle {
            if self.senders_per_room() == 0 {
                return Err(Error::Config(format!(
                    "--senders 0: {:?} would send nothing (the idle scenario measures \
                     connections alone)",
                    self.scenario
                )));
            }
            if self.duration == 0 {
                return Err(Error::Config(
                    "--duration 0: nothing would be measured".into(),
                ));
            }
        }
        if self.scenario == Scenario::Churn
            && self.conns / self.room_count() <= self.senders_per_room()
        {
            return Err(Error::Config(format!(
                "churn: every member of a room is a sender ({} per room), so nobody would \
                 disconnect and resume; give more --conns per room or fewer --senders",
                self.conns / self.room_count()
            )));
        }
        if let Some(s) = self.jwt_secret.as_ref().filter(|s| !s.is_empty()) {
            if s.len() < 16 && self.jwt_key_file.is_none() {
                return Err(Error::Config(format!(
                    "--jwt-secret is {} bytes: gateways refuse secrets under 16 bytes, so no \
                     gateway can check tokens signed with it",
                    s.len()
                )));
            }
        }
        for pid in self
            .gateway_pids
            .iter()
            .chain(&self.node_pids)
            .chain(&self.server_pids)
        {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return Err(Error::Config(format!(
                    "process {pid} (--gateway-pid/--node-pid/--server-pid) is not running on \
                     this host"
                )));
            }
        }
        for u in &self.urls {
            target(u)?;
        }
        // Each endpoint once: a process summed twice doubles its memory.
        let mut seen = std::collections::HashSet::new();
        for u in self.gateway_metrics.iter().chain(&self.node_metrics) {
            let e = crate::scrape::endpoint(u).map_err(|e| Error::Config(e.to_string()))?;
            if !seen.insert(e) {
                return Err(Error::Config(format!(
                    "{u} is given twice in --gateway-metrics/--node-metrics (in the embedded \
                     mode one process is both: give its /metrics once, as --gateway-metrics)"
                )));
            }
        }
        Ok(())
    }
}

/// One gateway the tool connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The TCP address, resolved once before the run.
    pub addr: SocketAddr,
    /// `wss://`: TLS (an ingress in front of the gateways), checked
    /// against the host name in the URL.
    pub tls: bool,
    /// The URL as given: its host goes into the request's `Host` header,
    /// which an ingress or a proxy in front of the gateways routes by.
    pub url: String,
}

impl Target {
    /// The URL of one connection, with its credential (`user=` or
    /// `token=`) added to the query.
    pub fn with_credential(&self, cred: &str) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}{cred}", self.url)
    }
}

/// The gateway of a `ws://` or `wss://host[:port][/path]` URL (path `/ws`
/// when none; port 80 or 443 when none).
///
/// # Errors
/// [`Error::Config`] for another scheme or an unresolvable host.
pub fn target(url: &str) -> Result<Target, Error> {
    if url.is_empty() {
        return Err(Error::Config(
            "an empty URL in --url (a trailing comma?)".into(),
        ));
    }
    // The scheme is case-insensitive (RFC 3986); the rest is kept as is.
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "ws" => false,
        "wss" => true,
        _ => return Err(Error::Config(format!("{url}: expected ws:// or wss://"))),
    };
    let scheme = if tls { "wss" } else { "ws" };
    if rest.contains('#') {
        return Err(Error::Config(format!(
            "{url}: a fragment (#...) is never sent to the server; remove it"
        )));
    }
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    if hostport.is_empty() {
        return Err(Error::Config(format!("{url}: no host")));
    }
    if hostport.contains('@') {
        return Err(Error::Config(format!(
            "{url}: credentials in the URL are not used; give --jwt-secret or --jwt-key-file"
        )));
    }
    let addr = with_port(hostport, if tls { 443 } else { 80 })
        .map_err(|e| Error::Config(format!("{url}: {e}")))?
        .to_socket_addrs()
        .map_err(|e| Error::Config(format!("{url}: {e}")))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| Error::Config(format!("{url}: no IPv4 address")))?;
    let url = if rest.len() == hostport.len() || rest[hostport.len()..].starts_with('?') {
        format!("{scheme}://{hostport}/ws{}", &rest[hostport.len()..])
    } else {
        format!("{scheme}://{rest}")
    };
    Ok(Target { addr, tls, url })
}

/// `host[:port]` with the port made explicit: the scheme's `default`
/// when none is given.
///
/// # Errors
/// A message for a port that is not a number from 1 to 65535.
pub(crate) fn with_port(host: &str, default: u16) -> Result<String, String> {
    match host.rsplit_once(':') {
        None => Ok(format!("{host}:{default}")),
        Some((_, p)) if p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(host.to_string()),
        Some((_, p)) => Err(format!("bad port {p:?}")),
    }
}

/// The source address of the `k`-th group of connections to `target`:
/// counted from `base` when one is set, walked over 127/8 for a loopback
/// target, and `None` (the operating system's choice) for any other.
pub fn source_for(base: Option<Ipv4Addr>, target: SocketAddr, k: usize) -> Option<Ipv4Addr> {
    match base {
        Some(b) => Some(source_addr(b, k)),
        None if target.ip().is_loopback() => Some(source_addr(Ipv4Addr::LOCALHOST, k)),
        None => None,
    }
}

/// The `k`-th source address counted from `base`. From a loopback base:
/// 127.0.0.1, 127.0.0.2, ..., 127.0.0.254, 127.0.1.1, ... (all of 127/8 is
/// loopback on Linux); from any other: `base`, `base + 1`, ...
pub fn source_addr(base: Ipv4Addr, k: usize) -> Ipv4Addr {
    if !base.is_loopback() {
        return Ipv4Addr::from(u32::from(base).wrapping_add(k as u32));
    }
    let k = k % (254 * 256 * 256);
    Ipv4Addr::new(
        127,
        ((k / 254 / 256) % 256) as u8,
        ((k / 254) % 256) as u8,
        (k % 254 + 1) as u8,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_stay_in_loopback() {
        let lo = Ipv4Addr::LOCALHOST;
        assert_eq!(source_addr(lo, 0), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(source_addr(lo, 253), Ipv4Addr::new(127, 0, 0, 254));
        assert_eq!(source_addr(lo, 254), Ipv4Addr::new(127, 0, 1, 1));
        assert!(source_addr(lo, 1_000_000).is_loopback());
    }

    #[test]
    fn other_source_addresses_count_up_from_the_base() {
        let base = Ipv4Addr::new(10, 250, 1, 1);
        assert_eq!(source_addr(base, 0), base);
        assert_eq!(source_addr(base, 300), Ipv4Addr::new(10, 250, 2, 45));
    }

    #[test]
    fn defaults_per_scenario() {
        let c = LoadConfig::parse_from(["chat-load", "fanout", "--conns", "50"]);
        assert_eq!((c.room_count(), c.senders_per_room()), (1, 1));
        let c = LoadConfig::parse_from(["chat-load", "rooms", "--conns", "50", "--rooms", "5"]);
        assert_eq!((c.room_count(), c.senders_per_room()), (5, 10));
        let c = LoadConfig::parse_from(["chat-load", "idle", "--conns", "50"]);
        assert_eq!((c.room_count(), c.senders_per_room()), (5, 0));
        assert!(c.validate().is_ok());
        let c = LoadConfig::parse_from(["chat-load", "rooms", "--conns", "50", "--senders", "0"]);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--senders 0"));
        let c = LoadConfig::parse_from(["chat-load", "fanout", "--duration", "0"]);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--duration 0"));
        let refused = |args: &[&str], why: &str| {
            let mut a = vec!["chat-load"];
            a.extend_from_slice(args);
            let err = LoadConfig::parse_from(a)
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{args:?}: {err}");
        };
        refused(&["churn", "--conns", "10", "--rooms", "10"], "nobody would");
        refused(&["idle", "--jwt-secret", "short"], "16 bytes");
        refused(&["idle", "--gateway-pid", "4294967295"], "not running");
        let me = std::process::id().to_string();
        let ok = LoadConfig::parse_from(["chat-load", "churn", "--conns", "20", "--rooms", "10"]);
        assert!(ok.validate().is_ok());
        let ok = LoadConfig::parse_from(["chat-load", "idle", "--server-pid", &me]);
        assert!(ok.validate().is_ok());
        assert_eq!(
            target("ws://127.0.0.1:9/ws").unwrap().addr,
            "127.0.0.1:9".parse().unwrap()
        );
        assert!(target("http://127.0.0.1:9/ws").is_err());
        let t = target("wss://localhost/ws").unwrap();
        assert!(t.tls && t.addr.port() == 443, "{t:?}");
        assert!(target("ws:///ws").is_err());
        assert!(target("ws://127.0.0.1:99999/ws")
            .unwrap_err()
            .to_string()
            .contains("bad port"));
        assert!(target("")
            .unwrap_err()
            .to_string()
            .contains("trailing comma"));
        assert!(target("ws://127.0.0.1:9/ws#x").is_err());
        assert!(target("ws://u:p@127.0.0.1:9/ws").is_err());
        assert_eq!(
            target("WS://127.0.0.1:9/ws").unwrap().url,
            "ws://127.0.0.1:9/ws"
        );
    }

    #[test]
    fn a_target_keeps_its_host_and_gets_a_path() {
        let t = target("ws://localhost:9/chat/ws").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9".parse().unwrap());
        assert_eq!(
            t.with_credential("user=a"),
            "ws://localhost:9/chat/ws?user=a"
        );
        let t = target("ws://127.0.0.1:9").unwrap();
        assert_eq!(t.with_credential("user=a"), "ws://127.0.0.1:9/ws?user=a");
        let t = target("ws://127.0.0.1:9/ws?tenant=x").unwrap();
        assert_eq!(
            t.with_credential("user=a"),
            "ws://127.0.0.1:9/ws?tenant=x&user=a"
        );
    }

    #[test]
    fn only_a_loopback_target_gets_a_loopback_source_by_default() {
        let lo: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let remote: SocketAddr = "10.0.0.7:8080".parse().unwrap();
        assert_eq!(source_for(None, lo, 1), Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(source_for(None, remote, 1), None);
        let base = Ipv4Addr::new(10, 250, 1, 1);
        assert_eq!(
            source_for(Some(base), remote, 1),
            Some(Ipv4Addr::new(10, 250, 1, 2))
        );
    }
}
