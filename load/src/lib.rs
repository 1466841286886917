//! `chat-load`: a load generator for the chat cluster that also checks
//! delivery, so a fast result is never a wrong one.
//!
//! It opens many WebSocket connections (one task each, small buffers, from
//! many loopback source addresses so 100,000 connections fit), runs a
//! scenario, and reports connected count, throughput, send→receive latency
//! percentiles (every message text starts with its send time), errors,
//! close codes, server memory per connection and server CPU. Every member
//! checks that it received every message of its room exactly once, in seq
//! order, including across reconnects with `since`.
//!
//! # Layout
//! - [`config`]: the scenarios and flags.
//! - [`run()`]: one run, phase by phase (connect, run, drain, verify,
//!   close).
//! - `conn`: the per-connection task.
//! - `stats`: shared counters and latency histograms.
//! - [`report`]: results as JSON, a human summary and a PNG plot.
//! - [`sys`]: file-descriptor limit, and RSS and CPU from `/proc`.
//! - [`scrape`]: RSS, CPU and connections from the servers' `/metrics`,
//!   for a cluster on other hosts.

pub mod config;
mod conn;
pub mod report;
mod run;
pub mod scrape;
mod stats;
pub mod sys;

pub use config::{LoadConfig, Scenario};
pub use report::Report;
pub use run::run;

/// Why a run could not be done (a run that went wrong still returns a
/// [`Report`] listing its problems).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Settings that cannot work.
    #[error("bad settings: {0}")]
    Config(String),
    /// A result file could not be written.
    #[error("cannot write results: {0}")]
    Output(String),
}
