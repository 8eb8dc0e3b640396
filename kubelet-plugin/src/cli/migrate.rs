//! `kubectl migrate <pod> --to <node>`: creates the clone, follows its phases, and ends with
//! one summary line, or the reason it failed.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod};
use kube::api::{Api, ListParams, PostParams};

use super::archive::human_bytes;
use super::clone_pod::{build_clone_pod, default_clone_name, HOSTNAME_LABEL};
use crate::pod::{annotation, pod_name, timings as phase_timings};
use crate::policy::not_opted_in;
use podmigrate_vocabulary::{
    Mode, Phase, Transfer, ARCHIVE_BYTES, FROZEN_MS, PAGES, PHASE, REASON, TRANSFER,
    TRANSFER_CHOSEN,
};

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The pod to move.
    pub pod: String,
    /// The node to move it to.
    #[arg(long = "to")]
    pub to: String,
    #[arg(short, long, default_value = "default", env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Leave the source running: the two diverge from the checkpoint on.
    #[arg(long)]
    pub clone: bool,
    /// Give up after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Keep the archives on the share after a successful restore.
    #[arg(long)]
    pub keep_archive: bool,
    /// The clone's name (default: <pod>-mig-<random>).
    #[arg(long)]
    pub name: Option<String>,
    /// How the memory moves: `postcopy` (the agent's default: the clone resumes at once and
    /// fetches the rest from the frozen source) or `stop-and-copy` (every page in the archive).
    #[arg(long, value_parser = parse_transfer)]
    pub transfer: Option<Transfer>,
}

fn parse_transfer(value: &str) -> Result<Transfer, String> {
    Transfer::parse(Some(value))
        .filter(|_| !value.is_empty())
        .ok_or_else(|| format!("unknown transfer {value:?} (expected postcopy or stop-and-copy)"))
}

pub fn run(args: MigrateArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(migrate(args))
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let kube = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster config)")?;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), &args.namespace);
    let source = pods
        .get_opt(&args.pod)
        .await
        .with_context(|| format!("reading pod {}/{}", args.namespace, args.pod))?
        .with_context(|| format!("pod {}/{} does not exist", args.namespace, args.pod))?;
    let namespace = Api::<Namespace>::all(kube.clone())
        .get_opt(&args.namespace)
        .await
        .with_context(|| format!("reading namespace {}", args.namespace))?;
    let target = Api::<Node>::all(kube.clone())
        .get_opt(&args.to)
        .await
        .with_context(|| format!("reading node {}", args.to))?;
    // Refused before anything is created: a clone that can never run would only wait out
    // its timeout.
    if let Some(why) = refusal(&source, namespace.as_ref(), target.as_ref(), &args.to) {
        bail!(why);
    }
    let source_node = node_name(&source).unwrap_or_default().to_string();
    let mode = if args.clone {
        Mode::Clone
    } else {
        Mode::Migrate
    };
    if mode == Mode::Migrate {
        if let Some(why) = crate::controller::refusal(&source, &pod_name(&source)) {
            bail!(why);
        }
    }
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| default_clone_name(&args.pod));
    let mut clone = build_clone_pod(&source, &args.to, &name, mode, args.keep_archive);
    if let Some(transfer) = args.transfer {
        clone
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(TRANSFER.into(), transfer.as_str().into());
    }
    pods.create(&PostParams::default(), &clone)
        .await
        .with_context(|| format!("creating clone pod {}/{name}", args.namespace))?;
    println!(
        "{} {}/{} {} -> {} as {name}",
        if args.clone { "cloning" } else { "migrating" },
        args.namespace,
        args.pod,
        source_node,
        args.to
    );

    let mut last_phase = None;
    let mut last_pages = None;
    loop {
        let Some(current) = pods
            .get_opt(&name)
            .await
            .with_context(|| format!("reading clone pod {}/{name}", args.namespace))?
        else {
            // The agent deletes a clone that can no longer finish once it has recorded why in
            // an Event, which outlives the pod.
            let why = ending_event(&kube, &args.namespace, &name)
                .await
                .unwrap_or_else(|| "no reason recorded".to_string());
            bail!(
                "migration of {}/{}: clone pod {name} was deleted: {why}",
                args.namespace,
                args.pod
            );
        };
        let phase = annotation(&current, PHASE).and_then(Phase::parse);
        if phase != last_phase {
            if let Some(phase) = phase {
                println!("  {:>7.1}s  {phase}", started.elapsed().as_secs_f64());
            }
            last_phase = phase;
        }
        if phase == Some(Phase::PostCopy) {
            let pages = annotation(&current, PAGES).and_then(parse_pages);
            if pages.is_some() && pages != last_pages {
                if let Some((moved, total)) = pages {
                    println!(
                        "  {:>7.1}s  PostCopy  {} of {} of memory",
                        started.elapsed().as_secs_f64(),
                        human_bytes(moved),
                        human_bytes(total)
                    );
                }
                last_pages = pages;
            }
        }
        match phase {
            Some(Phase::Running) => {
                let total = started.elapsed().as_secs_f64();
                let frozen = annotation(&current, FROZEN_MS)
                    .and_then(|v| v.parse::<f64>().ok())
                    .map(|ms| format!("{:.2}s", ms / 1000.0))
                    .unwrap_or_else(|| "0s".into());
                let bytes = annotation(&current, ARCHIVE_BYTES)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                let timings = phase_timings(&current);
                if !timings.is_empty() {
                    let parts: Vec<String> = timings
                        .iter()
                        .map(|(phase, ms)| format!("{phase} {:.2}s", *ms as f64 / 1000.0))
                        .collect();
                    println!("  phases: {}", parts.join(", "));
                }
                let transfer = annotation(&current, TRANSFER_CHOSEN).unwrap_or("stop-and-copy");
                let streamed = annotation(&current, PAGES)
                    .and_then(parse_pages)
                    .map(|(moved, _)| format!(", {} streamed", human_bytes(moved)))
                    .unwrap_or_default();
                println!(
                    "{} {}/{} {} -> {} in {total:.1}s ({transfer}, frozen {frozen}, {} archived{streamed})",
                    if args.clone { "cloned" } else { "migrated" },
                    args.namespace,
                    args.pod,
                    source_node,
                    args.to,
                    human_bytes(bytes)
                );
                return Ok(());
            }
            Some(Phase::Failed) | Some(Phase::RolledBack) => {
                bail!(
                    "migration of {}/{} {}: {}",
                    args.namespace,
                    args.pod,
                    if phase == Some(Phase::RolledBack) {
                        "rolled back"
                    } else {
                        "failed"
                    },
                    annotation(&current, REASON).unwrap_or("no reason recorded")
                );
            }
            _ => {}
        }
        // Giving up stops the migration too: nothing is left running that nobody follows.
        let gave_up = if started.elapsed() >= args.timeout {
            Some(format!(
                "did not finish within {}",
                humantime::format_duration(args.timeout)
            ))
        } else {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => None,
                _ = tokio::signal::ctrl_c() => Some("was interrupted".to_string()),
            }
        };
        if let Some(why) = gave_up {
            let who = format!(
                "kubectl migrate ({} {why})",
                super::cancel::whoami(kube.clone()).await
            );
            super::cancel::request_cancel(&pods, &current, &who).await?;
            bail!(
                "migration of {}/{} {why} (clone {name} was {}); it was cancelled and the source runs on",
                args.namespace,
                args.pod,
                phase.map(|p| p.as_str()).unwrap_or("Pending")
            );
        }
    }
}

/// The note of the newest Event that ended the migration to `clone` (rolled back, failed or
/// cancelled), which outlives the clone pod.
async fn ending_event(kube: &kube::Client, namespace: &str, clone: &str) -> Option<String> {
    let events: Api<Event> = Api::namespaced(kube.clone(), namespace);
    let listed = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={clone}")))
        .await
        .ok()?;
    listed
        .items
        .into_iter()
        .filter(|e| {
            matches!(
                e.reason.as_deref(),
                Some("RolledBack" | "Failed" | "Cancelled")
            )
        })
        .max_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0))
        .and_then(|e| e.message)
}

/// `<moved>/<total>` bytes, as [`PAGES`] records them.
fn parse_pages(value: &str) -> Option<(u64, u64)> {
    let (moved, total) = value.split_once('/')?;
    Some((moved.parse().ok()?, total.parse().ok()?))
}

/// Why `pod` cannot move to node `to` (whose object is `node`; `None`: it does not exist), in
/// one line naming the pod, or `None` when nothing known before the clone exists stands in
/// the way. `namespace` is the pod's namespace object, for the opt-in label (the agent's own
/// rule, [`not_opted_in`]); the agent checks the rest of its rules once the clone exists.
fn refusal(
    pod: &Pod,
    namespace: Option<&Namespace>,
    node: Option<&Node>,
    to: &str,
) -> Option<String> {
    let id = pod_name(pod);
    if pod.metadata.deletion_timestamp.is_some() {
        return Some(format!("pod {id} is being deleted"));
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if phase != Some("Running") {
        return Some(format!(
            "pod {id} is {}, not Running: only a running pod can be checkpointed",
            phase.filter(|p| !p.is_empty()).unwrap_or("without a phase")
        ));
    }
    let Some(source_node) = node_name(pod) else {
        return Some(format!("pod {id} is not on a node yet"));
    };
    if source_node == to {
        return Some(format!("pod {id} already runs on node {to}"));
    }
    let namespace_name = pod.metadata.namespace.as_deref().unwrap_or_default();
    if let Some(refused) = not_opted_in(pod, namespace, namespace_name) {
        return Some(refused.to_string());
    }
    let cannot = |why: String| Some(format!("cannot migrate pod {id} to node {to}: {why}"));
    let Some(node) = node else {
        return cannot("no such node".to_string());
    };
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status == "True" => {}
        Some(c) => {
            let reason = c.reason.as_deref().filter(|r| !r.is_empty());
            return cannot(format!(
                "the node is not Ready (Ready={}{})",
                c.status,
                reason.map(|r| format!(": {r}")).unwrap_or_default()
            ));
        }
        None => return cannot("the node is not Ready (no Ready condition)".to_string()),
    }
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        return cannot("the node is unschedulable (cordoned)".to_string());
    }
    // The clone keeps the source's nodeSelector, but for the node's name (retargeted): the
    // target must carry the rest, or its kubelet would refuse the clone.
    let labels = node.metadata.labels.as_ref();
    let selector = pod.spec.as_ref().and_then(|s| s.node_selector.as_ref());
    let missing: Vec<String> = selector
        .into_iter()
        .flatten()
        .filter(|(key, _)| key.as_str() != HOSTNAME_LABEL)
        .filter(|(key, value)| labels.and_then(|l| l.get(*key)) != Some(*value))
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    if !missing.is_empty() {
        return cannot(format!(
            "the node lacks the pod's nodeSelector label(s) {}",
            missing.join(", ")
        ));
    }
    None
}

fn node_name(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use podmigrate_vocabulary::MIGRATABLE;

    /// `shop/web-0`, Running on node-a, opted in by its own label.
    fn pod_json() -> Value {
        json!({
            "metadata": {"name": "web-0", "namespace": "shop", "labels": {MIGRATABLE: "true"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "web", "image": "nginx"}]},
            "status": {"phase": "Running"}
        })
    }

    /// `node-b`, Ready and schedulable.
    fn node_json() -> Value {
        json!({
            "metadata": {"name": "node-b"},
            "spec": {},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        })
    }

    fn refused(pod: Value, namespace: Option<Value>, node: Option<Value>) -> Option<String> {
        let pod: Pod = serde_json::from_value(pod).unwrap();
        let namespace: Option<Namespace> = namespace.map(|n| serde_json::from_value(n).unwrap());
        let node: Option<Node> = node.map(|n| serde_json::from_value(n).unwrap());
        refusal(&pod, namespace.as_ref(), node.as_ref(), "node-b")
    }

    #[test]
    fn a_running_opted_in_pod_may_move_to_a_ready_node() {
        assert_eq!(refused(pod_json(), None, Some(node_json())), None);
    }

    #[test]
    fn a_pod_that_did_not_opt_in_is_refused_unless_its_namespace_did() {
        let mut pod = pod_json();
        pod["metadata"]["labels"] = json!({});
        assert_eq!(
            refused(pod.clone(), None, Some(node_json())).as_deref(),
            Some(
                "source pod shop/web-0 is not migratable: label the pod or namespace shop \
                 podmigrate.io/migratable=true to allow cloning its memory"
            )
        );
        let namespace = json!({"metadata": {"name": "shop", "labels": {MIGRATABLE: "true"}}});
        assert_eq!(
            refused(pod, Some(namespace.clone()), Some(node_json())),
            None
        );
        // The pod's own label overrides its namespace's.
        let mut opted_out = pod_json();
        opted_out["metadata"]["labels"][MIGRATABLE] = json!("false");
        let why = refused(opted_out, Some(namespace), Some(node_json())).unwrap();
        assert!(why.contains("shop/web-0 opts out"), "{why}");
    }

    #[test]
    fn a_target_node_without_the_pods_node_selector_labels_is_refused_but_its_name_moves() {
        let mut pod = pod_json();
        pod["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": "node-a", "disk": "ssd"});
        assert_eq!(
            refused(pod.clone(), None, Some(node_json())).as_deref(),
            Some(
                "cannot migrate pod shop/web-0 to node node-b: the node lacks the pod's \
                 nodeSelector label(s) disk=ssd"
            )
        );
        let mut node = node_json();
        node["metadata"]["labels"] = json!({"kubernetes.io/hostname": "node-b", "disk": "ssd"});
        assert_eq!(refused(pod, None, Some(node)), None);
    }

    #[test]
    fn a_missing_target_node_is_refused() {
        assert_eq!(
            refused(pod_json(), None, None).as_deref(),
            Some("cannot migrate pod shop/web-0 to node node-b: no such node")
        );
    }

    #[test]
    fn a_target_node_that_is_not_ready_is_refused() {
        let mut node = node_json();
        node["status"]["conditions"][0] =
            json!({"type": "Ready", "status": "False", "reason": "KubeletNotReady"});
        assert_eq!(
            refused(pod_json(), None, Some(node)).as_deref(),
            Some(
                "cannot migrate pod shop/web-0 to node node-b: the node is not Ready \
                 (Ready=False: KubeletNotReady)"
            )
        );
        let mut unknown = node_json();
        unknown["status"] = json!({});
        let why = refused(pod_json(), None, Some(unknown)).unwrap();
        assert!(
            why.ends_with("the node is not Ready (no Ready condition)"),
            "{why}"
        );
    }

    #[test]
    fn an_unschedulable_target_node_is_refused() {
        let mut node = node_json();
        node["spec"]["unschedulable"] = json!(true);
        let why = refused(pod_json(), None, Some(node)).unwrap();
        assert!(
            why.ends_with("to node node-b: the node is unschedulable (cordoned)"),
            "{why}"
        );
    }

    #[test]
    fn the_pods_own_node_is_refused() {
        let mut pod = pod_json();
        pod["spec"]["nodeName"] = json!("node-b");
        assert_eq!(
            refused(pod, None, Some(node_json())).as_deref(),
            Some("pod shop/web-0 already runs on node node-b")
        );
    }

    #[test]
    fn a_pod_that_is_not_running_is_refused() {
        let mut pod = pod_json();
        pod["status"]["phase"] = json!("Pending");
        assert_eq!(
            refused(pod, None, Some(node_json())).as_deref(),
            Some("pod shop/web-0 is Pending, not Running: only a running pod can be checkpointed")
        );
    }

    #[test]
    fn a_pod_being_deleted_is_refused() {
        let mut pod = pod_json();
        pod["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        assert_eq!(
            refused(pod, None, Some(node_json())).as_deref(),
            Some("pod shop/web-0 is being deleted")
        );
    }
}
