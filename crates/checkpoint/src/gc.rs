//! Garbage collection of archives on the share and of node-local work directories.
//!
//! What goes: archives (`<share>/<ns>/<pod>/<container>.zip`) older than the age limit or beyond
//! the newest N; temporary files of interrupted packs and migrations' scratch records (commit
//! records, reservations; the names are [`crate::share`]'s) older than their own limit; expired
//! leases; and work units (`<work>/checkpoints/<x>`, `<work>/restore/<ns>/<x>`, `<work>/criu/<x>`, and a pod's restore markers `<work>/restored/<pod-uid>`) in which nothing
//! changed (ctime) for longer than the age limit. Archives are aged by their mtime, so `touch`
//! renews one.
//!
//! What never goes:
//! - anything a migration in flight references. The agent writes a **lease**
//!   ([`crate::share::lease_path`]) before it freezes the source and removes it
//!   when the migration ends; it names a deadline (past which it no longer protects anything, so a
//!   crashed agent's lease cannot pin forever) and the work units the migration uses. A pod
//!   directory with a live lease is left whole. Callers can add more (the CLI and the agent add
//!   the clones the API server reports as in flight) through [`InFlight`].
//! - the restore markers of a pod the caller knows still exists ([`InFlight::pod_uids`]): gone,
//!   a restarted container of that pod would try to restore again.
//! - anything pinned: `<container>.zip.keep` pins that archive, a `.keep` file in a pod
//!   directory pins every archive in it, and a `.keep` file in a work unit pins that unit.
//! - anything reached through a symbolic link: links are reported, never followed or removed.
//!
//! [`plan`] decides and removes nothing (it is what `--dry-run` prints); [`execute`] removes,
//! checking each path again first: it must still be the same file (device, inode, mtime) and its
//! pod directory must still hold no live lease.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::share::{self, KEEP, LEASE_PREFIX, RESTORED_DIR};
/// Work-directory subtrees whose children are units.
const WORK_UNITS: [(&str, usize); 4] = [
    ("checkpoints", 1),
    ("restore", 2),
    ("criu", 1),
    (RESTORED_DIR, 1),
];

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing lease {path}: {source}")]
    Lease {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A migration's claim on its pod directory and work units, until `deadline_unix_ms`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    /// Who holds it, for messages: `agent on node-a for clone default/counter-x`.
    pub holder: String,
    pub deadline_unix_ms: u64,
    /// Work units, relative to the work directory (`checkpoints/<clone-uid>`).
    #[serde(default)]
    pub work_units: Vec<String>,
    /// Set by the agent just before the freeze when the migration is post-copy: the source's
    /// shim then dumps lazily and serves the rest of the memory over a page stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_stream: Option<PageStreamPlan>,
}

/// Where a post-copy migration's page stream runs between the two nodes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PageStreamPlan {
    /// The source node's address, where its shim listens once the source is frozen.
    pub listen: std::net::IpAddr,
    /// The clone's node's address: the only one whose connections are taken (`None`: not known
    /// when the source froze; the stream's secret still authenticates the clone).
    #[serde(default)]
    pub peer: Option<std::net::IpAddr>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Writes a lease for `id` (the clone's uid) in `pod_dir`, atomically (temporary name and rename).
pub fn write_lease(pod_dir: &Path, id: &str, lease: &Lease) -> Result<PathBuf, GcError> {
    let path = share::lease_path(pod_dir, id);
    let err = |source| GcError::Lease {
        path: path.clone(),
        source,
    };
    fs::create_dir_all(pod_dir).map_err(err)?;
    let temp = share::lease_temp_path(pod_dir, id);
    fs::write(
        &temp,
        serde_json::to_vec(lease).expect("a lease serializes"),
    )
    .map_err(err)?;
    fs::rename(&temp, &path).map_err(err)?;
    Ok(path)
}

/// What protects work units and pod directories beyond the leases found on the share.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    /// `(namespace, pod)` whose share directory must stay whole.
    pub pods: BTreeSet<(String, String)>,
    /// Work units, relative to the work directory.
    pub work_units: BTreeSet<String>,
    /// Uids of (clone) pods that still exist, whatever their phase: their restore markers
    /// (`restored/<uid>`, see [`crate::share::restored_marker`]) stay however old. Without
    /// them, markers go by age like any work unit.
    pub pod_uids: BTreeSet<String>,
    /// Where each protection came from, for the report (e.g. "API server").
    pub source: String,
}

#[derive(Debug, Clone)]
pub struct GcPolicy {
    /// Archives and work units older than this go. `None`: no age limit.
    pub max_age: Option<Duration>,
    /// At most this many archives stay on the share (newest first, pinned and in-flight ones
    /// not counted). `None`: no count limit.
    pub keep_last: Option<usize>,
    /// Temporary files of packs older than this are leftovers of interrupted packs.
    pub temp_max_age: Duration,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy {
            max_age: Some(Duration::from_secs(24 * 3600)),
            keep_last: None,
            temp_max_age: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Archive,
    TempFile,
    StaleLease,
    WorkUnit,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Archive => "archive",
            Kind::TempFile => "temp file",
            Kind::StaleLease => "expired lease",
            Kind::WorkUnit => "work dir",
        }
    }
}

/// The file as it was seen, so a replaced one is not removed by mistake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
}

impl Seen {
    fn of(meta: &fs::Metadata) -> Seen {
        Seen {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Removal {
    pub path: PathBuf,
    pub kind: Kind,
    pub reason: String,
    pub bytes: u64,
    /// The pod directory whose leases are checked again before removal (share items only).
    pod_dir: Option<PathBuf>,
    seen: Seen,
}

#[derive(Debug, Clone)]
pub struct Kept {
    pub path: PathBuf,
    pub reason: String,
}

/// What GC would do.
#[derive(Debug, Default)]
pub struct Plan {
    pub remove: Vec<Removal>,
    /// Things a reader might expect to go, and why they stay.
    pub keep: Vec<Kept>,
}

/// What [`execute`] did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub removed: Vec<Removal>,
    /// Paths left because they changed since the plan, with why.
    pub skipped: Vec<Kept>,
    pub errors: Vec<String>,
}

fn age(now: SystemTime, meta: &fs::Metadata) -> Duration {
    meta.modified()
        .ok()
        .and_then(|m| now.duration_since(m).ok())
        .unwrap_or_default()
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86400 {
        format!("{}d{}h", s / 86400, (s % 86400) / 3600)
    } else if s >= 3600 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Directory entries with their own (not followed) metadata, sorted by name.
fn entries(dir: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>, GcError> {
    let io = |source| GcError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        match fs::symlink_metadata(&path) {
            Ok(meta) => out.push((path, meta)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(GcError::Io { path, source }),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// An expired lease: its path, metadata and why it no longer counts.
type Expired = (PathBuf, fs::Metadata, String);

/// Live leases in a pod directory, and expired ones (to remove).
fn leases(
    pod_dir: &[(PathBuf, fs::Metadata)],
    now: SystemTime,
) -> (Vec<(PathBuf, Lease)>, Vec<Expired>) {
    let mut live = Vec::new();
    let mut expired = Vec::new();
    for (path, meta) in pod_dir {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !name.starts_with(LEASE_PREFIX) || !meta.is_file() {
            continue;
        }
        match fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Lease>(&b).ok())
        {
            Some(lease) if lease.deadline_unix_ms > unix_ms(now) => {
                live.push((path.clone(), lease))
            }
            Some(lease) => expired.push((
                path.clone(),
                meta.clone(),
                format!("lease of {} expired", lease.holder),
            )),
            // Unreadable: maybe being written. It protects the directory until it is old.
            None if age(now, meta) < Duration::from_secs(3600) => live.push((
                path.clone(),
                Lease {
                    holder: "an unreadable lease".into(),
                    deadline_unix_ms: u64::MAX,
                    work_units: Vec::new(),
                    page_stream: None,
                },
            )),
            None => expired.push((
                path.clone(),
                meta.clone(),
                "unreadable lease older than 1h".into(),
            )),
        }
    }
    (live, expired)
}

/// Temporary archives and the scratch records of migrations: they go by the temporary files'
/// age limit.
fn is_temp(name: &str) -> bool {
    share::is_temp_archive_name(name) || share::is_scratch_name(name)
}

/// Decides what to remove. Reads only; never follows a symbolic link.
pub fn plan(
    share_root: Option<&Path>,
    work_dir: Option<&Path>,
    policy: &GcPolicy,
    in_flight: &InFlight,
    now: SystemTime,
) -> Result<Plan, GcError> {
    let mut plan = Plan::default();
    let mut protected_units: BTreeSet<String> = in_flight.work_units.clone();
    // Archives that may go by count, newest first once sorted.
    let mut countable: Vec<(PathBuf, fs::Metadata, PathBuf)> = Vec::new();

    if let Some(share) = share_root.filter(|p| p.exists()) {
        for (ns_dir, ns_meta) in entries(share)? {
            if ns_meta.file_type().is_symlink() {
                plan.keep.push(Kept {
                    path: ns_dir,
                    reason: "symbolic link: never followed".into(),
                });
                continue;
            }
            if !ns_meta.is_dir() {
                continue;
            }
            for (pod_dir, pod_meta) in entries(&ns_dir)? {
                if pod_meta.file_type().is_symlink() {
                    plan.keep.push(Kept {
                        path: pod_dir,
                        reason: "symbolic link: never followed".into(),
                    });
                    continue;
                }
                if !pod_meta.is_dir() {
                    continue;
                }
                let files = entries(&pod_dir)?;
                let (live, expired) = leases(&files, now);
                for (path, meta, reason) in expired {
                    plan.remove.push(Removal {
                        seen: Seen::of(&meta),
                        bytes: meta.len(),
                        path,
                        kind: Kind::StaleLease,
                        reason,
                        pod_dir: Some(pod_dir.clone()),
                    });
                }
                let ns = ns_dir.file_name().unwrap_or_default().to_string_lossy();
                let pod = pod_dir.file_name().unwrap_or_default().to_string_lossy();
                let held_by = if let Some((path, lease)) = live.first() {
                    for (_, lease) in &live {
                        protected_units.extend(lease.work_units.iter().cloned());
                    }
                    Some(format!(
                        "in flight: lease {} held by {}",
                        path.file_name().unwrap_or_default().to_string_lossy(),
                        lease.holder
                    ))
                } else if in_flight.pods.contains(&(ns.to_string(), pod.to_string())) {
                    Some(format!("in flight according to {}", in_flight.source))
                } else {
                    None
                };
                let dir_pinned = files
                    .iter()
                    .any(|(p, m)| m.is_file() && p.file_name().is_some_and(|n| n == KEEP));
                for (path, meta) in &files {
                    let name = path.file_name().unwrap_or_default().to_string_lossy();
                    let is_archive = share::is_archive_name(&name);
                    if !(is_archive || is_temp(&name)) {
                        continue;
                    }
                    if meta.file_type().is_symlink() {
                        plan.keep.push(Kept {
                            path: path.clone(),
                            reason: "symbolic link: never followed".into(),
                        });
                        continue;
                    }
                    if !meta.is_file() {
                        continue;
                    }
                    if let Some(reason) = &held_by {
                        plan.keep.push(Kept {
                            path: path.clone(),
                            reason: reason.clone(),
                        });
                        continue;
                    }
                    let old = age(now, meta);
                    if is_temp(&name) {
                        if old > policy.temp_max_age {
                            plan.remove.push(Removal {
                                path: path.clone(),
                                kind: Kind::TempFile,
                                reason: format!(
                                    "interrupted pack, last written {} ago (limit {})",
                                    human(old),
                                    human(policy.temp_max_age)
                                ),
                                bytes: meta.len(),
                                pod_dir: Some(pod_dir.clone()),
                                seen: Seen::of(meta),
                            });
                        }
                        continue;
                    }
                    let pin = share::pin_path(path);
                    if dir_pinned || fs::symlink_metadata(&pin).is_ok_and(|m| m.is_file()) {
                        plan.keep.push(Kept {
                            path: path.clone(),
                            reason: if dir_pinned {
                                format!("pinned by {}", pod_dir.join(KEEP).display())
                            } else {
                                format!("pinned by {}", pin.display())
                            },
                        });
                        continue;
                    }
                    match policy.max_age {
                        Some(limit) if old > limit => plan.remove.push(Removal {
                            path: path.clone(),
                            kind: Kind::Archive,
                            reason: format!("{} old (limit {})", human(old), human(limit)),
                            bytes: meta.len(),
                            pod_dir: Some(pod_dir.clone()),
                            seen: Seen::of(meta),
                        }),
                        _ => countable.push((path.clone(), meta.clone(), pod_dir.clone())),
                    }
                }
            }
        }
    }
    if let Some(keep_last) = policy.keep_last {
        countable.sort_by_key(|(path, meta, _)| {
            (
                std::cmp::Reverse(meta.modified().unwrap_or(UNIX_EPOCH)),
                path.clone(),
            )
        });
        for (path, meta, pod_dir) in countable.into_iter().skip(keep_last) {
            plan.remove.push(Removal {
                reason: format!(
                    "beyond the newest {keep_last} archive(s) (this one is {} old)",
                    human(age(now, &meta))
                ),
                bytes: meta.len(),
                seen: Seen::of(&meta),
                path,
                kind: Kind::Archive,
                pod_dir: Some(pod_dir),
            });
        }
    }

    if let Some(work) = work_dir.filter(|p| p.exists()) {
        for (sub, depth) in WORK_UNITS {
            let root = work.join(sub);
            let mut level = vec![root.clone()];
            for _ in 0..depth {
                let mut next = Vec::new();
                for dir in level {
                    match fs::symlink_metadata(&dir) {
                        Ok(m) if m.is_dir() => {}
                        Ok(m) if m.file_type().is_symlink() => {
                            plan.keep.push(Kept {
                                path: dir,
                                reason: "symbolic link: never followed".into(),
                            });
                            continue;
                        }
                        _ => continue,
                    }
                    next.extend(entries(&dir)?.into_iter().map(|(p, _)| p));
                }
                level = next;
            }
            for unit in level {
                let Ok(meta) = fs::symlink_metadata(&unit) else {
                    continue;
                };
                if meta.file_type().is_symlink() {
                    plan.keep.push(Kept {
                        path: unit,
                        reason: "symbolic link: never followed".into(),
                    });
                    continue;
                }
                let relative = unit
                    .strip_prefix(work)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if protected_units.contains(&relative) {
                    plan.keep.push(Kept {
                        path: unit,
                        reason: "in flight: named by a lease".into(),
                    });
                    continue;
                }
                let uid = unit.file_name().unwrap_or_default().to_string_lossy();
                if sub == RESTORED_DIR && in_flight.pod_uids.contains(&*uid) {
                    plan.keep.push(Kept {
                        reason: format!("restore markers of pod {uid}, which still exists"),
                        path: unit,
                    });
                    continue;
                }
                if meta.is_dir() && unit.join(KEEP).is_file() {
                    plan.keep.push(Kept {
                        reason: format!("pinned by {}", unit.join(KEEP).display()),
                        path: unit,
                    });
                    continue;
                }
                let Some(limit) = policy.max_age else {
                    continue;
                };
                let (newest, bytes) = newest_in(&unit, &meta);
                let old = now.duration_since(newest).unwrap_or_default();
                if old > limit {
                    plan.remove.push(Removal {
                        reason: format!("last changed {} ago (limit {})", human(old), human(limit)),
                        seen: Seen::of(&meta),
                        path: unit,
                        kind: Kind::WorkUnit,
                        bytes,
                        pod_dir: None,
                    });
                }
            }
        }
    }
    Ok(plan)
}

/// The latest change in a tree (links not followed), and its size in bytes. Change times
/// (ctime), not mtimes: unpacking restores the source's mtimes, which can be days old on a
/// directory that was written a second ago; nobody can set a ctime back.
fn newest_in(root: &Path, meta: &fs::Metadata) -> (SystemTime, u64) {
    let changed = |m: &fs::Metadata| {
        let ctime = UNIX_EPOCH
            + Duration::new(
                m.ctime().max(0) as u64,
                m.ctime_nsec().clamp(0, 999_999_999) as u32,
            );
        ctime.max(m.modified().unwrap_or(UNIX_EPOCH))
    };
    let mut newest = changed(meta);
    let mut bytes = 0;
    for entry in walkdir::WalkDir::new(root)
        .follow_links(false)
        .into_iter()
        .flatten()
    {
        if let Ok(m) = entry.metadata() {
            newest = newest.max(changed(&m));
            if m.is_file() {
                bytes += m.len();
            }
        }
    }
    (newest, bytes)
}

/// Removes what `plan` listed, checking each path again first.
pub fn execute(plan: Plan, now: SystemTime) -> Outcome {
    let mut outcome = Outcome::default();
    for removal in plan.remove {
        let skip = |reason: String| Kept {
            path: removal.path.clone(),
            reason,
        };
        match fs::symlink_metadata(&removal.path) {
            Ok(meta) if Seen::of(&meta) == removal.seen => {}
            Ok(_) => {
                outcome
                    .skipped
                    .push(skip("changed since it was looked at".into()));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                outcome
                    .errors
                    .push(format!("checking {}: {e}", removal.path.display()));
                continue;
            }
        }
        if removal.kind != Kind::StaleLease {
            if let Some(pod_dir) = &removal.pod_dir {
                let live = entries(pod_dir)
                    .map(|files| leases(&files, now).0)
                    .unwrap_or_default();
                if let Some((_, lease)) = live.first() {
                    outcome.skipped.push(skip(format!(
                        "a migration started meanwhile (lease held by {})",
                        lease.holder
                    )));
                    continue;
                }
            }
        }
        let removed = if removal.kind == Kind::WorkUnit && removal.seen_is_dir() {
            fs::remove_dir_all(&removal.path)
        } else {
            fs::remove_file(&removal.path)
        };
        match removed {
            Ok(()) => {
                // An emptied pod directory goes too; rmdir refuses one that is not empty.
                if let Some(pod_dir) = &removal.pod_dir {
                    let _ = fs::remove_dir(pod_dir);
                }
                outcome.removed.push(removal);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => outcome
                .errors
                .push(format!("removing {}: {e}", removal.path.display())),
        }
    }
    outcome
}

impl Removal {
    fn seen_is_dir(&self) -> bool {
        fs::symlink_metadata(&self.path).is_ok_and(|m| m.is_dir())
    }
}

#[cfg(test)]
mod tests;
