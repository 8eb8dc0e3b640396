//! `podmigrate status [<pod>]`: migrations in flight and recent results, read from the clones'
//! own record.

use anyhow::Context;
use clap::Args;
use comfy_table::{presets::NOTHING, Table};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use super::archive::human_bytes;
use crate::pod::annotation;
use podmigrate_vocabulary::{
    ARCHIVE_BYTES, CLONE_OF_LABEL, CLONE_POD, FROZEN_MS, MODE, PHASE, REASON, SOURCE_NODE,
};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only migrations of or to this pod (source or clone name).
    pub pod: Option<String>,
    #[arg(short, long, default_value = "default", env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(status(args))
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let kube = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster config)")?;
    let pods: Api<Pod> = if args.all_namespaces {
        Api::all(kube)
    } else {
        Api::namespaced(kube, &args.namespace)
    };
    let mut clones = pods
        .list(&ListParams::default().labels(CLONE_OF_LABEL))
        .await
        .context("listing clone pods")?
        .items;
    let get = |pod: &Pod, key: &str| annotation(pod, key).unwrap_or_default().to_string();
    if let Some(name) = &args.pod {
        clones.retain(|c| c.metadata.name.as_ref() == Some(name) || &get(c, CLONE_POD) == name);
    }
    clones.sort_by_key(|c| c.metadata.creation_timestamp.clone().map(|t| t.0));
    if clones.is_empty() {
        println!(
            "no migrations{}",
            args.pod.map(|p| format!(" of {p}")).unwrap_or_default()
        );
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header([
        "NAMESPACE",
        "SOURCE",
        "CLONE",
        "MODE",
        "PHASE",
        "FROM",
        "TO",
        "MOVED",
        "FROZEN",
        "REASON",
    ]);
    for c in &clones {
        let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
        table.add_row([
            c.metadata.namespace.clone().unwrap_or_default(),
            get(c, CLONE_POD),
            c.metadata.name.clone().unwrap_or_default(),
            dash(get(c, MODE)),
            dash(get(c, PHASE)),
            dash(get(c, SOURCE_NODE)),
            dash(
                c.spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
            ),
            get(c, ARCHIVE_BYTES)
                .parse::<u64>()
                .map(human_bytes)
                .unwrap_or_else(|_| "-".into()),
            get(c, FROZEN_MS)
                .parse::<f64>()
                .map(|ms| format!("{:.2}s", ms / 1000.0))
                .unwrap_or_else(|_| "-".into()),
            dash(get(c, REASON)),
        ]);
    }
    println!("{table}");
    Ok(())
}
