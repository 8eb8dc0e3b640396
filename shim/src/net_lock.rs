//! CRIU's network lock, left behind by a CRIU that died mid-dump.
//!
//! To dump a task's connections, CRIU drops every packet in its network namespace but its own
//! (iptables: a `CRIU` chain jumped to from INPUT and OUTPUT; nftables: a table `inet CRIU-<pid>`)
//! and removes the lock when it ends. A CRIU that is killed (OOM, SIGKILL, a node under
//! pressure) never removes it: the container is thawed and runs on, but no packet reaches it
//! (a pod on the real cluster stopped answering, tests/tests/kube_faults.rs). After a failed
//! dump the shim removes such a lock, as CRIU's own unlock does.

use std::io::Write;
use std::process::{Command, Stdio};

use tracing::{info, warn};

/// What CRIU's `iptables_network_unlock` feeds `iptables-restore --noflush`.
pub const IPTABLES_UNLOCK: &str =
    "*filter\n:CRIU - [0:0]\n-D INPUT -j CRIU\n-D OUTPUT -j CRIU\n-X CRIU\nCOMMIT\n";

fn in_netns(pid: u32, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["--", program])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Removes a CRIU network lock from the network namespace of process `pid`, if there is one;
/// returns what it removed (logged by the caller).
pub fn unlock(pid: u32) -> Vec<String> {
    let mut removed = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        let locked = in_netns(pid, tool)
            .args(["-w", "-n", "-L", "CRIU"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !locked {
            continue;
        }
        let restore = format!("{tool}-restore");
        let done = in_netns(pid, &restore)
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(IPTABLES_UNLOCK.as_bytes())?;
                }
                child.wait_with_output()
            });
        match done {
            Ok(o) if o.status.success() => removed.push(format!("{tool} chain CRIU")),
            Ok(o) => {
                warn!(pid, tool, error = %String::from_utf8_lossy(&o.stderr).trim(), "removing CRIU's network lock")
            }
            Err(e) => warn!(pid, tool, error = %e, "removing CRIU's network lock"),
        }
    }
    if let Ok(out) = in_netns(pid, "nft").args(["list", "tables"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(table) = nft_lock_table(line) {
                let ok = in_netns(pid, "nft")
                    .args(["delete", "table", "inet", table])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok {
                    removed.push(format!("nft table inet {table}"));
                }
            }
        }
    }
    if !removed.is_empty() {
        info!(pid, removed = ?removed, "removed the network lock of a CRIU that died");
    }
    removed
}

/// `table inet CRIU-123` -> `CRIU-123`: the tables CRIU's nftables lock makes.
fn nft_lock_table(line: &str) -> Option<&str> {
    let name = line.trim().strip_prefix("table inet ")?;
    (name.starts_with("CRIU-") && name[5..].bytes().all(|b| b.is_ascii_digit()) && name.len() > 5)
        .then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_criu_lock_tables_are_recognised() {
        assert_eq!(nft_lock_table("table inet CRIU-4242"), Some("CRIU-4242"));
        assert_eq!(nft_lock_table("table inet CRIU-"), None);
        assert_eq!(nft_lock_table("table inet filter"), None);
        assert_eq!(nft_lock_table("table ip CRIU-1"), None);
        assert!(IPTABLES_UNLOCK.contains("-X CRIU"));
    }
}
