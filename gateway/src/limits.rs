//! Edge limits applied before a WebSocket upgrade: the browser `Origin`
//! allow-list, connections per client address (the forwarded address when
//! the peer is a trusted proxy), and the server API key. Every refusal is
//! counted in `chat_gateway_limited_total{limit}`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use ipnet::IpNet;

use crate::metrics::METRICS;

/// An address has the most connections not yet upgraded: refuse another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many pending connections from this address")]
pub struct TooManyPending;

/// Edge policy shared by every request.
#[derive(Debug)]
pub struct Edge {
    max_per_ip: usize,
    trusted: Vec<IpNet>,
    origins: Option<Vec<String>>,
    api_key: Option<String>,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// HTTP connections not yet upgraded (or plain HTTP), per peer address.
    pending: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// Holds one connection's place in its address's count; dropping it frees
/// the place.
#[derive(Debug)]
pub struct ConnSlot {
    ip: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("conn count lock");
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

impl Edge {
    /// A policy: at most `max_per_ip` sockets per client address; `trusted`
    /// proxies' `X-Forwarded-For` names the client; `origins` (when set)
    /// lists the browser origins allowed; `api_key` enables the server API.
    pub fn new(
        max_per_ip: usize,
        trusted: Vec<IpNet>,
        origins: Option<Vec<String>>,
        api_key: Option<String>,
    ) -> Self {
        Self {
            max_per_ip,
            trusted,
            origins,
            api_key,
            counts: Arc::default(),
            pending: Arc::default(),
        }
    }

    /// The client's address: the peer, or, when the peer is a trusted
    /// proxy, the right-most untrusted address of `X-Forwarded-For`.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let mut ip = peer.ip().to_canonical();
        if !self.trusted.iter().any(|n| n.contains(&ip)) {
            return ip;
        }
        let hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse::<IpAddr>().ok())
            .collect();
        for hop in hops.into_iter().rev() {
            ip = hop.to_canonical();
            if !self.trusted.iter().any(|n| n.contains(&ip)) {
                break;
            }
        }
        ip
    }

    /// Takes a connection place for `ip`, or `None` when it has the most.
    pub fn admit(&self, ip: IpAddr) -> Option<ConnSlot> {
        let mut counts = self.counts.lock().expect("conn count lock");
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            METRICS.limited.with_label_values(&["conns_per_ip"]).inc();
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            ip,
            counts: self.counts.clone(),
        })
    }

    /// Takes a place for a new TCP connection from `peer` while it is plain
    /// HTTP (its request head not yet read, or not upgraded): at most
    /// `CHAT_MAX_CONNS_PER_IP` per address, so one address cannot hold
    /// every socket with half-sent requests. Trusted proxies are not
    /// counted (many clients share them; their clients are counted once
    /// upgraded).
    pub fn admit_pending(&self, peer: IpAddr) -> Result<Option<ConnSlot>, TooManyPending> {
        let ip = peer.to_canonical();
        if self.trusted.iter().any(|n| n.contains(&ip)) {
            return Ok(None);
        }
        let mut counts = self.pending.lock().expect("pending count lock");
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            METRICS.limited.with_label_values(&["pending_per_ip"]).inc();
            return Err(TooManyPending);
        }
        *n += 1;
        Ok(Some(ConnSlot {
            ip,
            counts: self.pending.clone(),
        }))
    }

    /// Whether a request with these headers may open a socket: non-browser
    /// clients send no `Origin`; browsers must send a listed one.
    pub fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        let (Some(list), Some(origin)) = (&self.origins, headers.get("origin")) else {
            return true;
        };
        let ok = origin
            .to_str()
            .is_ok_and(|o| list.iter().any(|a| a == o.trim_end_matches('/')));
        if !ok {
            METRICS.limited.with_label_values(&["origin"]).inc();
        }
        ok
    }

    /// Checks the server API's bearer key in constant time.
    pub fn api_authorized(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        let Some(key) = &self.api_key else {
            return Err("the server API is off: set CHAT_API_KEY");
        };
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(s, _)| s.eq_ignore_ascii_case("bearer"))
            .map(|(_, k)| k.trim())
            .ok_or("missing Authorization: Bearer <CHAT_API_KEY>")?;
        // Constant time over the key's length, so timing reveals nothing.
        let (a, b) = (key.as_bytes(), given.as_bytes());
        let mut diff = a.len() ^ b.len();
        for (i, x) in a.iter().enumerate() {
            diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
        }
        if diff == 0 {
            Ok(())
        } else {
            Err("wrong API key")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(trusted: &[&str]) -> Edge {
        Edge::new(
            2,
            trusted.iter().map(|s| s.parse().unwrap()).collect(),
            Some(vec!["https://app.example".into()]),
            Some("k".repeat(16)),
        )
    }

    #[test]
    fn forwarded_address_counts_only_behind_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9, 10.0.0.7".parse().unwrap());
        let direct: SocketAddr = "198.51.100.1:5000".parse().unwrap();
        let proxy: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let e = edge(&["10.0.0.0/8"]);
        assert_eq!(
            e.client_ip(direct, &h),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            e.client_ip(proxy, &h),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn per_address_places_are_freed_on_drop() {
        let e = edge(&[]);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = e.admit(ip).unwrap();
        let _b = e.admit(ip).unwrap();
        assert!(e.admit(ip).is_none());
        drop(a);
        assert!(e.admit(ip).is_some());
    }

    #[test]
    fn origins_and_api_key() {
        let e = edge(&[]);
        let mut h = HeaderMap::new();
        assert!(e.origin_allowed(&h), "no Origin: not a browser");
        h.insert("origin", "https://app.example".parse().unwrap());
        assert!(e.origin_allowed(&h));
        h.insert("origin", "https://evil.example".parse().unwrap());
        assert!(!e.origin_allowed(&h));
        let mut h = HeaderMap::new();
        assert!(e.api_authorized(&h).is_err());
        h.insert(
            "authorization",
            format!("Bearer {}", "k".repeat(16)).parse().unwrap(),
        );
        assert!(e.api_authorized(&h).is_ok());
        h.insert(
            "authorization",
            format!("Bearer {}", "k".repeat(15)).parse().unwrap(),
        );
        assert!(e.api_authorized(&h).is_err());
    }
}
