//! One run: plan the connections, ramp them up, run the measured phase,
//! drain, verify, close, and build the [`Report`].

use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::{target, LoadConfig, Scenario};
use crate::conn::{self, Phase, Plan, Shared};
use crate::report::{CoreShare, Latency, Memory, MetricsCpu, Report, Sample};
use crate::stats::Stats;
use crate::{scrape, sys, Error};

/// Width of the send stamp at the start of every message text.
const STAMP: usize = 16;
/// How long connection tasks may take to close at the end.
const CLOSE_DEADLINE: Duration = Duration::from_secs(15);

/// Counters read at one instant.
#[derive(Debug, Clone, Copy, Default)]
struct Snap {
    sent: u64,
    acked: u64,
    delivered: u64,
}

impl Snap {
    fn of(s: &Stats) -> Self {
        Snap {
            sent: Stats::get(&s.sent),
            acked: Stats::get(&s.acked),
            delivered: Stats::get(&s.delivered),
        }
    }
}

fn run_id() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(conn::now_us());
    format!("load{:08x}", h.finish() as u32)
}

/// The connections of a run: member `i` joins room `i mod rooms`; the
/// first `senders_per_room` members of each room send.
fn plans(cfg: &LoadConfig) -> Vec<Plan> {
    let rooms = cfg.room_count();
    let senders = cfg.senders_per_room();
    let per_sender = if senders > 0 {
        cfg.rate / senders as f64
    } else {
        0.0
    };
    let quiet_members = cfg.conns - senders * rooms;
    let churn_mean = (cfg.scenario == Scenario::Churn && cfg.churn_rate > 0.0)
        .then(|| quiet_members as f64 / cfg.churn_rate);
    (0..cfg.conns)
        .map(|idx| {
            let sender = idx / rooms < senders;
            Plan {
                idx,
                room: idx % rooms,
                rate: per_sender,
                sender,
                churn_mean_secs: if sender { None } else { churn_mean },
            }
        })
        .collect()
}

/// Waits until `done()` or the deadline; returns whether `done()` held.
async fn wait_until(deadline: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while !done() {
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Where one kind of server process's resident memory is read from.
enum MemProbe<'a> {
    /// `/proc/<pid>/status` of these processes (this host).
    Pids(&'a [u32]),
    /// `process_resident_memory_bytes` of these endpoints.
    Metrics(&'a [String]),
    /// Not measured.
    Nothing,
}

impl<'a> MemProbe<'a> {
    /// Process ids when given (exact, this host), else metrics endpoints.
    fn of(pids: &'a [u32], metrics: &'a [String]) -> Self {
        if !pids.is_empty() {
            Self::Pids(pids)
        } else if !metrics.is_empty() {
            Self::Metrics(metrics)
        } else {
            Self::Nothing
        }
    }

    /// A [`Memory`] with its `before` reading and where it came from.
    async fn start(&self) -> Memory {
        Memory {
            before: self.rss().await,
            source: match self {
                Self::Pids(_) => Some("proc"),
                Self::Metrics(_) => Some("metrics"),
                Self::Nothing => None,
            },
            ..Memory::default()
        }
    }

    async fn rss(&self) -> Option<u64> {
        match self {
            Self::Pids(p) => sys::total_rss(p),
            Self::Metrics(urls) => scrape::sum_over(urls, scrape::RSS).await.map(|v| v as u64),
            Self::Nothing => None,
        }
    }
}

/// CPU seconds of every endpoint in `urls` together, and when they were
/// read (`None` without any endpoint, or when one cannot be read).
async fn metrics_cpu(urls: &[String]) -> Option<CpuRead> {
    let start = Instant::now();
    let seconds = sum_if_any(urls, scrape::CPU_SECONDS).await?;
    let took = start.elapsed();
    Some(CpuRead {
        seconds,
        mid: start + took / 2,
        took,
    })
}

/// One read of the CPU counters.
#[derive(Debug, Clone, Copy)]
struct CpuRead {
    /// CPU seconds summed over the endpoints.
    seconds: f64,
    /// The middle of the read: the counters were sampled around then.
    mid: Instant,
    /// How long the read took.
    took: Duration,
}

/// Metric `name` summed over `urls`; `None` when there are none (the
/// figure was not asked for) or one cannot be read.
async fn sum_if_any(urls: &[String], name: &str) -> Option<f64> {
    if urls.is_empty() {
        return None;
    }
    scrape::sum_over(urls, name).await
}

/// TLS settings for `wss://`: the public (Mozilla) roots, and the
/// certificates of `ca_file` for an ingress with a private CA.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, Error> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let bad =
            |e: &dyn std::fmt::Display| Error::Config(format!("--ca-file {}: {e}", path.display()));
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(&pem_error(&e)))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&pem_error(&e)))?;
        if certs.is_empty() {
            return Err(bad(&"no certificate in it"));
        }
        for c in certs {
            roots.add(c).map_err(|e| bad(&e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A PEM error in words: the library's own text shows marker lines as
/// raw byte arrays.
fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as Pem;
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .trim()
            .chars()
            .take(80)
            .collect::<String>()
    };
    match e {
        Pem::MissingSectionEnd { end_marker } => {
            format!(
                "not valid PEM: no \"-----END {}-----\" line after its BEGIN line",
                text(end_marker)
            )
        }
        Pem::IllegalSectionStart { line } => {
            format!("not valid PEM: bad BEGIN line {:?}", text(line))
        }
        Pem::Base64Decode(m) => format!("not valid PEM: a certificate is not base64 ({m})"),
        Pem::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// The key every connection signs its token with: HS256 from
/// `--jwt-secret`, or RS256/ES256 from the PEM of `--jwt-key-file`
/// (whichever kind of key it holds).
fn signing_key(
    cfg: &LoadConfig,
) -> Result<Option<(jsonwebtoken::Algorithm, jsonwebtoken::EncodingKey)>, Error> {
    use jsonwebtoken::{Algorithm, EncodingKey};
    if let Some(path) = &cfg.jwt_key_file {
        let (alg, key) = key_from_file(path)?;
        // A public key parses too; signing once tells them apart before
        // any connection is made.
        let claims = serde_json::json!({ "sub": "chat-load", "exp": 1 });
        jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &key).map_err(|e| {
            Error::Config(format!(
                "--jwt-key-file {}: cannot sign with it ({e}); it must be a private key, \
                 RSA or EC on the P-256 curve",
                path.display()
            ))
        })?;
        return Ok(Some((alg, key)));
    }
    if let Some(s) = cfg.jwt_secret.as_ref().filter(|s| !s.is_empty()) {
        let key = EncodingKey::from_secret(s.as_bytes())
            .map_err(|e| Error::Config(format!("--jwt-secret: {e}")))?;
        return Ok(Some((Algorithm::HS256, key)));
    }
    Ok(None)
}

/// The signing key in a PEM file: ES256 for a P-256 key, RS256 for an
/// RSA one.
fn key_from_file(
    path: &std::path::Path,
) -> Result<(jsonwebtoken::Algorithm, jsonwebtoken::EncodingKey), Error> {
    use jsonwebtoken::{Algorithm, EncodingKey};
    let pem = std::fs::read(path)
        .map_err(|e| Error::Config(format!("--jwt-key-file {}: {e}", path.display())))?;
    if let Ok(key) = EncodingKey::from_ec_pem(&pem) {
        return Ok((Algorithm::ES256, key));
    }
    EncodingKey::from_rsa_pem(&pem)
        .map(|key| (Algorithm::RS256, key))
        .map_err(|e| {
            Error::Config(format!(
                "--jwt-key-file {}: not a private key the tool signs with ({e}): \
                 a P-256 key in PKCS#8 PEM (`openssl pkcs8 -topk8 -nocrypt` converts \
                 `BEGIN EC PRIVATE KEY`), or an RSA key in PKCS#8 or PKCS#1 PEM",
                path.display()
            ))
        })
}

/// Binds the first and the last source address the connections will use,
/// so that an address not on this host (a wrong `--source-base`) is
/// refused before the run instead of failing every connection.
fn check_sources(cfg: &LoadConfig, targets: &[crate::config::Target]) -> Result<(), Error> {
    let groups = cfg.conns.div_ceil(cfg.conns_per_source.max(1)).max(1);
    for t in targets {
        for k in [0, groups - 1] {
            let Some(src) = crate::config::source_for(cfg.source_base, t.addr, k) else {
                continue;
            };
            if let Err(e) = std::net::UdpSocket::bind((src, 0)) {
                return Err(Error::Config(format!(
                    "source address {src} ({} connection group {} of {groups}): {e}; \
                     --source-base must name addresses on an interface of this host",
                    cfg.source_base.map_or_else(
                        || "loopback walk".to_string(),
                        |b| format!("--source-base {b},")
                    ),
                    k + 1,
                )));
            }
        }
    }
    Ok(())
}

/// Runs a load scenario against the gateways in `cfg` and reports what it
/// measured. Does not fail on a wrong result: the report says what was
/// wrong ([`Report::problems`]).
///
/// # Errors
/// [`Error::Config`] for settings that cannot work (checked before any
/// connection is made).
pub async fn run(cfg: LoadConfig) -> Result<Report, Error> {
    cfg.validate()?;
    let nofile = sys::raise_nofile(cfg.conns as u64 * 2 + 1024);
    if nofile < cfg.conns as u64 + 64 {
        eprintln!(
            "chat-load: warning: RLIMIT_NOFILE is {nofile}, fewer than {} connections need",
            cfg.conns
        );
    }
    let rooms = cfg.room_count();
    let senders_per_room = cfg.senders_per_room();
    let run_id = run_id();
    let targets = cfg
        .urls
        .iter()
        .map(|u| target(u))
        .collect::<Result<Vec<_>, Error>>()?;
    let jwt_key = signing_key(&cfg)?;
    let auth = jwt_key
        .as_ref()
        .map_or_else(|| "dev".to_string(), |(alg, _)| format!("{alg:?}"));
    let tls = if targets.iter().any(|t| t.tls) {
        Some(tls_config(cfg.ca_file.as_deref())?)
    } else {
        if cfg.ca_file.is_some() {
            // Still read, so a wrong file shows now rather than when a
            // wss:// URL is added.
            tls_config(cfg.ca_file.as_deref())?;
            eprintln!("chat-load: warning: --ca-file is used only for wss:// URLs; every --url here is ws://");
        }
        None
    };
    check_sources(&cfg, &targets)?;
    if let Some(dir) = &cfg.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Config(format!("--out {}: {e}", dir.display())))?;
    }
    // Every metrics endpoint must answer before connections are made, so a
    // typo does not cost a whole run; and how many connections each
    // gateway served before, which the memory baseline depends on.
    for u in cfg.gateway_metrics.iter().chain(&cfg.node_metrics) {
        let body = scrape::get(u)
            .await
            .map_err(|e| Error::Config(format!("metrics: {e}")))?;
        let gateway = cfg.gateway_metrics.contains(u);
        let needed = [scrape::RSS, scrape::CPU_SECONDS].into_iter().chain(
            gateway
                .then_some([scrape::CONNECTIONS, scrape::CONNECTS])
                .into_iter()
                .flatten(),
        );
        for name in needed {
            if scrape::sum_metric(&body, name).is_none() {
                return Err(Error::Config(format!(
                    "{u} has no valid {name}: not the /metrics of a {} of this release",
                    if gateway {
                        "gateway"
                    } else {
                        "gateway or room node"
                    }
                )));
            }
        }
    }
    let prior_connects = sum_if_any(&cfg.gateway_metrics, scrape::CONNECTS)
        .await
        .map(|v| v as u64);
    let plans = plans(&cfg);
    let (phase, _) = watch::channel(Phase::Connecting);
    let shared = Arc::new(Shared {
        stats: Stats::new(rooms),
        phase,
        rooms: (0..rooms).map(|i| format!("{run_id}-r{i}")).collect(),
        targets,
        run_id,
        gate: Semaphore::new(cfg.connect_concurrency),
        ready_senders: AtomicU64::new(0),
        pad: "x".repeat(cfg.message_bytes - STAMP),
        jwt_key,
        tls,
        cfg: cfg.clone(),
    });
    let stats = &shared.stats;
    let tool_pid = [std::process::id()];
    let gw_probe = MemProbe::of(&cfg.gateway_pids, &cfg.gateway_metrics);
    let node_probe = MemProbe::of(&cfg.node_pids, &cfg.node_metrics);
    let tool_probe = MemProbe::Pids(&tool_pid);
    let mut gw_mem = gw_probe.start().await;
    let mut node_mem = node_probe.start().await;
    let mut tool_mem = tool_probe.start().await;
    // Every metrics endpoint (each once: `validate` refuses repeats), for
    // CPU time over the measured phase.
    let cpu_urls: Vec<String> = cfg
        .gateway_metrics
        .iter()
        .chain(&cfg.node_metrics)
        .cloned()
        .collect();

    let timeline = Arc::new(Mutex::new(Vec::new()));
    let progress = tokio::spawn(progress(shared.clone(), timeline.clone()));

    // Ramp up.
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for plan in plans.iter().cloned() {
        tasks.spawn(conn::run(shared.clone(), plan));
    }
    let n = cfg.conns as u64;
    wait_until(Duration::from_secs(cfg.connect_timeout), || {
        Stats::get(&stats.ready) + Stats::get(&stats.failed) >= n
    })
    .await;
    let connect_secs = started.elapsed().as_secs_f64();
    // With no connection joined there is nothing to measure: say so at
    // once instead of after the whole phase.
    let nothing = Stats::get(&stats.ready) == 0;
    if !nothing {
        tokio::time::sleep(Duration::from_secs(cfg.settle)).await;
    }
    let ready = Stats::get(&stats.ready);
    gw_mem.joined = gw_probe.rss().await;
    node_mem.joined = node_probe.rss().await;
    tool_mem.joined = tool_probe.rss().await;
    let gateway_connections = if ready > 0 {
        sum_if_any(&cfg.gateway_metrics, scrape::CONNECTIONS)
            .await
            .map(|v| v as u64)
    } else {
        None
    };

    // The measured phase.
    let s0 = Snap::of(stats);
    let cpu0 = sys::cpu_ticks(&cfg.server_pids);
    // Read with its own clock: its span is between the two reads.
    let metrics_cpu0 = metrics_cpu(&cpu_urls).await;
    let core0 = cfg.server_core.and_then(sys::core_times);
    let t0 = Instant::now();
    shared.phase.send_replace(Phase::Running);
    if !nothing {
        tokio::time::sleep(Duration::from_secs(cfg.duration)).await;
    }
    let s1 = Snap::of(stats);
    let cpu1 = sys::cpu_ticks(&cfg.server_pids);
    let core1 = cfg.server_core.and_then(sys::core_times);
    // The phase ends here, before any read over the network: a slow
    // endpoint must not stretch the time the rates are divided by.
    let secs = t0.elapsed().as_secs_f64();
    let metrics_cpu1 = metrics_cpu(&cpu_urls).await;
    gw_mem.end = gw_probe.rss().await;
    node_mem.end = node_probe.rss().await;
    tool_mem.end = tool_probe.rss().await;

    // Drain: every send answered, then every member at its room's final seq.
    shared.phase.send_replace(Phase::Stopping);
    let drain = Duration::from_secs(cfg.drain_timeout);
    let senders_ok = wait_until(drain, || {
        Stats::get(&stats.senders_done) >= Stats::get(&shared.ready_senders)
    })
    .await;
    shared.phase.send_replace(Phase::Verifying);
    let verified_ok = wait_until(drain, || Stats::get(&stats.verified) >= ready).await;
    shared.phase.send_replace(Phase::Closing);
    let closed_ok = tokio::time::timeout(CLOSE_DEADLINE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    if !closed_ok {
        tasks.abort_all();
    }
    progress.abort();

    let finals: Vec<u64> = stats
        .room_final
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    let expected: u64 = plans.iter().map(|p| finals[p.room]).sum();
    gw_mem.finish(ready);
    node_mem.finish(ready);
    tool_mem.finish(ready);
    let hist = stats.hists.lock().unwrap_or_else(|e| e.into_inner());
    let latency = Latency::from_hist(&hist.total);
    drop(hist);
    let errors = stats
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let close_codes = stats
        .closes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut r = Report {
        config: cfg.clone(),
        conns: cfg.conns,
        rooms,
        senders_per_room,
        connected: ready,
        failed: Stats::get(&stats.failed),
        connect_errors: Stats::get(&stats.connect_errors),
        auth,
        connect_failures: stats
            .connect_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        connect_secs,
        duration_secs: secs,
        sent: Stats::get(&stats.sent),
        acked: Stats::get(&stats.acked),
        delivered: Stats::get(&stats.delivered),
        expected_deliveries: expected,
        duplicates: Stats::get(&stats.duplicates),
        gaps: Stats::get(&stats.gaps),
        missing: Stats::get(&stats.missing),
        unexpected_closes: Stats::get(&stats.unexpected_closes),
        churn_disconnects: Stats::get(&stats.churn_disconnects),
        reconnects: Stats::get(&stats.reconnects),
        sent_per_sec: (s1.sent - s0.sent) as f64 / secs,
        acked_per_sec: (s1.acked - s0.acked) as f64 / secs,
        delivered_per_sec: (s1.delivered - s0.delivered) as f64 / secs,
        latency_ms: latency,
        errors,
        close_codes,
        gateway_memory: gw_mem,
        node_memory: node_mem,
        tool_memory: tool_mem,
        server_cpu_percent: (!cfg.server_pids.is_empty())
            .then(|| sys::cpu_percent(&cpu0, &cpu1, secs)),
        metrics_cpu: metrics_cpu0
            .zip(metrics_cpu1)
            .filter(|_| ready > 0)
            .and_then(|(a, b)| {
                // Each counter was read somewhere inside its request: take
                // the middle, and count half of each read's time as error
                // besides the counter's whole second per endpoint.
                let span = b.mid.duration_since(a.mid).as_secs_f64();
                let unsure = cpu_urls.len() as f64 + (a.took + b.took).as_secs_f64() / 2.0;
                (span > 0.0).then(|| MetricsCpu {
                    percent: (b.seconds - a.seconds).max(0.0) / span * 100.0,
                    resolution_percent: unsure / span * 100.0,
                    endpoints: cpu_urls.len(),
                })
            }),
        gateway_connections,
        prior_connects,
        server_core: cfg
            .server_core
            .zip(core0.zip(core1))
            .and_then(|(core, (a, b))| {
                let (busy, softirq, steal) = sys::core_share(a, b)?;
                Some(CoreShare {
                    core,
                    busy_percent: busy,
                    softirq_percent: softirq,
                    steal_percent: steal,
                })
            }),
        timeline: timeline.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        problems: Vec::new(),
        correct: false,
    };
    let p = &mut r.problems;
    if r.connected < n {
        p.push(format!(
            "{} of {n} connections never joined",
            n - r.connected
        ));
    }
    if r.connect_errors > 0 {
        p.push(format!(
            "{} failed connect attempts {:?}",
            r.connect_errors, r.connect_failures
        ));
    }
    if ready == 0 {
        p.push("no connection joined: the measured phase was skipped".into());
    }
    if !r.errors.is_empty() {
        p.push(format!("error frames {:?}", r.errors));
    }
    if r.unexpected_closes > 0 {
        p.push(format!(
            "{} connections closed by the server {:?}",
            r.unexpected_closes, r.close_codes
        ));
    }
    if !senders_ok || r.acked < r.sent {
        p.push(format!(
            "{} sends never acknowledged",
            r.sent.saturating_sub(r.acked)
        ));
    }
    if !verified_ok {
        p.push(format!(
            "{} members did not reach their room's last seq in {drain:?}",
            ready.saturating_sub(Stats::get(&stats.verified))
        ));
    }
    if r.duplicates > 0 || r.gaps > 0 || r.missing > 0 {
        p.push(format!(
            "{} duplicate or out-of-order, {} skipped, {} never received",
            r.duplicates, r.gaps, r.missing
        ));
    }
    if r.delivered != r.expected_deliveries {
        p.push(format!(
            "{} deliveries, {} expected",
            r.delivered, r.expected_deliveries
        ));
    }
    if !closed_ok {
        p.push("connections did not close in time".into());
    }
    // A figure asked for and not read is a failed run, never a missing
    // line (see the messages above for why).
    let unread = |m: &Memory| {
        m.source == Some("metrics") && (m.before.is_none() || m.joined.is_none() || m.end.is_none())
    };
    if unread(&r.gateway_memory) || unread(&r.node_memory) {
        p.push("memory could not be read from /metrics".into());
    }
    if ready > 0 && !cpu_urls.is_empty() && r.metrics_cpu.is_none() {
        p.push("CPU could not be read from /metrics".into());
    }
    let gateways = !cfg.gateway_metrics.is_empty();
    if gateways && (r.prior_connects.is_none() || (ready > 0 && r.gateway_connections.is_none())) {
        p.push("the gateways' connection counts could not be read from /metrics".into());
    }
    r.correct = r.problems.is_empty();
    Ok(r)
}

/// Prints one line a second and records the timeline.
async fn progress(shared: Arc<Shared>, timeline: Arc<Mutex<Vec<Sample>>>) {
    let start = Instant::now();
    let stats = &shared.stats;
    let mut last = Snap::of(stats);
    let mut last_t = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = Snap::of(stats);
        let dt = last_t.elapsed().as_secs_f64().max(1e-3);
        last_t = Instant::now();
        let interval = Latency::from_hist(&stats.take_interval());
        let phase = match *shared.phase.borrow() {
            // Everyone is in: the pause before sending (`--settle`).
            Phase::Connecting
                if Stats::get(&stats.ready) + Stats::get(&stats.failed)
                    >= shared.cfg.conns as u64 =>
            {
                "settling"
            }
            Phase::Connecting => "connecting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Verifying => "verifying",
            Phase::Closing => "closing",
        };
        let s = Sample {
            t: start.elapsed().as_secs_f64(),
            phase,
            open: Stats::get(&stats.open),
            sent_per_sec: (now.sent - last.sent) as f64 / dt,
            acked_per_sec: (now.acked - last.acked) as f64 / dt,
            delivered_per_sec: (now.delivered - last.delivered) as f64 / dt,
            p50_ms: interval.p50,
            p99_ms: interval.p99,
        };
        last = now;
        if !shared.cfg.quiet {
            let errs: u64 = stats
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .sum();
            eprintln!(
                "[{:>6.1}s] {:<10} open {:>6} joined {:>6}/{} | sent/s {:>8.0} acked/s {:>8.0} delivered/s {:>9.0} | p50 {:>7.2} ms p99 {:>7.2} ms | errors {} closes {} missing {}",
                s.t,
                s.phase,
                s.open,
                Stats::get(&stats.ready),
                shared.cfg.conns,
                s.sent_per_sec,
                s.acked_per_sec,
                s.delivered_per_sec,
                s.p50_ms,
                s.p99_ms,
                errs + Stats::get(&stats.connect_errors),
                Stats::get(&stats.unexpected_closes),
                Stats::get(&stats.gaps),
            );
        }
        timeline.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    }
}

/// Counts how many plans of each kind a run has, for tests.
#[cfg(test)]
fn plan_counts(cfg: &LoadConfig) -> std::collections::HashMap<&'static str, usize> {
    let mut m = std::collections::HashMap::new();
    for p in plans(cfg) {
        *m.entry(if p.sender { "sender" } else { "member" })
            .or_default() += 1;
        if p.churn_mean_secs.is_some() {
            *m.entry("churn").or_default() += 1;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn plans_follow_the_scenario() {
        let c = LoadConfig::parse_from(["chat-load", "churn", "--conns", "40", "--rooms", "4"]);
        let m = plan_counts(&c);
        assert_eq!(m["sender"], 4);
        assert_eq!(m["member"], 36);
        assert_eq!(m["churn"], 36);
        let c = LoadConfig::parse_from([
            "chat-load",
            "rooms",
            "--conns",
            "40",
            "--rooms",
            "4",
            "--rate",
            "8",
        ]);
        let p = plans(&c);
        assert!(p.iter().all(|p| p.sender && (p.rate - 0.8).abs() < 1e-9));
    }

    fn with_key(file: &str) -> LoadConfig {
        let path = format!("{}/../tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
        LoadConfig::from_args(["chat-load", "idle", "--jwt-key-file", &path]).unwrap()
    }

    #[test]
    fn a_key_file_signs_with_the_algorithm_of_its_key() {
        use jsonwebtoken::Algorithm;
        let alg = |f| signing_key(&with_key(f)).unwrap().map(|(a, _)| a);
        assert_eq!(alg("rs256.key.pem"), Some(Algorithm::RS256));
        assert_eq!(alg("es256.key.pem"), Some(Algorithm::ES256));
        for public in ["es256.pub.pem", "rs256.pub.pem"] {
            let err = signing_key(&with_key(public)).unwrap_err();
            assert!(err.to_string().contains("private key"), "{public}: {err}");
        }
        let err = signing_key(&with_key("missing.pem")).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let none = LoadConfig::from_args(["chat-load", "idle"]).unwrap();
        assert!(signing_key(&none).unwrap().is_none());
    }

    #[test]
    fn source_addresses_not_on_this_host_are_refused_before_the_run() {
        let cfg = |args: &[&str]| {
            let mut a = vec!["chat-load", "idle", "--conns", "600"];
            a.extend_from_slice(args);
            LoadConfig::from_args(a).unwrap()
        };
        let loopback = [target("ws://127.0.0.1:9/ws").unwrap()];
        check_sources(&cfg(&[]), &loopback).unwrap();
        check_sources(&cfg(&["--source-base", "127.0.5.1"]), &loopback).unwrap();
        // 192.0.2.0/24 is reserved for documentation: on no interface.
        let remote = [target("ws://192.0.2.1:9/ws").unwrap()];
        check_sources(&cfg(&[]), &remote).unwrap();
        let err = check_sources(&cfg(&["--source-base", "192.0.2.77"]), &remote).unwrap_err();
        assert!(err.to_string().contains("192.0.2.77"), "{err}");
    }

    #[test]
    fn a_broken_ca_file_is_named_in_words() {
        let dir = std::env::temp_dir().join(format!("chat-load-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cases = [
            (
                "-----BEGIN CERTIFICATE-----\nMIIB\n",
                "-----END CERTIFICATE-----",
            ),
            (
                "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                "not base64",
            ),
            ("just text\n", "no certificate"),
        ];
        for (i, (pem, expect)) in cases.into_iter().enumerate() {
            let path = dir.join(format!("{i}.pem"));
            std::fs::write(&path, pem).unwrap();
            let err = tls_config(Some(&path)).unwrap_err().to_string();
            assert!(err.contains(expect), "case {i}: {err}");
            assert!(!err.contains("[45, 45"), "case {i} shows raw bytes: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
