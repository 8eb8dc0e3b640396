//! `bench-downtime`: podmigrate's frozen time on a real two-node migration, by phase, for
//! `scripts/bench.sh downtime`, on the real cluster of `scripts/local-up-cluster.sh` (brought up
//! if none answers; one share on disk). For each ballast size, a counter pod with `-m <MiB>`
//! runs on node-a and is moved with `kubectl migrate --transfer <transfer>` while this driver
//! asks the clone's pod IP for the counter every few milliseconds. The downtime runs from the
//! agent's "freezing the source" log line to the first HTTP answer from node-b; the logs of the
//! agent (its pod's), both shims and node-b's containerd (the nodes' containerd logs, where the
//! shims log too) place each phase boundary on that same (wall) clock.
//!
//! Two more figures per run: the total time, from the freeze to the last page on node-b (node-b's
//! shim logging that every page arrived; for stop-and-copy it is the downtime), and how much
//! longer the counter takes to serve [`REQUESTS`] requests in a row right after its first answer
//! on node-b than it took on node-a just before the migration.
//!
//! Usage: `bench-downtime [--transfer stop-and-copy|postcopy] <MiB>...`; prints one JSON object
//! per size on stdout (`method` is `podmigrate` for stop-and-copy, `postcopy` for post-copy),
//! progress on stderr. Exit status 1 when a migration fails or the restored counter does not
//! continue.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use podmigrate_e2e::cli::parse_summary;
use podmigrate_e2e::cluster::{skip_reason, KubeCluster, TestNamespace, NODE_A, NODE_B};
use podmigrate_e2e::counter::{counter_hit, Counter};
use podmigrate_vocabulary::Transfer;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const PORT: u16 = 8090;
const COUNT_FILE: &str = "/tmp/count";
/// Requests timed before the freeze and after the first answer.
const REQUESTS: u64 = 1000;
/// Counts asked of node-a's counter before the timed requests.
const WARM_UP: u64 = 3;
/// How long after `kubectl migrate` ends node-b's shim may still be logging the last page.
const LAST_PAGE_LOG_WAIT: Duration = Duration::from_secs(15);

fn note(what: &str) {
    eprintln!("[bench-downtime] {what}");
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn parse_rfc3339(text: &str) -> Option<f64> {
    let t = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

/// `key=value` (the value up to the next blank) in a `tracing` fmt line.
fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The last line of `log` containing every one of `needles`.
fn last_line_with<'a>(log: &'a str, needles: &[&str]) -> Option<&'a str> {
    log.lines()
        .rev()
        .find(|l| needles.iter().all(|n| l.contains(n)))
}

/// Timestamp of a shim `tracing` line (its first word).
fn shim_time(line: &str) -> Option<f64> {
    parse_rfc3339(line.split_whitespace().next()?)
}

/// Timestamp of a containerd (logrus) line: `time="..."`.
fn containerd_time(line: &str) -> Option<f64> {
    let rest = line.split_once("time=\"")?.1;
    parse_rfc3339(rest.split_once('"')?.0)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Asks the clone's counter every 5 ms (once the clone has an IP) until it answers: (wall
/// time of the answer, its count, the clone's IP).
async fn first_answer(
    ns: &TestNamespace,
    source: &str,
    timeout: Duration,
) -> Result<(f64, u64, Ipv4Addr)> {
    let started = Instant::now();
    let mut ip = None;
    loop {
        if ip.is_none() {
            if let Some(clone) = ns.clones_of(source).await?.first() {
                ip = clone
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.as_deref())
                    .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
            }
        }
        if let Some(ip) = ip {
            if let Ok(count) = counter_hit(ip, PORT).await {
                return Ok((now_unix(), count, ip));
            }
        }
        ensure!(
            started.elapsed() < timeout,
            "node-b's counter did not answer within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Asks the counter at `ip` for [`REQUESTS`] counts in a row, each expected to be one more than
/// the last; returns the seconds they took and the last count.
async fn timed_requests(ip: Ipv4Addr, after: u64) -> Result<(f64, u64)> {
    let started = Instant::now();
    let mut count = after;
    for _ in 0..REQUESTS {
        let got = counter_hit(ip, PORT).await?;
        ensure!(
            got == count + 1,
            "the counter at {ip} answered {got}, not {}",
            count + 1
        );
        count = got;
    }
    Ok((started.elapsed().as_secs_f64(), count))
}

/// The wall time of node-b's shim logging that every page of `clone` arrived (post-copy),
/// waiting a little for the line.
async fn last_page_at(cluster: &KubeCluster, clone: &str) -> Result<f64> {
    let started = Instant::now();
    let log = cluster.dir.join(format!("logs/{NODE_B}-containerd.log"));
    loop {
        let text = read(&log)?;
        if let Some(line) = last_line_with(&text, &["every page arrived", &format!("/{clone} ")]) {
            return shim_time(line).context("shim line without timestamp");
        }
        ensure!(
            started.elapsed() < LAST_PAGE_LOG_WAIT,
            "no \"every page arrived\" line for {clone} in node-b's containerd log"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn measure(cluster: &KubeCluster, mib: u32, transfer: Transfer) -> Result<Value> {
    let pod = format!("bench-{}-{mib}", method(transfer).1);
    let ns = cluster.namespace(&pod).await?;
    let ready_within = Duration::from_secs(120 + u64::from(mib) / 10);
    let a = ns
        .start_counters(
            &pod,
            NODE_A,
            &[Counter::new("counter", PORT, COUNT_FILE).ballast(mib)],
            ready_within,
        )
        .await?;
    for expected in 1..=WARM_UP {
        let got = counter_hit(a, PORT).await?;
        ensure!(
            got == expected,
            "node-a's counter answered {got}, not {expected}"
        );
    }
    let (requests_before, at) = timed_requests(a, WARM_UP).await?;
    note(&format!(
        "{pod}: counter with {mib} MiB ballast at {at} on node-a ({REQUESTS} requests in {requests_before:.3}s); migrating ({})",
        transfer.as_str()
    ));
    let load_before = loadavg();

    let timeout = Duration::from_secs(300 + u64::from(mib) / 5);
    let cli = ns.spawn_kubectl_migrate(&[
        &pod,
        "--to",
        NODE_B,
        "--transfer",
        transfer.as_str(),
        "--timeout",
        &format!("{}s", timeout.as_secs()),
    ])?;
    // The timed requests start at the first answer, while a post-copy clone's memory still moves.
    let answer_then_requests = async {
        let (answered_at, count, ip) = first_answer(&ns, &pod, timeout).await?;
        let (requests_after, _) = timed_requests(ip, count).await?;
        anyhow::Ok((answered_at, count, requests_after))
    };
    let (run, answer) = tokio::join!(
        cli.finish(timeout + Duration::from_secs(30)),
        answer_then_requests
    );
    let run = run?;
    if !run.success {
        bail!(
            "kubectl migrate {pod} failed: {}{}",
            run.stdout,
            run.stderr.trim()
        );
    }
    let (answered_at, count, requests_after) = answer?;
    ensure!(
        count == at + 1,
        "node-b's counter answered {count} first, not {} (it did not carry on from {at})",
        at + 1
    );
    let summary = parse_summary(run.last_line())
        .with_context(|| format!("unexpected CLI summary {:?}", run.last_line()))?;
    let load_after = loadavg();

    // Phase boundaries, from the logs.
    let agent_log = cluster.agent_log(NODE_A, 20_000);
    let freeze_line = last_line_with(&agent_log, &["freezing the source", &pod])
        .context("no \"freezing the source\" line in node-a's agent log")?;
    let freeze_json: Value = serde_json::from_str(freeze_line)?;
    let t_freeze = freeze_json["timestamp"]
        .as_str()
        .and_then(parse_rfc3339)
        .context("agent log line without timestamp")?;

    let a_log = read(&cluster.dir.join(format!("logs/{NODE_A}-containerd.log")))?;
    let packed = last_line_with(&a_log, &["dumped and packed", &format!("/{pod} ")])
        .context("no \"dumped and packed\" line in node-a's containerd log")?;
    let t_packed = shim_time(packed).context("shim line without timestamp")?;
    let dump_s = field(packed, "dump_ms").context("dump_ms")? / 1e3;
    let diff_s = field(packed, "diff_ms").unwrap_or(0.0) / 1e3;
    let pack_s = field(packed, "pack_ms").context("pack_ms")? / 1e3;

    let b_log = read(&cluster.dir.join(format!("logs/{NODE_B}-containerd.log")))?;
    let clones = ns.clones_of(&pod).await?;
    let clone_pod = clones.first().context("no clone pod")?;
    let clone = clone_pod
        .metadata
        .name
        .clone()
        .context("a clone without a name")?;
    let unpacked = last_line_with(
        &b_log,
        &["checkpoint unpacked for restore", &format!("/{clone} ")],
    )
    .context("no \"checkpoint unpacked for restore\" line in node-b's containerd log")?;
    let t_unpacked = shim_time(unpacked).context("shim line without timestamp")?;
    let unpack_s = field(unpacked, "unpack_ms").context("unpack_ms")? / 1e3;
    let archive_bytes = field(unpacked, "bytes").unwrap_or(0.0);
    let id = clone_pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == "counter"))
        .and_then(|c| c.container_id.as_deref())
        .and_then(|id| id.rsplit("://").next())
        .context("the clone's container id")?
        .to_owned();
    let started = last_line_with(&b_log, &["StartContainer for", &id, "returns successfully"])
        .context("no StartContainer line for the clone in node-b's containerd log")?;
    let t_started = containerd_time(started).context("containerd line without time")?;

    // containerd logs StartContainer's return after the restored process may already answer.
    let t_restored = t_started.min(answered_at);
    let t_dump_start = t_packed - pack_s - diff_s - dump_s;
    let t_unpack_start = t_unpacked - unpack_s;
    let phases = json!({
        "freeze": t_dump_start - t_freeze,
        "dump": dump_s,
        "rootfs_diff": diff_s,
        "pack_commit": pack_s,
        "target_wait": t_unpack_start - t_packed,
        "unpack_verify": unpack_s,
        "restore": t_restored - t_unpacked,
        "first_answer": answered_at - t_restored,
    });
    let downtime = answered_at - t_freeze;
    let total = match transfer {
        Transfer::StopAndCopy => downtime,
        Transfer::PostCopy => last_page_at(cluster, &clone).await? - t_freeze,
    };
    let slowdown = requests_after / requests_before;
    // Before the freeze: did the clone reserve memory for the pages image, and how long did it take?
    let reserved = last_line_with(
        &b_log,
        &["memory reserved for the pages image", &format!("/{clone} ")],
    );
    let reserve_s = reserved
        .and_then(|l| field(l, "reserve_ms"))
        .map(|ms| ms / 1e3);
    let reserved_by = reserved.and_then(shim_time);
    note(&format!(
        "{pod}: memory reserved ahead on node-b: {}",
        match (reserve_s, reserved_by) {
            (Some(s), Some(at)) if at <= t_freeze =>
                format!("yes, in {s:.2}s, done before the freeze"),
            (Some(s), _) => format!(
                "in {s:.2}s, done {:.2}s after the freeze (the agent's --prepare-wait ran out)",
                reserved_by.unwrap_or(t_freeze) - t_freeze
            ),
            (None, _) => "no".to_string(),
        }
    ));
    note(&format!(
        "{pod}: downtime {downtime:.2}s, total {total:.2}s, first {REQUESTS} requests {slowdown:.2}x as long; phases {phases}; CLI: {}",
        run.last_line()
    ));
    let result = json!({
        "method": method(transfer).0,
        "mib": mib,
        "downtime": downtime,
        "total": total,
        "requests": REQUESTS,
        "requests_before": requests_before,
        "requests_after": requests_after,
        "slowdown": slowdown,
        "streamed": summary.streamed,
        "phases": phases,
        "reserve_ahead": reserve_s,
        "archive_bytes": archive_bytes,
        "cli_frozen": summary.frozen_seconds,
        "cli_total": summary.total_seconds,
        "count_after": count,
        "load_before": load_before,
        "load_after": load_after,
    });
    // The namespace, and with it both pods, goes when `ns` drops.
    Ok(result)
}

/// The method's name in scripts/bench.sh's report, and the pod's name part.
fn method(transfer: Transfer) -> (&'static str, &'static str) {
    match transfer {
        Transfer::StopAndCopy => ("podmigrate", "sc"),
        Transfer::PostCopy => ("postcopy", "pc"),
    }
}

async fn bench(sizes: &[u32], transfer: Transfer) -> Result<()> {
    if let Some(reason) = skip_reason() {
        bail!("this machine cannot run the benchmark: {reason}");
    }
    let cluster = KubeCluster::shared()
        .await
        .context("the two-node cluster (scripts/local-up-cluster.sh)")?;
    note(&format!("cluster up; share {}", cluster.share().display()));
    for &mib in sizes {
        let result = measure(&cluster, mib, transfer).await.with_context(|| {
            format!(
                "migrating the {mib} MiB counter\n{}",
                cluster.diagnostics(30)
            )
        })?;
        println!("{result}");
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    const USAGE: &str = "usage: bench-downtime [--transfer stop-and-copy|postcopy] <MiB>...";
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut transfer = Transfer::StopAndCopy;
    if args.first().map(String::as_str) == Some("--transfer") {
        match args.get(1).and_then(|t| Transfer::parse(Some(t))) {
            Some(t) => transfer = t,
            None => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
        args.drain(..2);
    }
    let sizes: Result<Vec<u32>, _> = args.iter().map(|a| a.parse()).collect();
    let sizes = match sizes {
        Ok(s) if !s.is_empty() => s,
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = tokio::select! {
        r = bench(&sizes, transfer) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-downtime: {e:#}");
            ExitCode::FAILURE
        }
    }
}
