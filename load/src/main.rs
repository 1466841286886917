//! `chat-load`: parse flags, run, print and write the results. Exits 1 when
//! the run's delivery check failed, 64 on bad settings.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;

/// Exit code for bad settings (`EX_USAGE`).
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cfg = chat_load::LoadConfig::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(main_async(cfg)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("chat-load: {e:#}");
            if matches!(
                e.downcast_ref::<chat_load::Error>(),
                Some(chat_load::Error::Config(_))
            ) {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn main_async(cfg: chat_load::LoadConfig) -> anyhow::Result<bool> {
    let out = cfg.out.clone();
    let report = chat_load::run(cfg).await?;
    println!("{}", report.summary());
    if let Some(dir) = out {
        report
            .write(&dir)
            .with_context(|| format!("writing results into {}", dir.display()))?;
        println!(
            "results: {}/results.json, summary.txt, plot.png",
            dir.display()
        );
    }
    Ok(report.correct)
}
