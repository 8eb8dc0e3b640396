//! `kubectl migrate <pod> --to <node>`: creates the clone, follows its phases, and ends with
//! one summary line, or the reason it failed.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

use super::archive::human_bytes;
use super::clone_pod::{build_clone_pod, default_clone_name};
use crate::agent::migration::phase_timings;
use crate::agent::reference::annotation;
use crate::agent::vocabulary::{Mode, Phase, ARCHIVE_BYTES, FROZEN_MS, PHASE, REASON};

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
    let pods: Api<Pod> = Api::namespaced(kube, &args.namespace);
    let source = pods
        .get_opt(&args.pod)
        .await
        .with_context(|| format!("reading pod {}/{}", args.namespace, args.pod))?
        .with_context(|| format!("pod {}/{} does not exist", args.namespace, args.pod))?;
    let source_node = source
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .with_context(|| format!("pod {}/{} is not on a node yet", args.namespace, args.pod))?;
    if source_node == args.to {
        bail!(
            "pod {}/{} already runs on node {}",
            args.namespace,
            args.pod,
            args.to
        );
    }
    let mode = if args.clone {
        Mode::Clone
    } else {
        Mode::Migrate
    };
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| default_clone_name(&args.pod));
    let clone = build_clone_pod(&source, &args.to, &name, mode, args.keep_archive);
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
    loop {
        let current = pods
            .get_opt(&name)
            .await
            .with_context(|| format!("reading clone pod {}/{name}", args.namespace))?
            .with_context(|| format!("clone pod {}/{name} was deleted", args.namespace))?;
        let phase = annotation(&current, PHASE).and_then(Phase::parse);
        if phase != last_phase {
            if let Some(phase) = phase {
                println!("  {:>7.1}s  {phase}", started.elapsed().as_secs_f64());
            }
            last_phase = phase;
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
                println!(
                    "{} {}/{} {} -> {} in {total:.1}s (frozen {frozen}, {} moved)",
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
        if started.elapsed() >= args.timeout {
            bail!(
                "migration of {}/{} did not finish within {} (clone {name} is {})",
                args.namespace,
                args.pod,
                humantime::format_duration(args.timeout),
                phase.map(|p| p.as_str()).unwrap_or("Pending")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
