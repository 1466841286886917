//! [`Bus`] over NATS (async-nats), with JetStream key-value buckets for
//! heartbeats.

use std::time::Duration;

use async_nats::jetstream;
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

use super::{Bus, BusError, BusMessage, KvChange};

/// Oldest NATS server the cluster runs on: 2.10 brought the key-value
/// behaviour async-nats relies on.
pub const MIN_SERVER: (u64, u64) = (2, 10);

/// How to reach NATS beyond its URL: credentials and a private CA.
#[derive(Debug, Clone, Default)]
pub struct NatsAuth {
    /// A `.creds` file (JWT + NKey seed) for the account.
    pub creds_file: Option<std::path::PathBuf>,
    /// A PEM CA bundle for a server certificate from a private CA; setting
    /// it requires TLS.
    pub ca_file: Option<std::path::PathBuf>,
}

/// A NATS connection.
#[derive(Clone, Debug)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    reconnects: tokio::sync::watch::Receiver<u64>,
}

/// Parses `major.minor` out of a server version like `2.10.7-RC1`.
fn parse_version(v: &str) -> Option<(u64, u64)> {
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

impl NatsBus {
    /// Connects to `url`, retrying until the server answers (logging each
    /// failure), then checks the server version and JetStream.
    ///
    /// # Errors
    /// [`BusError::Unsupported`] for a server older than 2.10 or without
    /// JetStream; [`BusError::Other`] for a URL that cannot work.
    pub async fn connect(url: &str, name: &str, auth: &NatsAuth) -> Result<Self, BusError> {
        let mut delay = Duration::from_millis(200);
        let (reconnect_tx, reconnects) = tokio::sync::watch::channel(0u64);
        let reconnect_tx = std::sync::Arc::new(reconnect_tx);
        let client = loop {
            let counter = reconnect_tx.clone();
            let base = match &auth.creds_file {
                Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                    .await
                    .map_err(|e| {
                        BusError::Unsupported(format!(
                            "cannot read NATS credentials {}: {e}",
                            path.display()
                        ))
                    })?,
                None => async_nats::ConnectOptions::new(),
            };
            let base = match &auth.ca_file {
                Some(ca) => base.add_root_certificates(ca.clone()).require_tls(true),
                None => base,
            };
            let opts = base
                .name(name)
                .connection_timeout(Duration::from_secs(5))
                .request_timeout(Some(Duration::from_secs(10)))
                .subscription_capacity(65_536)
                .max_reconnects(None)
                .event_callback(move |ev| {
                    let counter = counter.clone();
                    async move {
                        match ev {
                            async_nats::Event::Connected => {
                                tracing::info!("nats connected");
                                counter.send_modify(|n| *n += 1);
                            }
                            async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                            other => tracing::debug!(event = %other, "nats event"),
                        }
                    }
                });
            match opts.connect(url).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(error = %e, url, retry_in_ms = delay.as_millis() as u64, "cannot reach NATS; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        let info = client.server_info();
        match parse_version(&info.version) {
            Some(v) if v >= MIN_SERVER => {}
            _ => {
                return Err(BusError::Unsupported(format!(
                "NATS server {} is too old: this cluster needs NATS {}.{} or newer with JetStream",
                info.version, MIN_SERVER.0, MIN_SERVER.1
            )))
            }
        }
        if !info.jetstream {
            return Err(BusError::Unsupported(format!(
                "NATS server {} runs without JetStream: start it with -js",
                info.version
            )));
        }
        let js = jetstream::new(client.clone());
        Ok(Self {
            client,
            js,
            reconnects,
        })
    }

    /// The underlying client, for health checks.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    async fn store(&self, bucket: &str) -> Result<jetstream::kv::Store, BusError> {
        self.js
            .get_key_value(bucket)
            .await
            .map_err(|e| BusError::Other(e.to_string()))
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, subject: String, payload: Bytes) -> Result<(), BusError> {
        self.client
            .publish(subject, payload)
            .await
            .map_err(|e| BusError::Other(e.to_string()))
    }

    async fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, BusError> {
        let req = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        match self.client.send_request(subject, req).await {
            Ok(m) => Ok(m.payload),
            Err(e) => Err(match e.kind() {
                async_nats::RequestErrorKind::NoResponders => BusError::NoResponders,
                async_nats::RequestErrorKind::TimedOut => BusError::TimedOut,
                _ => BusError::Other(e.to_string()),
            }),
        }
    }

    async fn subscribe(&self, subject: String) -> Result<BoxStream<'static, BusMessage>, BusError> {
        let sub = self
            .client
            .subscribe(subject)
            .await
            .map_err(|e| BusError::Other(e.to_string()))?;
        Ok(sub
            .map(|m| BusMessage {
                reply: m.reply.map(|r| r.to_string()),
                payload: m.payload,
            })
            .boxed())
    }

    async fn kv_ensure(&self, bucket: &str, max_age: Duration) -> Result<(), BusError> {
        if self.js.get_key_value(bucket).await.is_ok() {
            return Ok(());
        }
        let cfg = jetstream::kv::Config {
            bucket: bucket.to_owned(),
            history: 1,
            max_age,
            storage: jetstream::stream::StorageType::Memory,
            ..Default::default()
        };
        match self.js.create_key_value(cfg).await {
            Ok(_) => Ok(()),
            // Another process created it between our check and create.
            Err(_) if self.js.get_key_value(bucket).await.is_ok() => Ok(()),
            Err(e) => Err(BusError::Other(format!(
                "cannot create bucket {bucket}: {e}"
            ))),
        }
    }

    async fn kv_put(&self, bucket: &str, key: &str, value: Bytes) -> Result<(), BusError> {
        self.store(bucket)
            .await?
            .put(key, value)
            .await
            .map(|_| ())
            .map_err(|e| BusError::Other(e.to_string()))
    }

    async fn kv_get(&self, bucket: &str, key: &str) -> Result<Option<Bytes>, BusError> {
        self.store(bucket)
            .await?
            .get(key)
            .await
            .map_err(|e| BusError::Other(e.to_string()))
    }

    async fn kv_delete(&self, bucket: &str, key: &str) -> Result<(), BusError> {
        self.store(bucket)
            .await?
            .delete(key)
            .await
            .map_err(|e| BusError::Other(e.to_string()))
    }

    async fn kv_watch(&self, bucket: &str) -> Result<BoxStream<'static, KvChange>, BusError> {
        let watch = self
            .store(bucket)
            .await?
            .watch_with_history(">")
            .await
            .map_err(|e| BusError::Other(e.to_string()))?;
        Ok(watch
            .filter_map(|entry| async move {
                match entry {
                    Ok(e) => Some(KvChange {
                        key: e.key,
                        value: match e.operation {
                            jetstream::kv::Operation::Put => Some(e.value),
                            _ => None,
                        },
                    }),
                    Err(err) => {
                        tracing::warn!(error = %err, "bucket watch error");
                        None
                    }
                }
            })
            .boxed())
    }

    async fn drain(&self) {
        if let Err(e) = self.client.drain().await {
            tracing::warn!(error = %e, "nats drain failed");
        }
    }

    fn reconnects(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reconnects.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn versions() {
        assert_eq!(parse_version("2.9.10"), Some((2, 9)));
        assert_eq!(parse_version("2.15.1"), Some((2, 15)));
        assert_eq!(parse_version("2.10.0-RC.1"), Some((2, 10)));
        assert!(parse_version("2.9.10") < Some((2, 10)));
        assert_eq!(parse_version("x"), None);
    }
}
