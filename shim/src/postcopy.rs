//! Post-copy in the shim: the page streams this shim runs in the background, one thread each,
//! cancelled and joined when their container is deleted or the shim shuts down.
//!
//! * The source's: once its archive is committed, a lazy dump's memory is served to the clone
//!   ([`Serving`]), and the stream's progress and end are recorded on the share for the
//!   source's agent ([`PagesRecord`]).
//! * The clone's: CRIU's lazy-pages daemon fetches the memory of a container restored lazily
//!   ([`Fetching`]). When that memory can no longer arrive the container is killed at once,
//!   with the reason as its termination message, and marked lost, so a restart fails instead
//!   of running a fresh process in its place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use podmigrate_checkpoint::ops::postcopy::{Fetching, Serving, ACCEPT_DEADLINE};
use podmigrate_checkpoint::pagestream::Cancel;
use podmigrate_checkpoint::share::{self, PagesRecord, PagesState};
use tracing::{info, warn};

/// What a container's Create reads to learn that its earlier restore lost its memory.
pub const LOST_PREFIX: &str = "lost: ";

/// One stream's thread.
struct Running {
    cancel: Cancel,
    thread: JoinHandle<()>,
}

/// The page streams of this shim, by container id.
#[derive(Default)]
pub struct Streams {
    running: Mutex<HashMap<String, Running>>,
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl Streams {
    /// Serves a committed lazy dump's memory in the background, recording its progress beside
    /// `archive` for the migration to `clone_pod_uid`.
    pub fn serve(
        &self,
        id: &str,
        who: String,
        serving: Serving,
        archive: PathBuf,
        clone_pod_uid: String,
    ) {
        let cancel = Cancel::new();
        let total_bytes = serving.ticket().total_bytes;
        let record = move |state: PagesState, moved_bytes: u64, reason: String| {
            let record = PagesRecord {
                clone_pod_uid: clone_pod_uid.clone(),
                state,
                moved_bytes,
                total_bytes,
                reason,
                updated_unix_ms: unix_millis(),
            };
            if let Err(e) = share::write_pages_record(&archive, &record) {
                warn!(archive = %archive.display(), error = %e, "recording the page stream");
            }
        };
        let thread_cancel = cancel.clone();
        let thread = std::thread::spawn(move || {
            record(PagesState::Streaming, 0, String::new());
            let mut moved = 0;
            let served = serving.serve(ACCEPT_DEADLINE, &thread_cancel, |bytes| {
                moved = bytes;
                record(PagesState::Streaming, bytes, String::new());
            });
            match served {
                Ok(()) => {
                    info!(container = %who, moved_bytes = moved, "post-copy: the clone holds every page");
                    record(PagesState::Complete, moved, String::new());
                }
                Err(e) => {
                    warn!(container = %who, error = %e, "post-copy: the page stream failed; the source keeps every page");
                    record(PagesState::Failed, moved, e.to_string());
                }
            }
        });
        self.insert(id, Running { cancel, thread });
    }

    /// Fetches a lazily restored container's memory in the background. `stop_clone` kills the
    /// container; it is called, with the reason, when the memory can no longer arrive. The
    /// restore's local copy (`restore_dir`) goes once the daemon is done with it; the restore
    /// `marker` records a loss.
    pub fn fetch(
        &self,
        id: &str,
        who: String,
        fetching: Fetching,
        restore_dir: PathBuf,
        marker: Option<PathBuf>,
        stop_clone: impl Fn(&str) + Send + Sync + 'static,
    ) {
        let cancel = Cancel::new();
        let thread_cancel = cancel.clone();
        let thread = std::thread::spawn(move || {
            let stop = |reason: &str| {
                warn!(container = %who, %reason, "post-copy: the clone's memory can no longer arrive; stopping it");
                if let Some(marker) = &marker {
                    mark_lost(marker, reason);
                }
                stop_clone(reason);
            };
            match fetching.fetch(ACCEPT_DEADLINE, &thread_cancel, stop, |_| {}) {
                Ok(()) => info!(container = %who, "post-copy: every page arrived"),
                Err(e) => {
                    warn!(container = %who, error = %e, "post-copy: fetching the memory failed")
                }
            }
            podmigrate_checkpoint::workspace::discard(&restore_dir);
        });
        self.insert(id, Running { cancel, thread });
    }

    /// Stops the stream of container `id`, if any, and waits for its thread.
    pub fn stop(&self, id: &str) {
        let running = self.lock().remove(id);
        if let Some(running) = running {
            running.cancel.cancel();
            let _ = running.thread.join();
        }
    }

    /// Whether container `id` has a stream still running.
    pub fn is_running(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|r| !r.thread.is_finished())
    }

    fn insert(&self, id: &str, running: Running) {
        let old = self.lock().insert(id.to_string(), running);
        if let Some(old) = old {
            old.cancel.cancel();
            let _ = old.thread.join();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        for id in ids {
            self.stop(&id);
        }
    }
}

/// Records in the restore marker that the container's memory was lost, so its next Create
/// fails with `reason` instead of starting a fresh process.
fn mark_lost(marker: &Path, reason: &str) {
    if let Some(parent) = marker.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    if let Err(e) = std::fs::write(marker, format!("{LOST_PREFIX}{reason}\n")) {
        warn!(marker = %marker.display(), error = %e, "recording the lost memory");
    }
}

/// Why a container whose restore marker says so may not start again: its memory was lost.
pub fn lost_reason(marker: &Path) -> Option<String> {
    let text = std::fs::read_to_string(marker).ok()?;
    text.strip_prefix(LOST_PREFIX).map(|r| r.trim().to_string())
}

/// The host file kubelet reads as the container's termination message (the bundle's mount on
/// `/dev/termination-log`), if it has one.
pub fn termination_message_file(bundle: &Path) -> Option<PathBuf> {
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).ok()?).ok()?;
    spec.get("mounts")?
        .as_array()?
        .iter()
        .find(|m| m.get("destination").and_then(|d| d.as_str()) == Some("/dev/termination-log"))
        .and_then(|m| m.get("source")?.as_str())
        .map(PathBuf::from)
}
