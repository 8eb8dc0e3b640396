//! `podmigrate gc`: remove old archives, leftovers of interrupted packs, expired leases and
//! stale work directories; `--dry-run` prints what would go, and why, and removes nothing.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use podmigrate_checkpoint::gc::{self, GcPolicy, InFlight};
use podmigrate_checkpoint::share::{DEFAULT_SHARE_ROOT, DEFAULT_WORK_DIR};

use super::archive::human_bytes;
use crate::gc::in_flight_from_api;

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Print what would be removed and why; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Archives and work directories older than this go (`0` for no age limit).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_age: Duration,
    /// Keep at most this many archives on the share, newest first (pinned and in-flight ones
    /// not counted).
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Temporary files of packs older than this are leftovers of interrupted packs.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub temp_max_age: Duration,
    #[arg(long, env = "PODMIGRATE_SHARE_ROOT", default_value = DEFAULT_SHARE_ROOT)]
    pub share_root: PathBuf,
    #[arg(long, env = "PODMIGRATE_WORK_DIR", default_value = DEFAULT_WORK_DIR)]
    pub work_dir: PathBuf,
    /// Only the share (skip the work directory).
    #[arg(long, conflicts_with = "work_only")]
    pub share_only: bool,
    /// Only the work directory (skip the share).
    #[arg(long)]
    pub work_only: bool,
    /// Do not ask the API server which migrations are in flight; rely on leases alone.
    #[arg(long)]
    pub no_api: bool,
    /// How long to wait for the API server.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub api_timeout: Duration,
}

pub fn run(args: GcArgs) -> anyhow::Result<()> {
    let in_flight = if args.no_api {
        InFlight::default()
    } else {
        let timeout = args.api_timeout;
        let asked = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(async {
                tokio::time::timeout(timeout, async {
                    let kube = kube::Client::try_default()
                        .await
                        .map_err(|e| e.to_string())?;
                    in_flight_from_api(&kube).await.map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|_| Err(format!("timed out after {timeout:?} (--api-timeout)")))
            });
        match asked {
            Ok(in_flight) => in_flight,
            Err(e) => {
                eprintln!(
                    "note: API server not asked ({e}); only leases protect migrations in flight"
                );
                InFlight::default()
            }
        }
    };
    let policy = GcPolicy {
        max_age: (!args.max_age.is_zero()).then_some(args.max_age),
        keep_last: args.keep_last,
        temp_max_age: args.temp_max_age,
    };
    let share = (!args.work_only).then_some(args.share_root.as_path());
    let work = (!args.share_only).then_some(args.work_dir.as_path());
    let now = SystemTime::now();
    let plan = gc::plan(share, work, &policy, &in_flight, now).context("gc")?;
    for kept in &plan.keep {
        println!("keep {}: {}", kept.path.display(), kept.reason);
    }
    if args.dry_run {
        let bytes: u64 = plan.remove.iter().map(|r| r.bytes).sum();
        for r in &plan.remove {
            println!(
                "would remove {} {} ({}): {}",
                r.kind.as_str(),
                r.path.display(),
                human_bytes(r.bytes),
                r.reason
            );
        }
        println!(
            "dry run: would remove {} item(s), {}; nothing was removed",
            plan.remove.len(),
            human_bytes(bytes)
        );
        return Ok(());
    }
    let outcome = gc::execute(plan, now);
    for r in &outcome.removed {
        println!(
            "removed {} {} ({}): {}",
            r.kind.as_str(),
            r.path.display(),
            human_bytes(r.bytes),
            r.reason
        );
    }
    for s in &outcome.skipped {
        println!("skipped {}: {}", s.path.display(), s.reason);
    }
    println!(
        "removed {} item(s), {}",
        outcome.removed.len(),
        human_bytes(outcome.removed.iter().map(|r| r.bytes).sum())
    );
    if let Some(first) = outcome.errors.first() {
        anyhow::bail!(
            "gc: {} removal(s) failed; first: {first}",
            outcome.errors.len()
        );
    }
    Ok(())
}
