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
    let bad = || ScrapeError::Url(url.to_string());
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (host, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], &rest[i..]),
        Some(i) => (&rest[..i], "/metrics"),
        None => (rest, "/metrics"),
    };
    if host.is_empty() {
        return Err(bad());
    }
    let host = crate::config::with_port(host, 80).map_err(|_| bad())?;
    Ok((host, path.trim_end_matches('?').to_string()))
}

/// Checks that `url` is one [`get`] can read, before a run starts, and
/// returns the endpoint it names (host and port in lower case, the path),
/// so two spellings of one endpoint compare equal.
///
/// # Errors
/// [`ScrapeError::Url`].
pub fn endpoint(url: &str) -> Result<String, ScrapeError> {
    if url.is_empty() {
        return Err(ScrapeError::Url(
            "an empty metrics URL (a trailing comma?)".into(),
        ));
    }
    let (host, path) = split_url(url)?;
    Ok(format!("{}{path}", host.to_ascii_lowercase()))
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
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        return Err(http("chunked answer to an HTTP/1.0 request".into()));
    }
    let body_bytes = raw.len() - (head.len() + 4);
    if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| http(format!("bad Content-Length {len:?}")))?;
        if body_bytes < len {
            return Err(http(format!(
                "answer cut short: {body_bytes} of {len} bytes"
            )));
        }
    }
    Ok(body.to_string())
}

/// The sum of every sample of metric `name` (all label sets) in a
/// Prometheus text exposition, `None` when it has none, or when a sample
/// is not a finite number ≥ 0 or a series appears twice: every metric read
/// here is a size, a count or a time, and a sum over a broken exposition
/// would be a wrong figure that looks right.
pub fn sum_metric(text: &str, name: &str) -> Option<f64> {
    let mut total = None;
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: `foo` must not match `foo_bar`.
        let (labels, rest) = match rest.as_bytes().first() {
            Some(b'{') => {
                let after = after_labels(rest);
                (&rest[..rest.len() - after.len()], after)
            }
            Some(b' ' | b'\t') => ("", rest),
            _ => continue,
        };
        let v = rest.split_whitespace().next()?.parse::<f64>().ok()?;
        if !v.is_finite() || v < 0.0 || !seen.insert(labels) {
            return None;
        }
        *total.get_or_insert(0.0) += v;
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
                    eprintln!("chat-load: {url} has no valid {name}");
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
        for broken in [
            "process_cpu_seconds_total NaN\n",
            "process_cpu_seconds_total +Inf\n",
            "process_cpu_seconds_total -3\n",
            "process_cpu_seconds_total 3\nprocess_cpu_seconds_total 3\n",
            "process_cpu_seconds_total x\n",
        ] {
            assert_eq!(sum_metric(broken, CPU_SECONDS), None, "{broken}");
        }
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
        assert!(split_url("http://gw:99999/metrics").is_err());
        assert!(split_url("http://gw:/metrics").is_err());
        // Spellings of one endpoint compare equal.
        let one = endpoint("http://GW:80/metrics").unwrap();
        for other in [
            "http://gw/metrics",
            "http://gw",
            "http://gw/metrics?",
            "http://gw?",
        ] {
            assert_eq!(endpoint(other).unwrap(), one, "{other}");
        }
        assert!(endpoint("")
            .unwrap_err()
            .to_string()
            .contains("trailing comma"));
    }

    #[tokio::test]
    async fn reads_a_body_and_refuses_an_error_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for answer in [
                "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nprocess_cpu_seconds_total 7\n",
                "HTTP/1.0 404 Not Found\r\n\r\nno",
                "HTTP/1.0 200 OK\r\nContent-Length: 90\r\n\r\nprocess_cpu_seconds_total 7\n",
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
        let err = get(&url).await.unwrap_err();
        assert!(err.to_string().contains("cut short"), "{err}");
        server.await.unwrap();
    }
}
