//! The demo page in headless Chromium (playwright-core under node): two
//! browser contexts in one room against the real embedded server — a message
//! typed in one appears in the other with the same seq, pending → acked,
//! reload with history, drain (1012) and automatic resume — plus the page's
//! own logic against a scripted fake server. A screenshot is saved to
//! `target/test-artifacts/demo.png`. `scripts/test.sh` installs Chromium and
//! the node package; without them this test fails, it never skips.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context};
use chat_tests::{binary, free_port};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn chromium() -> anyhow::Result<PathBuf> {
    let p = std::env::var_os("CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    ensure!(
        p.exists(),
        "no Chromium at {} (apt-get install chromium, or run ./scripts/test.sh)",
        p.display()
    );
    Ok(p)
}

fn run_node(script: &str, envs: &[(&str, String)]) -> anyhow::Result<()> {
    let dir = root().join("tests/browser");
    ensure!(
        dir.join("node_modules/playwright-core").exists(),
        "tests/browser/node_modules is missing: run ./scripts/test.sh (or npm ci in tests/browser)"
    );
    let out = Command::new("node")
        .arg(script)
        .current_dir(&dir)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .env("CHROMIUM", chromium()?)
        .output()
        .context("cannot run node (install Node.js, or run ./scripts/test.sh)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    ensure!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    Ok(())
}

#[test]
fn demo_page_two_browsers_chat_and_resume() -> anyhow::Result<()> {
    let artifacts = root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let shot = artifacts.join("demo.png");
    let _ = std::fs::remove_file(&shot);
    run_node(
        "demo.test.js",
        &[
            ("GATEWAY_BIN", binary("chat-gateway")?.display().to_string()),
            ("PORT", free_port()?.to_string()),
            ("SCREENSHOT", shot.display().to_string()),
        ],
    )?;
    ensure!(shot.exists(), "no screenshot at {}", shot.display());
    Ok(())
}

#[test]
fn demo_page_logic_against_a_scripted_server() -> anyhow::Result<()> {
    let html = root().join("gateway/static/index.html");
    run_node(
        "mock.test.js",
        &[("INDEX_HTML", html.display().to_string())],
    )
}
