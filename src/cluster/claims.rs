//! Write claims: each cluster write task asks the client, before it writes, whether its
//! partition of that job was handed out before.
//!
//! Ballista runs a task again when its executor is lost, under a new task id, so a task
//! cannot tell by itself that it is a second attempt. For a scan or an aggregate that is
//! harmless; for a sink it is not: the lost attempt may have delivered part of its rows, and
//! only the lost executor's journal knows which. So `flumen run --cluster` listens on a port of
//! its own (on the address it uses to reach the scheduler), and a write task claims
//! `(job, table, partition)` there first. The first claim is granted; any later one is refused,
//! and the task fails saying why instead of delivering rows a second time.
//!
//! The protocol is one line each way over TCP: `claim\t<job>\t<table>\t<partition>\n`, answered
//! `first\n` or `again\n`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Starts the claim service of this client on the address it reaches `scheduler` (`host:port`)
/// from, and returns that address. None without a Tokio runtime or a free port.
pub fn serve(scheduler: &str) -> Option<SocketAddr> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let ip = local_ip_towards(scheduler).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let std_listener = std::net::TcpListener::bind((ip, 0)).ok()?;
    std_listener.set_nonblocking(true).ok()?;
    let addr = std_listener.local_addr().ok()?;
    let claimed: Arc<Mutex<HashSet<String>>> = Arc::default();
    handle.spawn(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
            return;
        };
        while let Ok((socket, _)) = listener.accept().await {
            let claimed = Arc::clone(&claimed);
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut line = String::new();
                if BufReader::new(read).read_line(&mut line).await.is_err() {
                    return;
                }
                let key = line.trim_end().to_string();
                let first = key.starts_with("claim\t") && claimed.lock().is_ok_and(|mut c| c.insert(key));
                let _ = write.write_all(if first { b"first\n" } else { b"again\n" }).await;
            });
        }
    });
    Some(addr)
}

/// The local address of the interface that routes to `scheduler` (`host:port`).
fn local_ip_towards(scheduler: &str) -> Option<IpAddr> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect(scheduler).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// Claims the write of `partition` of `table` in `job` at the client's claim service `addr`:
/// Ok(true) for the first claim, Ok(false) when it was claimed before.
pub async fn claim(addr: &str, job: &str, table: &str, partition: usize) -> std::io::Result<bool> {
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    let line = format!(
        "claim\t{job}\t{}\t{partition}\n",
        table.replace(['\t', '\n'], " ")
    );
    socket.write_all(line.as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new(socket).read_line(&mut answer).await?;
    match answer.trim_end() {
        "first" => Ok(true),
        "again" => Ok(false),
        other => Err(std::io::Error::other(format!("unexpected answer '{other}'"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_partition_is_granted_once() {
        let addr = serve("127.0.0.1:9").expect("a claim service").to_string();
        assert!(claim(&addr, "job1", "agg", 0).await.unwrap());
        assert!(claim(&addr, "job1", "agg", 1).await.unwrap());
        assert!(
            !claim(&addr, "job1", "agg", 0).await.unwrap(),
            "a second claim is refused"
        );
        assert!(
            claim(&addr, "job2", "agg", 0).await.unwrap(),
            "another job is another write"
        );
    }
}
