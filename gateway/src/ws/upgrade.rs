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
    offers_deflate: bool,
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
}

impl IntoResponse for UpgradeError {
    fn into_response(self) -> Response {
        let mut r = crate::http::error(
            StatusCode::UPGRADE_REQUIRED,
            "bad_request",
            &self.to_string(),
        );
        if self == Self::Key {
            *r.status_mut() = StatusCode::BAD_REQUEST;
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

impl WsUpgrade {
    /// Checks a request's headers (and takes its upgrade handle from
    /// `extensions`, when it has one).
    pub fn from_parts(parts: &mut Parts) -> Result<Self, UpgradeError> {
        let h = &parts.headers;
        if !has_token(h, header::CONNECTION, "upgrade")
            || !has_token(h, header::UPGRADE, "websocket")
        {
            return Err(UpgradeError::NotUpgrade);
        }
        if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
            return Err(UpgradeError::Version);
        }
        // The key is 16 random bytes in base64: 24 characters.
        let key = h
            .get(header::SEC_WEBSOCKET_KEY)
            .filter(|k| k.len() == 24)
            .cloned()
            .ok_or(UpgradeError::Key)?;
        let offers_deflate = deflate::accepts(
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
            offers_deflate,
            on_upgrade,
        })
    }

    /// Whether the client offered permessage-deflate in a form we accept.
    pub fn offers_deflate(&self) -> bool {
        self.offers_deflate
    }

    /// Answers 101 and runs `session` on the upgraded socket. `deflate`
    /// says whether to accept the client's permessage-deflate offer; the
    /// session is told whether it was negotiated.
    pub fn on_upgrade<F, Fut>(self, deflate: bool, session: F) -> Response
    where
        F: FnOnce(Socket, bool) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let deflate = deflate && self.offers_deflate;
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
        if deflate {
            h.insert(
                header::SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_static(deflate::RESPONSE),
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

    const GOOD: [(&str, &str); 4] = [
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
        v12[2].1 = "12";
        assert_eq!(
            WsUpgrade::from_parts(&mut parts(&v12)).unwrap_err(),
            UpgradeError::Version
        );
        let mut nokey = GOOD;
        nokey[3].1 = "short";
        assert_eq!(
            WsUpgrade::from_parts(&mut parts(&nokey)).unwrap_err(),
            UpgradeError::Key
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
