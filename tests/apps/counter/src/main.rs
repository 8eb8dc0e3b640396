//! `counter`: the workload podmigrate's end-to-end tests and benchmarks migrate.
//!
//! A single-threaded HTTP/1.1 server on std's `TcpListener` (no async runtime), built as a static
//! binary so it runs in a bare busybox rootfs:
//!
//! * `GET /` increments the counter, writes it to the count file (plain truncate-write, so a
//!   rootfs change lost in a migration shows) and answers the new value, e.g. `6\n`;
//! * `GET /healthz` answers `ok\n` without incrementing;
//! * `GET /checksum` answers a 64-bit hash of the ballast (see below) in hex, so a test can check
//!   that a restored process's memory is byte-identical to the dumped one;
//! * `GET /exit` answers `bye\n`, then exits 0 (an Indexed Job's pod completes so);
//! * anything else: 404 (400 for a request that is not HTTP).
//!
//! With `-k` ("keep") it also holds what a checkpoint must carry or close, as real servers do:
//!
//! * an established TCP connection over the loopback, both ends its own; `GET /loopback` sends a
//!   byte through it and answers `<client port> <server port> <bytes so far>`, so a test sees
//!   the same connection carry on after a migration;
//! * an exclusive `flock` on `<count file>.lock`; `GET /lock` answers `held` when a second
//!   open file description cannot take it, `free` otherwise;
//! * every connection that asks `GET /hold`: answered `held`, then kept open, never read again,
//!   as a client's long-lived connection to the pod would be.
//!
//! Every response carries `Connection: close` and the server closes its side (but for `/hold`,
//! below): connections are short, so a checkpoint taken between requests holds only the
//! listening socket.
//!
//! With `-m <MiB>` it first allocates that much *ballast* and fills it: the first 30% with xorshift
//! pseudo-random bytes (incompressible), the other 70% with repeating English text (highly
//! compressible), writing every page so all of it is resident, and keeps it alive until exit. The
//! count file is written (`0`) only once the ballast is resident and the port is bound, so its
//! appearance means "ready". SIGTERM and SIGINT exit at once (as a container's PID 1 it would
//! otherwise ignore them).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

const USAGE: &str =
    "usage: counter [-m <MiB>] [-p <port, default 8080>] [-f <file, default /tmp/count>] [-k]";

/// Share of the ballast filled with pseudo-random bytes, in percent; the rest is text.
const RANDOM_PERCENT: usize = 30;
/// The xorshift64 seed (Marsaglia's); fixed, so every run's ballast is identical.
const SEED: u64 = 88_172_645_463_325_252;
/// The text repeated over the compressible part of the ballast.
const TEXT: &[u8] = b"It was the best of times, it was the worst of times, it was the age of wisdom, \
it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was \
the season of Light, it was the season of Darkness, it was the spring of hope, it was the winter of \
despair. The quick brown fox jumps over the lazy dog while the pods migrate between the nodes.\n";

/// Largest request head read; a longer one is answered 400.
const MAX_HEAD: usize = 8192;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes to stderr, never panicking (stderr may be closed or a broken pipe in a container).
macro_rules! log {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), "counter: {}", format_args!($($arg)*));
    }};
}

#[derive(Debug, PartialEq, Eq)]
struct Config {
    mib: usize,
    port: u16,
    file: PathBuf,
    keep: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mib: 0,
            port: 8080,
            file: PathBuf::from("/tmp/count"),
            keep: false,
        }
    }
}

/// `Ok(None)` means help was asked for.
fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Option<Config>, String> {
    let mut cfg = Config::default();
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "-m" => {
                let v = value()?;
                cfg.mib = v
                    .parse()
                    .map_err(|_| format!("-m: not a number of MiB: {v:?}"))?;
                cfg.mib
                    .checked_mul(1 << 20)
                    .ok_or_else(|| format!("-m: {v} MiB is too large"))?;
            }
            "-p" => {
                let v = value()?;
                cfg.port = v.parse().map_err(|_| format!("-p: not a port: {v:?}"))?;
            }
            "-f" => {
                let v = value()?;
                if v.is_empty() {
                    return Err("-f: empty path".into());
                }
                cfg.file = PathBuf::from(v);
            }
            "-k" => cfg.keep = true,
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Some(cfg))
}

/// Bytes of a `len`-byte ballast that are pseudo-random (the rest is text).
fn random_len(len: usize) -> usize {
    (len as u128 * RANDOM_PERCENT as u128 / 100) as usize
}

fn fill_random(buf: &mut [u8], mut x: u64) {
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&next().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let n = rest.len();
    rest.copy_from_slice(&next().to_le_bytes()[..n]);
}

fn fill_text(buf: &mut [u8]) {
    for chunk in buf.chunks_mut(TEXT.len()) {
        chunk.copy_from_slice(&TEXT[..chunk.len()]);
    }
}

/// Fills all of `buf` (so every page is touched): random first, then text.
fn fill(buf: &mut [u8]) {
    let (random, text) = buf.split_at_mut(random_len(buf.len()));
    fill_random(random, SEED);
    fill_text(text);
}

fn ballast(mib: usize) -> Vec<u8> {
    // vec! of zeros maps the pages lazily; fill() then writes every one of them.
    let mut buf = vec![0u8; mib << 20];
    fill(&mut buf);
    buf
}

/// A fast 64-bit hash (FNV-style over 8-byte words, then the tail and the length).
fn checksum(buf: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut chunks = buf.chunks_exact(8);
    for c in &mut chunks {
        h = (h ^ u64::from_le_bytes(c.try_into().unwrap())).wrapping_mul(PRIME);
    }
    for &b in chunks.remainder() {
        h = (h ^ b as u64).wrapping_mul(PRIME);
    }
    (h ^ buf.len() as u64).wrapping_mul(PRIME)
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Count,
    Health,
    Checksum,
    Loopback,
    Lock,
    Hold,
    Exit,
    NotFound,
    BadRequest,
}

/// Routes on the request line of `head` (the bytes read so far; only the first line matters).
fn route(head: &[u8]) -> Route {
    let Some(end) = head.iter().position(|&b| b == b'\n') else {
        return Route::BadRequest;
    };
    let Ok(line) = std::str::from_utf8(&head[..end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if method.is_empty() || !version.starts_with("HTTP/") || target.is_empty() {
        return Route::BadRequest;
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    match (method, path) {
        ("GET", "/") => Route::Count,
        ("GET", "/healthz") => Route::Health,
        ("GET", "/checksum") => Route::Checksum,
        ("GET", "/loopback") => Route::Loopback,
        ("GET", "/lock") => Route::Lock,
        ("GET", "/hold") => Route::Hold,
        ("GET", "/exit") => Route::Exit,
        _ => Route::NotFound,
    }
}

/// Index just past the blank line ending an HTTP head, if `buf` holds one.
fn head_end(buf: &[u8]) -> Option<usize> {
    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        return Some(i + 4);
    }
    buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}

fn response(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// What `-k` holds (see the module's documentation).
struct Kept {
    /// The two ends of one loopback connection.
    client: TcpStream,
    server: TcpStream,
    /// Bytes sent through it so far.
    sent: u64,
    /// The open file description holding the lock, and the file's path.
    _lock: std::fs::File,
    lock_path: PathBuf,
    /// Connections that asked to be held.
    held: Vec<TcpStream>,
}

impl Kept {
    fn new(count_file: &std::path::Path) -> std::io::Result<Kept> {
        use std::os::fd::AsRawFd;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        for s in [&client, &server] {
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
        }
        let mut lock_path = count_file.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let lock = std::fs::File::create(&lock_path)?;
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Kept {
            client,
            server,
            sent: 0,
            _lock: lock,
            lock_path,
            held: Vec::new(),
        })
    }

    /// One byte through the loopback connection, and back.
    fn loopback(&mut self) -> std::io::Result<String> {
        let byte = [(self.sent % 251) as u8];
        self.client.write_all(&byte)?;
        let mut got = [0u8; 1];
        self.server.read_exact(&mut got)?;
        self.server.write_all(&got)?;
        self.client.read_exact(&mut got)?;
        if got != byte {
            return Err(std::io::Error::other(format!(
                "sent {} and got {} back",
                byte[0], got[0]
            )));
        }
        self.sent += 1;
        Ok(format!(
            "{} {} {}\n",
            self.client.local_addr()?.port(),
            self.server.local_addr()?.port(),
            self.sent
        ))
    }

    /// Whether the lock is held: a second open file description cannot take it.
    fn lock(&self) -> std::io::Result<&'static str> {
        use std::os::fd::AsRawFd;
        let other = std::fs::File::open(&self.lock_path)?;
        if unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok("free\n");
        }
        match std::io::Error::last_os_error() {
            e if e.kind() == std::io::ErrorKind::WouldBlock => Ok("held\n"),
            e => Err(e),
        }
    }
}

struct Server {
    count: u64,
    file: PathBuf,
    ballast: Vec<u8>,
    kept: Option<Kept>,
}

impl Server {
    /// The response to a request whose head is `head`, applying its effect.
    fn handle(&mut self, head: &[u8]) -> String {
        match route(head) {
            Route::Count => {
                self.count += 1;
                self.write_count();
                response("200 OK", &format!("{}\n", self.count))
            }
            Route::Health => response("200 OK", "ok\n"),
            Route::Checksum => response("200 OK", &format!("{:016x}\n", checksum(&self.ballast))),
            Route::Loopback => self.with_kept(Kept::loopback),
            Route::Lock => self.with_kept(|kept| kept.lock().map(String::from)),
            Route::Hold => self.with_kept(|_| Ok("held\n".to_string())),
            Route::Exit => response("200 OK", "bye\n"),
            Route::NotFound => response("404 Not Found", "not found\n"),
            Route::BadRequest => response("400 Bad Request", "bad request\n"),
        }
    }

    /// The answer of `ask` on what `-k` holds: 409 without `-k`, 500 when it fails.
    fn with_kept(&mut self, ask: impl FnOnce(&mut Kept) -> std::io::Result<String>) -> String {
        let Some(kept) = self.kept.as_mut() else {
            return response("409 Conflict", "nothing kept: start with -k\n");
        };
        match ask(kept) {
            Ok(body) => response("200 OK", &body),
            Err(e) => response("500 Internal Server Error", &format!("{e}\n")),
        }
    }

    fn write_count(&self) {
        if let Err(e) = std::fs::write(&self.file, format!("{}\n", self.count)) {
            log!("writing {}: {e}", self.file.display());
        }
    }

    fn serve(&mut self, mut stream: TcpStream) -> std::io::Result<()> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        // Read the whole head (not just the request line): closing with unread data would reset
        // the connection and could destroy the response before the client reads it.
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        let reply = loop {
            if head_end(&buf).is_some() {
                break self.handle(&buf);
            }
            if buf.len() >= MAX_HEAD {
                break response("400 Bad Request", "request head too large\n");
            }
            match stream.read(&mut chunk) {
                Ok(0) if buf.is_empty() => return Ok(()),
                // A client that closed its write side after the request line.
                Ok(0) => break self.handle(&buf),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        stream.write_all(reply.as_bytes())?;
        stream.flush()?;
        if let (Route::Hold, Some(kept)) = (route(&buf), self.kept.as_mut()) {
            kept.held.push(stream);
            return Ok(());
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        if route(&buf) == Route::Exit {
            log!("asked to exit");
            std::process::exit(0);
        }
        Ok(())
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    // Only async-signal-safe calls here.
    unsafe { libc::_exit(0) }
}

fn main() {
    let cfg = match parse_args(std::env::args().skip(1)) {
        Ok(Some(cfg)) => cfg,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            log!("{e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }

    let started = std::time::Instant::now();
    let ballast = ballast(cfg.mib);
    // The ballast must stay allocated and written: make it opaque to the optimiser.
    std::hint::black_box(&ballast);
    let listener = match TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.port))) {
        Ok(l) => l,
        Err(e) => {
            log!("binding 0.0.0.0:{}: {e}", cfg.port);
            std::process::exit(1);
        }
    };
    let kept = match cfg.keep.then(|| Kept::new(&cfg.file)).transpose() {
        Ok(kept) => kept,
        Err(e) => {
            log!("-k: holding a loopback connection and a lock: {e}");
            std::process::exit(1);
        }
    };
    let mut server = Server {
        count: 0,
        file: cfg.file,
        ballast,
        kept,
    };
    server.write_count();
    log!(
        "ready in {:.2}s: {} MiB ballast resident, listening on 0.0.0.0:{}, count file {}",
        started.elapsed().as_secs_f64(),
        cfg.mib,
        cfg.port,
        server.file.display()
    );

    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = server.serve(stream) {
                    log!("connection: {e}");
                }
            }
            // EINTR (e.g. around a CRIU restore) and ECONNABORTED are harmless.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                log!("accept: {e}");
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn args_defaults_and_flags() {
        assert_eq!(parse_args(args("")), Ok(Some(Config::default())));
        assert_eq!(
            parse_args(args("-m 64 -p 9000 -f /data/c")),
            Ok(Some(Config {
                mib: 64,
                port: 9000,
                file: PathBuf::from("/data/c"),
                keep: false,
            }))
        );
        assert!(parse_args(args("-k")).unwrap().unwrap().keep);
        assert_eq!(parse_args(args("-h")), Ok(None));
        assert!(parse_args(args("-m")).is_err());
        assert!(parse_args(args("-m lots")).is_err());
        assert!(parse_args(args("-p 70000")).is_err());
        assert!(parse_args(args("-x")).is_err());
        assert!(parse_args(vec!["-f".into(), String::new()]).is_err());
        assert!(parse_args(args(&format!("-m {}", usize::MAX))).is_err());
    }

    #[test]
    fn routes() {
        assert_eq!(route(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Route::Count);
        assert_eq!(route(b"GET /?n=1 HTTP/1.0\r\n\r\n"), Route::Count);
        assert_eq!(route(b"GET / HTTP/1.1\n\n"), Route::Count);
        assert_eq!(route(b"GET /healthz HTTP/1.1\r\n\r\n"), Route::Health);
        assert_eq!(route(b"GET /checksum HTTP/1.1\r\n\r\n"), Route::Checksum);
        assert_eq!(route(b"GET /exit HTTP/1.1\r\n\r\n"), Route::Exit);
        assert_eq!(route(b"POST /exit HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /other HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /healthz/ HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET / HTTP/1.1"), Route::BadRequest); // no line end yet
        assert_eq!(route(b"GET /\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET  / HTTP/1.1\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET / FTP/1\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\xff\xfe / HTTP/1.1\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\r\n\r\n"), Route::BadRequest);
    }

    #[test]
    fn head_end_finds_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn count_increments_and_writes_file() {
        let dir = std::env::temp_dir().join(format!("counter-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("count");
        let mut s = Server {
            count: 5,
            file: file.clone(),
            ballast: Vec::new(),
            kept: None,
        };
        let r = s.handle(b"GET / HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain\r\n"));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\n6\n"), "{r}");
        assert!(r.contains("Content-Length: 2\r\n"));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "6\n");
        // Health does not count, nor does the answer to /exit (`serve` exits after sending
        // it), nor a 404.
        assert!(s
            .handle(b"GET /healthz HTTP/1.1\r\n\r\n")
            .ends_with("\r\n\r\nok\n"));
        assert!(s
            .handle(b"GET /exit HTTP/1.1\r\n\r\n")
            .ends_with("\r\n\r\nbye\n"));
        assert!(s
            .handle(b"GET /nope HTTP/1.1\r\n\r\n")
            .starts_with("HTTP/1.1 404 "));
        assert_eq!(s.count, 6);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "6\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn keeps_a_loopback_connection_and_a_lock() {
        let dir = std::env::temp_dir().join(format!("counter-kept-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Server {
            count: 0,
            file: dir.join("count"),
            ballast: Vec::new(),
            kept: Some(Kept::new(&dir.join("count")).unwrap()),
        };
        let first = s.handle(b"GET /loopback HTTP/1.1\r\n\r\n");
        let second = s.handle(b"GET /loopback HTTP/1.1\r\n\r\n");
        let body = |r: &str| r.rsplit("\r\n\r\n").next().unwrap().to_string();
        let (a, b) = (body(&first), body(&second));
        assert!(a.ends_with(" 1\n") && b.ends_with(" 2\n"), "{a}{b}");
        assert_eq!(a.rsplit_once(' ').unwrap().0, b.rsplit_once(' ').unwrap().0);
        assert!(s
            .handle(b"GET /lock HTTP/1.1\r\n\r\n")
            .ends_with("\r\n\r\nheld\n"));
        s.kept = None;
        assert!(s
            .handle(b"GET /lock HTTP/1.1\r\n\r\n")
            .starts_with("HTTP/1.1 409 "));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn fill_ratio_is_30_percent_random_then_text() {
        let len = (1 << 20) + 13; // not a multiple of 8 nor of the text length
        let mut buf = vec![0u8; len];
        fill(&mut buf);
        let r = random_len(len);
        assert_eq!(r, len * 3 / 10);
        // The text part is exactly the repeated text.
        for (i, &b) in buf[r..].iter().enumerate() {
            assert_eq!(b, TEXT[i % TEXT.len()], "text byte {i}");
        }
        // The random part has no long run of the text and a roughly uniform byte histogram.
        let random = &buf[..r];
        assert!(!random.windows(16).any(|w| w == &TEXT[..16]));
        let mut hist = [0usize; 256];
        random.iter().for_each(|&b| hist[b as usize] += 1);
        let expected = r / 256;
        assert!(
            hist.iter()
                .all(|&n| n > expected * 9 / 10 && n < expected * 11 / 10),
            "{hist:?}"
        );
        // Every page was written (no zero page left).
        assert!(buf.chunks(4096).all(|p| p.iter().any(|&b| b != 0)));
    }

    #[test]
    fn fill_is_deterministic_and_ballast_sized() {
        let b = ballast(1);
        assert_eq!(b.len(), 1 << 20);
        assert_eq!(checksum(&b), checksum(&ballast(1)));
        let mut other = b.clone();
        other[12345] ^= 1;
        assert_ne!(checksum(&b), checksum(&other));
        assert!(ballast(0).is_empty());
    }

    #[test]
    fn serves_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let file = std::env::temp_dir().join(format!("counter-tcp-{}", std::process::id()));
        let client = std::thread::spawn(move || {
            let get = |path: &str| {
                let mut c = TcpStream::connect(addr).unwrap();
                write!(c, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
                let mut out = String::new();
                c.read_to_string(&mut out).unwrap();
                out
            };
            (get("/"), get("/"), get("/healthz"))
        });
        let mut s = Server {
            count: 0,
            file: file.clone(),
            ballast: vec![1, 2, 3],
            kept: None,
        };
        for _ in 0..3 {
            let (stream, _) = listener.accept().unwrap();
            s.serve(stream).unwrap();
        }
        let (a, b, h) = client.join().unwrap();
        assert!(a.ends_with("\r\n\r\n1\n"), "{a}");
        assert!(b.ends_with("\r\n\r\n2\n"), "{b}");
        assert!(h.ends_with("\r\n\r\nok\n"), "{h}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "2\n");
        std::fs::remove_file(file).unwrap();
    }
}
