//! What the node agent does about one clone pod: the whole decision, as a pure function of
//! the objects the watch loop already holds, so every rule is unit-tested without a cluster.
//!
//! Exactly one agent acts on a clone: the one on the source's node (only it can checkpoint the
//! source). When there is no scheduled source to point at (missing, or unreadable reference),
//! the agent on the clone's node speaks instead, so a refusal is reported once, not by every
//! node of the DaemonSet.

use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::pod::{
    annotation, clone_mode, clone_reference, pod_name, CloneRef, ModeError, ReferenceError,
};
use podmigrate_vocabulary::{
    Mode, Phase, Transfer, MIGRATABLE, PHASE, RUNTIME_CLASS, SOURCE_NODE, TRANSFER,
};

/// The annotation the kubelet puts on the API mirror of a static pod.
const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What the agent on `this_node` should do about a clone pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Checkpoint `containers` of `source` (on this node) now.
    Checkpoint {
        source: String,
        /// The source's app containers (`spec.containers`), in spec order.
        containers: Vec<String>,
        mode: Mode,
    },
    /// The clone is mid-checkpoint on this node, so this agent started it and then restarted:
    /// never checkpoint twice; finish or roll back (thaw the source) instead.
    Resume { source: String, phase: Phase },
    /// Another node's agent (or nobody: not a clone) handles it.
    NotMine { reason: NotMineReason },
    /// Nothing to do now; a later change to one of the pods may change that.
    Wait { reason: WaitReason },
    /// Will never be done as asked: report it (a Kubernetes Event, phase Failed).
    Refuse { reason: Refusal },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotMineReason {
    /// The pod has no clone reference.
    NotAClone { pod: String },
    /// The source runs on another node.
    SourceOnOtherNode { source: String, node: String },
    /// No scheduled source; the clone's node speaks for it.
    CloneOnOtherNode { clone: String, node: String },
    /// Mid-checkpoint, started by the agent of another node.
    CheckpointedElsewhere { clone: String, node: String },
}

impl fmt::Display for NotMineReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAClone { pod } => write!(f, "pod {pod} is not a clone"),
            Self::SourceOnOtherNode { source, node } => write!(
                f,
                "source pod {source} runs on node {node}: that node's agent handles it"
            ),
            Self::CloneOnOtherNode { clone, node } => write!(
                f,
                "clone {clone} is on node {node} and its source is on no node: that node's agent \
                 handles it"
            ),
            Self::CheckpointedElsewhere { clone, node } => write!(
                f,
                "clone {clone} is being checkpointed on node {node}: that node's agent handles it"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// Running, Failed or RolledBack: nothing more happens.
    Finished { clone: String, phase: Phase },
    /// The shim on the clone's node restores; the agent has nothing to do.
    Restoring { clone: String },
    /// Deleted before its checkpoint began: nothing to do, nothing to undo.
    CloneDeleting { clone: String },
    /// Neither pod is on a node yet, so no agent owns it yet.
    Unscheduled { clone: String },
    /// The source is frozen only once its clone has somewhere to go.
    CloneNotScheduled { clone: String },
    /// `phase` is the source's pod phase (`Pending`, `Unknown`...).
    SourceNotRunning { source: String, phase: String },
    /// The source is itself a clone whose migration is still under way.
    SourceMigrating { source: String, phase: Phase },
    /// One of the containers to checkpoint is not running (starting, restarting, exited).
    ContainerNotRunning {
        source: String,
        container: String,
        state: String,
    },
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Finished { clone, phase } => write!(f, "clone {clone} is already {phase}"),
            Self::Restoring { clone } => write!(
                f,
                "clone {clone} is Restoring: the shim on its node does that"
            ),
            Self::CloneDeleting { clone } => write!(
                f,
                "clone {clone} is being deleted before its checkpoint began"
            ),
            Self::Unscheduled { clone } => {
                write!(f, "neither clone {clone} nor its source is on a node yet")
            }
            Self::CloneNotScheduled { clone } => write!(
                f,
                "clone {clone} has no node yet: the source is checkpointed only once its clone \
                 has somewhere to go"
            ),
            Self::SourceNotRunning { source, phase } => {
                write!(f, "source pod {source} is {phase}, not Running yet")
            }
            Self::SourceMigrating { source, phase } => {
                write!(f, "source pod {source} is itself a clone still {phase}")
            }
            Self::ContainerNotRunning {
                source,
                container,
                state,
            } => write!(
                f,
                "container {container} of source pod {source} is not running ({state})"
            ),
        }
    }
}

/// Why a clone is refused. `Display` is the Event message (one line, naming the pods);
/// [`Refusal::event_reason`] the Event's short reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Cross-namespace, invalid or conflicting reference.
    Reference(ReferenceError),
    SelfReference {
        clone: String,
    },
    UnknownMode(ModeError),
    UnknownTransfer {
        clone: String,
        value: String,
    },
    UnknownPhase {
        clone: String,
        value: String,
    },
    /// The kubelet already failed (or finished) the clone pod, e.g. NodeAffinity at admission.
    CloneFinished {
        clone: String,
        phase: String,
        why: Option<String>,
    },
    /// Only the migrate shim restores a checkpoint; any other runtime starts fresh, and in
    /// migrate mode the source would then be deleted with its state.
    CloneRuntimeClass {
        clone: String,
        runtime_class: Option<String>,
    },
    SourceMissing {
        source: String,
    },
    SourceDeleting {
        source: String,
    },
    /// The source's containers have all exited for good: no process to checkpoint.
    SourceFinished {
        source: String,
        phase: String,
    },
    /// Only the migrate shim checkpoints; a source under another handler (kata, gVisor,
    /// plain runc) cannot be. No runtimeClassName is allowed: the node's default may be ours.
    SourceRuntimeClass {
        source: String,
        runtime_class: String,
    },
    /// A DaemonSet runs one pod per node and would adopt and delete the clone.
    DaemonSetPod {
        source: String,
        daemon_set: String,
    },
    /// A static pod belongs to its node's kubelet, which would recreate it after migration.
    StaticPod {
        source: String,
    },
    /// Memory can hold secrets: nobody may clone what its owner did not offer.
    NotOptedIn {
        source: String,
        namespace: String,
        /// The pod's own label value when it is present but not `"true"` (an opt-out that
        /// overrides the namespace).
        pod_label: Option<String>,
    },
    NoAppContainers {
        source: String,
    },
    /// Checkpoints are per container name: every source container needs its namesake.
    ContainersDiffer {
        source: String,
        missing: Vec<String>,
        extra: Vec<String>,
    },
    /// A checkpoint restores only onto the image it was taken from.
    ImageDiffers {
        source: String,
        container: String,
        source_image: String,
        clone_image: String,
    },
    /// Two clones of one source would freeze it twice and race to restore.
    AnotherCloneInProgress {
        source: String,
        other: String,
    },
}

impl Refusal {
    /// A CamelCase reason for the Kubernetes Event.
    pub fn event_reason(&self) -> &'static str {
        match self {
            Self::Reference(ReferenceError::CrossNamespace { .. }) => "CrossNamespaceClone",
            Self::Reference(_) => "InvalidCloneReference",
            Self::SelfReference { .. } => "SelfClone",
            Self::UnknownMode(_) => "UnknownMode",
            Self::UnknownTransfer { .. } => "UnknownTransfer",
            Self::UnknownPhase { .. } => "UnknownPhase",
            Self::CloneFinished { .. } => "CloneFinished",
            Self::CloneRuntimeClass { .. } => "CloneRuntimeClass",
            Self::SourceMissing { .. } => "SourceNotFound",
            Self::SourceDeleting { .. } => "SourceDeleting",
            Self::SourceFinished { .. } => "SourceFinished",
            Self::SourceRuntimeClass { .. } => "SourceRuntimeClass",
            Self::DaemonSetPod { .. } => "DaemonSetPod",
            Self::StaticPod { .. } => "StaticPod",
            Self::NotOptedIn { .. } => "NotMigratable",
            Self::NoAppContainers { .. } => "NoContainers",
            Self::ContainersDiffer { .. } => "ContainersDiffer",
            Self::ImageDiffers { .. } => "ImageDiffers",
            Self::AnotherCloneInProgress { .. } => "CloneInProgress",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reference(err) => err.fmt(f),
            Self::UnknownMode(err) => err.fmt(f),
            Self::UnknownTransfer { clone, value } => write!(
                f,
                "clone {clone} has unknown {TRANSFER} {value:?} (expected \"postcopy\" or \"stop-and-copy\")"
            ),
            Self::SelfReference { clone } => write!(f, "clone {clone} names itself as its source"),
            Self::UnknownPhase { clone, value } => {
                write!(f, "clone {clone} has unknown {PHASE} {value:?}")
            }
            Self::CloneFinished { clone, phase, why } => {
                write!(f, "clone {clone} is {phase} before its checkpoint")?;
                if let Some(why) = why {
                    write!(f, " ({why})")?;
                }
                f.write_str(": nothing to restore into")
            }
            Self::CloneRuntimeClass {
                clone,
                runtime_class,
            } => write!(
                f,
                "clone {clone} has runtimeClassName {}, not {RUNTIME_CLASS:?}: its containers \
                 would start fresh instead of being restored",
                runtime_class
                    .as_deref()
                    .map_or_else(|| "unset".to_string(), |c| format!("{c:?}"))
            ),
            Self::SourceMissing { source } => write!(f, "source pod {source} does not exist"),
            Self::SourceDeleting { source } => write!(f, "source pod {source} is being deleted"),
            Self::SourceFinished { source, phase } => write!(
                f,
                "source pod {source} has terminated ({phase}): no running process to checkpoint"
            ),
            Self::SourceRuntimeClass {
                source,
                runtime_class,
            } => write!(
                f,
                "source pod {source} runs under runtimeClassName {runtime_class:?}, not \
                 {RUNTIME_CLASS:?}: only the migrate shim can checkpoint it"
            ),
            Self::DaemonSetPod { source, daemon_set } => write!(
                f,
                "source pod {source} belongs to DaemonSet {daemon_set}, which runs one pod per \
                 node and would delete a clone"
            ),
            Self::StaticPod { source } => write!(
                f,
                "source pod {source} is a static pod: its node's kubelet owns it"
            ),
            Self::NotOptedIn {
                source,
                namespace,
                pod_label: Some(value),
            } => write!(
                f,
                "source pod {source} opts out of cloning ({MIGRATABLE}={value:?} overrides \
                 namespace {namespace})"
            ),
            Self::NotOptedIn {
                source,
                namespace,
                pod_label: None,
            } => write!(
                f,
                "source pod {source} is not migratable: label the pod or namespace {namespace} \
                 {MIGRATABLE}=true to allow cloning its memory"
            ),
            Self::NoAppContainers { source } => {
                write!(f, "source pod {source} has no containers to checkpoint")
            }
            Self::ContainersDiffer {
                source,
                missing,
                extra,
            } => {
                write!(
                    f,
                    "the clone's containers do not match source pod {source}'s by name"
                )?;
                if !missing.is_empty() {
                    write!(f, "; missing from the clone: {}", missing.join(", "))?;
                }
                if !extra.is_empty() {
                    write!(f, "; not in the source: {}", extra.join(", "))?;
                }
                Ok(())
            }
            Self::ImageDiffers {
                source,
                container,
                source_image,
                clone_image,
            } => write!(
                f,
                "container {container}: the clone's image {clone_image:?} differs from source \
                 pod {source}'s {source_image:?}; a checkpoint restores only onto its own image"
            ),
            Self::AnotherCloneInProgress { source, other } => write!(
                f,
                "clone {other} of the same source pod {source} is already in progress"
            ),
        }
    }
}

/// Decide about `clone` on `this_node`.
///
/// - `source`: the pod the clone's reference names, in the clone's namespace, if it exists.
/// - `source_namespace`: the clone's namespace object, for its opt-in label.
/// - `clones_of_same_source`: other pods of the namespace naming the same source (the clone
///   itself may be among them; pods naming another source are ignored).
pub fn decide(
    clone: &Pod,
    source: Option<&Pod>,
    source_namespace: Option<&Namespace>,
    clones_of_same_source: &[Pod],
    this_node: &str,
) -> Decision {
    decide_with_reference(
        clone,
        clone_reference(clone),
        source,
        source_namespace,
        clones_of_same_source,
        this_node,
    )
}

/// [`decide`] with the reference already read, e.g. by
/// [`clone_reference_raw`](crate::pod::clone_reference_raw) from a pod's raw JSON
/// where an API server keeps `spec.clonePod`.
pub fn decide_with_reference(
    clone: &Pod,
    reference: Result<Option<CloneRef>, ReferenceError>,
    source: Option<&Pod>,
    source_namespace: Option<&Namespace>,
    clones_of_same_source: &[Pod],
    this_node: &str,
) -> Decision {
    let clone_id = pod_name(clone);
    let reference = match reference {
        Ok(None) => return not_mine(NotMineReason::NotAClone { pod: clone_id }),
        Ok(Some(reference)) => Ok(reference),
        Err(err) => Err(err),
    };
    let phase = match annotation(clone, PHASE) {
        None => Ok(Phase::Pending),
        Some(value) => Phase::parse(value).ok_or(value),
    };

    // Past Pending, the migration has begun: it is never started again, whatever changed
    // since (a migrated source is deleted on purpose, for one).
    if let Ok(phase) = phase {
        if phase.is_final() {
            return wait(WaitReason::Finished {
                clone: clone_id,
                phase,
            });
        }
        match phase {
            Phase::Restoring | Phase::PostCopy => {
                return wait(WaitReason::Restoring { clone: clone_id })
            }
            Phase::Checkpointing | Phase::Transferring => {
                // The node recorded when the checkpoint began, else the source's own.
                let recorded = annotation(clone, SOURCE_NODE).or_else(|| source.and_then(node));
                if let (Ok(reference), Some(node)) = (&reference, recorded) {
                    return if node == this_node {
                        Decision::Resume {
                            source: reference.source.clone(),
                            phase,
                        }
                    } else {
                        not_mine(NotMineReason::CheckpointedElsewhere {
                            clone: clone_id,
                            node: node.to_string(),
                        })
                    };
                }
                // No node to resume on, or a reference edited mid-flight: refused below.
            }
            _ => {}
        }
    }

    // One agent speaks for each clone: the source's node's, else the clone's node's.
    let source_node = source.and_then(node);
    match (source_node, node(clone)) {
        (Some(node), _) if node != this_node => {
            return not_mine(NotMineReason::SourceOnOtherNode {
                source: pod_name(source.expect("a node implies a source")),
                node: node.to_string(),
            })
        }
        (Some(_), _) => {}
        (None, Some(node)) if node != this_node => {
            return not_mine(NotMineReason::CloneOnOtherNode {
                clone: clone_id,
                node: node.to_string(),
            })
        }
        (None, Some(_)) => {}
        (None, None) => return wait(WaitReason::Unscheduled { clone: clone_id }),
    }

    if clone.metadata.deletion_timestamp.is_some() {
        return wait(WaitReason::CloneDeleting { clone: clone_id });
    }
    let reference = match reference {
        Ok(reference) => reference,
        Err(err) => return refuse(Refusal::Reference(err)),
    };
    if Some(reference.source.as_str()) == clone.metadata.name.as_deref() {
        return refuse(Refusal::SelfReference { clone: clone_id });
    }
    let mode = match clone_mode(clone) {
        Ok(mode) => mode,
        Err(err) => return refuse(Refusal::UnknownMode(err)),
    };
    if let Some(value) = annotation(clone, TRANSFER).filter(|v| Transfer::parse(Some(v)).is_none())
    {
        return refuse(Refusal::UnknownTransfer {
            clone: clone_id,
            value: value.to_string(),
        });
    }
    if let Err(value) = phase {
        return refuse(Refusal::UnknownPhase {
            clone: clone_id,
            value: value.to_string(),
        });
    }
    if let Some(phase @ ("Failed" | "Succeeded")) = pod_phase(clone) {
        let status = clone.status.as_ref();
        let why = status
            .and_then(|s| s.reason.clone().or_else(|| s.message.clone()))
            .filter(|why| !why.is_empty());
        return refuse(Refusal::CloneFinished {
            clone: clone_id,
            phase: phase.to_string(),
            why,
        });
    }
    let clone_runtime = runtime_class(clone);
    if clone_runtime != Some(RUNTIME_CLASS) {
        return refuse(Refusal::CloneRuntimeClass {
            clone: clone_id,
            runtime_class: clone_runtime.map(str::to_string),
        });
    }

    let namespace = clone.metadata.namespace.clone().unwrap_or_default();
    let Some(source) = source else {
        let source = if namespace.is_empty() {
            reference.source.clone()
        } else {
            format!("{namespace}/{}", reference.source)
        };
        return refuse(Refusal::SourceMissing { source });
    };
    let source_id = pod_name(source);
    if source.metadata.deletion_timestamp.is_some() {
        return refuse(Refusal::SourceDeleting { source: source_id });
    }
    if let Some(phase @ ("Failed" | "Succeeded")) = pod_phase(source) {
        return refuse(Refusal::SourceFinished {
            source: source_id,
            phase: phase.to_string(),
        });
    }
    if let Some(runtime_class) = runtime_class(source).filter(|c| *c != RUNTIME_CLASS) {
        return refuse(Refusal::SourceRuntimeClass {
            source: source_id,
            runtime_class: runtime_class.to_string(),
        });
    }
    if let Some(owner) = source.metadata.owner_references.iter().flatten().find(|o| {
        o.kind == "DaemonSet" && o.api_version.starts_with("apps/") && o.controller == Some(true)
    }) {
        return refuse(Refusal::DaemonSetPod {
            source: source_id,
            daemon_set: format!("{namespace}/{}", owner.name),
        });
    }
    if annotation(source, MIRROR_POD_ANNOTATION).is_some() {
        return refuse(Refusal::StaticPod { source: source_id });
    }
    if let Some(refusal) = not_opted_in(source, source_namespace, &namespace) {
        return refuse(refusal);
    }

    let source_containers = app_containers(source);
    if source_containers.is_empty() {
        return refuse(Refusal::NoAppContainers { source: source_id });
    }
    let clone_containers = app_containers(clone);
    let missing = names_not_in(&source_containers, &clone_containers);
    let extra = names_not_in(&clone_containers, &source_containers);
    if !missing.is_empty() || !extra.is_empty() {
        return refuse(Refusal::ContainersDiffer {
            source: source_id,
            missing,
            extra,
        });
    }
    for (name, source_image) in &source_containers {
        let clone_image = clone_containers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, image)| *image)
            .unwrap_or_default();
        if clone_image != *source_image {
            return refuse(Refusal::ImageDiffers {
                source: source_id,
                container: name.to_string(),
                source_image: source_image.to_string(),
                clone_image: clone_image.to_string(),
            });
        }
    }
    if let Some(other) = blocking_clone(clone, &reference.source, clones_of_same_source) {
        return refuse(Refusal::AnotherCloneInProgress {
            source: source_id,
            other: pod_name(other),
        });
    }

    if node(clone).is_none() {
        return wait(WaitReason::CloneNotScheduled { clone: clone_id });
    }
    let source_phase = pod_phase(source).unwrap_or("Pending");
    if source_phase != "Running" || source_node != Some(this_node) {
        return wait(WaitReason::SourceNotRunning {
            source: source_id,
            phase: source_phase.to_string(),
        });
    }
    if let Some(phase) = annotation(source, PHASE)
        .and_then(Phase::parse)
        .filter(|p| !p.is_final())
    {
        return wait(WaitReason::SourceMigrating {
            source: source_id,
            phase,
        });
    }
    for (container, _) in &source_containers {
        if let Some(state) = not_running(source, container) {
            return wait(WaitReason::ContainerNotRunning {
                source: source_id,
                container: container.to_string(),
                state,
            });
        }
    }

    Decision::Checkpoint {
        source: reference.source,
        containers: source_containers
            .iter()
            .map(|(name, _)| name.to_string())
            .collect(),
        mode,
    }
}

fn not_mine(reason: NotMineReason) -> Decision {
    Decision::NotMine { reason }
}

fn wait(reason: WaitReason) -> Decision {
    Decision::Wait { reason }
}

fn refuse(reason: Refusal) -> Decision {
    Decision::Refuse { reason }
}

fn node(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

fn pod_phase(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .filter(|p| !p.is_empty())
}

fn runtime_class(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.runtime_class_name.as_deref())
        .filter(|c| !c.is_empty())
}

/// Whether `source` offered its memory for cloning: `None` when it did, else
/// [`Refusal::NotOptedIn`]. The pod's own [`MIGRATABLE`] label decides when present (so a pod
/// can opt out of an opted-in namespace); otherwise that of `namespace`, the namespace object
/// named `namespace_name` (absent: not found or not read). The one rule for the agent, which
/// checks it before every checkpoint, and `kubectl migrate`, which checks it before it creates
/// a clone.
pub fn not_opted_in(
    source: &Pod,
    namespace: Option<&Namespace>,
    namespace_name: &str,
) -> Option<Refusal> {
    let label = |labels: Option<&std::collections::BTreeMap<String, String>>| {
        labels.and_then(|l| l.get(MIGRATABLE)).cloned()
    };
    let pod_label = match label(source.metadata.labels.as_ref()) {
        Some(value) if value == "true" => return None,
        Some(value) => Some(value),
        None => {
            let namespace_label = namespace
                .filter(|ns| ns.metadata.name.as_deref() == Some(namespace_name))
                .and_then(|ns| label(ns.metadata.labels.as_ref()));
            if namespace_label.as_deref() == Some("true") {
                return None;
            }
            None
        }
    };
    Some(Refusal::NotOptedIn {
        source: pod_name(source),
        namespace: namespace_name.to_string(),
        pod_label,
    })
}

/// `(name, image)` of `spec.containers`: the long-running app containers. Init containers
/// have finished, native sidecars are not carried by a clone (the CLI drops every init
/// container; a departure carries them, see `agent::handoff`), and ephemeral debug containers
/// cannot be created with a pod.
fn app_containers(pod: &Pod) -> Vec<(&str, &str)> {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| (c.name.as_str(), c.image.as_deref().unwrap_or_default()))
        .collect()
}

fn names_not_in(these: &[(&str, &str)], those: &[(&str, &str)]) -> Vec<String> {
    these
        .iter()
        .filter(|(name, _)| !those.iter().any(|(other, _)| other == name))
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Another live clone of the same source that goes first: one already past Pending, else
/// the earliest pending one by (creationTimestamp, name). Clones on their way out (deleted,
/// finished, failed by the kubelet, unreadable) do not block.
fn blocking_clone<'a>(clone: &Pod, source: &str, others: &'a [Pod]) -> Option<&'a Pod> {
    let key = |pod: &Pod| {
        (
            pod.metadata.creation_timestamp.clone(),
            pod.metadata.name.clone(),
        )
    };
    let mine = key(clone);
    let live = others.iter().filter(|other| {
        !same_pod(clone, other)
            && other.metadata.namespace == clone.metadata.namespace
            && matches!(clone_reference(other), Ok(Some(r)) if r.source == source)
            && other.metadata.deletion_timestamp.is_none()
            && !matches!(pod_phase(other), Some("Failed" | "Succeeded"))
    });
    let mut earliest_pending: Option<&Pod> = None;
    for other in live {
        let phase = match annotation(other, PHASE) {
            None => Phase::Pending,
            Some(value) => match Phase::parse(value) {
                Some(phase) => phase,
                None => continue, // refused on its own account: it will not go ahead
            },
        };
        if phase == Phase::Pending {
            let earlier = key(other) < mine && earliest_pending.is_none_or(|e| key(other) < key(e));
            if earlier {
                earliest_pending = Some(other);
            }
        } else if !phase.is_final() {
            return Some(other);
        }
    }
    earliest_pending
}

fn same_pod(a: &Pod, b: &Pod) -> bool {
    match (&a.metadata.uid, &b.metadata.uid) {
        (Some(x), Some(y)) => x == y,
        _ => a.metadata.name == b.metadata.name && a.metadata.namespace == b.metadata.namespace,
    }
}

/// Why `container` of `pod` is not running, or `None` when it is.
fn not_running(pod: &Pod, container: &str) -> Option<String> {
    let status = pod
        .status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .find(|s| s.name == container);
    let Some(state) = status.and_then(|s| s.state.as_ref()) else {
        return Some("no status yet".to_string());
    };
    if state.running.is_some() {
        return None;
    }
    Some(if let Some(waiting) = &state.waiting {
        format!(
            "waiting: {}",
            waiting.reason.as_deref().unwrap_or("unknown")
        )
    } else if let Some(terminated) = &state.terminated {
        format!(
            "terminated: {}, exit code {}",
            terminated.reason.as_deref().unwrap_or("unknown"),
            terminated.exit_code
        )
    } else {
        "no state".to_string()
    })
}

#[cfg(test)]
mod tests;
