//! Server figures read from Prometheus endpoints, for runs against a
//! cluster whose processes the tool cannot see in `/proc` (another host,
//! a Kubernetes cluster): the gateways' and room nodes' resident memory
//! (`process_resident_memory_bytes`), CPU time (`process_cpu_seconds_total`)
//! and open connections (`chat_gateway_connections`).
//!
//! The endpoints are plain `http://` inside a cluster (CONTRACT: `/metrics`
//! on the gateway's listener and the node's admin listener), so one
//! HTTP/1.0 GET per read is all this needs: the server answers with a
//! length or closes the connection, never in chunks, and a load tool does
//! not need a general HTTP client for it.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The standard process metric for resident memory, in bytes.
pub const RSS: &str = "process_resident_memory_bytes";
/// The standard process metric for user + system CPU time. The Rust
/// Prometheus client counts it in whole seconds.
pub const CPU_SECONDS: &str = "process_cpu_seconds_total";
/// The gateway's open WebSocket connections.
pub const CONNECTIONS: &str = "chat_gateway_connections";
/// Connections the gateway accepted since it started.
pub const CONNECTS: &str = "chat_gateway_connects_total";

/// How long one read of one endpoint may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest exposition accepted (a gateway's is tens of KiB).
const MAX_BYTES: usize = 16 << 20;

/// Why an endpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// Not an `http://host[:port]/path` URL.
    #[error("{0}: expected http://host[:port]/path")]
    Url(String),
    /// Connecting, writing or reading failed.
    #[error("{url}: {source}")]
    Io {
        /// The endpoint.
        url: String,
        /// What failed.
        source: std::io::Error,
    },
    /// No answer within the timeout.
    #[error("{0}: no answer within 5 s")]
    TimedOut(String),
    /// An answer that is not a plain 200 with a body.
    #[error("{url}: {what}")]
    Http {
        /// The endpoint.
        url: String,
        /// What was wrong.
        what: String,
    },
}

/// Host (with port) and path of an `http://` URL.
fn split_url(url: &str) -> Result<(String, String), ScrapeError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ScrapeError::Url(url.to_string()))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    if host.is_empty() {
        return Err(ScrapeError::Url(url.to_string()));
    }
    Ok((crate::config::with_port(host, 80), path.to_string()))
}

/// Checks that `url` is one [`get`] can read, before a run starts.
///
/// # Errors
/// [`ScrapeError::Url`].
pub fn check_url(url: &str) -> Result<(), ScrapeError> {
    split_url(url).map(|_| ())
}

/// The body of `GET url`.
///
/// # Errors
/// [`ScrapeError`] when the endpoint cannot be read or does not answer 200.
pub async fn get(url: &str) -> Result<String, ScrapeError> {
    match tokio::time::timeout(TIMEOUT, get_inner(url)).await {
        Ok(r) => r,
        Err(_) => Err(ScrapeError::TimedOut(url.to_string())),
    }
}

async fn get_inner(url: &str) -> Result<String, ScrapeError> {
    let (host, path) = split_url(url)?;
    let io = |source| ScrapeError::Io {
        url: url.to_string(),
        source,
    };
    let mut stream = TcpStream::connect(&host).await.map_err(io)?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/plain\r\nUser-Agent: chat-load\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_BYTES as u64 + 1)
        .read_to_end(&mut raw)
        .await
        .map_err(io)?;
    let http = |what: String| ScrapeError::Http {
        url: url.to_string(),
        what,
    };
    if raw.len() > MAX_BYTES {
        return Err(http(format!("answer larger than {MAX_BYTES} bytes")));
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| http("answer without a header end".into()))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(http(format!("answered {status:?}")));
    }
    if head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    }) {
        return Err(http("chunked answer to an HTTP/1.0 request".into()));
    }
    Ok(body.to_string())
}

/// The sum of every sample of metric `name` (all label sets) in a
/// Prometheus text exposition, `None` when it has none.
pub fn sum_metric(text: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: `foo` must not match `foo_bar`.
        let rest = match rest.as_bytes().first() {
            Some(b'{') => after_labels(rest),
            Some(b' ' | b'\t') => rest,
            _ => continue,
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

/// What follows the label set that `s` starts with (`{...}`), skipping
/// braces inside quoted label values; "" when it never closes.
fn after_labels(s: &str) -> &str {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return &s[i + 1..],
            _ => {}
        }
    }
    ""
}

/// Metric `name` summed over every endpoint in `urls`: `None` when any
/// endpoint cannot be read or lacks it, so a sum never silently leaves a
/// process out. The first failure is printed once per call.
pub async fn sum_over(urls: &[String], name: &str) -> Option<f64> {
    let reads = futures::future::join_all(urls.iter().map(|u| get(u))).await;
    let mut total = 0.0;
    for (url, read) in urls.iter().zip(reads) {
        match read {
            Ok(body) => match sum_metric(&body, name) {
                Some(v) => total += v,
                None => {
                    eprintln!("chat-load: {url} has no {name}");
                    return None;
                }
            },
            Err(e) => {
                eprintln!("chat-load: cannot read metrics: {e}");
                return None;
            }
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_a_metric_over_its_label_sets_and_only_that_metric() {
        let text = "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
                    # TYPE process_resident_memory_bytes gauge\n\
                    process_resident_memory_bytes 3.0035968e7\n\
                    process_resident_memory_bytes_extra 5\n\
                    chat_gateway_frames_out_total{kind=\"message\"} 10\n\
                    chat_gateway_frames_out_total{kind=\"reply\",x=\"a}b\"} 5 1700000000\n";
        assert_eq!(sum_metric(text, RSS), Some(30_035_968.0));
        assert_eq!(
            sum_metric(text, "chat_gateway_frames_out_total"),
            Some(15.0)
        );
        assert_eq!(sum_metric(text, "chat_gateway_frames_out"), None);
        assert_eq!(sum_metric(text, CPU_SECONDS), None);
    }

    #[test]
    fn takes_only_http_urls_and_defaults_the_port_and_path() {
        assert_eq!(
            split_url("http://gw:8080/metrics").unwrap(),
            ("gw:8080".into(), "/metrics".into())
        );
        assert_eq!(
            split_url("http://chat-gateway.chat.svc").unwrap(),
            ("chat-gateway.chat.svc:80".into(), "/metrics".into())
        );
        assert!(split_url("https://gw/metrics").is_err());
        assert!(split_url("gw:8080/metrics").is_err());
        assert!(split_url("http:///metrics").is_err());
    }

    #[tokio::test]
    async fn reads_a_body_and_refuses_an_error_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for answer in [
                "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nprocess_cpu_seconds_total 7\n",
                "HTTP/1.0 404 Not Found\r\n\r\nno",
            ] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                assert!(buf[..n].starts_with(b"GET /metrics HTTP/1.0\r\n"));
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let url = format!("http://{addr}/metrics");
        let body = get(&url).await.unwrap();
        assert_eq!(sum_metric(&body, CPU_SECONDS), Some(7.0));
        let err = get(&url).await.unwrap_err();
        assert!(err.to_string().contains("404"), "{err}");
        server.await.unwrap();
    }
}
