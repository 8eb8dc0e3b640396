//! Draining a node of the real cluster: cordons undone when a test ends (also when it fails),
//! `kubectl drain`, the pods a controller runs in a given place, the Jobs that complete, and the
//! departure records (Leases) podmigrate keeps meanwhile.
//!
//! The pods and controllers themselves are [`crate::cluster`]'s ([`roaming_counter_pod`],
//! [`counter_controller`], [`indexed_counter_job`]).
//!
//! [`roaming_counter_pod`]: crate::cluster::roaming_counter_pod
//! [`counter_controller`]: crate::cluster::counter_controller
//! [`indexed_counter_job`]: crate::cluster::indexed_counter_job

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use k8s_openapi::api::batch::v1::{Job, JobStatus};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use podmigrate_vocabulary::DEPARTURE_LEASE_PREFIX;

use crate::cluster::{is_ready, KubeCluster, TestNamespace};

/// The label an Indexed Job puts on each of its pods: its completion index.
pub const JOB_COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";

/// Nodes a test cordoned (or drained), uncordoned when dropped, also when the test fails. Keep it
/// alive until the end of the test, after [`KubeCluster::exclusive`]'s guard (declared later, it
/// drops first).
pub struct Cordons<'a> {
    cluster: &'a KubeCluster,
    nodes: Vec<String>,
}

impl<'a> Cordons<'a> {
    pub fn new(cluster: &'a KubeCluster) -> Cordons<'a> {
        Cordons {
            cluster,
            nodes: Vec::new(),
        }
    }

    fn remember(&mut self, node: &str) {
        if !self.nodes.iter().any(|n| n == node) {
            self.nodes.push(node.to_owned());
        }
    }

    /// `kubectl cordon <node>`: nothing new is scheduled there.
    pub fn cordon(&mut self, node: &str) -> Result<()> {
        self.remember(node);
        self.cluster.kubectl(&["cordon", node]).map(drop)
    }

    /// `kubectl uncordon <node>`, now.
    pub fn uncordon(&mut self, node: &str) -> Result<()> {
        self.cluster.kubectl(&["uncordon", node])?;
        self.nodes.retain(|n| n != node);
        Ok(())
    }

    /// `kubectl drain <node> --ignore-daemonsets --delete-emptydir-data --timeout=<timeout>`:
    /// cordons the node, evicts its pods (but the agent's, a DaemonSet's) and waits until they
    /// are gone. What it printed; its stderr in the error if it fails. The node stays cordoned
    /// until it is uncordoned or this guard drops.
    pub fn drain(&mut self, node: &str, timeout: Duration) -> Result<String> {
        self.remember(node);
        self.cluster.kubectl(&[
            "drain",
            node,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            &format!("--timeout={}s", timeout.as_secs()),
        ])
    }
}

impl Drop for Cordons<'_> {
    fn drop(&mut self) {
        for node in std::mem::take(&mut self.nodes) {
            if let Err(e) = self.cluster.kubectl(&["uncordon", &node]) {
                eprintln!("uncordoning {node}: {e:#}");
            }
        }
    }
}

/// `app=<app>`, and `extra` (a label selector) if not empty.
fn selector(app: &str, extra: &str) -> String {
    if extra.is_empty() {
        format!("app={app}")
    } else {
        format!("app={app},{extra}")
    }
}

/// The pods labelled `app=<app>` (and `extra`, a label selector, if not empty) that are not
/// being deleted.
pub async fn live_pods(ns: &TestNamespace, app: &str, extra: &str) -> Result<Vec<Pod>> {
    Ok(ns
        .pods
        .list(&ListParams::default().labels(&selector(app, extra)))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

fn name_of(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

/// Waits until the live pods of `app` (and `extra`, e.g. a Job's completion index) are exactly
/// `count`, each ready on `node`; their names, sorted. The error lists what was seen.
pub async fn wait_ready_on(
    ns: &TestNamespace,
    app: &str,
    extra: &str,
    count: usize,
    node: &str,
    timeout: Duration,
) -> Result<Vec<String>> {
    let started = Instant::now();
    loop {
        let pods = live_pods(ns, app, extra).await?;
        if pods.len() == count && pods.iter().all(|p| node_of(p) == Some(node) && is_ready(p)) {
            let mut names: Vec<String> = pods.iter().map(name_of).collect();
            names.sort();
            return Ok(names);
        }
        if started.elapsed() >= timeout {
            let seen: Vec<String> = pods
                .iter()
                .map(|p| {
                    format!(
                        "{} on {:?}: {}",
                        name_of(p),
                        node_of(p),
                        serde_json::to_string(&p.status).unwrap_or_default()
                    )
                })
                .collect();
            bail!(
                "not {count} ready pods {} on {node} in {} after {timeout:?}: {seen:#?}",
                selector(app, extra),
                ns.name
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The one pod of `app` with identity `extra` (a label selector; empty for a controller of one
/// pod), once it runs ready on `node`: its name.
pub async fn wait_one_ready_on(
    ns: &TestNamespace,
    app: &str,
    extra: &str,
    node: &str,
    timeout: Duration,
) -> Result<String> {
    let mut names = wait_ready_on(ns, app, extra, 1, node, timeout).await?;
    Ok(names.remove(0))
}

/// Waits until Job `name` is `Complete`; its status. Fails at once if it `Failed`.
pub async fn wait_job_complete(
    ns: &TestNamespace,
    name: &str,
    timeout: Duration,
) -> Result<JobStatus> {
    let jobs: Api<Job> = Api::namespaced(ns.client.clone(), &ns.name);
    let started = Instant::now();
    loop {
        let status = jobs.get(name).await?.status.unwrap_or_default();
        let condition = |kind: &str| {
            status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == kind && c.status == "True")
        };
        if condition("Complete") {
            return Ok(status);
        }
        if condition("Failed") || started.elapsed() >= timeout {
            bail!(
                "Job {}/{name} did not complete within {timeout:?}: {status:?}",
                ns.name
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The names of the departure records (`podmigrate-departure-<pod uid>` Leases) in the
/// namespace.
pub async fn departure_records(ns: &TestNamespace) -> Result<Vec<String>> {
    let leases: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    Ok(leases
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|l| l.metadata.name)
        .filter(|n| n.starts_with(DEPARTURE_LEASE_PREFIX))
        .collect())
}

/// Waits until no departure record is left in the namespace (a committed one goes once its
/// replacement runs, a failed one a minute after it failed).
pub async fn wait_no_departure_records(ns: &TestNamespace, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let left = departure_records(ns).await?;
        if left.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            bail!(
                "departure records left in {} after {timeout:?}: {left:?}",
                ns.name
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
