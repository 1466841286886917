//! Counters and latency histograms shared by every connection task.
//!
//! Counters are atomics; the two histograms (the whole run and the current
//! one-second interval) sit behind one mutex, held for two `record` calls
//! per delivered message. That keeps per-connection memory at zero for
//! statistics, which matters at 100,000 connections.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

/// Highest latency the histograms track, in microseconds (1 hour).
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Whole-run and per-interval latency histograms, in microseconds.
#[derive(Debug)]
pub(crate) struct Hists {
    pub(crate) total: Histogram<u64>,
    pub(crate) interval: Histogram<u64>,
}

fn new_hist() -> Histogram<u64> {
    // 3 significant digits over 1 µs..1 h: the bounds are constants, so
    // construction cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Everything the connection tasks count.
#[derive(Debug)]
pub(crate) struct Stats {
    /// Connections open right now.
    pub(crate) open: AtomicU64,
    /// Connections that finished their first join.
    pub(crate) ready: AtomicU64,
    /// Connections that gave up before their first join.
    pub(crate) failed: AtomicU64,
    /// Failed connect attempts (TCP, upgrade or hello).
    pub(crate) connect_errors: AtomicU64,
    /// `send` frames written.
    pub(crate) sent: AtomicU64,
    /// `ack` frames received.
    pub(crate) acked: AtomicU64,
    /// `message` frames received.
    pub(crate) delivered: AtomicU64,
    /// Messages received again (seq not above the last one seen).
    pub(crate) duplicates: AtomicU64,
    /// Messages skipped over (a seq jumped ahead).
    pub(crate) gaps: AtomicU64,
    /// Messages a member never received by the end of the run.
    pub(crate) missing: AtomicU64,
    /// Connections the server closed or lost while the run went on.
    pub(crate) unexpected_closes: AtomicU64,
    /// Deliberate disconnects of the churn scenario.
    pub(crate) churn_disconnects: AtomicU64,
    /// Reconnects (churn or after an unexpected close).
    pub(crate) reconnects: AtomicU64,
    /// Senders with nothing unacknowledged after the load stopped.
    pub(crate) senders_done: AtomicU64,
    /// Members that received every room's final seq.
    pub(crate) verified: AtomicU64,
    /// Connection tasks that ended.
    pub(crate) finished: AtomicU64,
    /// Highest acked seq per room.
    pub(crate) room_final: Vec<AtomicU64>,
    /// Error frames by code.
    pub(crate) errors: Mutex<BTreeMap<String, u64>>,
    /// Failed connect attempts by what went wrong.
    pub(crate) connect_failures: Mutex<BTreeMap<String, u64>>,
    /// Close codes received from the server (and `0` for connections that
    /// ended without a close frame), by code.
    pub(crate) closes: Mutex<BTreeMap<u16, u64>>,
    /// Send→receive latencies.
    pub(crate) hists: Mutex<Hists>,
}

impl Stats {
    pub(crate) fn new(rooms: usize) -> Self {
        Stats {
            open: AtomicU64::new(0),
            ready: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            missing: AtomicU64::new(0),
            unexpected_closes: AtomicU64::new(0),
            churn_disconnects: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            senders_done: AtomicU64::new(0),
            verified: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            room_final: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            errors: Mutex::new(BTreeMap::new()),
            connect_failures: Mutex::new(BTreeMap::new()),
            closes: Mutex::new(BTreeMap::new()),
            hists: Mutex::new(Hists {
                total: new_hist(),
                interval: new_hist(),
            }),
        }
    }

    pub(crate) fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub(crate) fn inc(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Records one send→receive latency in microseconds.
    pub(crate) fn record_latency(&self, us: u64) {
        let us = us.clamp(1, MAX_LATENCY_US);
        let mut h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        // `us` is clamped into the histogram's range, so recording succeeds.
        let _ = h.total.record(us);
        let _ = h.interval.record(us);
    }

    /// Takes the current interval's histogram, leaving an empty one.
    pub(crate) fn take_interval(&self) -> Histogram<u64> {
        let mut h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut h.interval, new_hist())
    }

    pub(crate) fn error(&self, code: &str) {
        let mut m = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(code.to_string()).or_default() += 1;
    }

    pub(crate) fn close_code(&self, code: u16) {
        let mut m = self.closes.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(code).or_default() += 1;
    }
}
