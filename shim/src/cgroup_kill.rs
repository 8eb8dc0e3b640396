//! SIGKILL for a container's processes, found by their cgroup rather than through the runc
//! shim.
//!
//! A post-copy clone whose memory can no longer arrive must die before anything else runs in
//! it. The runc shim cannot always do that in time: while `runc restore` runs, its Start holds
//! the process lock that Kill waits for, and a lazy restore may not finish until a page is
//! served (a restored task blocks in its page fault, and CRIU waits for the task). Killing the
//! tasks directly ends that: CRIU sees them die, the restore fails, and the runc shim is free.
//!
//! A container's processes are those whose cgroup path (any hierarchy, cgroup v1 or v2, the
//! cgroupfs or the systemd driver) names its id; the id is 64 hex digits, so no other
//! container's path contains it.

use std::fs;

use tracing::warn;

/// Sends SIGKILL to every process in container `id`'s cgroup; returns how many were signalled.
pub fn kill_container_processes(id: &str) -> usize {
    if id.len() < 12
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        warn!(
            id,
            "not killing by cgroup: the container id is too short or not a plain name"
        );
        return 0;
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    let own = std::process::id();
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(cgroups) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        if in_container(&cgroups, id) {
            // SAFETY: kill(2) with a pid and a signal number; no memory is shared.
            if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    killed
}

/// Whether a `/proc/<pid>/cgroup` text puts the process in a cgroup of container `id`: a path
/// component that is the id, or ends with it (`cri-containerd-<id>.scope`).
fn in_container(cgroups: &str, id: &str) -> bool {
    cgroups.lines().any(|line| {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        path.split('/')
            .any(|part| part == id || part.strip_suffix(".scope").is_some_and(|p| p.ends_with(id)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "340f768a8f6f14aa97533af10eff834efd01c22277bddc0cdb1fe536d77646da";

    #[test]
    fn a_container_is_found_in_cgroupfs_and_systemd_paths_of_v1_and_v2() {
        let v1 = format!("9:name=systemd:/node-b/kubepods/besteffort/pod28ff/{ID}\n8:pids:/node-b/kubepods/besteffort/pod28ff/{ID}\n0::/node-b/kubepods/besteffort/pod28ff/{ID}\n");
        assert!(in_container(&v1, ID));
        let systemd =
            format!("0::/kubepods.slice/kubepods-pod28ff.slice/cri-containerd-{ID}.scope\n");
        assert!(in_container(&systemd, ID));
    }

    #[test]
    fn the_sandbox_a_prefix_and_other_containers_are_not() {
        let sandbox = "0::/node-b/kubepods/besteffort/pod28ff/aaaa\n";
        assert!(!in_container(sandbox, ID));
        let pod_only = "0::/node-b/kubepods/besteffort/pod28ff\n";
        assert!(!in_container(pod_only, ID));
        // A longer id that merely starts with this one.
        let longer = format!("0::/pod28ff/{ID}0\n");
        assert!(!in_container(&longer, ID));
    }

    #[test]
    fn an_id_that_is_no_plain_name_kills_nothing() {
        assert_eq!(kill_container_processes(""), 0);
        assert_eq!(kill_container_processes("../../x"), 0);
    }
}
