//! `podmigrate agent`: the node agent, as the DaemonSet runs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kube::runtime::events::{Recorder, Reporter};
use podmigrate_checkpoint::gc::GcPolicy;
use podmigrate_checkpoint::share::{DEFAULT_SHARE_ROOT, DEFAULT_WORK_DIR};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::agent::containerd::Containerd;
use crate::agent::handoff::{self, Handoff};
use crate::agent::limits::Limits;
use crate::agent::machine::{Agent, AgentConfig};
use crate::agent::metrics::{self, Metrics};
use crate::agent::ports::{DirShare, KubeCluster};
use crate::agent::timeouts::Timeouts;
use crate::agent::watch;
use crate::gc::{self, GcSchedule};

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// This node's name (the DaemonSet sets it from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    #[arg(long, env = "PODMIGRATE_SHARE_ROOT", default_value = DEFAULT_SHARE_ROOT)]
    pub share_root: PathBuf,
    #[arg(long, env = "PODMIGRATE_WORK_DIR", default_value = DEFAULT_WORK_DIR)]
    pub work_dir: PathBuf,
    #[arg(
        long,
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_socket: PathBuf,
    /// Outbound migrations at once on this node; more wait, marked queued.
    #[arg(long, env = "PODMIGRATE_MAX_OUTBOUND", default_value_t = 2, value_parser = at_least_one)]
    pub max_outbound: usize,
    /// Where /metrics and /healthz are served.
    #[arg(long, env = "PODMIGRATE_METRICS_ADDR", default_value = "0.0.0.0:9477")]
    pub metrics_addr: SocketAddr,
    /// Inbound migrations at once into one node; more wait, marked queued.
    #[arg(long, env = "PODMIGRATE_MAX_INBOUND", default_value_t = 2, value_parser = at_least_one)]
    pub max_inbound: usize,
    /// Migrations at once in the whole cluster; more wait, marked queued.
    #[arg(long, env = "PODMIGRATE_MAX_CLUSTER", default_value_t = 5, value_parser = at_least_one)]
    pub max_cluster: usize,
    /// How long a migration may take per GiB of the source's memory (counted as at least
    /// 1 GiB); a clone's podmigrate.io/completion-timeout-per-gib overrides it.
    #[arg(long, env = "PODMIGRATE_COMPLETION_TIMEOUT_PER_GIB", default_value = "800s", value_parser = humantime::parse_duration)]
    pub completion_timeout_per_gib: Duration,
    /// How long a migration may make no progress (no archive bytes packed, no change in the
    /// clone's containers); a clone's podmigrate.io/progress-timeout overrides it.
    #[arg(long, env = "PODMIGRATE_PROGRESS_TIMEOUT", default_value = "150s", value_parser = humantime::parse_duration)]
    pub progress_timeout: Duration,
    /// How long to wait before freezing for the clone to reserve memory for the checkpoint (it
    /// freezes anyway after that; `0`: do not wait).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub prepare_wait: Duration,
    /// How often to garbage-collect the share and the work directory (`0`: never).
    #[arg(long, env = "PODMIGRATE_GC_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub gc_interval: Duration,
    /// GC removes archives and work directories older than this (`0`: no age limit).
    #[arg(long, env = "PODMIGRATE_GC_MAX_AGE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub gc_max_age: Duration,
    /// GC keeps at most this many archives on the share (default: no count limit).
    #[arg(long, env = "PODMIGRATE_GC_KEEP_LAST")]
    pub gc_keep_last: Option<usize>,
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{value:?} is not a whole number of at least 1")),
    }
}

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: AgentArgs) -> anyhow::Result<()> {
    let kube = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let containerd = Containerd::connect(&args.containerd_socket).await?;
    let metrics = Arc::new(Metrics::default());
    let reporter = Reporter {
        controller: "podmigrate-agent".into(),
        instance: Some(args.node_name.clone()),
    };
    let recorder = Recorder::new(kube.clone(), reporter);
    let gc_schedule = Arc::new(GcSchedule {
        every: args.gc_interval,
        policy: GcPolicy {
            max_age: (!args.gc_max_age.is_zero()).then_some(args.gc_max_age),
            keep_last: args.gc_keep_last,
            ..GcPolicy::default()
        },
        share_root: args.share_root.clone(),
        work_dir: args.work_dir.clone(),
    });
    let gc_kube = kube.clone();
    let config = AgentConfig {
        node_name: args.node_name,
        work_dir: args.work_dir,
        limits: Limits {
            max_outbound: args.max_outbound,
            max_inbound: args.max_inbound,
            max_cluster: args.max_cluster,
        },
        timeouts: Timeouts {
            completion_per_gib: args.completion_timeout_per_gib,
            progress: args.progress_timeout,
        },
        prepare_wait: args.prepare_wait,
    };
    info!(node = %config.node_name, share = %args.share_root.display(), limits = ?config.limits, timeouts = ?config.timeouts, "agent starting");
    let agent = Arc::new(Agent::new(
        KubeCluster {
            client: kube,
            recorder,
        },
        containerd,
        DirShare {
            root: args.share_root,
        },
        config,
        Arc::clone(&metrics),
    ));

    let shutdown = CancellationToken::new();
    let on_signal = {
        let shutdown = shutdown.clone();
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = shutdown.cancelled() => {}
            }
            info!("stopping");
            shutdown.cancel();
        }
    };
    // Whichever part ends first stops the others.
    let served = {
        let shutdown = shutdown.clone();
        async move {
            let served = metrics::serve(metrics, args.metrics_addr, shutdown.clone()).await;
            shutdown.cancel();
            served
        }
    };
    let collected = gc::run_periodically(gc_kube, gc_schedule, shutdown.clone());
    let handoff = Handoff::new(Arc::clone(&agent), shutdown.clone());
    let answered = {
        let shutdown = shutdown.clone();
        let handoff = Arc::clone(&handoff);
        let work_dir = agent.config.work_dir.clone();
        async move {
            let answered = handoff::serve(handoff, &work_dir).await;
            shutdown.cancel();
            answered.with_context(|| format!("answering the shims in {}", work_dir.display()))
        }
    };
    let released = handoff::run_release(handoff);
    let watched = {
        let shutdown = shutdown.clone();
        async move {
            watch::run(agent, shutdown.clone()).await;
            shutdown.cancel();
        }
    };
    let (served, answered, (), (), (), ()) =
        tokio::join!(served, answered, watched, released, on_signal, collected);
    answered?;
    served.with_context(|| format!("serving metrics on {}", args.metrics_addr))
}
