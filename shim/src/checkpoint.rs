//! Checkpoint: dump a container with CRIU through the runc shim, while the library's
//! [`Checkpoint`] operation packs the dump onto the share, adds what CRIU does not save and
//! commits the archive. Here: the request's options, the work space, the task's state, and the
//! runc shim's calls around the dump.
//!
//! The container is paused first and dumped with "leave running", so CRIU leaves it frozen.
//! Only once the archive is committed does the container stop (if containerd asked for exit) or
//! thaw; if anything fails it thaws, exactly as it was. A checkpoint never costs the source.
//!
//! In post-copy (the agent's lease says so) the dump is lazy and runs runc directly, because
//! the runc shim's Checkpoint has no lazy mode: the archive then holds all but the private
//! memory, and the committed checkpoint comes back with the [`Serving`] that serves that memory
//! to the clone (see `podmigrate_checkpoint::ops::postcopy`).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use containerd_shim::protos::api::{
    CheckpointTaskRequest, KillRequest, PauseRequest, ResumeRequest, StateRequest,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::shim::oci::CheckpointOptions;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::protos::types::mount::Mount;
use containerd_shim::protos::types::task::Status;
use podmigrate_checkpoint::archive::{PackSummary, Source, Versions};
use podmigrate_checkpoint::bandwidth::Bandwidth;
use podmigrate_checkpoint::gc::PageStreamPlan;
use podmigrate_checkpoint::layout::CHECKPOINT_DIR;
use podmigrate_checkpoint::ops::checkpoint::Checkpoint;
use podmigrate_checkpoint::ops::postcopy::{Serve, Serving};
use podmigrate_checkpoint::reap::Reaper;
use podmigrate_checkpoint::{criu, prefault, runc, workspace};
use podmigrate_vocabulary::RUNC_CHECKPOINT_OPTIONS_TYPE_URL;
use tracing::{info, warn};

use crate::config::ShimConfig;
use crate::delegate::Delegate;
use crate::error::describe_ttrpc_error;
use crate::identity::ContainerIdentity;
use crate::mounts::upperdir;

mod error;

pub use error::{CheckpointError, CheckpointFailure};

fn unix_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

/// CRIU and runc versions, asked once per shim: they are what made every checkpoint it takes.
fn stack_versions() -> &'static Versions {
    static VERSIONS: OnceLock<Versions> = OnceLock::new();
    VERSIONS.get_or_init(|| Versions {
        criu: criu::version(criu::DEFAULT_CRIU).unwrap_or_default(),
        runc: runc::Runc::new(RUNC_ROOT)
            .version()
            .map(|v| v.version)
            .unwrap_or_default(),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        podmigrate: crate::VERSION.to_string(),
    })
}

/// The request's runc `CheckpointOptions`; none at all means the defaults. Options of another
/// type are refused rather than misread.
pub fn checkpoint_options(
    req: &CheckpointTaskRequest,
) -> Result<CheckpointOptions, CheckpointFailure> {
    let Some(any) = req
        .options
        .as_ref()
        .filter(|a| !a.type_url.is_empty() || !a.value.is_empty())
    else {
        return Ok(CheckpointOptions::new());
    };
    let type_url = any.type_url.rsplit('/').next().unwrap_or_default();
    if type_url != RUNC_CHECKPOINT_OPTIONS_TYPE_URL {
        return Err(CheckpointFailure::OptionsType {
            type_url: any.type_url.clone(),
        });
    }
    CheckpointOptions::parse_from_bytes(&any.value).map_err(|error| {
        CheckpointFailure::OptionsUnreadable {
            type_url: any.type_url.clone(),
            error,
        }
    })
}

/// Where containerd's runc shim keeps runc's state, one directory per namespace.
const RUNC_ROOT: &str = "/run/containerd/runc";

/// A post-copy checkpoint's memory, still to be served to the clone it was made for.
pub struct PostCopySource {
    pub serving: Serving,
    pub clone_pod_uid: String,
}

/// What a lazy dump needs beyond the container.
struct LazyDump<'a> {
    images: &'a Path,
    criu_work: &'a Path,
    options: &'a CheckpointOptions,
    plan: &'a PageStreamPlan,
    bandwidth: Bandwidth,
    total_bytes: u64,
}

pub struct Checkpointer<'a> {
    pub ctx: &'a Context,
    /// containerd's namespace of the task (`k8s.io`), which names runc's state directory.
    pub containerd_namespace: &'a str,
    /// How the lazy dump's runc is waited for.
    pub reaper: &'a dyn Reaper,
    pub delegate: &'a Delegate,
    pub config: &'a ShimConfig,
    pub identity: &'a ContainerIdentity,
    pub bundle: &'a Path,
    pub rootfs: &'a [Mount],
}

impl Checkpointer<'_> {
    fn call<T>(
        &self,
        step: &'static str,
        result: containerd_shim::protos::ttrpc::Result<T>,
    ) -> Result<T, CheckpointFailure> {
        result.map_err(|error| CheckpointFailure::Delegate { step, error })
    }

    /// CRIU's own last error lines of a failed dump: runc names only the log, which goes with
    /// the CRIU work directory or the task's bundle.
    fn criu_errors(&self, dump: &CheckpointTaskRequest) -> String {
        let work = CheckpointOptions::parse_from_bytes(&dump.options.value)
            .map(|o| PathBuf::from(o.work_path))
            .unwrap_or_default();
        let logs = [work.join("dump.log"), self.bundle.join("criu-dump.log")];
        logs.iter()
            .find_map(|log| fs::read_to_string(log).ok())
            .map(|text| criu_error_lines(&text, 3))
            .unwrap_or_default()
    }

    /// Checkpoints the container; a failure names it. In post-copy, the committed checkpoint
    /// comes with what serves its memory, which the caller runs.
    pub fn run(
        &self,
        req: &CheckpointTaskRequest,
    ) -> Result<(PackSummary, Option<PostCopySource>), CheckpointError> {
        self.checkpoint(req)
            .map_err(|failure| CheckpointError::new(self.identity.describe(), failure))
    }

    fn checkpoint(
        &self,
        req: &CheckpointTaskRequest,
    ) -> Result<(PackSummary, Option<PostCopySource>), CheckpointFailure> {
        let started = Instant::now();
        let id = self.identity.id.as_str();
        let mut options = checkpoint_options(req)?;
        let exit = options.exit;
        // A malformed cap fails before anything is frozen.
        self.bandwidth()?;
        let criu_work = self
            .config
            .work_dir
            .join("criu")
            .join(format!("{id}-{}", unix_millis()));

        let state = self.call(
            "reading the task state",
            self.delegate.client().state(
                self.ctx.clone(),
                &StateRequest {
                    id: id.into(),
                    ..Default::default()
                },
            ),
        )?;
        // The dump goes to memory-backed work space when the container's memory fits there.
        let space = self
            .config
            .workspace()
            .choose(workspace::cgroup_memory(state.pid));
        info!(container = %self.identity.describe(), in_memory = space.in_memory, root = %space.root.display(), why = %space.why, "checkpoint work space");
        let (local_dir, created_local) =
            self.local_dir(req, &options, space.in_memory.then_some(&space.root))?;
        let paused_by_us = match state.status.enum_value_or_default() {
            Status::RUNNING => {
                self.call(
                    "pausing",
                    self.delegate.client().pause(
                        self.ctx.clone(),
                        &PauseRequest {
                            id: id.into(),
                            ..Default::default()
                        },
                    ),
                )?;
                true
            }
            Status::PAUSED => false,
            status => return Err(CheckpointFailure::TaskState { status }),
        };

        let mut serving = None;
        let result = self.dump_and_commit(
            &mut options,
            &local_dir,
            &criu_work,
            state.pid,
            &mut serving,
        );
        if serving.is_none() {
            // A lazy dump's CRIU still logs there while it serves the memory.
            let _ = fs::remove_dir_all(&criu_work);
        }
        match result {
            Ok(committed) => {
                // A checkpoint directory in memory-backed work space is gone once committed;
                // one in the caller's image path stays.
                if space.in_memory {
                    let _ = fs::remove_dir_all(&local_dir);
                }
                if exit {
                    // Killed while frozen, the processes die as they thaw, without running.
                    self.call(
                        "stopping the checkpointed task",
                        self.delegate.client().kill(
                            self.ctx.clone(),
                            &KillRequest {
                                id: id.into(),
                                signal: libc::SIGKILL as u32,
                                all: true,
                                ..Default::default()
                            },
                        ),
                    )?;
                    if paused_by_us {
                        let _ = self.delegate.client().resume(
                            self.ctx.clone(),
                            &ResumeRequest {
                                id: id.into(),
                                ..Default::default()
                            },
                        );
                    }
                } else if paused_by_us {
                    self.call(
                        "resuming after the checkpoint",
                        self.delegate.client().resume(
                            self.ctx.clone(),
                            &ResumeRequest {
                                id: id.into(),
                                ..Default::default()
                            },
                        ),
                    )?;
                }
                info!(
                    container = %self.identity.describe(),
                    archive = %committed.archive.display(),
                    bytes = committed.archive_bytes,
                    exit,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    postcopy = serving.is_some(),
                    "checkpoint committed"
                );
                Ok((committed, serving))
            }
            Err(err) => {
                // A lazy dump that got as far as serving ends here: its CRIU lets the source go.
                if let Some(source) = serving {
                    source.serving.abandon();
                }
                let _ = fs::remove_dir_all(&criu_work);
                if paused_by_us {
                    if let Err(e) = self.delegate.client().resume(
                        self.ctx.clone(),
                        &ResumeRequest {
                            id: id.into(),
                            ..Default::default()
                        },
                    ) {
                        warn!(container = %self.identity.describe(), error = %describe_ttrpc_error(&e), "resuming after a failed checkpoint");
                    }
                }
                // A CRIU that died mid-dump left its network lock: nothing would reach the
                // container it thawed.
                crate::net_lock::unlock(state.pid);
                if created_local {
                    let _ = fs::remove_dir_all(&local_dir);
                }
                warn!(container = %self.identity.describe(), error = %err, "checkpoint failed; the container keeps running");
                Err(err)
            }
        }
    }

    /// Where the whole checkpoint directory (not just CRIU's images) goes: a fresh directory in
    /// memory-backed work space `memory` when the checkpoint fits there; otherwise the caller's
    /// `image_path`, else the request's path, else a fresh directory in the disk work space.
    ///
    /// The options come before the request path because containerd's request path is not
    /// always the caller's: for a runtime name outside `io.containerd.runc` (e.g.
    /// `io.containerd.migrate.v2`), Tasks.Checkpoint ignores `image_path`, passes a temp dir of
    /// its own and tars whatever ends up there into its content store; left empty, that costs
    /// little. Where containerd honours `image_path` (names under `io.containerd.runc`), the two
    /// are the same.
    fn local_dir(
        &self,
        req: &CheckpointTaskRequest,
        options: &CheckpointOptions,
        memory: Option<&PathBuf>,
    ) -> Result<(PathBuf, bool), CheckpointFailure> {
        let dir = if memory.is_none() && !options.image_path.is_empty() {
            PathBuf::from(&options.image_path)
        } else if memory.is_none() && !req.path.is_empty() {
            PathBuf::from(&req.path)
        } else {
            memory
                .unwrap_or(&self.config.work_dir)
                .join("checkpoints")
                .join(&self.identity.namespace)
                .join(&self.identity.pod)
                .join(format!("{}-{}", self.identity.container, unix_millis()))
        };
        let existed = dir.exists();
        if existed
            && fs::read_dir(&dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            return Err(CheckpointFailure::DirNotEmpty { dir });
        }
        fs::create_dir_all(&dir).map_err(creating(&dir))?;
        Ok((dir, !existed))
    }

    /// The node's cap, lowered by the pod's annotation if it asks for less.
    fn bandwidth(&self) -> Result<Bandwidth, CheckpointFailure> {
        let node = self
            .config
            .bandwidth
            .clone()
            .map_err(CheckpointFailure::NodeBandwidth)?;
        let pod = match &self.identity.bandwidth {
            Some(value) => Bandwidth::parse(value).map_err(CheckpointFailure::PodBandwidth)?,
            None => Bandwidth::UNLIMITED,
        };
        Ok(node.stricter(pod))
    }

    /// Dumps the container into `local_dir` while the library's [`Checkpoint`] packs it onto
    /// the share, adds what CRIU does not save, and commits it: through the runc shim, or, in
    /// post-copy, lazily with runc itself, leaving what serves the memory in `serving`.
    fn dump_and_commit(
        &self,
        options: &mut CheckpointOptions,
        local_dir: &Path,
        criu_work: &Path,
        pid: u32,
        serving: &mut Option<PostCopySource>,
    ) -> Result<PackSummary, CheckpointFailure> {
        let id = self.identity.id.as_str();
        let images = local_dir.join(CHECKPOINT_DIR);
        options.exit = false;
        options.image_path = images.display().to_string();
        options.work_path = criu_work.display().to_string();
        let dump = CheckpointTaskRequest {
            id: id.into(),
            path: images.display().to_string(),
            options: MessageField::some(Any {
                type_url: RUNC_CHECKPOINT_OPTIONS_TYPE_URL.to_string(),
                value: options
                    .write_to_bytes()
                    .map_err(CheckpointFailure::EncodeOptions)?,
                ..Default::default()
            }),
            ..Default::default()
        };
        // runc creates CRIU's work directory with a plain mkdir, so its parent must exist.
        fs::create_dir_all(criu_work).map_err(creating(criu_work))?;
        let bandwidth = self.bandwidth()?;
        Checkpoint {
            share_root: &self.config.share_root,
            key_file: self.config.key_file.as_deref(),
            source: Source {
                node: self.config.node_name.clone(),
                namespace: self.identity.namespace.clone(),
                pod: self.identity.pod.clone(),
                pod_uid: self.identity.pod_uid.clone(),
                container: self.identity.container.clone(),
                image: self.identity.image.clone(),
                container_id: id.into(),
                ..Source::default()
            },
            versions: stack_versions().clone(),
            bandwidth,
            local_dir,
            spec: &self.bundle.join("config.json"),
            upperdir: upperdir(self.rootfs),
        }
        .run(
            |pack_for| match pack_for.and_then(|p| Some((p, p.page_stream.as_ref()?))) {
                None => self.dump(&dump),
                Some((pack_for, plan)) => {
                    let lazy = LazyDump {
                        images: &images,
                        criu_work,
                        options,
                        plan,
                        bandwidth,
                        total_bytes: prefault::process_memory(pid).unwrap_or(0),
                    };
                    *serving = Some(PostCopySource {
                        serving: self.lazy_dump(&lazy, local_dir)?,
                        clone_pod_uid: pack_for.clone_pod_uid.clone(),
                    });
                    self.refuse_if_stopping()
                }
            },
        )
    }

    /// The lazy dump, up to the point where every image but the private memory is written,
    /// with the stream's ticket left in `local_dir` for the archive.
    fn lazy_dump(
        &self,
        lazy: &LazyDump<'_>,
        local_dir: &Path,
    ) -> Result<Serving, CheckpointFailure> {
        let runc = runc::Runc::new(Path::new(RUNC_ROOT).join(self.containerd_namespace));
        let reaper = self.reaper;
        let options = runc::CheckpointOptions {
            leave_running: true,
            tcp_established: lazy.options.open_tcp,
            file_locks: lazy.options.file_locks,
            ext_unix_sk: lazy.options.external_unix_sockets,
            shell_job: lazy.options.terminal,
            manage_cgroups_mode: runc::CgroupsMode::parse(&lazy.options.cgroups_mode),
        };
        let serving = Serve {
            runc: &runc,
            reaper,
            id: &self.identity.id,
            images: lazy.images,
            work: lazy.criu_work,
            options: &options,
            plan: lazy.plan,
            bandwidth: lazy.bandwidth,
            total_bytes: lazy.total_bytes,
        }
        .start()
        .map_err(|error| CheckpointFailure::LazyDump {
            criu: criu_log_errors(&lazy.criu_work.join("dump.log")),
            error: Box::new(error),
        })?;
        serving
            .ticket()
            .write_to(local_dir)
            .map_err(|error| CheckpointFailure::LazyDump {
                criu: String::new(),
                error: Box::new(error.into()),
            })?;
        Ok(serving)
    }

    /// A container asked to stop while it was frozen (its pod deleted mid-checkpoint: kubelet's
    /// SIGTERM, then SIGKILL) carries that signal, pending, in its dump, and a clone restored
    /// from it would only die. Such a checkpoint is refused, before anything is committed.
    fn refuse_if_stopping(&self) -> Result<(), CheckpointFailure> {
        let state = self.call(
            "reading the task state after the dump",
            self.delegate.client().state(
                self.ctx.clone(),
                &StateRequest {
                    id: self.identity.id.clone(),
                    ..Default::default()
                },
            ),
        )?;
        let status =
            fs::read_to_string(format!("/proc/{}/status", state.pid)).map_err(|error| {
                CheckpointFailure::Stopped {
                    pid: state.pid,
                    error,
                }
            })?;
        match pending_stop_signal(&status) {
            Some(signal) => Err(CheckpointFailure::StopPending { signal }),
            None => Ok(()),
        }
    }

    /// The CRIU dump through the runc shim, refused if the container was asked to stop
    /// meanwhile.
    fn dump(&self, dump: &CheckpointTaskRequest) -> Result<(), CheckpointFailure> {
        self.delegate
            .client()
            .checkpoint(self.ctx.clone(), dump)
            .map_err(|error| CheckpointFailure::Dump {
                criu: self.criu_errors(dump),
                error,
            })?;
        self.refuse_if_stopping()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_errors_are_its_last_error_lines_on_one_line() {
        let log = "(00.1) Dumping\n(00.2) Error (criu/sk-inet.c:199): inet: Connected TCP socket, consider using --tcp-established option.\n(00.3) Unlocking\n(00.4) Error (criu/cr-dump.c:2100): Dumping FAILED.\n";
        assert_eq!(
            criu_error_lines(log, 3),
            "(00.2) Error (criu/sk-inet.c:199): inet: Connected TCP socket, consider using --tcp-established option. | (00.4) Error (criu/cr-dump.c:2100): Dumping FAILED."
        );
        assert_eq!(criu_error_lines("(00.1) fine\n", 3), "");
    }

    fn request(type_url: &str, options: &CheckpointOptions) -> CheckpointTaskRequest {
        CheckpointTaskRequest {
            id: "c1".into(),
            options: MessageField::some(Any {
                type_url: type_url.into(),
                value: options.write_to_bytes().unwrap(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn runc_checkpoint_options_are_read() {
        let sent = CheckpointOptions {
            exit: true,
            image_path: "/var/lib/x/ck".into(),
            ..Default::default()
        };
        for type_url in [
            RUNC_CHECKPOINT_OPTIONS_TYPE_URL.to_string(),
            format!("type.googleapis.com/{RUNC_CHECKPOINT_OPTIONS_TYPE_URL}"),
        ] {
            let got = checkpoint_options(&request(&type_url, &sent)).unwrap();
            assert!(got.exit);
            assert_eq!(got.image_path, "/var/lib/x/ck");
        }
        let none = checkpoint_options(&CheckpointTaskRequest::default()).unwrap();
        assert!(!none.exit && none.image_path.is_empty());
    }

    #[test]
    fn other_checkpoint_options_are_refused() {
        let err = checkpoint_options(&request(
            "runtimeoptions.v1.Options",
            &CheckpointOptions::default(),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("runtimeoptions.v1.Options")
                && err.contains(RUNC_CHECKPOINT_OPTIONS_TYPE_URL),
            "{err}"
        );
    }
}

/// A stop signal (SIGTERM, SIGKILL, SIGINT, SIGQUIT) pending on a process, from its
/// `/proc/<pid>/status` (`SigPnd`: the thread's, `ShdPnd`: the process's).
fn pending_stop_signal(status: &str) -> Option<&'static str> {
    const STOP: [(u32, &str); 4] = [
        (libc::SIGKILL as u32, "SIGKILL"),
        (libc::SIGTERM as u32, "SIGTERM"),
        (libc::SIGINT as u32, "SIGINT"),
        (libc::SIGQUIT as u32, "SIGQUIT"),
    ];
    let pending = status
        .lines()
        .filter_map(|l| {
            let (key, value) = l.split_once(':')?;
            matches!(key, "SigPnd" | "ShdPnd")
                .then(|| u64::from_str_radix(value.trim(), 16).ok())?
        })
        .fold(0u64, |all, mask| all | mask);
    STOP.iter()
        .find(|(signal, _)| pending & (1u64 << (signal - 1)) != 0)
        .map(|(_, name)| *name)
}

#[cfg(test)]
mod pending_signal_tests {
    use super::pending_stop_signal;

    #[test]
    fn finds_a_pending_stop_signal_in_either_mask() {
        let quiet = "Name:\tcounter\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\nSigBlk:\t0000000000004000\n";
        assert_eq!(pending_stop_signal(quiet), None);
        // SIGTERM is 15: bit 14.
        let term = "SigPnd:\t0000000000000000\nShdPnd:\t0000000000004000\n";
        assert_eq!(pending_stop_signal(term), Some("SIGTERM"));
        let kill = "SigPnd:\t0000000000000100\nShdPnd:\t0000000000000000\n";
        assert_eq!(pending_stop_signal(kill), Some("SIGKILL"));
        // SIGUSR1 (10) is not a stop.
        let usr1 = "SigPnd:\t0000000000000200\nShdPnd:\t0000000000000000\n";
        assert_eq!(pending_stop_signal(usr1), None);
    }
}

/// A failure to create the directory `path`.
fn creating(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointFailure + '_ {
    move |error| CheckpointFailure::Io {
        op: "creating",
        path: path.to_path_buf(),
        error,
    }
}

/// The last error lines of the CRIU log at `path`, or nothing.
fn criu_log_errors(path: &Path) -> String {
    fs::read_to_string(path)
        .map(|text| criu_error_lines(&text, 3))
        .unwrap_or_default()
}

/// The last `n` lines of a CRIU log that report an error, joined on one line.
fn criu_error_lines(log: &str, n: usize) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error"))
        .map(str::trim)
        .collect();
    errors[errors.len().saturating_sub(n)..].join(" | ")
}
