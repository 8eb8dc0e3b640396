//! The credentials CRIU would restore, checked against the clone's OCI spec.
//!
//! CRIU restores each task's uids, gids, supplementary groups and capability sets from its
//! `core-<tid>.img` images, whatever the clone's spec says. A forged (unsealed) archive could
//! therefore hand a clone a process with more privilege than its pod may have. Before a restore,
//! every task's credentials are read from the images (CRIU's format: magics, then a length-prefixed
//! protobuf `core_entry`, decoded with the subset in `proto/criu/core.proto`) and compared with
//! what a process of the clone's spec could legitimately hold:
//!
//! * **capabilities**: every set (bounding, permitted, effective, inheritable, ambient) within
//!   the spec's bounding set, which no process of the container can leave; with
//!   `noNewPrivileges` also permitted, effective and ambient within the spec's permitted set (no
//!   exec can add to them then);
//! * **uids** (real, effective, saved, fs): the spec's `process.user.uid`, unless the process
//!   could reach `CAP_SETUID` (in the spec's permitted set, or with privileges possible through
//!   exec, in its bounding set): a process holding it may take any uid;
//! * **gids** (real, effective, saved, fs) and supplementary groups: the spec's `gid` and
//!   `additionalGids`, unless it could reach `CAP_SETGID` likewise.
//!
//! Seccomp and LSM state are not compared (runc applies the clone's own seccomp profile on
//! restore; CRIU's images carry the source's, from the same pod spec).

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use podmigrate_proto::criu::{CoreEntry, CredsEntry};
use prost::Message;

/// `IMG_COMMON_MAGIC`, at the head of every CRIU image but the inventory (criu/include/magic.h).
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// `IMG_SERVICE_MAGIC`, at the head of service files.
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// `CORE_MAGIC`: a `core-<tid>.img`.
const CORE_MAGIC: u32 = 0x5505_3847;
/// A core entry is a few KiB; a bigger one is hostile.
const MAX_CORE_ENTRY: usize = 1 << 20;
/// A core image holds one entry; more than this many images is hostile.
const MAX_TASKS: usize = 65_536;

const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;

/// Capability names (linux/capability.h), by number.
const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("reading the clone's spec {path}: {reason}")]
    Spec { path: PathBuf, reason: String },
    #[error("CRIU image {path}: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error("no task credentials (core-*.img) in {dir}")]
    NoTasks { dir: PathBuf },
    #[error(
        "the checkpoint's task {tid} ({comm}) has credentials the clone's spec {spec} does not \
         allow: {problems}"
    )]
    Exceeds {
        tid: String,
        comm: String,
        spec: PathBuf,
        problems: String,
    },
}

/// A set of capabilities, one bit per number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    fn from_words(words: &[u32]) -> CapSet {
        CapSet(
            words
                .iter()
                .take(2)
                .enumerate()
                .fold(0u64, |acc, (i, w)| acc | (u64::from(*w) << (32 * i))),
        )
    }

    fn from_names(names: &[String]) -> CapSet {
        CapSet(
            names
                .iter()
                .filter_map(|n| CAPABILITIES.iter().position(|c| c == n))
                .fold(0u64, |acc, bit| acc | (1 << bit)),
        )
    }

    fn has(self, cap: u32) -> bool {
        self.0 & (1 << cap) != 0
    }

    /// What `self` holds beyond `allowed`, by name.
    fn beyond(self, allowed: CapSet) -> Vec<String> {
        let extra = self.0 & !allowed.0;
        (0..64)
            .filter(|bit| extra & (1 << bit) != 0)
            .map(|bit| {
                CAPABILITIES
                    .get(bit)
                    .map_or_else(|| format!("capability {bit}"), |n| n.to_string())
            })
            .collect()
    }
}

/// What the clone's OCI spec lets its processes hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecLimits {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: BTreeSet<u32>,
    pub bounding: CapSet,
    pub permitted: CapSet,
    pub no_new_privileges: bool,
}

impl SpecLimits {
    /// Reads `process` of an OCI `config.json`.
    pub fn from_spec(path: &Path) -> Result<SpecLimits, CredsError> {
        let raw = fs::read(path).map_err(|source| CredsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        #[derive(serde::Deserialize, Default)]
        #[serde(rename_all = "camelCase")]
        struct User {
            #[serde(default)]
            uid: u32,
            #[serde(default)]
            gid: u32,
            #[serde(default)]
            additional_gids: Vec<u32>,
        }
        #[derive(serde::Deserialize, Default)]
        struct Caps {
            #[serde(default)]
            bounding: Vec<String>,
            #[serde(default)]
            permitted: Vec<String>,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Process {
            #[serde(default)]
            user: User,
            #[serde(default)]
            capabilities: Option<Caps>,
            #[serde(default)]
            no_new_privileges: bool,
        }
        #[derive(serde::Deserialize)]
        struct Spec {
            process: Option<Process>,
        }
        let spec: Spec = serde_json::from_slice(&raw).map_err(|e| CredsError::Spec {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let process = spec.process.ok_or_else(|| CredsError::Spec {
            path: path.to_path_buf(),
            reason: "it has no process".to_string(),
        })?;
        let caps = process.capabilities.unwrap_or_default();
        Ok(SpecLimits {
            uid: process.user.uid,
            gid: process.user.gid,
            additional_gids: process.user.additional_gids.into_iter().collect(),
            bounding: CapSet::from_names(&caps.bounding),
            permitted: CapSet::from_names(&caps.permitted),
            no_new_privileges: process.no_new_privileges,
        })
    }

    /// The capabilities a process of this spec could come to hold: its permitted set, or with
    /// exec able to grant privileges (no `noNewPrivileges`), its bounding set.
    fn reachable(&self) -> CapSet {
        if self.no_new_privileges {
            CapSet(self.permitted.0 & self.bounding.0)
        } else {
            self.bounding
        }
    }

    /// What in `creds` this spec does not allow (empty: nothing).
    pub fn problems(&self, creds: &CredsEntry) -> Vec<String> {
        let mut problems = Vec::new();
        let reachable = self.reachable();
        let sets = [
            ("bounding", &creds.cap_bnd),
            ("permitted", &creds.cap_prm),
            ("effective", &creds.cap_eff),
            ("inheritable", &creds.cap_inh),
            ("ambient", &creds.cap_amb),
        ];
        for (name, words) in sets {
            let set = CapSet::from_words(words);
            let limit = if name == "bounding" || name == "inheritable" {
                self.bounding
            } else {
                reachable
            };
            let extra = set.beyond(limit);
            if !extra.is_empty() {
                problems.push(format!(
                    "{name} capabilities {} beyond the spec's {}",
                    extra.join(","),
                    if limit == self.bounding {
                        "bounding set"
                    } else {
                        "permitted set (noNewPrivileges)"
                    }
                ));
            }
        }
        if !reachable.has(CAP_SETUID) {
            let uids = [
                ("uid", creds.uid),
                ("euid", creds.euid),
                ("suid", creds.suid),
                ("fsuid", creds.fsuid),
            ];
            for (name, value) in uids {
                if value != self.uid {
                    problems.push(format!(
                        "{name} {value}, not the spec's user {} (and no CAP_SETUID)",
                        self.uid
                    ));
                }
            }
        }
        if !reachable.has(CAP_SETGID) {
            let allowed = |g: u32| g == self.gid || self.additional_gids.contains(&g);
            let gids = [
                ("gid", creds.gid),
                ("egid", creds.egid),
                ("sgid", creds.sgid),
                ("fsgid", creds.fsgid),
            ];
            for (name, value) in gids {
                if !allowed(value) {
                    problems.push(format!(
                        "{name} {value}, not the spec's group {} or additional groups (and no CAP_SETGID)",
                        self.gid
                    ));
                }
            }
            let extra: Vec<String> = creds
                .groups
                .iter()
                .filter(|g| !allowed(**g))
                .map(u32::to_string)
                .collect();
            if !extra.is_empty() {
                problems.push(format!(
                    "supplementary groups {} not in the spec (and no CAP_SETGID)",
                    extra.join(",")
                ));
            }
        }
        problems
    }
}

/// One task's credentials, as CRIU would restore them.
#[derive(Debug, Clone)]
pub struct TaskCreds {
    /// From the image's name, `core-<tid>.img`.
    pub tid: String,
    pub comm: String,
    pub creds: CredsEntry,
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Decodes one `core-<tid>.img`: the task's credentials, if it has any, and its name.
pub fn read_core_image(path: &Path) -> Result<Option<(CredsEntry, String)>, CredsError> {
    let bad = |reason: String| CredsError::Image {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = fs::read(path).map_err(|source| CredsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut at = 0;
    let mut magic = read_u32(&bytes, at).ok_or_else(|| bad("shorter than its magic".into()))?;
    at += 4;
    if magic == IMG_COMMON_MAGIC || magic == IMG_SERVICE_MAGIC {
        magic = read_u32(&bytes, at).ok_or_else(|| bad("shorter than its magic".into()))?;
        at += 4;
    }
    if magic != CORE_MAGIC {
        return Err(bad(format!(
            "magic {magic:#010x} is not CRIU's core image magic {CORE_MAGIC:#010x}"
        )));
    }
    let len = read_u32(&bytes, at).ok_or_else(|| bad("no entry".into()))? as usize;
    at += 4;
    if len > MAX_CORE_ENTRY {
        return Err(bad(format!("entry of {len} bytes is too large")));
    }
    let entry = bytes
        .get(at..at + len)
        .ok_or_else(|| bad(format!("entry of {len} bytes is truncated")))?;
    let core = CoreEntry::decode(entry).map_err(|e| bad(format!("undecodable core entry: {e}")))?;
    Ok(core.thread_core.and_then(|t| {
        let comm = t.comm.unwrap_or_default();
        t.creds.map(|c| (c, comm))
    }))
}

/// Every task's credentials in CRIU's image directory `images`.
pub fn read_tasks(images: &Path) -> Result<Vec<TaskCreds>, CredsError> {
    let io = |source| CredsError::Io {
        path: images.to_path_buf(),
        source,
    };
    let mut tasks = Vec::new();
    for entry in fs::read_dir(images).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(tid) = name
            .strip_prefix("core-")
            .and_then(|r| r.strip_suffix(".img"))
        else {
            continue;
        };
        if tasks.len() >= MAX_TASKS {
            return Err(CredsError::Image {
                path: images.to_path_buf(),
                reason: format!("more than {MAX_TASKS} core images"),
            });
        }
        let path = entry.path();
        let (creds, comm) = read_core_image(&path)?.ok_or_else(|| CredsError::Image {
            path: path.clone(),
            reason: "the task has no credentials".into(),
        })?;
        tasks.push(TaskCreds {
            tid: tid.to_string(),
            comm,
            creds,
        });
    }
    if tasks.is_empty() {
        return Err(CredsError::NoTasks {
            dir: images.to_path_buf(),
        });
    }
    tasks.sort_by(|a, b| a.tid.cmp(&b.tid));
    Ok(tasks)
}

/// Refuses the checkpoint in `images` if any of its tasks holds credentials the clone's spec
/// (`spec`, the bundle's `config.json`) does not allow; returns how many tasks were checked.
pub fn check(images: &Path, spec: &Path) -> Result<usize, CredsError> {
    let limits = SpecLimits::from_spec(spec)?;
    let tasks = read_tasks(images)?;
    for task in &tasks {
        let problems = limits.problems(&task.creds);
        if !problems.is_empty() {
            return Err(CredsError::Exceeds {
                tid: task.tid.clone(),
                comm: if task.comm.is_empty() {
                    "?".into()
                } else {
                    task.comm.clone()
                },
                spec: spec.to_path_buf(),
                problems: problems.join("; "),
            });
        }
    }
    Ok(tasks.len())
}

#[cfg(test)]
mod tests;
