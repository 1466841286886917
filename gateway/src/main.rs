//! `chat-gateway`: parses config, starts telemetry, runs the gateway.

use std::process::ExitCode;

use chat_gateway::config::Config;
use chat_room_node::telemetry;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// jemalloc instead of glibc's malloc. Under load glibc's allocator took a
/// third of the room node's and the gateway's user time (`_int_malloc`,
/// `unlink_chunk`, `malloc_consolidate` at the top of perf profiles) and
/// kept resizing its thread arenas. Same machine, runs back to back:
/// durable writes +39%, one room +18%, idle memory per connection 7.47 →
/// 7.70 KiB (mimalloc, also tried, cost 8.6 KiB); docs/BENCHMARKS.md.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for bad configuration (EX_USAGE).
const EX_USAGE: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            eprintln!(
                "{}",
                e.to_string()
                    .lines()
                    .next()
                    .unwrap_or("invalid configuration")
            );
            return ExitCode::from(EX_USAGE);
        }
        Err(e) => e.exit(),
    };
    if let Err(e) = config.validate() {
        eprintln!("{e}");
        return ExitCode::from(EX_USAGE);
    }
    telemetry::init(config.log_format);
    tracing::info!(config = %config.redacted(), "starting chat-gateway");
    let listener = match chat_gateway::bind(config.listen()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {}: {e}", config.listen());
            return ExitCode::from(EX_USAGE);
        }
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        telemetry::shutdown_signal().await;
        signal.cancel();
    });
    // On a worker thread, not in `main`'s block_on: with the main thread
    // serving the gateway's loop, every request crossed threads (a futex
    // wake each way), which showed up as context switches under load.
    let res = match tokio::spawn(chat_gateway::run(config, listener, shutdown)).await {
        Ok(res) => res,
        Err(e) => {
            eprintln!("gateway stopped: {e}");
            return ExitCode::FAILURE;
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(
            e @ (chat_gateway::Error::Config(_)
            | chat_gateway::Error::Bus(chat_room_node::bus::BusError::Unsupported(_))),
        ) => {
            tracing::error!("{e}");
            eprintln!("{e}");
            ExitCode::from(EX_USAGE)
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
