//! The names podmigrate shares between its parts: the annotations, labels and finalizer it
//! writes on Kubernetes objects, the phases of a migration, and the type URLs on the wire. One
//! place, so the shim, the agent, the CLI and the docs cannot drift apart.

/// Every annotation and label podmigrate writes starts with this; a clone drops the source's.
pub const PREFIX: &str = "podmigrate.io/";
/// On a clone pod: the name of the pod (same namespace) it is a clone of.
pub const CLONE_POD: &str = "podmigrate.io/clone-pod";
/// On a clone pod: `migrate` (default: the source stops once the clone runs) or `clone`
/// (the source keeps running).
pub const MODE: &str = "podmigrate.io/mode";
/// On a clone pod: where the migration stands (see [`Phase`]).
pub const PHASE: &str = "podmigrate.io/phase";
/// On a clone pod: why it failed or rolled back, one line.
pub const REASON: &str = "podmigrate.io/reason";
/// On a clone pod: the node the source ran on when it was checkpointed.
pub const SOURCE_NODE: &str = "podmigrate.io/source-node";
/// On a clone pod: SHA-256 of the archive manifest(s), comma-separated by container.
pub const ARCHIVE_DIGEST: &str = "podmigrate.io/archive-digest";
/// On a clone pod: total archive bytes moved across the share.
pub const ARCHIVE_BYTES: &str = "podmigrate.io/archive-bytes";
/// On a clone pod: JSON object of phase name to milliseconds spent in it.
pub const PHASE_TIMINGS: &str = "podmigrate.io/phase-timings";
/// On a clone pod: milliseconds the source was frozen (freeze to the clone running).
pub const FROZEN_MS: &str = "podmigrate.io/frozen-ms";
/// Label on a clone pod naming its source. Annotations cannot be selected by the API server,
/// so this is how the source's agent finds clones pinned to other nodes; the clone's own agent
/// adds it to a clone made by hand with the annotation only.
pub const CLONE_OF_LABEL: &str = "podmigrate.io/clone-of";
/// On a clone pod: when the source was frozen, in Unix milliseconds (survives an agent restart).
pub const FROZEN_AT: &str = "podmigrate.io/frozen-at";
/// On a clone pod: `true` keeps the archives after a successful restore.
pub const KEEP_ARCHIVE: &str = "podmigrate.io/keep-archive";
/// On a clone pod: `fresh` starts its containers anew if the checkpoint cannot be restored.
pub const FALLBACK: &str = "podmigrate.io/fallback";
/// On a source pod: its own cap on its checkpoint's bytes per second onto the share; it can
/// only lower the node's `PODMIGRATE_BANDWIDTH_PER_MIGRATION`. The shim reads it at the
/// container's Create, like all pod annotations the CRI plugin passes.
pub const BANDWIDTH: &str = "podmigrate.io/bandwidth-per-migration";
/// On a clone pod: who asked to cancel the migration (`kubectl migrate cancel`). The source's
/// agent rolls the migration back in whatever phase it stands, until the source is deleted.
pub const CANCEL: &str = "podmigrate.io/cancel";
/// On a clone pod: how long the migration may take per GiB of the source's memory (a
/// duration, `800s`), overriding the agent's `--completion-timeout-per-gib`.
pub const COMPLETION_TIMEOUT_PER_GIB: &str = "podmigrate.io/completion-timeout-per-gib";
/// On a clone pod: how long the migration may move no bytes (a duration, `150s`), overriding
/// the agent's `--progress-timeout`.
pub const PROGRESS_TIMEOUT: &str = "podmigrate.io/progress-timeout";
/// On a clone pod: the source's memory in bytes when the migration was claimed, which scales
/// its completion timeout.
pub const MEMORY_BYTES: &str = "podmigrate.io/memory-bytes";
/// On a clone pod: when the migration last made progress, in Unix milliseconds, and what it
/// had reached then (`<ms>:<mark>`: bytes packed while checkpointing, the clone's container
/// states while restoring): its progress timeout runs from there.
pub const PROGRESS: &str = "podmigrate.io/progress";
/// On a clone pod: when the source's agent claimed the migration, in Unix milliseconds: its
/// completion timeout runs from there.
pub const STARTED_AT: &str = "podmigrate.io/started-at";
/// On a clone pod: how the memory moves, `postcopy` (the default) or `stop-and-copy`
/// (`kubectl migrate --transfer`). Post-copy falls back to stop-and-copy, with the reason in an
/// Event, where the clone's node has no userfaultfd or the migration is a clone.
pub const TRANSFER: &str = "podmigrate.io/transfer";
/// On a clone pod: the transfer the source's agent chose when it froze the source.
pub const TRANSFER_CHOSEN: &str = "podmigrate.io/transfer-chosen";
/// On a clone pod in post-copy: the bytes of lazy memory the clone holds and their total
/// (`<moved>/<total>`), from the source's page stream record.
pub const PAGES: &str = "podmigrate.io/pages";
/// The finalizer the source's agent puts on a clone it claims: a clone deleted mid-migration
/// stays until its migration is rolled back (the source thawed, the archives swept).
pub const FINALIZER: &str = "podmigrate.io/migration";
/// Label on a source pod or its namespace: `"true"` opts in to being cloned. Memory can hold
/// secrets, so nobody may clone what its owner did not offer.
pub const MIGRATABLE: &str = "podmigrate.io/migratable";
/// On a pod that replaces a departed pod (a controller's new pod in the place of one deleted
/// or evicted): the name of the departed pod whose checkpoint it restores.
pub const REPLACES: &str = "podmigrate.io/replaces";
/// A departure's record is a coordination.k8s.io Lease in the pod's namespace named this and
/// the departing pod's uid: the checkpoint a deleted pod left for its replacement, claimed by
/// the replacement (its uid in `spec.holderIdentity`).
pub const DEPARTURE_LEASE_PREFIX: &str = "podmigrate-departure-";
/// On a departure record: where it stands (see [`Departure`]).
pub const DEPARTURE: &str = "podmigrate.io/departure";
/// On a departure record: the departed pod's name.
pub const DEPARTED_POD: &str = "podmigrate.io/departed-pod";
/// On a departure record: the departed pod's app containers, comma-separated, one archive each.
pub const DEPARTED_CONTAINERS: &str = "podmigrate.io/departed-containers";
/// Label on a departure record: the uid of the controller that replaces the pod.
pub const CONTROLLER_UID_LABEL: &str = "podmigrate.io/controller-uid";
/// Label on a departure record: which of the controller's pods departed (a StatefulSet's pod
/// name, a ReplicaSet's `pod-template-hash`, an Indexed Job's completion index).
pub const IDENTITY_LABEL: &str = "podmigrate.io/identity";
/// Label on a departure record: the node the pod departed from, whose agent owns the record.
pub const DEPARTED_FROM_LABEL: &str = "podmigrate.io/departed-from";
/// The RuntimeClass whose handler is our shim.
pub const RUNTIME_CLASS: &str = "migrate";

/// Labels a controller uses to count or adopt its pods: a ReplicaSet's `pod-template-hash`, a
/// StatefulSet's or DaemonSet's `controller-revision-hash`, a Job's `controller-uid`. A clone is
/// made without them, so no controller counts it while it restores; a ReplicaSet's are given
/// to it when it takes the source's place.
pub const CONTROLLER_LABELS: [&str; 4] = [
    "pod-template-hash",
    "controller-revision-hash",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
];
/// Kubernetes' own annotation: a ReplicaSet scaling down deletes the pod with the lowest cost
/// first (among pods equally ready).
pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The type URL containerd's runc shim expects on an Any holding runc's CheckpointOptions
/// (`podmigrate_proto::v1::RuncCheckpointOptions`).
pub const RUNC_CHECKPOINT_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.CheckpointOptions";
/// The field the original proof of concept added to PodSpec; a stock API server drops it, so
/// `podmigrate apply` moves it into [`CLONE_POD`].
pub const SPEC_CLONE_POD_FIELD: &str = "clonePod";

/// Where a departure stands, as written to [`DEPARTURE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// The pod is frozen and being checkpointed; its containers are not killed yet.
    Checkpointing,
    /// Every container's archive is committed: the replacement restores them.
    Committed,
    /// The checkpoint failed or ran out of time: the pod ended as usual, the replacement
    /// starts fresh.
    Failed,
}

impl Departure {
    pub const ALL: [Departure; 3] = [
        Departure::Checkpointing,
        Departure::Committed,
        Departure::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Departure::Checkpointing => "Checkpointing",
            Departure::Committed => "Committed",
            Departure::Failed => "Failed",
        }
    }

    pub fn parse(value: &str) -> Option<Departure> {
        Departure::ALL.into_iter().find(|d| d.as_str() == value)
    }
}

/// The phases of a migration, as written to [`PHASE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Pending,
    Checkpointing,
    Transferring,
    Restoring,
    /// Post-copy only: the clone runs while the rest of its memory streams in; the source
    /// stays frozen, holding every page, until the clone holds them all.
    PostCopy,
    Running,
    Failed,
    RolledBack,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Pending,
        Phase::Checkpointing,
        Phase::Transferring,
        Phase::Restoring,
        Phase::PostCopy,
        Phase::Running,
        Phase::Failed,
        Phase::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Checkpointing => "Checkpointing",
            Phase::Transferring => "Transferring",
            Phase::Restoring => "Restoring",
            Phase::PostCopy => "PostCopy",
            Phase::Running => "Running",
            Phase::Failed => "Failed",
            Phase::RolledBack => "RolledBack",
        }
    }

    pub fn parse(value: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == value)
    }

    /// No further work happens in these.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Running | Phase::Failed | Phase::RolledBack)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the source fares once its clone runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Frozen at checkpoint, deleted once the clone runs.
    Migrate,
    /// Keeps running; the two diverge from the checkpoint on.
    Clone,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Migrate => "migrate",
            Mode::Clone => "clone",
        }
    }

    /// Absent means migrate; anything else unknown is refused by the caller.
    pub fn parse(value: Option<&str>) -> Option<Mode> {
        match value {
            None | Some("") | Some("migrate") => Some(Mode::Migrate),
            Some("clone") => Some(Mode::Clone),
            Some(_) => None,
        }
    }
}

/// How the memory moves, as asked in [`TRANSFER`] and recorded in [`TRANSFER_CHOSEN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// Every page is in the archive; the freeze grows with the memory.
    StopAndCopy,
    /// The archive holds all but the lazy memory, which the clone fetches from the frozen
    /// source after it resumes; the freeze does not grow with the memory.
    PostCopy,
}

impl Transfer {
    pub fn as_str(self) -> &'static str {
        match self {
            Transfer::StopAndCopy => "stop-and-copy",
            Transfer::PostCopy => "postcopy",
        }
    }

    /// Absent means post-copy; anything else unknown is refused by the caller.
    pub fn parse(value: Option<&str>) -> Option<Transfer> {
        match value {
            None | Some("") | Some("postcopy") => Some(Transfer::PostCopy),
            Some("stop-and-copy") => Some(Transfer::StopAndCopy),
            Some(_) => None,
        }
    }
}

impl std::fmt::Display for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_we_write_has_our_prefix() {
        for name in [
            CLONE_POD,
            MODE,
            PHASE,
            REASON,
            SOURCE_NODE,
            ARCHIVE_DIGEST,
            ARCHIVE_BYTES,
            PHASE_TIMINGS,
            FROZEN_MS,
            KEEP_ARCHIVE,
            FALLBACK,
            MIGRATABLE,
            BANDWIDTH,
            CANCEL,
            COMPLETION_TIMEOUT_PER_GIB,
            PROGRESS_TIMEOUT,
            MEMORY_BYTES,
            PROGRESS,
            STARTED_AT,
            FINALIZER,
            CLONE_OF_LABEL,
            FROZEN_AT,
            TRANSFER,
            TRANSFER_CHOSEN,
            PAGES,
            REPLACES,
            DEPARTURE,
            DEPARTED_POD,
            DEPARTED_CONTAINERS,
            CONTROLLER_UID_LABEL,
            IDENTITY_LABEL,
            DEPARTED_FROM_LABEL,
        ] {
            assert!(name.starts_with(PREFIX), "{name}");
        }
    }

    #[test]
    fn phases_and_modes_round_trip_their_names() {
        for phase in Phase::ALL {
            assert_eq!(Phase::parse(phase.as_str()), Some(phase));
        }
        assert_eq!(Phase::parse("Done"), None);
        for departure in Departure::ALL {
            assert_eq!(Departure::parse(departure.as_str()), Some(departure));
        }
        assert_eq!(Mode::parse(None), Some(Mode::Migrate));
        assert_eq!(Mode::parse(Some("clone")), Some(Mode::Clone));
        assert_eq!(Mode::parse(Some("teleport")), None);
    }
}
