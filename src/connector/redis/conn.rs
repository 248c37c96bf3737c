//! Connections to a Redis server or cluster: pooled multiplexed connections per node, the
//! cluster's slot map (from `CLUSTER SLOTS`) and the key → slot hash.
//!
//! Cluster routing is flumen's own rather than the crate's cluster client: a pipeline there must
//! hold one slot only, while flumen sends one pipeline per master with the rows of every slot it
//! owns. A `MOVED`/`ASK` answer drops the slot map; the rows go again after it is read anew.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use url::Url;

use crate::error::{Error, Result};

/// Slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// The nodes to talk to: one for a standalone server, the masters of a cluster.
#[derive(Debug)]
pub struct Topology {
    /// `host:port` of each node.
    pub nodes: Vec<String>,
    /// For a cluster: the node index owning each slot.
    pub slots: Option<Vec<u16>>,
}

impl Topology {
    /// The node a key goes to.
    pub fn node_of(&self, slot: u16) -> usize {
        self.slots.as_ref().map_or(0, |s| s[slot as usize] as usize)
    }
}

/// Whether LOCATION is a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterMode {
    Auto,
    Yes,
    No,
}

/// A Redis server or cluster, as a table reaches it.
#[derive(Clone)]
pub struct Redis {
    /// LOCATION with its password: only ever given to the client, never shown.
    url: Url,
    /// `host:port` of LOCATION, for messages.
    pub address: String,
    pub cluster: ClusterMode,
    /// Multiplexed connections kept per node.
    pub per_node: usize,
    pub timeout: Duration,
    /// PEM of the CA for rediss://, when not the web PKI's.
    ca: Option<Vec<u8>>,
    topology: Arc<Mutex<Option<Arc<Topology>>>>,
    pool: Arc<Mutex<HashMap<String, Vec<MultiplexedConnection>>>>,
    next: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redis({})", self.address)
    }
}

impl Redis {
    /// `redis://[user][:password]@host[:port][/db]` or `rediss://` (TLS).
    pub fn new(
        location: &str,
        cluster: ClusterMode,
        per_node: usize,
        timeout: Duration,
        ca: Option<Vec<u8>>,
    ) -> Result<Self> {
        let url = Url::parse(location).map_err(|e| {
            Error::Option(format!(
                "LOCATION is not a URL like redis://:${{PASSWORD}}@host:6379/0: {e}"
            ))
        })?;
        if !matches!(url.scheme(), "redis" | "rediss") {
            return Err(Error::Option(format!(
                "LOCATION scheme '{}' does not fit STORED AS REDIS: use redis:// or rediss:// (TLS)",
                url.scheme()
            )));
        }
        let host = url.host_str().unwrap_or("127.0.0.1").to_string();
        let address = format!("{host}:{}", url.port().unwrap_or(6379));
        Ok(Self {
            url,
            address,
            cluster,
            per_node: per_node.max(1),
            timeout,
            ca,
            topology: Default::default(),
            pool: Default::default(),
            next: Default::default(),
        })
    }

    fn url_for(&self, node: &str) -> Result<String> {
        let mut u = self.url.clone();
        if node != self.address {
            let (host, port) = node
                .rsplit_once(':')
                .ok_or_else(|| Error::Config(format!("redis node '{node}' is not host:port")))?;
            u.set_host(Some(host.trim_start_matches('[').trim_end_matches(']')))
                .map_err(|e| Error::Config(format!("redis node '{node}': {e}")))?;
            u.set_port(port.parse().ok())
                .map_err(|_| Error::Config(format!("redis node '{node}': bad port")))?;
        }
        Ok(u.to_string())
    }

    /// A new connection of its own (scans keep one per partition).
    pub async fn connect(&self, node: &str) -> Result<MultiplexedConnection> {
        let url = self.url_for(node)?;
        let client = match &self.ca {
            Some(pem) => redis::Client::build_with_tls(
                url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            None => redis::Client::open(url.as_str()),
        }
        .map_err(|e| Error::Config(format!("redis {node}: {}", text(&e))))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(10)))
            .set_response_timeout(Some(self.timeout));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| Error::Config(format!("redis {node}: {}", text(&e))))
    }

    /// One of the node's pooled connections, in turn.
    pub async fn pooled(&self, node: &str) -> Result<MultiplexedConnection> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.per_node;
        if let Some(c) = self.lock_pool()?.get(node).and_then(|v| v.get(i)) {
            return Ok(c.clone());
        }
        let c = self.connect(node).await?;
        let mut pool = self.lock_pool()?;
        let v = pool.entry(node.to_string()).or_default();
        if v.len() < self.per_node {
            v.push(c.clone());
        }
        Ok(c)
    }

    /// Forgets a node's connections (after a connection error).
    pub fn drop_node(&self, node: &str) {
        if let Ok(mut p) = self.pool.lock() {
            p.remove(node);
        }
    }

    fn lock_pool(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Vec<MultiplexedConnection>>>> {
        self.pool
            .lock()
            .map_err(|_| Error::Config("redis connection pool poisoned".into()))
    }

    /// Forgets the slot map (after MOVED/ASK); the next request reads it again.
    pub fn invalidate(&self) {
        if let Ok(mut t) = self.topology.lock() {
            *t = None;
        }
        if let Ok(mut p) = self.pool.lock() {
            p.clear();
        }
    }

    /// The nodes and, for a cluster, the slot map.
    pub async fn topology(&self) -> Result<Arc<Topology>> {
        if let Some(t) = self
            .topology
            .lock()
            .map_err(|_| Error::Config("redis topology poisoned".into()))?
            .clone()
        {
            return Ok(t);
        }
        let t = Arc::new(self.discover().await?);
        if let Ok(mut g) = self.topology.lock() {
            *g = Some(Arc::clone(&t));
        }
        Ok(t)
    }

    async fn discover(&self) -> Result<Topology> {
        let mut c = self.connect(&self.address).await?;
        let standalone = || Topology {
            nodes: vec![self.address.clone()],
            slots: None,
        };
        if self.cluster == ClusterMode::No {
            let _: Value = redis::cmd("PING")
                .query_async(&mut c)
                .await
                .map_err(|e| Error::Config(format!("redis {}: {}", self.address, text(&e))))?;
            return Ok(standalone());
        }
        let info: String = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut c)
            .await
            .map_err(|e| Error::Config(format!("redis {}: {}", self.address, text(&e))))?;
        if !info.contains("cluster_enabled:1") {
            if self.cluster == ClusterMode::Yes {
                return Err(Error::Option(format!(
                    "'cluster' 'true', but redis {} is not a cluster node (cluster_enabled:0)",
                    self.address
                )));
            }
            return Ok(standalone());
        }
        if self
            .url
            .path()
            .trim_matches('/')
            .parse::<u32>()
            .is_ok_and(|db| db != 0)
        {
            return Err(Error::Option(format!(
                "redis {} is a cluster, which has only database 0: drop the /db from LOCATION",
                self.address
            )));
        }
        let v: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut c)
            .await
            .map_err(|e| Error::Config(format!("redis {}: CLUSTER SLOTS: {}", self.address, text(&e))))?;
        let mut nodes: Vec<String> = Vec::new();
        let mut slots = vec![u16::MAX; SLOTS];
        let Value::Array(ranges) = v else {
            return Err(Error::Config(format!(
                "redis {}: CLUSTER SLOTS answered {v:?}",
                self.address
            )));
        };
        for r in ranges {
            let Value::Array(r) = r else { continue };
            let (Some(Value::Int(a)), Some(Value::Int(b)), Some(Value::Array(master))) =
                (r.first(), r.get(1), r.get(2))
            else {
                continue;
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => continue,
            };
            let host = if host.is_empty() {
                self.address.rsplit_once(':').map_or(host, |(h, _)| h.to_string())
            } else {
                host
            };
            let Some(Value::Int(port)) = master.get(1) else {
                continue;
            };
            let node = format!("{host}:{port}");
            let i = match nodes.iter().position(|n| *n == node) {
                Some(i) => i,
                None => {
                    nodes.push(node);
                    nodes.len() - 1
                }
            };
            for s in (*a).max(0)..=(*b).min(SLOTS as i64 - 1) {
                slots[s as usize] = i as u16;
            }
        }
        if let Some(s) = slots.iter().position(|&n| n == u16::MAX) {
            return Err(Error::Config(format!(
                "redis cluster at {}: slot {s} has no master (is the cluster fully set up? CLUSTER INFO says)",
                self.address
            )));
        }
        Ok(Topology {
            nodes,
            slots: Some(slots),
        })
    }
}

/// A client error as text (the crate never prints the URL; detail and code kept).
pub fn text(e: &redis::RedisError) -> String {
    let s = e.to_string();
    if e.is_connection_refusal() {
        format!("{s} (is the server running?)")
    } else {
        s
    }
}

/// The slot of a key: CRC16 (XMODEM) of the key, or of its `{hash tag}`, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let tag = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|s| {
            key[s + 1..]
                .iter()
                .position(|&b| b == b'}')
                .filter(|&e| e > 0)
                .map(|e| &key[s + 1..s + 1 + e])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in tag {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_redis() {
        // Values from the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(slot(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }
}
