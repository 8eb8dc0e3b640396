//! The test app `counter` (tests/apps/counter): a container of it, and its HTTP side (`GET /`
//! answers the next count, `GET /healthz` answers `ok`, `GET /checksum` the ballast's hash,
//! `GET /exit` ends it with status 0, and with `-k` `GET /loopback`, `GET /lock` and
//! `GET /hold` show what it holds).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A container of a counter pod.
#[derive(Debug, Clone)]
pub struct Counter {
    pub name: String,
    pub port: u16,
    /// Its count file inside the container.
    pub file: String,
    /// `-m` ballast in MiB.
    pub ballast_mib: Option<u32>,
    /// `-k`: hold a loopback connection, a file lock and the connections that ask to be held.
    pub keep: bool,
}

impl Counter {
    pub fn new(name: &str, port: u16, file: &str) -> Counter {
        Counter {
            name: name.to_owned(),
            port,
            file: file.to_owned(),
            ballast_mib: None,
            keep: false,
        }
    }

    pub fn keep(mut self) -> Counter {
        self.keep = true;
        self
    }

    pub fn ballast(mut self, mib: u32) -> Counter {
        self.ballast_mib = Some(mib);
        self
    }

    /// The counter's command-line arguments: port, count file, and ballast if any.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "-p".to_owned(),
            self.port.to_string(),
            "-f".to_owned(),
            self.file.clone(),
        ];
        if let Some(mib) = self.ballast_mib {
            args.extend(["-m".to_owned(), mib.to_string()]);
        }
        if self.keep {
            args.push("-k".to_owned());
        }
        args
    }
}

/// `GET <path>` on `addr` (one request per connection, as the counter answers); the body of a
/// 200 answer. Bounded to 5 s.
pub async fn http_get_addr(addr: SocketAddr, path: &str) -> Result<String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        let reply = String::from_utf8_lossy(&reply).into_owned();
        let (head, body) = reply
            .split_once("\r\n\r\n")
            .with_context(|| format!("no HTTP head in {reply:?}"))?;
        ensure!(
            head.starts_with("HTTP/1.1 200"),
            "GET {path} on {addr}: {head}"
        );
        Ok(body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("GET {path} on {addr}: no answer within 5s"))?
}

/// `GET /hold` on a counter started with `-k`: the connection, answered and kept open by the
/// counter, as a long-lived client's would be.
pub async fn hold_connection(addr: SocketAddr) -> Result<tokio::net::TcpStream> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream
            .write_all(format!("GET /hold HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut reply = Vec::new();
        let mut chunk = [0u8; 512];
        while !reply.ends_with(b"\r\n\r\nheld\n") {
            let n = stream.read(&mut chunk).await?;
            ensure!(n > 0, "GET /hold on {addr}: closed after {reply:?}");
            reply.extend_from_slice(&chunk[..n]);
        }
        Ok(stream)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("GET /hold on {addr}: no answer within 5s"))?
}

/// `GET /` on a counter: its new count.
pub async fn counter_hit(ip: Ipv4Addr, port: u16) -> Result<u64> {
    let body = http_get_addr((ip, port).into(), "/").await?;
    body.trim()
        .parse()
        .with_context(|| format!("the counter on {ip}:{port} answered {body:?}"))
}

/// Polls `GET /healthz` until the counter answers `ok`.
pub async fn wait_counter_ready(ip: Ipv4Addr, port: u16, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let last = match http_get_addr((ip, port).into(), "/healthz").await {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            Ok(body) => format!("answered {body:?}"),
            Err(e) => format!("{e:#}"),
        };
        if started.elapsed() >= timeout {
            bail!("counter on {ip}:{port} not ready after {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
