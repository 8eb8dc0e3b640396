//! Network namespaces for suites that need two hosts' worth of network on one machine without
//! a cluster (the SMB share suite): `podmigrate-<tag>-<node>` namespaces, each joined to the
//! host by a veth pair in its own `10.213.X.0/30` (`.1` on the host side, `.2` as `eth0`
//! inside). Nothing else is routed. Deleted on drop.
//!
//! The Kubernetes suites do not use these: their nodes are scripts/local-up-cluster.sh's
//! ([`crate::cluster`]).

use std::collections::BTreeSet;
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::containerd::{find_in_path, run_bounded};

/// Prefix of every namespace made here.
pub const NETNS_PREFIX: &str = "podmigrate-";

/// Why namespaces cannot be made here, if they cannot: no `ip` (iproute2).
pub fn skip_reason() -> Option<String> {
    find_in_path("ip")
        .is_none()
        .then(|| "`ip` not found (scripts/setup.sh installs iproute2)".to_owned())
}

/// Runs `ip <args>`, bounded; fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = run_bounded(Command::new("ip").args(args), Duration::from_secs(15))?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Third octets of `10.213.X.0/30` subnets handed out by this process.
static SUBNETS: Mutex<BTreeSet<u8>> = Mutex::new(BTreeSet::new());

/// A `10.213.X.0/30` nobody on this machine uses: not handed out here, and no interface has an
/// address in `10.213.X.0/24`.
fn allocate_subnet() -> Result<u8> {
    let out = run_bounded(
        Command::new("ip").args(["-4", "-o", "addr", "show"]),
        Duration::from_secs(15),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let used: BTreeSet<u8> = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("10.213."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    let mut taken = SUBNETS.lock().unwrap_or_else(|e| e.into_inner());
    let x = (1..=254u8)
        .find(|x| !taken.contains(x) && !used.contains(x))
        .context("no free 10.213.X.0/30 subnet")?;
    taken.insert(x);
    Ok(x)
}

/// A short tag unique on this machine for this process's namespaces and links.
pub fn unique_tag() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tag = format!(
            "{:05x}",
            (std::process::id().wrapping_mul(2_654_435_761) ^ nanos ^ n) & 0xfffff
        );
        let taken = fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(&tag));
        if !taken && !Path::new(&format!("/sys/class/net/pm{tag}0")).exists() {
            return tag;
        }
    }
}

/// A node's network namespace and its veth pair; deleted on drop.
pub struct NetNs {
    pub name: String,
    /// The veth end on the host side.
    pub host_link: String,
    pub host_ip: Ipv4Addr,
    /// The node's IP (`eth0` inside the namespace).
    pub node_ip: Ipv4Addr,
    subnet: u8,
    deleted: bool,
}

impl NetNs {
    /// `ip netns add <name>`, a veth pair `<host_link>` ↔ `eth0` in a fresh `10.213.X.0/30`.
    pub fn create(name: &str, host_link: &str) -> Result<NetNs> {
        ensure!(host_link.len() <= 15, "link name {host_link} is too long");
        let subnet = allocate_subnet()?;
        let host_ip = Ipv4Addr::new(10, 213, subnet, 1);
        let node_ip = Ipv4Addr::new(10, 213, subnet, 2);
        ip(&["netns", "add", name])?;
        let mut ns = NetNs {
            name: name.to_owned(),
            host_link: host_link.to_owned(),
            host_ip,
            node_ip,
            subnet,
            deleted: false,
        };
        let peer = format!("{host_link}p");
        let result = (|| {
            ip(&[
                "link", "add", host_link, "type", "veth", "peer", "name", &peer,
            ])?;
            ip(&["link", "set", &peer, "netns", name])?;
            ip(&["-n", name, "link", "set", &peer, "name", "eth0"])?;
            ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("{node_ip}/30"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", name, "link", "set", "eth0", "up"])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
            ip(&["addr", "add", &format!("{host_ip}/30"), "dev", host_link])?;
            ip(&["link", "set", host_link, "up"])
        })();
        if let Err(e) = result {
            ns.delete();
            return Err(e);
        }
        Ok(ns)
    }

    /// Deletes the namespace and the host-side link (idempotent).
    pub fn delete(&mut self) {
        if self.deleted {
            return;
        }
        self.deleted = true;
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("netns cleanup: {e:#}");
        }
        // Usually gone with its peer's namespace already.
        if Path::new("/sys/class/net").join(&self.host_link).exists() {
            let _ = ip(&["link", "del", &self.host_link]);
        }
        SUBNETS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.subnet);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.delete();
    }
}
