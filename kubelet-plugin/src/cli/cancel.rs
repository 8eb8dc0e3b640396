//! `kubectl migrate cancel <pod>`: stops a migration in any phase before its source is deleted.
//! It names the pod (the source or its clone) and who asks; the source's agent thaws the source,
//! removes the clone, sweeps the archives and says who cancelled in an Event on both pods.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use podmigrate_vocabulary::{Phase, CANCEL, CLONE_OF_LABEL, CLONE_POD, PHASE, REASON};
use serde_json::json;

use crate::pod::annotation;

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The pod whose migration to stop: the source or its clone.
    pub pod: String,
    #[arg(short, long, default_value = "default", env = "POD_NAMESPACE")]
    pub namespace: String,
    /// How long to wait for the source's agent to roll the migration back.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub wait: Duration,
}

pub fn run(args: CancelArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(cancel(args))
}

fn phase(pod: &Pod) -> Phase {
    annotation(pod, PHASE)
        .and_then(Phase::parse)
        .unwrap_or(Phase::Pending)
}

async fn cancel(args: CancelArgs) -> anyhow::Result<()> {
    let kube = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster config)")?;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), &args.namespace);
    let id = format!("{}/{}", args.namespace, args.pod);
    let pod = pods
        .get_opt(&args.pod)
        .await
        .with_context(|| format!("reading pod {id}"))?
        .with_context(|| format!("pod {id} does not exist"))?;
    let clones = if annotation(&pod, CLONE_POD).is_some() {
        vec![pod]
    } else {
        pods.list(&ListParams::default().labels(&format!("{CLONE_OF_LABEL}={}", args.pod)))
            .await
            .with_context(|| format!("listing the clones of pod {id}"))?
            .items
    };
    let clones: Vec<Pod> = clones
        .into_iter()
        .filter(|c| !phase(c).is_final())
        .collect();
    if clones.is_empty() {
        bail!("no migration of pod {id} is in progress");
    }
    let who = whoami(kube).await;
    for clone in &clones {
        let name = clone.metadata.name.clone().unwrap_or_default();
        request_cancel(&pods, clone, &who).await?;
        println!(
            "cancelling migration to clone {}/{name} ({})",
            args.namespace,
            phase(clone)
        );
    }
    let started = Instant::now();
    for clone in &clones {
        let name = clone.metadata.name.clone().unwrap_or_default();
        loop {
            let Some(current) = pods
                .get_opt(&name)
                .await
                .with_context(|| format!("reading clone pod {}/{name}", args.namespace))?
            else {
                println!("migration to {}/{name} cancelled", args.namespace);
                break;
            };
            if phase(&current).is_final() && current.metadata.deletion_timestamp.is_some() {
                println!(
                    "migration to {}/{name} cancelled: {}",
                    args.namespace,
                    annotation(&current, REASON).unwrap_or("rolled back")
                );
                break;
            }
            if started.elapsed() >= args.wait {
                bail!(
                    "clone {}/{name} is still {} after {}: is the agent on the source's node running?",
                    args.namespace,
                    phase(&current),
                    humantime::format_duration(args.wait)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Asks the source's agent to stop the migration to `clone`, in `who`'s name. A clone nobody
/// claimed yet froze nothing and is deleted at once; a claimed one is held by the agent's
/// finalizer until it has rolled back.
pub async fn request_cancel(pods: &Api<Pod>, clone: &Pod, who: &str) -> anyhow::Result<()> {
    let name = clone.metadata.name.clone().unwrap_or_default();
    let namespace = clone.metadata.namespace.clone().unwrap_or_default();
    pods.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "annotations": { CANCEL: who } } })),
    )
    .await
    .with_context(|| format!("marking clone pod {namespace}/{name} cancelled"))?;
    if phase(clone) == Phase::Pending {
        match pods.delete(&name, &DeleteParams::default()).await {
            // Gone already (its agent or someone else deleted it): nothing to stop.
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => {
                return Err(e).with_context(|| format!("deleting clone pod {namespace}/{name}"))
            }
        }
    }
    Ok(())
}

/// Who the API server says we are (a SelfSubjectReview), for the agent's Event.
pub async fn whoami(kube: kube::Client) -> String {
    let review = Api::<SelfSubjectReview>::all(kube)
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await;
    review
        .ok()
        .and_then(|r| r.status?.user_info?.username)
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "kubectl migrate cancel".to_string())
}
