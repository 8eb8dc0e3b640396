//! A real migration round trip on one machine: a busybox counter runs in a runc container, is
//! checkpointed with CRIU, laid out as a CRI-style checkpoint directory, packed into an archive,
//! unpacked elsewhere, and restored into a fresh bundle built from the unpacked checkpoint, where
//! the counter must carry on from where it stopped.
//!
//! Needs root, runc, CRIU (`criu check` passing), busybox-static and tar; skips otherwise, unless
//! `PODMIGRATE_E2E_REQUIRE` is set (scripts/test.sh sets it), in which case it fails.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use podmigrate_checkpoint::archive::{self, PackOptions, UnpackOptions};
use podmigrate_checkpoint::layout::{
    ContainerConfig, CHECKPOINT_DIR, DELETED_FILES, ROOTFS_DIFF_TAR, SPEC_DUMP,
};
use podmigrate_checkpoint::runc::{CheckpointOptions, ContainerStatus, Runc};
use podmigrate_e2e::bundle::Bundle;
use podmigrate_e2e::harness::{
    read_counter, runc_criu_skip_reason, skip, tree_contents, unique_id, wait_for, workspace_bin,
    ContainerGuard, Scratch,
};

/// Writes an ever-increasing number to /tmp/count ten times a second.
const COUNTER_SCRIPT: &str =
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done";
/// Bound on every runc invocation.
const RUNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on every wait for the counter.
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

#[test]
fn runc_checkpoint_archive_restore_keeps_counting() {
    let started = Instant::now();
    let scratch = Scratch::new("podmigrate-e2e-roundtrip-").expect("scratch directory");
    let runc = Runc::new(scratch.path().join("runc-root")).with_timeout(RUNC_TIMEOUT);
    if let Some(reason) = runc_criu_skip_reason(&runc) {
        skip(&reason);
        return;
    }
    // Declared after `scratch`, so it drops (and deletes the containers) before the directory goes.
    let mut guard = ContainerGuard::new(&runc);
    if let Err(e) = roundtrip(&runc, scratch.path(), &mut guard) {
        panic!("round trip failed after {:?}: {e:?}", started.elapsed());
    }
    guard.cleanup().expect("deleting the restored container");
    eprintln!("round trip passed in {:?}", started.elapsed());
}

fn roundtrip(runc: &Runc, tmp: &Path, guard: &mut ContainerGuard) -> Result<()> {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>7.2?}] {what}", t0.elapsed());

    // 1. The counter runs in a runc container.
    let source = Bundle::create(
        &tmp.join("source-bundle"),
        runc.binary(),
        &["sh", "-c", COUNTER_SCRIPT],
    )?;
    let source_count = source.rootfs().join("tmp/count");
    let source_id = unique_id("pm-e2e-src");
    guard.track(&source_id);
    runc.run_detached(&source_id, source.dir())?;
    let state = runc.state(&source_id)?;
    ensure!(
        state.status == ContainerStatus::Running,
        "source container {source_id} is {:?} right after `runc run -d`, expected running",
        state.status
    );
    step(&format!("started {source_id} (pid {})", state.pid));

    // 2. Once it has counted to 5, checkpoint it (the container stops).
    let mut last_seen = 0;
    wait_for("the source counter to reach 5", WAIT, POLL, || {
        let n = read_counter(&source_count)?;
        last_seen = last_seen.max(n);
        (n >= 5).then_some(n)
    })?;
    let layout_dir = tmp.join("checkpoint-dir");
    let images = layout_dir.join(CHECKPOINT_DIR);
    runc.checkpoint(
        &source_id,
        &images,
        &tmp.join("dump-work"),
        &CheckpointOptions::default(),
    )?;
    step("checkpointed");
    match runc.state(&source_id) {
        Err(e) if e.is_not_found() => {}
        Ok(s) if s.status == ContainerStatus::Stopped => {}
        other => anyhow::bail!(
            "after a checkpoint without --leave-running, {source_id} should be gone or stopped, got {other:?}"
        ),
    }
    // The file may have been caught truncated mid-`echo`; then the last value seen is N.
    let n = read_counter(&source_count)
        .unwrap_or(last_seen)
        .max(last_seen);
    ensure!(n >= 5, "counter was {n} at checkpoint, expected >= 5");
    std::thread::sleep(Duration::from_millis(400));
    let after_pause = read_counter(&source_count);
    ensure!(
        after_pause.is_none_or(|m| m == n),
        "the source counter moved from {n} to {after_pause:?} after the checkpoint: it still runs"
    );
    ensure!(
        images.join("inventory.img").is_file(),
        "no inventory.img in {}: CRIU wrote no images",
        images.display()
    );
    step(&format!("counter stopped at N = {n}"));

    // 3. The rest of the CRI checkpoint layout beside CRIU's images.
    let config = ContainerConfig {
        id: source_id.clone(),
        name: "counter".into(),
        rootfs_image_name: "localhost/busybox-counter:e2e".into(),
        oci_runtime: "runc".into(),
        created_time: state.created.clone(),
        checkpointed_time: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)?,
        ..ContainerConfig::default()
    };
    config.write_to(&layout_dir)?;
    fs::copy(source.config_path(), layout_dir.join(SPEC_DUMP))?;
    tar(&[
        "-C",
        path_str(&source.rootfs())?,
        "-cf",
        path_str(&layout_dir.join(ROOTFS_DIFF_TAR))?,
        "tmp",
    ])?;
    fs::write(layout_dir.join(DELETED_FILES), "[]")?;
    let packed_tree = tree_contents(&layout_dir)?;
    step(&format!("laid out {} files", packed_tree.len()));

    // 4. Pack, verify with the CLI when it has been built, unpack somewhere else.
    let archive_path = tmp.join("counter.ckpt");
    let summary = archive::pack(&layout_dir, &archive_path, &PackOptions::default())
        .context("packing the checkpoint directory")?;
    step(&format!(
        "packed {} entries, {} -> {} bytes",
        summary.entries, summary.content_bytes, summary.archive_bytes
    ));
    verify_with_cli(&archive_path)?;
    let unpacked = tmp.join("unpacked");
    let verified = archive::unpack(&archive_path, &unpacked, &UnpackOptions::default())
        .context("unpacking the archive")?;
    ensure!(
        verified.manifest_sha256 == summary.manifest_sha256,
        "unpack verified manifest {} but pack wrote {}",
        verified.manifest_sha256,
        summary.manifest_sha256
    );
    step(&format!(
        "unpacked and verified {} entries ({} content bytes)",
        verified.manifest.entries.len(),
        verified.content_bytes
    ));
    let unpacked_tree = tree_contents(&unpacked)?;
    let packed_names: Vec<_> = packed_tree.keys().collect();
    let unpacked_names: Vec<_> = unpacked_tree.keys().collect();
    ensure!(
        packed_names == unpacked_names,
        "unpacked files differ from packed ones:\n packed:   {packed_names:?}\n unpacked: {unpacked_names:?}"
    );
    for (name, bytes) in &packed_tree {
        ensure!(
            unpacked_tree[name] == *bytes,
            "{} changed in the round trip ({} bytes packed, {} unpacked)",
            name.display(),
            bytes.len(),
            unpacked_tree[name].len()
        );
    }
    ensure!(
        ContainerConfig::read_from(&unpacked)?.as_ref() == Some(&config),
        "config.dump did not survive the archive"
    );

    // 5. Restore into a fresh bundle built only from the unpacked checkpoint.
    let spec: serde_json::Value = serde_json::from_slice(&fs::read(unpacked.join(SPEC_DUMP))?)
        .context("parsing the unpacked spec.dump")?;
    let target = Bundle::create_with_spec(&tmp.join("target-bundle"), &spec)?;
    tar(&[
        "-C",
        path_str(&target.rootfs())?,
        "-xf",
        path_str(&unpacked.join(ROOTFS_DIFF_TAR))?,
    ])?;
    let target_count = target.rootfs().join("tmp/count");
    let restored_id = unique_id("pm-e2e-dst");
    guard.track(&restored_id);
    runc.restore_detached(
        &restored_id,
        target.dir(),
        &unpacked.join(CHECKPOINT_DIR),
        &tmp.join("restore-work"),
    )?;
    let restored = runc.state(&restored_id)?;
    ensure!(
        restored.status == ContainerStatus::Running,
        "restored container {restored_id} is {:?}, expected running",
        restored.status
    );
    step(&format!("restored as {restored_id} (pid {})", restored.pid));

    // 6. The counter continues from N: every value seen is >= N, it rises past N promptly (not
    //    from 1, not with a jump), keeps rising, and the source bundle stays frozen at N.
    let mut seen = Vec::new();
    let first = wait_for("the restored counter to pass N", WAIT, POLL, || {
        let v = read_counter(&target_count)?;
        seen.push(v);
        (v > n).then_some(v)
    })?;
    ensure!(
        seen.iter().all(|&v| v >= n),
        "restored counter went below N = {n} (restarted?): values {seen:?}"
    );
    ensure!(
        first <= n + 10,
        "restored counter jumped from N = {n} to {first}: not the checkpointed process"
    );
    let target_value = n + 10;
    let last = wait_for(
        &format!("the restored counter to reach {target_value}"),
        WAIT,
        POLL,
        || {
            let v = read_counter(&target_count)?;
            seen.push(v);
            (v >= target_value).then_some(v)
        },
    )?;
    let mut rising = seen.clone();
    rising.dedup();
    ensure!(
        rising.windows(2).all(|w| w[0] < w[1]),
        "restored counter did not rise monotonically from N = {n}: {rising:?}"
    );
    ensure!(
        read_counter(&source_count).is_none_or(|v| v == n),
        "the source rootfs counter changed after the checkpoint"
    );
    step(&format!(
        "counter continued: N = {n}, first after restore = {first}, then {last}"
    ));

    // The restored container is still healthy; stop it the normal way.
    runc.kill(&restored_id, "KILL")?;
    wait_for(
        "the restored container to stop",
        WAIT,
        POLL,
        || match runc.state(&restored_id) {
            Ok(s) => (s.status == ContainerStatus::Stopped).then_some(()),
            Err(_) => Some(()),
        },
    )?;
    runc.delete_force(&restored_id)?;
    step("restored container killed and deleted");
    Ok(())
}

/// Runs `podmigrate verify <archive>` when the CLI has been built with that subcommand.
fn verify_with_cli(archive_path: &Path) -> Result<()> {
    let Some(cli) = workspace_bin("podmigrate") else {
        eprintln!(
            "note: podmigrate binary not built in this profile; skipping `podmigrate verify`"
        );
        return Ok(());
    };
    let help = Command::new(&cli).arg("--help").output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    if !help.lines().any(|l| l.trim_start().starts_with("verify")) {
        eprintln!(
            "note: {} has no `verify` subcommand yet; skipping it",
            cli.display()
        );
        return Ok(());
    }
    let out = Command::new(&cli)
        .arg("verify")
        .arg(archive_path)
        .output()?;
    ensure!(
        out.status.success(),
        "`{} verify {}` failed ({}):\nstdout: {}\nstderr: {}",
        cli.display(),
        archive_path.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    eprintln!(
        "podmigrate verify: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

fn tar(args: &[&str]) -> Result<()> {
    let out = Command::new("tar")
        .args(args)
        .output()
        .context("running tar")?;
    ensure!(
        out.status.success(),
        "tar {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))
}
