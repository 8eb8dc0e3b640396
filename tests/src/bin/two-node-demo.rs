//! `two-node-demo`: the tutorial, on one machine, the way it runs on a cluster (scripts/demo.sh
//! builds and runs it). Two nodes, each in its own network namespace with its own containerd
//! (our shim behind the `migrate` RuntimeClass), real `podmigrate agent` and test kubelet; one
//! API server (the in-process stand-in) and one share directory. A counter counts to 5 on
//! node-a, `kubectl migrate counter --to node-b` moves it, and node-b's counter answers 6.
//!
//! Everything is torn down on success, failure, Ctrl-C or SIGTERM. The last two lines printed
//! are the CLI's summary line and `counter 5 -> 6`. Exit status: 0 on success, 1 on failure,
//! 130/143 when interrupted.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use podmigrate_e2e::cri::POD_NAME_LABEL;
use podmigrate_e2e::nodes::{
    counter_hit, counter_pod, parse_summary, skip_reason, wait_counter_ready, Binaries, Cluster,
    ClusterOptions, Counter, NODE_A, NODE_B,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};

const POD: &str = "counter";
const PORT: u16 = 8080;
const COUNT_FILE: &str = "/tmp/count";
const WAIT: Duration = Duration::from_secs(60);

fn section(n: u32, of: u32, what: &str) {
    println!("\n[{n}/{of}] {what}");
}

fn say(what: &str) {
    println!("      {what}");
    let _ = std::io::stdout().flush();
}

/// What the demo proved, printed last.
struct Outcome {
    summary: String,
    before: u64,
    after: u64,
}

async fn demo(cluster_slot: &mut Option<Cluster>) -> Result<Outcome> {
    const STEPS: u32 = 6;
    if let Some(reason) = skip_reason() {
        bail!("this machine cannot run the demo: {reason}");
    }
    let binaries = Binaries::beside_current_exe()?;
    section(1, STEPS, "two nodes, one API server, one share");
    say(&format!("podmigrate: {}", binaries.cli.display()));
    say(&format!("shim:       {}", binaries.shim.display()));
    let cluster = cluster_slot.insert(
        Cluster::start(ClusterOptions::new(binaries))
            .await
            .context("bringing up the two nodes")?,
    );
    say(&format!("API server (stand-in): {}", cluster.api.url()));
    say(&format!(
        "share:                 {}",
        cluster.share.display()
    ));
    let (a, b) = (cluster.node(NODE_A).ip, cluster.node(NODE_B).ip);

    section(
        2,
        STEPS,
        "a stateful counter on node-a (runtimeClassName: migrate, podmigrate.io/migratable: \"true\")",
    );
    cluster
        .create_pod(&counter_pod(
            POD,
            NODE_A,
            &[Counter::new("counter", PORT, COUNT_FILE)],
        ))
        .await?;
    let pod = cluster.wait_running(POD, WAIT).await?;
    say(&format!(
        "pod default/{POD} is {} on {}",
        pod.status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default(),
        NODE_A
    ));
    wait_counter_ready(a, PORT, WAIT).await?;
    let mut last = 0;
    for expected in 1..=5 {
        last = counter_hit(a, PORT).await?;
        say(&format!("GET http://{a}:{PORT}/ -> {last}"));
        ensure!(
            last == expected,
            "the counter answered {last}, not {expected}"
        );
    }
    ensure!(
        counter_hit(b, PORT).await.is_err(),
        "node-b answers on port {PORT} before the migration"
    );
    say(&format!(
        "(node-b, {b}:{PORT}, answers nothing: separate networks)"
    ));

    section(3, STEPS, &format!("kubectl migrate {POD} --to {NODE_B}"));
    let started = Instant::now();
    let mut cli = tokio::process::Command::new(&cluster.kubectl_migrate)
        .args([POD, "--to", NODE_B, "--timeout", "150s"])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running kubectl-migrate")?;
    let stdout = cli.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    let reading = async {
        while let Some(line) = lines.next_line().await? {
            say(&format!("$ {line}"));
            printed.push(line);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(180), reading)
        .await
        .context("kubectl migrate did not finish in 180s")??;
    let output = cli.wait_with_output().await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "kubectl migrate failed ({}): {}",
        output.status,
        stderr.trim()
    );
    let summary = printed
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty())
        .cloned()
        .unwrap_or_default();
    ensure!(
        parse_summary(&summary).is_some(),
        "unexpected summary line {summary:?}"
    );
    say(&format!(
        "(the CLI ran {:.1}s)",
        started.elapsed().as_secs_f64()
    ));

    section(4, STEPS, "node-b's clone carries on");
    let clones = cluster.clones_of(POD).await?;
    let clone = clones
        .first()
        .and_then(|c| c.metadata.name.clone())
        .context("no clone pod")?;
    cluster.wait_running(&clone, WAIT).await?;
    let id = cluster
        .container_id(&clone, "counter")
        .context("the clone's container id")?;
    let file = cluster.cat(NODE_B, &id, COUNT_FILE).await?;
    say(&format!(
        "pod default/{clone} on {NODE_B}: {COUNT_FILE} holds {} (came with the rootfs diff)",
        file.trim()
    ));
    ensure!(
        file.trim() == last.to_string(),
        "{COUNT_FILE} holds {file:?}"
    );
    let next = counter_hit(b, PORT).await?;
    say(&format!(
        "GET http://{b}:{PORT}/ -> {next} (its memory came with the checkpoint)"
    ));
    ensure!(next == last + 1, "node-b's counter answered {next}");

    section(5, STEPS, "node-a's pod is gone");
    cluster.wait_gone(POD, WAIT).await?;
    say(&format!(
        "pod default/{POD} deleted by node-a's agent, torn down and confirmed by node-a's kubelet"
    ));
    let left = cluster
        .node(NODE_A)
        .cri
        .list_containers(&[(POD_NAME_LABEL, POD)])
        .await?;
    ensure!(
        left.is_empty(),
        "node-a still has {} containers",
        left.len()
    );
    say("node-a's containerd has no containers of it left");
    ensure!(counter_hit(a, PORT).await.is_err(), "node-a still answers");

    section(6, STEPS, "tearing down");
    let cluster = cluster_slot.take().expect("started above");
    cluster.shutdown().await;
    say("pods deleted, agents stopped, containerds stopped, namespaces deleted");
    Ok(Outcome {
        summary,
        before: last,
        after: next,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> ExitCode {
    println!("podmigrate: moving a live counter between two nodes");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut cluster = None;
    let result = tokio::select! {
        result = demo(&mut cluster) => result.map_err(|e| (e, 1u8)),
        _ = interrupt.recv() => Err((anyhow::anyhow!("interrupted"), 130)),
        _ = terminate.recv() => Err((anyhow::anyhow!("terminated"), 143)),
    };
    match result {
        Ok(outcome) => {
            println!();
            println!("{}", outcome.summary);
            println!("counter {} -> {}", outcome.before, outcome.after);
            ExitCode::SUCCESS
        }
        Err((error, code)) => {
            if let Some(cluster) = &cluster {
                if code == 1 {
                    eprintln!("{}", cluster.diagnostics(30));
                }
            }
            eprintln!("two-node-demo: {error:#}; tearing down");
            if let Some(cluster) = cluster.take() {
                // Containerd's cleanup blocks; keep it off the async workers.
                let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
            }
            ExitCode::from(code)
        }
    }
}
