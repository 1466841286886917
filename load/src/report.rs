//! The results of a run: a serialisable [`Report`], its human summary and
//! its plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Once;

use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde::Serialize;

use crate::config::{LoadConfig, Scenario};
use crate::Error;

/// Send→receive latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Messages measured.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    pub(crate) fn from_hist(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// How the server core spent the measured phase, in percent of its time.
#[derive(Debug, Clone, Serialize)]
pub struct CoreShare {
    /// The core (`--server-core`).
    pub core: usize,
    /// Neither idle nor stolen: every process and the kernel.
    pub busy_percent: f64,
    /// Softirq (packet receive work among others), part of busy.
    pub softirq_percent: f64,
    /// Taken by the hypervisor for someone else.
    pub steal_percent: f64,
}

/// Resident memory of one kind of process, before the connections and
/// with all of them joined.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// RSS before the first connect, bytes.
    pub before: Option<u64>,
    /// RSS with every connection joined (after `--settle`), bytes.
    pub joined: Option<u64>,
    /// RSS at the end of the measured phase, bytes.
    pub end: Option<u64>,
    /// (joined − before) / joined connections, bytes.
    pub per_conn: Option<f64>,
    /// Where the readings come from: `proc` (`VmRSS` of the given process
    /// ids) or `metrics` (`process_resident_memory_bytes` of the given
    /// endpoints).
    pub source: Option<&'static str>,
}

/// CPU of the gateways and room nodes over the measured phase, from their
/// `process_cpu_seconds_total` (NATS and Postgres are not in it).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MetricsCpu {
    /// Percent of one core.
    pub percent: f64,
    /// How far off `percent` may be: the counter is kept in whole seconds,
    /// so each endpoint's difference is within one second.
    pub resolution_percent: f64,
    /// Endpoints summed.
    pub endpoints: usize,
}

impl Memory {
    pub(crate) fn finish(&mut self, conns: u64) {
        if let (Some(b), Some(j)) = (self.before, self.joined) {
            if conns > 0 {
                self.per_conn = Some((j as f64 - b as f64) / conns as f64);
            }
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the tool started.
    pub t: f64,
    /// The run's phase.
    pub phase: &'static str,
    /// Connections open.
    pub open: u64,
    /// Sends per second.
    pub sent_per_sec: f64,
    /// Acks (durable writes) per second.
    pub acked_per_sec: f64,
    /// Deliveries per second.
    pub delivered_per_sec: f64,
    /// Median latency of the second's deliveries, ms.
    pub p50_ms: f64,
    /// 99th percentile latency of the second's deliveries, ms.
    pub p99_ms: f64,
}

/// Everything a run measured and checked.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The settings of the run (the JWT secret left out).
    pub config: LoadConfig,
    /// Connections asked for.
    pub conns: usize,
    /// Rooms.
    pub rooms: usize,
    /// Senders per room.
    pub senders_per_room: usize,
    /// Connections that joined.
    pub connected: u64,
    /// Connections that never joined.
    pub failed: u64,
    /// Failed connect attempts (including ones retried successfully).
    pub connect_errors: u64,
    /// How connections authenticated: `dev` (`?user=`, the gateways' dev
    /// auth) or the token algorithm (`HS256`, `RS256`, `ES256`).
    pub auth: String,
    /// Failed connect attempts by what went wrong (the first 160
    /// characters of the error).
    pub connect_failures: BTreeMap<String, u64>,
    /// Seconds from the first connect until every connection had joined.
    pub connect_secs: f64,
    /// Length of the measured phase, seconds.
    pub duration_secs: f64,
    /// Sends written.
    pub sent: u64,
    /// Acks received: messages committed to the database.
    pub acked: u64,
    /// Message frames received over all members.
    pub delivered: u64,
    /// Deliveries that exactly-once delivery to every member implies.
    pub expected_deliveries: u64,
    /// Messages received twice or out of order.
    pub duplicates: u64,
    /// Messages skipped by a jump in seq.
    pub gaps: u64,
    /// Messages some member never received.
    pub missing: u64,
    /// Connections closed or lost by the server while the run went on.
    pub unexpected_closes: u64,
    /// Deliberate disconnects (churn).
    pub churn_disconnects: u64,
    /// Reconnects.
    pub reconnects: u64,
    /// Sends per second over the measured phase.
    pub sent_per_sec: f64,
    /// Acks (durable writes) per second over the measured phase.
    pub acked_per_sec: f64,
    /// Deliveries per second over the measured phase.
    pub delivered_per_sec: f64,
    /// Send→receive latency over every delivery.
    pub latency_ms: Latency,
    /// Error frames by code.
    pub errors: BTreeMap<String, u64>,
    /// Unexpected close codes by code (`0`: no close frame).
    pub close_codes: BTreeMap<u16, u64>,
    /// Gateway RSS (sum over `--gateway-pid`).
    pub gateway_memory: Memory,
    /// Room-node RSS (sum over `--node-pid`).
    pub node_memory: Memory,
    /// This tool's own RSS.
    pub tool_memory: Memory,
    /// CPU of every `--server-pid` and its children over the measured
    /// phase, percent of one core.
    pub server_cpu_percent: Option<f64>,
    /// CPU of the processes behind `--gateway-metrics` and
    /// `--node-metrics` over the measured phase.
    pub metrics_cpu: Option<MetricsCpu>,
    /// Connections the gateways behind `--gateway-metrics` reported with
    /// every connection of the run joined (other clients count too).
    pub gateway_connections: Option<u64>,
    /// Connections the gateways behind `--gateway-metrics` had accepted
    /// before this run. Above 0, memory they kept from those (allocator
    /// caches) is reused by this run's connections, so the memory per
    /// connection is a lower bound: measure against fresh gateways.
    pub prior_connects: Option<u64>,
    /// The server core over the measured phase (`--server-core`).
    pub server_core: Option<CoreShare>,
    /// Per-second samples.
    pub timeline: Vec<Sample>,
    /// Why the run is not correct (empty: every member received every
    /// message exactly once in seq order, and nothing failed).
    pub problems: Vec<String>,
    /// `problems.is_empty()`.
    pub correct: bool,
}

/// Headroom above the highest point of a chart, so that the legend in its
/// upper corner covers no line.
const LEGEND_ROOM: f64 = 1.4;

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn memory_line(out: &mut String, name: &str, m: &Memory) {
    let (Some(b), Some(j)) = (m.before, m.joined) else {
        return;
    };
    let _ = write!(out, "{name:<15}before {}, joined {}", mib(b), mib(j));
    if let Some(e) = m.end {
        let _ = write!(out, ", end {}", mib(e));
    }
    if let Some(p) = m.per_conn {
        let _ = write!(out, ": {:.2} KiB per connection", p / 1024.0);
    }
    if m.source == Some("metrics") {
        out.push_str(" (from /metrics)");
    }
    out.push('\n');
}

impl Report {
    /// The human summary printed at the end of a run.
    pub fn summary(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        // Writing to a String cannot fail.
        let load = if c.scenario == Scenario::Idle {
            "pings only".to_string()
        } else {
            format!(
                "{} sender(s) per room, {} msgs/s per room, {}-byte messages",
                self.senders_per_room,
                if c.rate > 0.0 {
                    format!("{}", c.rate)
                } else {
                    "max".into()
                },
                c.message_bytes,
            )
        };
        let _ = writeln!(
            s,
            "chat-load {:?}: {} connections in {} room(s), {load}, {:.1} s measured",
            c.scenario, self.conns, self.rooms, self.duration_secs
        );
        if !c.server_settings.is_empty() {
            let _ = writeln!(s, "server settings: {}", c.server_settings.join(" "));
        }
        if let Some(n) = &c.note {
            let _ = writeln!(s, "note: {n}");
        }
        let _ = writeln!(
            s,
            "{:<15}{}/{} in {:.1} s (connect errors {}, reconnects {}, churn disconnects {})",
            "connected",
            self.connected,
            self.conns,
            self.connect_secs,
            self.connect_errors,
            self.reconnects,
            self.churn_disconnects
        );
        let _ = writeln!(
            s,
            "{:<15}{} ({:.0}/s); acked {} ({:.0}/s durable writes)",
            "sent", self.sent, self.sent_per_sec, self.acked, self.acked_per_sec
        );
        let _ = writeln!(
            s,
            "{:<15}{} ({:.0}/s) of {} expected",
            "delivered", self.delivered, self.delivered_per_sec, self.expected_deliveries
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            s,
            "{:<15}p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (n={})",
            "latency ms", l.p50, l.p90, l.p99, l.p999, l.max, l.count
        );
        memory_line(&mut s, "gateway RSS", &self.gateway_memory);
        memory_line(&mut s, "room node RSS", &self.node_memory);
        memory_line(&mut s, "tool RSS", &self.tool_memory);
        if self.gateway_memory.joined.is_none() {
            let _ = writeln!(
                s,
                "{:<15}gateway memory not measured: give --gateway-pid (same host) or \
                 --gateway-metrics",
                "note"
            );
        }
        if let Some(cpu) = self.server_cpu_percent {
            let _ = writeln!(s, "{:<15}{cpu:.1}% of one core", "server CPU");
        }
        if let Some(c) = &self.metrics_cpu {
            let _ = writeln!(
                s,
                "{:<15}{:.1}% of one core, ±{:.1}% (gateways and room nodes, {} endpoint(s) of /metrics)",
                "cluster CPU", c.percent, c.resolution_percent, c.endpoints
            );
        }
        if let Some(n) = self.prior_connects.filter(|n| *n > 0) {
            let _ = writeln!(
                s,
                "{:<15}the gateways had accepted {n} connections before this run: memory kept \
                 from those makes the per-connection figure a lower bound (restart them to \
                 measure it)",
                "note"
            );
        }
        if let Some(n) = self.gateway_connections {
            let _ = writeln!(
                s,
                "{:<15}{n} open with every connection joined",
                "gateway conns"
            );
        }
        if let Some(c) = &self.server_core {
            let _ = writeln!(
                s,
                "{:<15}core {}: busy {:.1}% (softirq {:.1}%), steal {:.1}%",
                "server core", c.core, c.busy_percent, c.softirq_percent, c.steal_percent
            );
        }
        let _ = writeln!(s, "{:<15}{}", "auth", self.auth);
        let _ = writeln!(s, "{:<15}{:?}", "errors", self.errors);
        let _ = writeln!(s, "{:<15}{:?}", "close codes", self.close_codes);
        if self.correct {
            let _ = writeln!(
                s,
                "{:<15}OK: every member received every message exactly once, in seq order",
                "correctness"
            );
        } else {
            let _ = writeln!(
                s,
                "{:<15}FAILED: {}",
                "correctness",
                self.problems.join("; ")
            );
        }
        s
    }

    /// Writes `results.json`, `summary.txt` and `plot.png` into `dir`.
    ///
    /// # Errors
    /// [`Error::Output`] when a file cannot be written.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let out = |e: &dyn std::fmt::Display| Error::Output(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(|e| out(&e))?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| out(&e))?;
        std::fs::write(dir.join("results.json"), json).map_err(|e| out(&e))?;
        std::fs::write(dir.join("summary.txt"), self.summary()).map_err(|e| out(&e))?;
        self.plot(&dir.join("plot.png"))
    }

    /// Draws throughput (top) and latency (bottom) over time.
    ///
    /// # Errors
    /// [`Error::Output`] when drawing or encoding fails.
    pub fn plot(&self, path: &Path) -> Result<(), Error> {
        draw(self, path).map_err(|e| Error::Output(format!("{}: {e}", path.display())))
    }
}

static FONT: Once = Once::new();

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(r: &Report, path: &Path) -> DrawResult {
    FONT.call_once(|| {
        // The font is compiled in; registering valid TTF bytes succeeds,
        // and without it only the labels would be missing.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
    let root = BitMapBackend::new(path, (1100, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(400);
    let pts = &r.timeline;
    let t_max = pts.last().map(|p| p.t).unwrap_or(1.0).max(1.0);
    let rate_max = pts
        .iter()
        .map(|p| p.delivered_per_sec.max(p.acked_per_sec))
        .fold(1.0, f64::max)
        * LEGEND_ROOM;
    let title = format!(
        "chat-load {:?}: {} conns, {} room(s)",
        r.config.scenario, r.conns, r.rooms
    );
    let mut chart = ChartBuilder::on(&top)
        .caption(format!("{title}: throughput"), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..t_max, 0.0..rate_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("per second")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            pts.iter().map(|p| (p.t, p.delivered_per_sec)),
            &BLUE,
        ))?
        .label("deliveries/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            pts.iter().map(|p| (p.t, p.acked_per_sec)),
            &RED,
        ))?
        .label("acks (durable writes)/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    let lat_max = pts.iter().map(|p| p.p99_ms).fold(1.0, f64::max) * LEGEND_ROOM;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("send → receive latency (per second)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..t_max, 0.0..lat_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms")
        .draw()?;
    let with_data = || pts.iter().filter(|p| p.p99_ms > 0.0);
    chart
        .draw_series(LineSeries::new(
            with_data().map(|p| (p.t, p.p50_ms)),
            &GREEN,
        ))?
        .label("p50")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    chart
        .draw_series(LineSeries::new(
            with_data().map(|p| (p.t, p.p99_ms)),
            &MAGENTA,
        ))?
        .label("p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
