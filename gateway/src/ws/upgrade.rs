//! The HTTP/1.1 WebSocket handshake (RFC 6455 §4.2) as an axum extractor:
//! checks the request, negotiates permessage-deflate, answers 101 and hands
//! the upgraded socket to the session.

use std::future::Future;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::deflate;

/// An upgraded client socket: the TCP stream itself when it is one (read
/// by readiness, split without a lock), with the bytes hyper had already
/// read past the request; any other upgraded stream as it is.
#[derive(Debug)]
pub enum Socket {
    /// A plain TCP connection and the bytes read past the request head.
    Tcp(TcpStream, Bytes),
    /// Anything else hyper upgraded.
    Other(TokioIo<Upgraded>),
}

impl Socket {
    fn from_upgraded(upgraded: Upgraded) -> Self {
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => Self::Tcp(parts.io.into_inner(), parts.read_buf),
            Err(other) => Self::Other(TokioIo::new(other)),
        }
    }
}

/// A valid WebSocket upgrade request, not yet answered.
#[derive(Debug)]
pub struct WsUpgrade {
    key: HeaderValue,
    /// The answer to the client's permessage-deflate offer, if acceptable.
    deflate: Option<&'static str>,
    on_upgrade: OnUpgrade,
}

/// Why a request is not a WebSocket upgrade the gateway can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    /// `Connection: upgrade` and `Upgrade: websocket` are missing.
    #[error("not a WebSocket upgrade request")]
    NotUpgrade,
    /// A WebSocket version other than 13.
    #[error("unsupported WebSocket version (13 only)")]
    Version,
    /// No valid `Sec-WebSocket-Key`.
    #[error("missing or malformed Sec-WebSocket-Key")]
    Key,
    /// The connection cannot be upgraded (not HTTP/1.1).
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
    /// A handshake header given twice, or no `Host`.
    #[error("duplicate WebSocket handshake header, or no Host")]
    BadHeaders,
    /// Not a GET.
    #[error("a WebSocket upgrade is a GET request")]
    Method,
}

impl IntoResponse for UpgradeError {
    fn into_response(self) -> Response {
        let mut r = crate::http::error(
            StatusCode::UPGRADE_REQUIRED,
            "bad_request",
            &self.to_string(),
        );
        match self {
            Self::Key | Self::BadHeaders => *r.status_mut() = StatusCode::BAD_REQUEST,
            Self::Method => *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED,
            _ => {}
        }
        let h = r.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        r
    }
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether `k` is 16 bytes in base64 (RFC 6455 §4.2.1): 22 characters of
/// the alphabet, the last carrying no stray bits, then `==`.
fn is_key(k: &[u8]) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let [body @ .., b'=', b'='] = k else {
        return false;
    };
    body.len() == 22
        && body.iter().all(|c| ALPHABET.contains(c))
        && ALPHABET
            .iter()
            .position(|c| *c == body[21])
            .is_some_and(|v| v & 0x0F == 0)
}

impl WsUpgrade {
    /// Checks a request's headers (and takes its upgrade handle from
    /// `extensions`, when it has one).
    pub fn from_parts(parts: &mut Parts) -> Result<Self, UpgradeError> {
        if parts.method != axum::http::Method::GET {
            return Err(UpgradeError::Method);
        }
        let h = &parts.headers;
        if !has_token(h, header::CONNECTION, "upgrade")
            || !has_token(h, header::UPGRADE, "websocket")
        {
            return Err(UpgradeError::NotUpgrade);
        }
        let once = |name| h.get_all(name).iter().count() <= 1;
        if !once(header::SEC_WEBSOCKET_KEY)
            || !once(header::SEC_WEBSOCKET_VERSION)
            || !h.contains_key(header::HOST)
        {
            return Err(UpgradeError::BadHeaders);
        }
        if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
            return Err(UpgradeError::Version);
        }
        let key = h
            .get(header::SEC_WEBSOCKET_KEY)
            .filter(|k| is_key(k.as_bytes()))
            .cloned()
            .ok_or(UpgradeError::Key)?;
        let deflate = deflate::response(
            h.get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        );
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeError::NotUpgradable)?;
        Ok(Self {
            key,
            deflate,
            on_upgrade,
        })
    }

    /// Answers 101 and runs `session` on the upgraded socket. `deflate`
    /// says whether to accept the client's permessage-deflate offer; the
    /// session is told whether it was negotiated.
    pub fn on_upgrade<F, Fut>(self, deflate: bool, session: F) -> Response
    where
        F: FnOnce(Socket, bool) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let answer = self.deflate.filter(|_| deflate);
        let deflate = answer.is_some();
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => session(Socket::from_upgraded(upgraded), deflate).await,
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let h = r.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        if let Some(a) = answer {
            h.insert(
                header::SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_static(a),
            );
        }
        r
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = UpgradeError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Self::from_parts(parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::get("/ws");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    const GOOD: [(&str, &str); 5] = [
        ("host", "chat.example.com"),
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn refuses_what_is_not_an_upgrade() {
        assert_eq!(
            WsUpgrade::from_parts(&mut parts(&[])).unwrap_err(),
            UpgradeError::NotUpgrade
        );
        let mut v12 = GOOD;
        v12[3].1 = "12";
        assert_eq!(
            WsUpgrade::from_parts(&mut parts(&v12)).unwrap_err(),
            UpgradeError::Version
        );
        for bad in [
            "short",
            "!!!!!!!!!!!!!!!!!!!!!!!!",
            "AAAAAAAAAAAAAAAAAAAAAAAA",
            "dGhlIHNhbXBsZSBub25jZR==",
        ] {
            let mut nokey = GOOD;
            nokey[4].1 = bad;
            assert_eq!(
                WsUpgrade::from_parts(&mut parts(&nokey)).unwrap_err(),
                UpgradeError::Key,
                "{bad}"
            );
        }
        let mut twice = GOOD.to_vec();
        twice.push(("sec-websocket-key", "AAAAAAAAAAAAAAAAAAAAAA=="));
        assert_eq!(
            WsUpgrade::from_parts(&mut parts(&twice)).unwrap_err(),
            UpgradeError::BadHeaders
        );
        let no_host = &GOOD[1..];
        assert_eq!(
            WsUpgrade::from_parts(&mut parts(no_host)).unwrap_err(),
            UpgradeError::BadHeaders
        );
        let mut head = Request::head("/ws");
        for (k, v) in GOOD {
            head = head.header(k, v);
        }
        let mut head = head.body(()).unwrap().into_parts().0;
        assert_eq!(
            WsUpgrade::from_parts(&mut head).unwrap_err(),
            UpgradeError::Method
        );
        // Headers fine, but no upgradable connection under it.
        assert_eq!(
            WsUpgrade::from_parts(&mut parts(&GOOD)).unwrap_err(),
            UpgradeError::NotUpgradable
        );
    }

    #[test]
    fn accept_key_is_the_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            tungstenite::handshake::derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
