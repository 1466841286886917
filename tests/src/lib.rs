//! Test harness for the end-to-end suites.
//!
//! The suites run the real `chat-gateway` and `chat-room-node` binaries as
//! separate processes against a private NATS server and a fresh Postgres
//! database per cluster, because the properties we care about (ordering,
//! failover, no loss across restarts) only show up across real process and
//! network boundaries.
//!
//! The external tools come from `./scripts/test.sh`, which installs a current
//! `nats-server` and makes sure Postgres is reachable, then exports
//! `CHAT_TEST_NATS_SERVER` and `CHAT_TEST_DATABASE_URL`. Everything here
//! fails loudly (never skips) when a dependency is missing, so a green run
//! always means the tests really ran.
//!
//! Every process writes its stdout and stderr to
//! `target/test-logs/<test-name>/<proc-name>.log`; errors from the harness
//! quote the tail of the relevant log, and a [`TestCluster`] dropped while
//! the test panics prints the tail of every log.
//!
//! Fault tests add a [`PrivatePostgres`] per cluster (so the database can
//! be stopped) and the [`fault`] module: a workload of correct clients and
//! a checker that holds what they saw against the database.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use sqlx::{Connection as _, Row as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod fault;

/// Default admin URL of the Postgres the tests create their databases in.
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// How long a whole cluster may take to become ready.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long `nats-server` may take to accept clients.
const NATS_READY_DEADLINE: Duration = Duration::from_secs(20);
/// How long a SIGTERMed `nats-server` may take before it is SIGKILLed.
const NATS_STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of a process log quoted in errors and panic reports.
const LOG_TAIL_LINES: usize = 40;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh number unique within this process (for names of databases,
/// directories and subject prefixes).
fn next_counter() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A random 64-bit value without pulling in a `rand` dependency: std's
/// `RandomState` is seeded from the OS.
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(next_counter());
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// The workspace root (parent of this crate), known at compile time.
fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The cargo profile directory (`target/debug`) the running test executable
/// was built into: test executables live in `<profile>/deps/`.
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the running test executable")?;
    let deps = exe
        .parent()
        .with_context(|| format!("test executable {} has no parent dir", exe.display()))?;
    if deps.file_name().is_some_and(|n| n == "deps") {
        if let Some(profile) = deps.parent() {
            return Ok(profile.to_path_buf());
        }
    }
    // Not run through cargo's layout (e.g. copied elsewhere): assume the
    // executable sits next to the binaries.
    Ok(deps.to_path_buf())
}

/// Root of the per-test log directories: `<target>/test-logs`.
fn logs_root() -> PathBuf {
    match profile_dir() {
        Ok(p) => p
            .parent()
            .map(|t| t.join("test-logs"))
            .unwrap_or_else(|| p.join("test-logs")),
        Err(_) => workspace_dir().join("target").join("test-logs"),
    }
}

/// Turns a test name into something safe as a directory name.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        "unnamed".to_string()
    } else {
        s
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so any
/// user name can be put into a query string.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The last `n` lines of a log file, for error messages.
fn log_tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            lines[start..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Ports handed out by [`free_port`] in this process, so two parts of one
/// test run never get the same port even before either binds it.
static USED_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback TCP port that is free right now and not handed out before by
/// this process. Needed because every process of a test cluster must listen
/// on its own port and tests run in parallel.
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..200 {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("cannot bind an ephemeral loopback port")?;
        let port = listener.local_addr()?.port();
        drop(listener);
        let mut used = USED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if used.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    bail!("could not find a free loopback port in 200 tries")
}

/// Sends a signal by number to a process id via the shell's `kill` builtin
/// (the workspace forbids `unsafe`, and `sh` exists everywhere).
fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("sh")
        .args([
            "-c",
            "kill -s \"$1\" \"$2\"",
            "sh",
            signal,
            &pid.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("cannot run `kill -s {signal} {pid}` through sh"))?;
    if !status.success() {
        bail!("`kill -s {signal} {pid}` failed ({status}): process already gone?");
    }
    Ok(())
}

/// Polls `f` every few milliseconds until it yields `Ok(Some(value))`, and
/// returns that value; fails once `deadline` has passed.
///
/// Why: tests must wait for asynchronous effects (a message persisted, a
/// node noticed gone) without fixed sleeps, which are either flaky or slow.
/// `Ok(None)` means "not yet"; an `Err` also means "not yet" (a connection
/// refused while something restarts is normal) but the last error is quoted
/// in the timeout error so a wait that never succeeds explains itself.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    let end = start + deadline;
    let mut interval = Duration::from_millis(10);
    let mut last_err: Option<anyhow::Error> = None;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        let now = Instant::now();
        if now >= end {
            let mut msg = format!(
                "timed out after {:?} ({attempts} attempts) waiting for {what}",
                now - start
            );
            if let Some(e) = last_err {
                msg.push_str(&format!("; last error: {e:#}"));
            }
            bail!(msg);
        }
        tokio::time::sleep(interval.min(end - now)).await;
        interval = (interval * 2).min(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// NATS
// ---------------------------------------------------------------------------

/// Finds the `nats-server` binary: `CHAT_TEST_NATS_SERVER`, else the one
/// `./scripts/test.sh` installs into `target/tools/venv`. The Debian package
/// is too old (2.9) for the KV API we use, so it is never picked up from
/// `PATH`.
fn nats_server_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CHAT_TEST_NATS_SERVER") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "CHAT_TEST_NATS_SERVER={} does not exist; run ./scripts/test.sh to install nats-server",
            p.display()
        );
    }
    let fallback = workspace_dir().join("target/tools/venv/bin/nats-server");
    if fallback.is_file() {
        return Ok(fallback);
    }
    bail!(
        "no nats-server: CHAT_TEST_NATS_SERVER is unset and {} does not exist; \
         run ./scripts/test.sh (it installs a current nats-server and sets up Postgres)",
        fallback.display()
    )
}

/// A private `nats-server` with JetStream on a free loopback port.
///
/// Why: each test cluster needs its own NATS so tests cannot see each
/// other's traffic, and fault tests need to stop and restart the server
/// (keeping its port and JetStream store) to check the cluster recovers.
pub struct Nats {
    bin: PathBuf,
    port: u16,
    store_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl fmt::Debug for Nats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nats")
            .field("port", &self.port)
            .field("store_dir", &self.store_dir)
            .field("log_path", &self.log_path)
            .field("running", &self.child.is_some())
            .finish()
    }
}

impl Nats {
    /// Starts a server logging to `target/test-logs/nats-<port>/nats.log`.
    /// Why: the simple form for tests that need only NATS.
    pub async fn start() -> anyhow::Result<Nats> {
        Self::start_with_log(None).await
    }

    /// Starts a server logging to `target/test-logs/<test_name>/nats.log`,
    /// next to the other logs of that test (used by [`TestCluster`]).
    pub async fn start_named(test_name: &str) -> anyhow::Result<Nats> {
        let path = logs_root().join(sanitize(test_name)).join("nats.log");
        Self::start_with_log(Some(path)).await
    }

    async fn start_with_log(log_path: Option<PathBuf>) -> anyhow::Result<Nats> {
        let bin = nats_server_binary()?;
        remove_stale_store_dirs();
        let port = free_port()?;
        let store_dir = std::env::temp_dir().join(format!(
            "chat-test-nats-{}-{}-{:08x}",
            std::process::id(),
            next_counter(),
            random_u64() as u32
        ));
        fs::create_dir_all(&store_dir)
            .with_context(|| format!("cannot create NATS store dir {}", store_dir.display()))?;
        let log_path =
            log_path.unwrap_or_else(|| logs_root().join(format!("nats-{port}")).join("nats.log"));
        let mut nats = Nats {
            bin,
            port,
            store_dir,
            log_path,
            child: None,
        };
        nats.spawn(true).await?;
        Ok(nats)
    }

    /// `nats://127.0.0.1:PORT`, for `CHAT_NATS_URL` and for test clients.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port the server listens on (stable across [`Nats::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log file, to read when a test fails.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the server process is currently started (not stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    async fn spawn(&mut self, truncate: bool) -> anyhow::Result<()> {
        if let Some(dir) = self.log_path.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create log dir {}", dir.display()))?;
        }
        let mut log = OpenOptions::new()
            .create(true)
            .write(true)
            .append(!truncate)
            .truncate(truncate)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        if !truncate {
            let _ = writeln!(log, "=== harness: restarting nats-server ===");
        }
        let log2 = log.try_clone()?;
        let child = Command::new(&self.bin)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.store_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    /// Waits until the server greets a TCP client with its `INFO` line
    /// (JetStream is initialised before the client port opens).
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let end = Instant::now() + NATS_READY_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "nats-server on port {} exited during start-up ({status}); log tail ({}):\n{}",
                        self.port,
                        self.log_path.display(),
                        log_tail(&self.log_path, LOG_TAIL_LINES)
                    );
                }
            }
            let last_err = match nats_info(addr).await {
                Ok(()) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= end {
                bail!(
                    "nats-server on port {} not ready within {NATS_READY_DEADLINE:?} ({last_err}); log tail ({}):\n{}",
                    self.port,
                    self.log_path.display(),
                    log_tail(&self.log_path, LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server: SIGTERM, wait for the process to exit, SIGKILL if
    /// it takes longer than 10 s. Why: fault tests take NATS away from a
    /// running cluster; waiting for the pid guarantees the port is free and
    /// the store is released before [`Nats::restart`].
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            // The process may have died on its own; then the wait below
            // returns at once.
            let _ = send_signal(pid, "TERM");
        }
        match tokio::time::timeout(NATS_STOP_GRACE, child.wait()).await {
            Ok(status) => {
                status.context("waiting for nats-server to exit")?;
            }
            Err(_) => {
                child
                    .kill()
                    .await
                    .context("SIGKILL of nats-server after the grace period")?;
            }
        }
        Ok(())
    }

    /// Stops the server (if running) and starts it again on the same port
    /// with the same JetStream store, then waits until it accepts clients.
    /// Why: the cluster must reconnect and find its streams and KV again.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.spawn(false).await
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = fs::remove_dir_all(&self.store_dir);
    }
}

static STALE_STORES_REMOVED: AtomicBool = AtomicBool::new(false);

/// Removes `chat-test-nats-<pid>-…` store dirs left in the temp dir by test
/// processes that were killed before their [`Nats`] was dropped.
fn remove_stale_store_dirs() {
    if STALE_STORES_REMOVED.swap(true, Ordering::SeqCst) {
        return;
    }
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("chat-test-nats-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Connects to a NATS port and reads its greeting.
async fn nats_info(addr: SocketAddr) -> anyhow::Result<()> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        if &buf != b"INFO" {
            bail!("unexpected greeting {:?}", String::from_utf8_lossy(&buf));
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .map_err(|_| anyhow!("no INFO greeting within 2 s"))?
}

// ---------------------------------------------------------------------------
// Postgres
// ---------------------------------------------------------------------------

/// Replaces the database name in a Postgres URL.
fn url_with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Drops `chat_test_<pid>_…` databases whose process is gone, so repeated
/// runs against a long-lived Postgres do not pile up databases.
async fn drop_stale_databases(conn: &mut sqlx::PgConnection) {
    let rows =
        match sqlx::query("SELECT datname FROM pg_database WHERE datname LIKE 'chat\\_test\\_%'")
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => rows,
            Err(_) => return,
        };
    for row in rows {
        let Ok(name) = row.try_get::<String, _>(0) else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("chat_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await;
    }
}

static STALE_DATABASES_DROPPED: AtomicBool = AtomicBool::new(false);

/// Creates a new, empty database `chat_test_<pid>_<counter>_<random>` and
/// returns its URL.
///
/// Why: every cluster gets its own schema and data, so tests can run in
/// parallel and assert on exact table contents. The admin connection comes
/// from `CHAT_TEST_DATABASE_URL` (default
/// `postgres://postgres@127.0.0.1:5432/postgres`). An unreachable Postgres
/// is an error: the end-to-end tests must fail, never silently skip.
pub async fn fresh_database() -> anyhow::Result<String> {
    let admin_url = std::env::var("CHAT_TEST_DATABASE_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string());
    let mut conn = tokio::time::timeout(
        Duration::from_secs(15),
        sqlx::PgConnection::connect(&admin_url),
    )
    .await
    .map_err(|_| anyhow!("timed out connecting to Postgres"))
    .and_then(|r| r.map_err(anyhow::Error::from))
    .with_context(|| {
        format!(
            "cannot connect to Postgres at {admin_url} (CHAT_TEST_DATABASE_URL); \
             run the tests through ./scripts/test.sh, which starts one if needed"
        )
    })?;
    if !STALE_DATABASES_DROPPED.swap(true, Ordering::SeqCst) {
        drop_stale_databases(&mut conn).await;
    }
    let name = format!(
        "chat_test_{}_{}_{:08x}",
        std::process::id(),
        next_counter(),
        random_u64() as u32
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await
        .with_context(|| format!("CREATE DATABASE {name} on {admin_url}"))?;
    let _ = conn.close().await;
    Ok(url_with_database(&admin_url, &name))
}

/// Creates database `name` through the admin URL `admin_url`.
async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = tokio::time::timeout(
        Duration::from_secs(15),
        sqlx::PgConnection::connect(admin_url),
    )
    .await
    .map_err(|_| anyhow!("timed out connecting to Postgres at {admin_url}"))?
    .with_context(|| format!("cannot connect to Postgres at {admin_url}"))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await
        .with_context(|| format!("CREATE DATABASE {name} on {admin_url}"))?;
    // Best effort: the server closes the session anyway.
    let _ = conn.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// Private Postgres
// ---------------------------------------------------------------------------

/// Socket paths are limited to ~107 bytes; a data dir longer than this gets
/// a separate, short socket dir under `/tmp`.
const PG_MAX_SOCKET_DIR: usize = 80;
/// How long `pg_ctl` may take to start or stop the server.
const PG_CTL_TIMEOUT_SECS: u32 = 60;

/// The newest `/usr/lib/postgresql/<version>/bin` that holds `pg_ctl` and
/// `initdb` (Debian's layout; `./scripts/test.sh` installs the package).
fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let entries = fs::read_dir(root).with_context(|| {
        format!(
            "no {}: install the postgresql package (./scripts/test.sh does) for a private Postgres",
            root.display()
        )
    })?;
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    for entry in entries.flatten() {
        let bin = entry.path().join("bin");
        if !bin.join("pg_ctl").is_file() || !bin.join("initdb").is_file() {
            continue;
        }
        let version: Vec<u32> = entry
            .file_name()
            .to_string_lossy()
            .split('.')
            .map(|p| p.parse().unwrap_or(0))
            .collect();
        if best.as_ref().is_none_or(|(v, _)| version > *v) {
            best = Some((version, bin));
        }
    }
    best.map(|(_, b)| b)
        .with_context(|| format!("no {}/*/bin with pg_ctl and initdb", root.display()))
}

/// Whether this process runs as root (then Postgres tools must run as the
/// `postgres` user: the server refuses to run as root). `/proc/self` is
/// owned by the effective user; no `unsafe` `geteuid` needed.
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A command for a Postgres tool, run as `postgres` through `runuser` when
/// we are root.
fn pg_tool(bin: &Path, tool: &str) -> std::process::Command {
    let exe = bin.join(tool);
    if running_as_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(exe);
        c
    } else {
        std::process::Command::new(exe)
    }
}

/// Gives `dir` to the `postgres` user (when we are root) with mode 700, as
/// the server requires for its data directory.
fn give_to_postgres(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 700 {}", dir.display()))?;
    if running_as_root() {
        let status = std::process::Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir)
            .status()
            .context("running chown")?;
        if !status.success() {
            bail!(
                "chown postgres:postgres {} failed ({status}): is there a `postgres` user?",
                dir.display()
            );
        }
    }
    Ok(())
}

static STALE_PG_REMOVED: AtomicBool = AtomicBool::new(false);

/// Stops and removes `chat-test-pg-<pid>-…` dirs left in the temp dir by
/// test processes that died before their [`PrivatePostgres`] was dropped
/// (the server is a daemon and outlives a killed test process).
fn remove_stale_pg_dirs(bin: &Path) {
    if STALE_PG_REMOVED.swap(true, Ordering::SeqCst) {
        return;
    }
    for root in [std::env::temp_dir(), PathBuf::from("/tmp")] {
        let Ok(entries) = fs::read_dir(&root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| {
                    n.strip_prefix("chat-test-pg-")
                        .or_else(|| n.strip_prefix("chat-test-pgsock-"))
                })
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let dir = entry.path();
            if dir.join("postmaster.pid").exists() {
                // Best effort: a dead test's server; if this fails the
                // directory removal below still frees the disk.
                let _ = pg_tool(bin, "pg_ctl")
                    .arg("-D")
                    .arg(&dir)
                    .args(["-m", "immediate", "-w", "stop"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            // Best effort cleanup of a dead test's leftovers.
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// A private Postgres server (its own `initdb` cluster on a free port) that
/// a test can stop and start again.
///
/// Why: the shared Postgres on 5432 cannot be taken away from one test
/// without breaking every other; fault tests need a database outage of
/// their own. The data dir lives in the temp dir, owned by `postgres`; the
/// server log is `target/test-logs/<test>/postgres.log`. Dropping it stops
/// the server (immediate mode) and removes the data dir.
pub struct PrivatePostgres {
    bin: PathBuf,
    port: u16,
    data_dir: PathBuf,
    /// Separate short socket dir when the data dir path is too long.
    socket_dir: Option<PathBuf>,
    log_path: PathBuf,
    running: bool,
}

impl fmt::Debug for PrivatePostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivatePostgres")
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("log_path", &self.log_path)
            .field("running", &self.running)
            .finish()
    }
}

impl PrivatePostgres {
    /// Runs `initdb` (trust auth, user `postgres`, no fsync) in a fresh
    /// temp dir and starts the server on a free loopback port, logging to
    /// `target/test-logs/<test_name>/postgres.log`. Takes a second or two.
    ///
    /// # Errors
    /// When the Postgres binaries or the `postgres` user are missing, or
    /// the server does not start (the error quotes its log).
    pub async fn start(test_name: &str) -> anyhow::Result<PrivatePostgres> {
        let bin = postgres_bin_dir()?;
        remove_stale_pg_dirs(&bin);
        let tag = format!(
            "{}-{}-{:08x}",
            std::process::id(),
            next_counter(),
            random_u64() as u32
        );
        let data_dir = std::env::temp_dir().join(format!("chat-test-pg-{tag}"));
        fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        let socket_dir = if data_dir.as_os_str().len() > PG_MAX_SOCKET_DIR {
            let d = PathBuf::from(format!("/tmp/chat-test-pgsock-{tag}"));
            fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
            give_to_postgres(&d)?;
            Some(d)
        } else {
            None
        };
        let log_path = logs_root().join(sanitize(test_name)).join("postgres.log");
        if let Some(dir) = log_path.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create log dir {}", dir.display()))?;
        }
        let mut pg = PrivatePostgres {
            bin,
            port: free_port()?,
            data_dir,
            socket_dir,
            log_path,
            running: false,
        };
        give_to_postgres(&pg.data_dir)?;
        let log = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&pg.log_path)
            .with_context(|| format!("cannot open {}", pg.log_path.display()))?;
        let log2 = log.try_clone()?;
        let mut initdb = Command::from(pg_tool(&pg.bin, "initdb"));
        initdb
            .arg("-D")
            .arg(&pg.data_dir)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .arg("--locale=C")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let status = initdb.status().await.context("running initdb")?;
        if !status.success() {
            bail!(
                "initdb {} failed ({status}); log ({}):\n{}",
                pg.data_dir.display(),
                pg.log_path.display(),
                log_tail(&pg.log_path, LOG_TAIL_LINES)
            );
        }
        pg.start_again().await?;
        Ok(pg)
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The port the server listens on (stable across stop and start).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server log, to read when a test fails.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the server is started (not stopped).
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Runs `pg_ctl` with `args` (its output and the server's go to the
    /// log) and fails with the log tail when it does.
    async fn pg_ctl(&self, args: &[&str], what: &str) -> anyhow::Result<()> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        // Best effort: a marker in the log to find the fault in it.
        let _ = writeln!(log, "=== harness: pg_ctl {what} ===");
        let log2 = log.try_clone()?;
        let mut cmd = Command::from(pg_tool(&self.bin, "pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-t", &PG_CTL_TIMEOUT_SECS.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let status = cmd
            .status()
            .await
            .with_context(|| format!("running pg_ctl {what}"))?;
        if !status.success() {
            bail!(
                "pg_ctl {what} failed ({status}); log ({}):\n{}",
                self.log_path.display(),
                log_tail(&self.log_path, LOG_TAIL_LINES)
            );
        }
        Ok(())
    }

    /// Stops the server with a fast shutdown (clients are disconnected at
    /// once, nothing is lost) and waits until it is gone. A no-op when
    /// stopped. Why: the database outage of fault tests.
    ///
    /// # Errors
    /// When `pg_ctl stop` fails (the error quotes the server log).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if !self.running {
            return Ok(());
        }
        self.pg_ctl(&["-m", "fast", "-w", "stop"], "stop (fast)")
            .await?;
        self.running = false;
        Ok(())
    }

    /// Starts the server again on the same port with the same data, and
    /// waits until it accepts connections. A no-op when running.
    ///
    /// # Errors
    /// When `pg_ctl start` fails (the error quotes the server log).
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        if self.running {
            return Ok(());
        }
        let socket_dir = self.socket_dir.as_ref().unwrap_or(&self.data_dir);
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            socket_dir.display()
        );
        self.pg_ctl(&["-w", "-o", &opts, "start"], "start").await?;
        self.running = true;
        Ok(())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            // Best effort in a destructor: the temp dir is removed anyway,
            // and a leftover server is stopped by the next run's cleanup.
            let _ = pg_tool(&self.bin, "pg_ctl")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "immediate", "-w", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // Best effort cleanup of temp dirs.
        let _ = fs::remove_dir_all(&self.data_dir);
        if let Some(d) = &self.socket_dir {
            let _ = fs::remove_dir_all(d);
        }
    }
}

// ---------------------------------------------------------------------------
// Binaries and processes
// ---------------------------------------------------------------------------

/// The newest source file that `binary` was built from, per cargo's
/// dep-info file `<binary>.d`, if it is newer than the binary. Used to warn
/// about a stale binary (sources edited after the last build).
fn newer_source_than(binary: &Path, built: SystemTime) -> Option<PathBuf> {
    let mut dep_info = binary.as_os_str().to_owned();
    dep_info.push(".d");
    let text = fs::read_to_string(dep_info).ok()?;
    let first = text.lines().next()?;
    // `target: dep dep ...`, spaces inside paths escaped as `\ `.
    let (_, deps) = first.split_once(": ")?;
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut current = String::new();
    let mut chars = deps.chars().peekable();
    let mut paths = Vec::new();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => {
                current.push(' ');
                chars.next();
            }
            ' ' => {
                if !current.is_empty() {
                    paths.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        paths.push(current);
    }
    for p in paths {
        let Ok(m) = fs::metadata(&p).and_then(|m| m.modified()) else {
            continue;
        };
        if m > built && newest.as_ref().is_none_or(|(n, _)| m > *n) {
            newest = Some((m, PathBuf::from(p)));
        }
    }
    newest.map(|(_, p)| p)
}

/// Path of a built workspace binary (`chat-gateway`, `chat-room-node`) in
/// the same target directory as the running test executable.
///
/// Why: the suites run the real binaries. `cargo test` does not build
/// other packages' binaries, so `./scripts/test.sh` runs
/// `cargo build --workspace --bins` first; a missing binary is an error
/// saying so, and a binary older than one of its sources (per cargo's
/// dep-info file) gets a warning on stderr
/// (shown with the test's output if it fails).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = profile_dir()?;
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let meta = fs::metadata(&path).with_context(|| {
        format!(
            "binary {} not found: build it with `cargo build --workspace --bins` \
             (./scripts/test.sh does this before running the tests)",
            path.display()
        )
    })?;
    if let Some(src) = meta
        .modified()
        .ok()
        .and_then(|built| newer_source_than(&path, built))
    {
        eprintln!(
            "warning: {} is older than its source {}; \
             run `cargo build --workspace --bins` (or ./scripts/test.sh)",
            path.display(),
            src.display()
        );
    }
    Ok(path)
}

/// A spawned process (normally a gateway or room node) whose stdout and
/// stderr go to a log file.
///
/// Why: the suites need to kill (SIGKILL), stop (SIGTERM) and restart
/// individual processes and check how they exit, and when a test fails the
/// logs are what explains it. Dropping a `Proc` SIGKILLs it so no test
/// leaves processes behind.
pub struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log_path: PathBuf,
    child: Option<Child>,
    pid: Option<u32>,
    exit: Option<ExitStatus>,
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("program", &self.program)
            .field("pid", &self.pid)
            .field("exit", &self.exit)
            .field("log_path", &self.log_path)
            .finish()
    }
}

impl Proc {
    /// Spawns `program` with `args` and `env` (inherited `CHAT_*` variables
    /// are removed so the caller's shell cannot leak into the test), logging
    /// to `target/test-logs/<test_name>/<name>.log` (truncated).
    ///
    /// Why public: tests of start-up behaviour (e.g. invalid configuration
    /// exits 64) spawn a binary directly. Must be called inside a Tokio
    /// runtime.
    pub fn spawn(
        test_name: &str,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<Proc> {
        let log_path = logs_root()
            .join(sanitize(test_name))
            .join(format!("{}.log", sanitize(name)));
        let mut p = Proc {
            name: name.to_string(),
            program: program.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.to_vec(),
            log_path,
            child: None,
            pid: None,
            exit: None,
        };
        p.spawn_inner(true)?;
        Ok(p)
    }

    fn spawn_inner(&mut self, truncate: bool) -> anyhow::Result<()> {
        if let Some(dir) = self.log_path.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create log dir {}", dir.display()))?;
        }
        let mut log = OpenOptions::new()
            .create(true)
            .write(true)
            .append(!truncate)
            .truncate(truncate)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        let _ = writeln!(
            log,
            "=== harness: {} {} {} ===",
            if truncate { "starting" } else { "restarting" },
            self.name,
            self.program.display()
        );
        let log2 = log.try_clone()?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CHAT_") {
                cmd.env_remove(&k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} ({})", self.name, self.program.display()))?;
        self.pid = child.id();
        self.child = Some(child);
        self.exit = None;
        Ok(())
    }

    /// Starts the process again with the same program, arguments and
    /// environment, appending to the same log. Why: restart and failover
    /// tests. Fails if the previous incarnation is still running.
    pub fn respawn(&mut self) -> anyhow::Result<()> {
        if self.is_running()? {
            bail!(
                "{} (pid {:?}) is still running; kill9/term + wait_exit it before respawn",
                self.name,
                self.pid
            );
        }
        self.spawn_inner(false)
    }

    /// The name given at spawn (used for the log file name and messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current (or last) process id.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Path of the log file, to point at in assertions.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far, so tests can assert on logged lines (e.g. the
    /// effective configuration with secrets redacted).
    pub fn log(&self) -> anyhow::Result<String> {
        let bytes = fs::read(&self.log_path)
            .with_context(|| format!("cannot read {}", self.log_path.display()))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log_path, n)
    }

    /// Whether the process is still running (reaps it if it has exited;
    /// the status is then returned by [`Proc::wait_exit`]).
    pub fn is_running(&mut self) -> anyhow::Result<bool> {
        let Some(child) = self.child.as_mut() else {
            return Ok(false);
        };
        match child
            .try_wait()
            .with_context(|| format!("checking {}", self.name))?
        {
            Some(status) => {
                self.exit = Some(status);
                self.child = None;
                Ok(false)
            }
            None => Ok(true),
        }
    }

    /// SIGKILLs the process and reaps it. Why: crash tests (no graceful
    /// shutdown, nothing flushed). A no-op if it already exited.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let status = child
                .wait()
                .await
                .with_context(|| format!("reaping {} after SIGKILL", self.name))?;
            self.exit = Some(status);
        }
        Ok(())
    }

    /// Sends SIGTERM (graceful drain). Why: shutdown and rolling-restart
    /// tests; follow with [`Proc::wait_exit`].
    pub fn term(&mut self) -> anyhow::Result<()> {
        if !self.is_running()? {
            bail!(
                "cannot SIGTERM {}: it already exited ({:?}); log tail:\n{}",
                self.name,
                self.exit,
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        let pid = self
            .pid
            .with_context(|| format!("{} has no pid", self.name))?;
        send_signal(pid, "TERM").with_context(|| format!("SIGTERM to {}", self.name))
    }

    /// Waits up to `deadline` for the process to exit and returns its
    /// status (also when it had already exited). Why: tests check that a
    /// drain finishes in time and with the right exit code.
    pub async fn wait_exit(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(mut child) = self.child.take() {
            match tokio::time::timeout(deadline, child.wait()).await {
                Ok(status) => {
                    let status = status.with_context(|| format!("waiting for {}", self.name))?;
                    self.exit = Some(status);
                }
                Err(_) => {
                    self.child = Some(child);
                    bail!(
                        "{} (pid {:?}) did not exit within {deadline:?}; log tail ({}):\n{}",
                        self.name,
                        self.pid,
                        self.log_path.display(),
                        self.log_tail(LOG_TAIL_LINES)
                    );
                }
            }
        }
        self.exit
            .with_context(|| format!("{} was never started", self.name))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

// ---------------------------------------------------------------------------
// Minimal HTTP client
// ---------------------------------------------------------------------------

/// A parsed HTTP response from [`http_request`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Header names (lower-cased) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body, decoded from chunked encoding if needed (lossy UTF-8).
    pub body: String,
}

impl HttpResponse {
    /// The body parsed as JSON, for the REST API.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("HTTP {} body is not JSON: {}", self.status, self.body))
    }

    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn decode_chunked(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunked body: missing chunk size line")?;
        let size_str = String::from_utf8_lossy(&body[..line_end]);
        let size_str = size_str.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16)
            .with_context(|| format!("chunked body: bad chunk size {size_str:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            bail!("chunked body truncated");
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or(&[]);
    }
}

/// Sends one HTTP/1.1 request over a fresh TCP connection and reads the
/// whole response (10 s deadline).
///
/// Why: readiness probes, `/metrics` and the REST API are plain HTTP; a
/// few lines over a raw socket avoid a full HTTP client dependency.
/// `headers` are extra request headers (e.g. `("authorization", "Bearer K")`);
/// a `body` is sent with `content-type: application/json`.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<HttpResponse> {
    let fut = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        stream.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let head_end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .with_context(|| {
                format!(
                    "incomplete HTTP response: {:?}",
                    String::from_utf8_lossy(&raw)
                )
            })?;
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad HTTP status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let body_raw = &raw[head_end + 4..];
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
        let body_bytes = if chunked {
            decode_chunked(body_raw)?
        } else {
            body_raw.to_vec()
        };
        Ok::<_, anyhow::Error>(HttpResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&body_bytes).into_owned(),
        })
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| {
            anyhow!("HTTP {method} http://{addr}{path}: no complete response within 10 s")
        })?
        .with_context(|| format!("HTTP {method} http://{addr}{path}"))
}

/// `GET` shorthand for [`http_request`].
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
    http_request(addr, "GET", path, &[], None).await
}

/// The value of `name` (with its labels, e.g. `x{limit="origin"}`) in a
/// Prometheus text exposition.
pub fn metric_value(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

/// Like [`metric_value`], 0 when the metric is absent (counters not yet
/// incremented are not exported).
pub fn metric(body: &str, name: &str) -> f64 {
    metric_value(body, name).unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// Test cluster
// ---------------------------------------------------------------------------

/// Builder for [`TestCluster`]; see [`TestCluster::builder`].
#[derive(Debug, Clone)]
pub struct TestClusterBuilder {
    test_name: String,
    gateways: usize,
    room_nodes: usize,
    env: Vec<(String, String)>,
    private_postgres: bool,
}

impl TestClusterBuilder {
    /// Number of gateway processes (default 1).
    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n;
        self
    }

    /// Number of room node processes (default 1).
    pub fn room_nodes(mut self, n: usize) -> Self {
        self.room_nodes = n;
        self
    }

    /// An extra environment variable for every gateway and room node (e.g.
    /// `CHAT_RATE_LIMIT_PER_SEC=0`); later values override the defaults.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs the cluster's database in its own [`PrivatePostgres`] (database
    /// `chat`) instead of a fresh database on the shared server. Why: fault
    /// tests stop and start it ([`TestCluster::postgres`]).
    pub fn private_postgres(mut self) -> Self {
        self.private_postgres = true;
        self
    }

    /// Starts NATS, a fresh database, the room nodes and the gateways, and
    /// waits until every process answers `/readyz` with 200 and every
    /// gateway's ring contains all room nodes (60 s deadline).
    pub async fn start(self) -> anyhow::Result<TestCluster> {
        let log_dir = logs_root().join(sanitize(&self.test_name));
        let _ = fs::remove_dir_all(&log_dir);
        fs::create_dir_all(&log_dir)
            .with_context(|| format!("cannot create {}", log_dir.display()))?;
        let nats = Nats::start_named(&self.test_name)
            .await
            .context("starting NATS for the test cluster")?;
        let (postgres, database_url) = if self.private_postgres {
            let pg = PrivatePostgres::start(&self.test_name)
                .await
                .context("starting the test cluster's private Postgres")?;
            create_database(&pg.url("postgres"), "chat").await?;
            let url = pg.url("chat");
            (Some(pg), url)
        } else {
            let url = fresh_database()
                .await
                .context("creating the test cluster's database")?;
            (None, url)
        };
        let mut cluster = TestCluster {
            test_name: self.test_name,
            prefix: format!("t{:012x}", random_u64() & 0xffff_ffff_ffff),
            database_url,
            extra_env: self.env,
            gateways: Vec::new(),
            nodes: Vec::new(),
            nats,
            postgres,
        };
        for _ in 0..self.room_nodes {
            cluster.spawn_node()?;
        }
        for _ in 0..self.gateways {
            cluster.spawn_gateway()?;
        }
        let end = Instant::now() + READY_DEADLINE;
        for i in 0..cluster.nodes.len() {
            let addr = cluster.nodes[i].addr;
            wait_http_ready(&mut cluster.nodes[i].proc, addr, end).await?;
        }
        for i in 0..cluster.gateways.len() {
            let addr = cluster.gateways[i].addr;
            wait_http_ready(&mut cluster.gateways[i].proc, addr, end).await?;
        }
        let n = cluster.nodes.len();
        cluster
            .wait_ring_nodes_until(n, end)
            .await
            .context("test cluster did not converge")?;
        Ok(cluster)
    }
}

/// A process of the cluster and the address it serves HTTP on.
struct Member {
    proc: Proc,
    addr: SocketAddr,
}

/// Waits until `GET /readyz` on `addr` answers 200, failing early (with
/// the log tail) if the process exits.
async fn wait_http_ready(proc: &mut Proc, addr: SocketAddr, end: Instant) -> anyhow::Result<()> {
    loop {
        if !proc.is_running()? {
            bail!(
                "{} exited before it became ready ({:?}); log tail ({}):\n{}",
                proc.name(),
                proc.exit,
                proc.log_path().display(),
                proc.log_tail(LOG_TAIL_LINES)
            );
        }
        let last = match http_get(addr, "/readyz").await {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => format!("HTTP {}: {}", r.status, r.body.trim()),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= end {
            bail!(
                "{} not ready at http://{addr}/readyz in time (last: {last}); log tail ({}):\n{}",
                proc.name(),
                proc.log_path().display(),
                proc.log_tail(LOG_TAIL_LINES)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A whole chat cluster of real processes: a private NATS, a fresh
/// database, N room nodes and M gateways, with a unique subject prefix.
///
/// Why: the end-to-end suites exercise the external contract exactly as a
/// deployment would. Dropping the cluster kills every process; if the test
/// is panicking, the tail of every log is printed first.
pub struct TestCluster {
    test_name: String,
    prefix: String,
    database_url: String,
    extra_env: Vec<(String, String)>,
    // Field order is drop order: clients' servers first, NATS last.
    gateways: Vec<Member>,
    nodes: Vec<Member>,
    nats: Nats,
    /// The cluster's own Postgres, with [`TestClusterBuilder::private_postgres`].
    postgres: Option<PrivatePostgres>,
}

impl fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCluster")
            .field("test_name", &self.test_name)
            .field("prefix", &self.prefix)
            .field("database_url", &self.database_url)
            .field("nats", &self.nats)
            .field(
                "nodes",
                &self.nodes.iter().map(|m| m.addr).collect::<Vec<_>>(),
            )
            .field(
                "gateways",
                &self.gateways.iter().map(|m| m.addr).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl TestCluster {
    /// Starts describing a cluster for the test `test_name` (use the test
    /// function's name: it names the log directory, and `./scripts/test.sh`
    /// prints those logs in CI when that test fails).
    pub fn builder(test_name: &str) -> TestClusterBuilder {
        TestClusterBuilder {
            test_name: test_name.to_string(),
            gateways: 1,
            room_nodes: 1,
            env: Vec::new(),
            private_postgres: false,
        }
    }

    fn with_extra(&self, mut env: Vec<(String, String)>) -> Vec<(String, String)> {
        env.extend(self.extra_env.iter().cloned());
        env
    }

    fn spawn_node(&mut self) -> anyhow::Result<usize> {
        let i = self.nodes.len();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let env = self.with_extra(vec![
            ("CHAT_NATS_URL".into(), self.nats.url()),
            ("CHAT_SUBJECT_PREFIX".into(), self.prefix.clone()),
            ("CHAT_NODE_ID".into(), format!("node-{i}")),
            ("CHAT_DATABASE_URL".into(), self.database_url.clone()),
            ("CHAT_ADMIN_LISTEN".into(), addr.to_string()),
            ("RUST_LOG".into(), "info".into()),
            ("NO_COLOR".into(), "1".into()),
        ]);
        let proc = Proc::spawn(
            &self.test_name,
            &format!("node-{i}"),
            &binary("chat-room-node")?,
            &[],
            &env,
        )?;
        self.nodes.push(Member { proc, addr });
        Ok(i)
    }

    fn spawn_gateway(&mut self) -> anyhow::Result<usize> {
        let i = self.gateways.len();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let env = self.with_extra(vec![
            ("CHAT_NATS_URL".into(), self.nats.url()),
            ("CHAT_SUBJECT_PREFIX".into(), self.prefix.clone()),
            ("CHAT_LISTEN".into(), addr.to_string()),
            ("CHAT_DEV_AUTH".into(), "true".into()),
            ("CHAT_GATEWAY_ID".into(), format!("gw-{i}")),
            ("RUST_LOG".into(), "info".into()),
            ("NO_COLOR".into(), "1".into()),
        ]);
        let proc = Proc::spawn(
            &self.test_name,
            &format!("gw-{i}"),
            &binary("chat-gateway")?,
            &[],
            &env,
        )?;
        self.gateways.push(Member { proc, addr });
        Ok(i)
    }

    /// Adds room node `node-<n>` to the running cluster and waits until it
    /// is ready and every gateway sees it. Why: scale-out and rebalancing
    /// tests. Returns its index.
    pub async fn add_room_node(&mut self) -> anyhow::Result<usize> {
        let i = self.spawn_node()?;
        let end = Instant::now() + READY_DEADLINE;
        let addr = self.nodes[i].addr;
        wait_http_ready(&mut self.nodes[i].proc, addr, end).await?;
        let n = self.running_nodes()?;
        self.wait_ring_nodes_until(n, end).await?;
        Ok(i)
    }

    /// Adds gateway `gw-<n>` and waits until it is ready and sees all
    /// running room nodes. Returns its index.
    pub async fn add_gateway(&mut self) -> anyhow::Result<usize> {
        let i = self.spawn_gateway()?;
        let end = Instant::now() + READY_DEADLINE;
        let addr = self.gateways[i].addr;
        wait_http_ready(&mut self.gateways[i].proc, addr, end).await?;
        let n = self.running_nodes()?;
        self.wait_ring_nodes_until(n, end).await?;
        Ok(i)
    }

    /// Starts room node `i` again (same id, address and environment) after
    /// it was killed or stopped, and waits until it is ready. Why: restart
    /// and recovery tests. Does not wait for the gateways' rings; use
    /// [`TestCluster::wait_ring_nodes`] for that.
    pub async fn respawn_node(&mut self, i: usize) -> anyhow::Result<()> {
        let m = self
            .nodes
            .get_mut(i)
            .with_context(|| format!("no room node {i}"))?;
        m.proc.respawn()?;
        wait_http_ready(&mut m.proc, m.addr, Instant::now() + READY_DEADLINE).await
    }

    /// Starts gateway `i` again (same address and environment) and waits
    /// until it is ready.
    pub async fn respawn_gateway(&mut self, i: usize) -> anyhow::Result<()> {
        let m = self
            .gateways
            .get_mut(i)
            .with_context(|| format!("no gateway {i}"))?;
        m.proc.respawn()?;
        wait_http_ready(&mut m.proc, m.addr, Instant::now() + READY_DEADLINE).await
    }

    fn running_nodes(&mut self) -> anyhow::Result<usize> {
        let mut n = 0;
        for m in &mut self.nodes {
            if m.proc.is_running()? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Waits (up to 60 s) until every running gateway reports
    /// `chat_gateway_ring_nodes n`. Why: after killing or adding a room
    /// node, tests must wait for the gateways to notice before asserting on
    /// routing.
    pub async fn wait_ring_nodes(&mut self, n: usize) -> anyhow::Result<()> {
        self.wait_ring_nodes_until(n, Instant::now() + READY_DEADLINE)
            .await
    }

    async fn wait_ring_nodes_until(&mut self, n: usize, end: Instant) -> anyhow::Result<()> {
        for i in 0..self.gateways.len() {
            if !self.gateways[i].proc.is_running()? {
                continue;
            }
            let addr = self.gateways[i].addr;
            let name = self.gateways[i].proc.name().to_string();
            loop {
                let last = match http_get(addr, "/metrics").await {
                    Ok(r) if r.status == 200 => {
                        match metric_value(&r.body, "chat_gateway_ring_nodes") {
                            Some(v) if v == n as f64 => break,
                            Some(v) => format!("chat_gateway_ring_nodes {v}"),
                            None => "no chat_gateway_ring_nodes metric".to_string(),
                        }
                    }
                    Ok(r) => format!("HTTP {}", r.status),
                    Err(e) => format!("{e:#}"),
                };
                if Instant::now() >= end {
                    let p = &self.gateways[i].proc;
                    bail!(
                        "{name} did not report chat_gateway_ring_nodes {n} in time (last: {last}); log tail ({}):\n{}",
                        p.log_path().display(),
                        p.log_tail(LOG_TAIL_LINES)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// The HTTP/WebSocket address of gateway `i`. Panics on a bad index
    /// (a bug in the test itself).
    pub fn gateway_addr(&self, i: usize) -> SocketAddr {
        self.gateways
            .get(i)
            .unwrap_or_else(|| panic!("no gateway {i}: cluster has {}", self.gateways.len()))
            .addr
    }

    /// The admin (`/metrics`, `/readyz`) address of room node `i`.
    pub fn node_admin_addr(&self, i: usize) -> SocketAddr {
        self.nodes
            .get(i)
            .unwrap_or_else(|| panic!("no room node {i}: cluster has {}", self.nodes.len()))
            .addr
    }

    /// `ws://ADDR/ws?user=USER` for gateway `i` (dev auth), user
    /// percent-encoded.
    pub fn ws_url(&self, i: usize, user: &str) -> String {
        format!(
            "ws://{}/ws?user={}",
            self.gateway_addr(i),
            percent_encode(user)
        )
    }

    /// URL of this cluster's own database, for asserting on stored rows.
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// The cluster's unique NATS subject prefix (`CHAT_SUBJECT_PREFIX`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A small connection pool to the cluster's database.
    pub async fn pool(&self) -> anyhow::Result<sqlx::PgPool> {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(15))
            .connect(&self.database_url)
            .await
            .with_context(|| format!("connecting to test database {}", self.database_url))
    }

    /// Room node `i`'s process, to kill, stop or inspect. Panics on a bad
    /// index.
    pub fn node(&mut self, i: usize) -> &mut Proc {
        let len = self.nodes.len();
        &mut self
            .nodes
            .get_mut(i)
            .unwrap_or_else(|| panic!("no room node {i}: cluster has {len}"))
            .proc
    }

    /// Gateway `i`'s process. Panics on a bad index.
    pub fn gateway(&mut self, i: usize) -> &mut Proc {
        let len = self.gateways.len();
        &mut self
            .gateways
            .get_mut(i)
            .unwrap_or_else(|| panic!("no gateway {i}: cluster has {len}"))
            .proc
    }

    /// Number of room node processes started (running or not).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Number of gateway processes started (running or not).
    pub fn gateway_count(&self) -> usize {
        self.gateways.len()
    }

    /// The cluster's NATS server, to stop or restart it.
    pub fn nats(&mut self) -> &mut Nats {
        &mut self.nats
    }

    /// The cluster's private Postgres, to stop and start it. Panics unless
    /// the cluster was built with [`TestClusterBuilder::private_postgres`]
    /// (a bug in the test itself).
    pub fn postgres(&mut self) -> &mut PrivatePostgres {
        self.postgres.as_mut().unwrap_or_else(|| {
            panic!("TestCluster::postgres() needs TestClusterBuilder::private_postgres()")
        })
    }

    /// The HTTP/WebSocket addresses of every gateway, in index order
    /// (stable across restarts). Why: clients that fail over between
    /// gateways need them all.
    pub fn gateway_addrs(&self) -> Vec<SocketAddr> {
        self.gateways.iter().map(|m| m.addr).collect()
    }

    /// The `CHAT_NODE_ID` of room node `i` (`node-<i>`), as it appears in
    /// heartbeats and leases.
    pub fn node_id(&self, i: usize) -> String {
        format!("node-{i}")
    }

    /// The value of the unlabelled metric `name` in room node `i`'s
    /// `/metrics` (`None` when absent). Why: tests pick nodes by load, e.g.
    /// the one with the most `chat_room_active_rooms`.
    pub async fn node_metric(&self, i: usize, name: &str) -> anyhow::Result<Option<f64>> {
        Ok(metric_value(&self.node_metrics(i).await?, name))
    }

    /// The body of gateway `i`'s `/metrics` (errors on non-200).
    pub async fn metrics(&self, i: usize) -> anyhow::Result<String> {
        let r = http_get(self.gateway_addr(i), "/metrics").await?;
        if r.status != 200 {
            bail!("gateway {i} /metrics: HTTP {}: {}", r.status, r.body);
        }
        Ok(r.body)
    }

    /// The body of room node `i`'s `/metrics` (errors on non-200).
    pub async fn node_metrics(&self, i: usize) -> anyhow::Result<String> {
        let r = http_get(self.node_admin_addr(i), "/metrics").await?;
        if r.status != 200 {
            bail!("room node {i} /metrics: HTTP {}: {}", r.status, r.body);
        }
        Ok(r.body)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut report = format!(
                "\n===== test cluster {} failed; logs in {} =====\n",
                self.test_name,
                logs_root().join(sanitize(&self.test_name)).display()
            );
            for m in self.nodes.iter().chain(self.gateways.iter()) {
                report.push_str(&format!(
                    "----- {} ({}) last {LOG_TAIL_LINES} lines -----\n{}\n",
                    m.proc.name(),
                    m.proc.log_path().display(),
                    m.proc.log_tail(LOG_TAIL_LINES)
                ));
            }
            if let Some(pg) = &self.postgres {
                report.push_str(&format!(
                    "----- postgres ({}) last {LOG_TAIL_LINES} lines -----\n{}\n",
                    pg.log_path().display(),
                    log_tail(pg.log_path(), LOG_TAIL_LINES)
                ));
            }
            eprintln!("{report}");
        }
        for m in self.gateways.iter_mut().chain(self.nodes.iter_mut()) {
            if let Some(child) = m.proc.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket test client speaking the JSON protocol.
///
/// Why: the suites talk to gateways exactly as browsers do. Frames a test
/// skipped while waiting for a specific one are kept in [`Client::skipped`]
/// so it can still assert on them (e.g. that no duplicate arrived).
pub struct Client {
    ws: Ws,
    /// The `hello` frame the server sent on connect.
    pub hello: Value,
    /// Frames passed over by [`Client::recv_until`] and
    /// [`Client::expect_close`], oldest first.
    pub skipped: Vec<Value>,
    /// The close code, once the server has closed the connection.
    pub close_code: Option<u16>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("hello", &self.hello)
            .field("skipped", &self.skipped.len())
            .field("close_code", &self.close_code)
            .finish()
    }
}

/// Short description of recent skipped frames for error messages.
fn describe_recent(frames: &[Value]) -> String {
    if frames.is_empty() {
        return "none".to_string();
    }
    let start = frames.len().saturating_sub(5);
    let mut s = format!("{} total; last: ", frames.len());
    for f in &frames[start..] {
        let mut t = f.to_string();
        if t.len() > 300 {
            let mut cut = 300;
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
            t.push('…');
        }
        s.push_str(&t);
        s.push(' ');
    }
    s
}

impl Client {
    /// Connects and reads the `hello` frame (10 s deadline). A refused
    /// upgrade (e.g. HTTP 401) is an error quoting the status.
    pub async fn connect(url: &str) -> anyhow::Result<Client> {
        Self::connect_with_headers(url, &[]).await
    }

    /// Like [`Client::connect`] with extra request headers, e.g.
    /// `("authorization", "Bearer JWT")`, `("origin", …)`,
    /// `("x-forwarded-for", …)`. Why: auth, origin and proxy tests.
    pub async fn connect_with_headers(
        url: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Client> {
        let mut req = url
            .into_client_request()
            .with_context(|| format!("bad WebSocket URL {url}"))?;
        for (k, v) in headers {
            req.headers_mut().insert(
                HeaderName::from_bytes(k.as_bytes()).with_context(|| format!("header {k}"))?,
                HeaderValue::from_str(v).with_context(|| format!("header {k} value"))?,
            );
        }
        let (ws, _resp) = match tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(req),
        )
        .await
        {
            Err(_) => bail!("WebSocket connect to {url}: no handshake within 10 s"),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                bail!(
                    "WebSocket connect to {url} refused: HTTP {}: {body}",
                    resp.status().as_u16()
                );
            }
            Ok(Err(e)) => return Err(e).with_context(|| format!("WebSocket connect to {url}")),
            Ok(Ok(x)) => x,
        };
        let mut client = Client {
            ws,
            hello: Value::Null,
            skipped: Vec::new(),
            close_code: None,
        };
        let hello = client
            .recv(Duration::from_secs(10))
            .await
            .with_context(|| format!("waiting for hello from {url}"))?;
        if hello.get("type").and_then(Value::as_str) != Some("hello") {
            bail!("first frame from {url} is not hello: {hello}");
        }
        client.hello = hello;
        Ok(client)
    }

    /// Sends a JSON value as one text frame.
    pub async fn send_json(&mut self, v: Value) -> anyhow::Result<()> {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .context("sending a JSON frame")
    }

    /// Sends a raw text frame (malformed JSON, oversized frames).
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .context("sending a text frame")
    }

    /// Sends any WebSocket message (binary, ping, …) for protocol-edge
    /// tests.
    pub async fn send_raw(&mut self, msg: Message) -> anyhow::Result<()> {
        self.ws.send(msg).await.context("sending a raw frame")
    }

    /// Reads one WebSocket message with a deadline; `Ok(None)` means the
    /// connection ended. Pings are answered right away.
    async fn next_frame(&mut self, end: Instant) -> anyhow::Result<Option<Value>> {
        loop {
            let msg = match tokio::time::timeout_at(end, self.ws.next()).await {
                Err(_) => bail!("no frame in time"),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => {
                    return Err(anyhow::Error::from(e).context(match self.close_code {
                        Some(c) => format!("WebSocket error after close code {c}"),
                        None => "WebSocket error (no close frame seen)".to_string(),
                    }))
                }
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str())
                        .with_context(|| format!("text frame is not JSON: {}", t.as_str()))?;
                    return Ok(Some(v));
                }
                Message::Binary(b) => bail!("unexpected binary frame ({} bytes)", b.len()),
                Message::Ping(_) => {
                    // tungstenite queued the pong; push it out now.
                    let _ = self.ws.flush().await;
                }
                Message::Pong(_) | Message::Frame(_) => {}
                Message::Close(frame) => {
                    let (code, reason) = match frame {
                        Some(f) => (u16::from(f.code), f.reason.as_str().to_string()),
                        None => (u16::from(CloseCode::Status), String::new()),
                    };
                    self.close_code = Some(code);
                    bail!("connection closed by the server with code {code} ({reason:?})");
                }
            }
        }
    }

    /// The next text frame parsed as JSON. Errors on timeout, on close (the
    /// message includes the close code, also kept in
    /// [`Client::close_code`]) and on non-JSON or binary frames.
    pub async fn recv(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        match self.next_frame(Instant::now() + timeout).await {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(anyhow!(
                "connection ended (close code {:?})",
                self.close_code
            )),
            Err(e) => Err(e.context(format!("recv (timeout {timeout:?})"))),
        }
    }

    /// The next text frame parsed as JSON, or `None` when none comes within
    /// `timeout`; errors when the connection ends or breaks. Why: a reader
    /// that polls with a short timeout must stop once the socket is gone,
    /// not spin on the same error.
    pub async fn recv_within(&mut self, timeout: Duration) -> anyhow::Result<Option<Value>> {
        let end = Instant::now() + timeout;
        // The inner deadline never fires first; the outer one says "none".
        match tokio::time::timeout_at(end, self.next_frame(end + Duration::from_secs(3600))).await {
            Err(_) => Ok(None),
            Ok(Ok(Some(v))) => Ok(Some(v)),
            Ok(Ok(None)) => Err(anyhow!(
                "connection ended (close code {:?})",
                self.close_code
            )),
            Ok(Err(e)) => Err(e),
        }
    }

    /// The first frame matching `pred` within `timeout`; frames that do not
    /// match are appended to [`Client::skipped`]. Why: interleaved presence
    /// and message frames make "the next frame" brittle.
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let end = Instant::now() + timeout;
        loop {
            match self.next_frame(end).await {
                Ok(Some(v)) if pred(&v) => return Ok(v),
                Ok(Some(v)) => self.skipped.push(v),
                Ok(None) => bail!(
                    "connection ended before a matching frame (close code {:?}); skipped: {}",
                    self.close_code,
                    describe_recent(&self.skipped)
                ),
                Err(e) => {
                    return Err(e.context(format!(
                        "recv_until (timeout {timeout:?}); skipped: {}",
                        describe_recent(&self.skipped)
                    )))
                }
            }
        }
    }

    /// [`Client::recv_until`] for the first frame of type `t`.
    pub async fn recv_type(&mut self, timeout: Duration, t: &str) -> anyhow::Result<Value> {
        self.recv_until(timeout, |v| {
            v.get("type").and_then(Value::as_str) == Some(t)
        })
        .await
    }

    /// Waits for the server to close the connection and returns the close
    /// code (1005 when the close frame had none); text frames before it go
    /// to [`Client::skipped`]. Why: close-code tests (1009, 4008, 1012 …).
    pub async fn expect_close(&mut self, timeout: Duration) -> anyhow::Result<u16> {
        if let Some(c) = self.close_code {
            return Ok(c);
        }
        let end = Instant::now() + timeout;
        loop {
            match self.next_frame(end).await {
                Ok(Some(v)) => self.skipped.push(v),
                Ok(None) => {
                    return self.close_code.with_context(|| {
                        format!(
                            "connection ended without a close frame; skipped: {}",
                            describe_recent(&self.skipped)
                        )
                    })
                }
                Err(e) => {
                    if let Some(c) = self.close_code {
                        return Ok(c);
                    }
                    return Err(e.context(format!(
                        "expect_close (timeout {timeout:?}); skipped: {}",
                        describe_recent(&self.skipped)
                    )));
                }
            }
        }
    }

    /// Skipped frames of type `t`, for assertions after a
    /// [`Client::recv_until`].
    pub fn frames_of_type(&self, t: &str) -> Vec<&Value> {
        self.skipped
            .iter()
            .filter(|v| v.get("type").and_then(Value::as_str) == Some(t))
            .collect()
    }

    /// Closes the connection normally and waits (up to 5 s) for the
    /// server's close reply.
    pub async fn close(mut self) -> anyhow::Result<()> {
        if self.close_code.is_some() {
            return Ok(());
        }
        self.ws
            .close(None)
            .await
            .context("sending the close frame")?;
        let drain = async {
            while let Some(msg) = self.ws.next().await {
                if msg.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        Ok(())
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn database_url_rewrite() {
        assert_eq!(
            url_with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            url_with_database("postgres://u:p@h:1/db?sslmode=disable", "x"),
            "postgres://u:p@h:1/x?sslmode=disable"
        );
        assert_eq!(url_with_database("postgres://h", "x"), "postgres://h/x");
    }

    #[test]
    fn encoding_and_metrics() {
        assert_eq!(percent_encode("a b/ü"), "a%20b%2F%C3%BC");
        let body = "# HELP x\nchat_gateway_ring_nodes 2\nchat_gateway_ring_nodes_total 5\n";
        assert_eq!(metric_value(body, "chat_gateway_ring_nodes"), Some(2.0));
        assert_eq!(metric_value(body, "missing"), None);
        assert_eq!(sanitize("a::b c"), "a__b_c");
    }

    #[test]
    fn chunked() {
        let body = b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n";
        assert_eq!(decode_chunked(body).unwrap(), b"Wikipedia");
    }
}
