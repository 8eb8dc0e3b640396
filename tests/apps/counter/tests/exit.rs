//! The counter binary itself: `GET /exit` answers `bye`, then the process exits 0 (how an
//! Indexed Job's counter pod completes).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `GET <path>` on 127.0.0.1:`port`: the whole reply.
fn get(port: u16, path: &str) -> std::io::Result<String> {
    let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(c, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn get_exit_answers_bye_then_exits_zero() {
    let dir = std::env::temp_dir().join(format!("counter-exit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("count");
    // A port free a moment ago.
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_counter"))
        .args(["-p", &port.to_string(), "-f"])
        .arg(&file)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // The count file appears once the port is bound.
    let started = Instant::now();
    while !file.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the counter never got ready"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the counter ended before it was ready: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(get(port, "/").unwrap().ends_with("\r\n\r\n1\n"));
    let bye = get(port, "/exit").unwrap();
    assert!(bye.starts_with("HTTP/1.1 200 OK\r\n"), "{bye}");
    assert!(bye.ends_with("\r\n\r\nbye\n"), "{bye}");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("the counter did not exit after GET /exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    std::fs::remove_dir_all(dir).unwrap();
}
