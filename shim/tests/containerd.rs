//! End-to-end: a private containerd launches our shim binary for real.
//!
//! The test starts its own containerd (root, state, sockets and config in a temp dir; the CRI
//! plugin disabled, since it needs CNI and a pause image that cannot be had offline), imports
//! a one-layer OCI image built here (static busybox as /bin/sh), and runs `ctr run` with our
//! runtime by name (`io.containerd.migrate.v2`, and `io.containerd.runc.migrate.v2` of the
//! containerd 1.6 stanza: binary found on containerd's PATH) and by absolute path (the route
//! CRI's `runtime_path` takes). The shim must start, answer
//! `Create` with UNIMPLEMENTED, exit on containerd's `Shutdown`, and remove its socket.
//!
//! Needs root and `containerd`/`ctr`/`busybox` (scripts/setup.sh installs them); otherwise it
//! prints why and passes without doing anything.

use std::{
    ffi::OsString,
    fs,
    io::Write,
    os::unix::{ffi::OsStrExt, fs::PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-migrate-v2");
const NAMESPACE: &str = "podmigrate-test";
const IMAGE: &str = "docker.io/podmigrate/busybox-test:latest";
const IMAGE_BASE: &str = "docker.io/podmigrate/busybox-test";
/// Bound for every external command and every wait, so a hang fails instead of stalling CI.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Preconditions

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Names a directory holding the containerd to test against (`containerd`, `ctr`,
/// `containerd-shim-runc-v2`), as for the CRI suites in `tests/`; unset: those on PATH.
const CONTAINERD_BIN_DIR_ENV: &str = "PODMIGRATE_CONTAINERD_BIN_DIR";

fn containerd_bin_dir() -> Option<PathBuf> {
    std::env::var_os(CONTAINERD_BIN_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `containerd` or `ctr` of the containerd under test.
fn containerd_tool(name: &str) -> Option<PathBuf> {
    match containerd_bin_dir() {
        Some(dir) => Some(dir.join(name)).filter(|p| p.is_file()),
        None => find_in_path(name),
    }
}

fn find_busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| find_in_path("busybox"))
}

/// Why the end-to-end test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (containerd and shims manage mounts and /run/containerd)".into());
    }
    for tool in ["containerd", "ctr"] {
        if containerd_tool(tool).is_none() {
            return Some(format!(
                "`{tool}` not on PATH (scripts/setup.sh installs it) or in ${CONTAINERD_BIN_DIR_ENV}"
            ));
        }
    }
    if find_busybox().is_none() {
        return Some(
            "no busybox binary for the test image (apt-get install busybox-static)".into(),
        );
    }
    None
}

macro_rules! skip_unless_possible {
    () => {
        if let Some(reason) = skip_reason() {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Running commands with a deadline

/// Runs `cmd` to completion (or kills it after STEP_TIMEOUT), capturing stdout and stderr via
/// files so a chatty child can never block on a full pipe.
fn run(cmd: &mut Command, scratch: &Path) -> Output {
    let out_path = scratch.join("cmd.stdout");
    let err_path = scratch.join("cmd.stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let status = wait_deadline(&mut child, STEP_TIMEOUT)
        .unwrap_or_else(|| panic!("{cmd:?} did not finish within {STEP_TIMEOUT:?}"));
    Output {
        status,
        stdout: fs::read(&out_path).unwrap(),
        stderr: fs::read(&err_path).unwrap(),
    }
}

fn wait_deadline(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `check` until it returns true or `limit` passes.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// A private containerd that cleans up after itself, even when the test panics

struct Containerd {
    child: Option<Child>,
    /// Everything of ours lives here; removed after `drop` has stopped containerd.
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
    /// containerd-shim hardcodes /run/containerd/s for shim sockets; remove what we created.
    created_run_dirs: Vec<PathBuf>,
}

impl Containerd {
    fn start() -> Self {
        let created_run_dirs = ["/run/containerd", "/run/containerd/s"]
            .iter()
            .map(PathBuf::from)
            .filter(|d| !d.exists())
            .collect();
        let dir = tempfile::Builder::new()
            .prefix("podmigrate-ctrd-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        let socket = root.join("containerd.sock");
        let log = root.join("containerd.log");

        // containerd resolves `io.containerd.migrate.v2` to `containerd-shim-migrate-v2` on
        // its PATH: give it a directory holding just our freshly built binary.
        let bin = root.join("bin");
        fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(SHIM, bin.join("containerd-shim-migrate-v2")).unwrap();
        let mut path = OsString::from(&bin);
        path.push(":");
        // Then the chosen containerd's dir: containerd looks its runc shim up on PATH first.
        if let Some(dir) = containerd_bin_dir() {
            path.push(&dir);
            path.push(":");
        }
        path.push(std::env::var_os("PATH").unwrap_or_default());

        let config = root.join("config.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}/root"
state = "{root}/state"
temp = "{root}/tmp"
# CRI needs CNI plugins and a pause image; ctr drives the task API directly.
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

# Defaults to /opt/containerd: keep everything inside the temp dir.
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
"#,
                root = root.display(),
                socket = socket.display(),
            ),
        )
        .unwrap();
        fs::create_dir(root.join("tmp")).unwrap();

        let log_file = fs::File::create(&log).unwrap();
        let child = Command::new(containerd_tool("containerd").expect("checked by skip_reason"))
            .arg("--config")
            .arg(&config)
            // Debug makes containerd pass -debug to the shim and copy its log FIFO verbosely.
            .args(["--log-level", "debug"])
            .env("PATH", &path)
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawning containerd");

        let mut daemon = Containerd {
            child: Some(child),
            dir,
            socket,
            log,
            created_run_dirs,
        };
        let ready = eventually(STEP_TIMEOUT, || {
            daemon.socket.exists() && daemon.ctr(&["version"]).status.success()
        });
        assert!(
            ready,
            "containerd did not come up; log:\n{}",
            daemon.log_text()
        );
        if let Some(status) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "containerd exited early ({status}); log:\n{}",
                daemon.log_text()
            );
        }
        daemon
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(containerd_tool("ctr").expect("checked by skip_reason"));
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args);
        run(&mut cmd, self.path())
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Processes whose command line mentions our containerd socket: shims it launched
    /// (`-address <socket>`), which outlive containerd if something went wrong.
    fn our_shims(&self) -> Vec<i32> {
        let needle = self.socket.as_os_str().as_bytes();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
                    return false;
                };
                let is_shim = cmdline
                    .split(|b| *b == 0)
                    .next()
                    .is_some_and(|argv0| argv0.ends_with(b"containerd-shim-migrate-v2"));
                is_shim && cmdline.windows(needle.len()).any(|w| w == needle)
            })
            .collect()
    }

    /// Mount points under our temp dir, deepest first.
    fn our_mounts(&self) -> Vec<PathBuf> {
        let prefix = self.path().as_os_str().as_bytes().to_vec();
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<PathBuf> = info
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|mp| mp.as_bytes().starts_with(&prefix))
            .map(PathBuf::from)
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        mounts
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- containerd log ----\n{}\n------------------------",
                self.log_text()
            );
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on the pid of the child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if wait_deadline(&mut child, Duration::from_secs(5)).is_none() {
                eprintln!("containerd ignored SIGTERM; killed");
            }
        }
        for pid in self.our_shims() {
            eprintln!("killing leftover shim {pid}");
            // SAFETY: kill(2) on a shim launched by our containerd (matched by socket path).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for mount in self.our_mounts() {
            let c = std::ffi::CString::new(mount.as_os_str().as_bytes()).unwrap();
            // SAFETY: valid NUL-terminated path; lazy unmount of a mount under our temp dir.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        for dir in self.created_run_dirs.iter().rev() {
            let _ = fs::remove_dir(dir); // only if empty: never touch others' sockets
        }
        // `self.dir` (TempDir) is removed after this returns.
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal OCI image, built by hand

/// Appends one ustar entry (a directory when `data` is None) to `out`.
fn tar_entry(out: &mut Vec<u8>, path: &str, mode: u32, data: Option<&[u8]>) {
    assert!(path.len() < 100, "ustar name too long: {path}");
    let mut header = [0u8; 512];
    let put =
        |h: &mut [u8; 512], at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
    let size = data.map_or(0, <[u8]>::len);
    put(&mut header, 0, path.as_bytes());
    put(&mut header, 100, format!("{mode:07o}\0").as_bytes());
    put(&mut header, 108, b"0000000\0"); // uid
    put(&mut header, 116, b"0000000\0"); // gid
    put(&mut header, 124, format!("{size:011o}\0").as_bytes());
    put(&mut header, 136, b"00000000000\0"); // mtime: epoch, for reproducible digests
    put(&mut header, 156, if data.is_some() { b"0" } else { b"5" });
    put(&mut header, 257, b"ustar\0");
    put(&mut header, 263, b"00");
    put(&mut header, 148, b"        "); // checksum is computed with its own field blank
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    put(&mut header, 148, format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&header);
    if let Some(data) = data {
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
}

fn tar_finish(out: &mut Vec<u8>) {
    out.resize(out.len() + 1024, 0);
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes an OCI image layout tarball (what `ctr images import` reads) with a single
/// uncompressed layer holding `busybox` as `/bin/sh`.
fn build_oci_archive(busybox: &Path, dest: &Path) {
    let mut layer = Vec::new();
    tar_entry(&mut layer, "bin/", 0o755, None);
    tar_entry(
        &mut layer,
        "bin/sh",
        0o755,
        Some(&fs::read(busybox).unwrap()),
    );
    tar_finish(&mut layer);
    let layer_digest = sha256_hex(&layer);

    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": { "Cmd": ["/bin/sh"] },
        // Uncompressed layer: its diff id is its digest.
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
    }))
    .unwrap();
    let config_digest = sha256_hex(&config);

    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer.len(),
        }],
    }))
    .unwrap();
    let manifest_digest = sha256_hex(&manifest);

    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": IMAGE,
                "org.opencontainers.image.ref.name": "latest",
            },
        }],
    }))
    .unwrap();

    let mut archive = Vec::new();
    tar_entry(
        &mut archive,
        "oci-layout",
        0o644,
        Some(br#"{"imageLayoutVersion":"1.0.0"}"#),
    );
    tar_entry(&mut archive, "index.json", 0o644, Some(&index));
    tar_entry(&mut archive, "blobs/", 0o755, None);
    tar_entry(&mut archive, "blobs/sha256/", 0o755, None);
    for (digest, blob) in [
        (&layer_digest, &layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        tar_entry(
            &mut archive,
            &format!("blobs/sha256/{digest}"),
            0o644,
            Some(blob),
        );
    }
    tar_finish(&mut archive);
    fs::File::create(dest).unwrap().write_all(&archive).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Runs a container with `runtime` through our shim (which forwards to containerd's runc shim)
/// and checks its output, its exit, and that both shims and their sockets are gone after.
fn assert_runs_through_the_shim(ctrd: &Containerd, runtime: &str, container: &str) {
    let fifo_dir = ctrd.path().join("fifo"); // not /run/containerd/fifo
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--fifo-dir",
        fifo_dir.to_str().unwrap(),
        "--runtime",
        runtime,
        IMAGE,
        container,
        "/bin/sh",
        "-c",
        &format!("echo hello from {container}; exit 3"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "ctr run --runtime {runtime}: status {:?}, stdout {stdout:?}, stderr {stderr:?}",
        out.status.code()
    );
    assert!(
        stdout.contains(&format!("hello from {container}")),
        "the container's output did not come back: {stdout:?} {stderr:?}"
    );
    // ctr run exits with the task's exit status: the exit event made it back to containerd.
    assert_eq!(out.status.code(), Some(3), "exit status: {stderr}");

    // containerd calls Shutdown once the task is deleted: both shims must exit and take their
    // sockets with them.
    let group = format!("{container}/podmigrate");
    let address = containerd_shim::socket_address(ctrd.socket.to_str().unwrap(), NAMESPACE, &group);
    let socket_path = PathBuf::from(address.strip_prefix("unix://").unwrap());
    assert!(
        eventually(Duration::from_secs(5), || ctrd.our_shims().is_empty()
            && !socket_path.exists()),
        "shims still running ({:?}) or socket {} left behind",
        ctrd.our_shims(),
        socket_path.display()
    );
    // And the container record is gone (ctr run --rm), so the id can be reused.
    let listed = ctrd.ctr(&["containers", "list", "--quiet"]);
    assert!(
        !String::from_utf8_lossy(&listed.stdout)
            .lines()
            .any(|l| l == container),
        "container {container} left behind"
    );
}

#[test]
fn containerd_runs_containers_through_the_shim() {
    skip_unless_possible!();
    let started = Instant::now();
    let ctrd = Containerd::start();

    let archive = ctrd.path().join("busybox-oci.tar");
    build_oci_archive(&find_busybox().unwrap(), &archive);
    let imported = ctrd.ctr(&[
        "images",
        "import",
        "--base-name",
        IMAGE_BASE,
        archive.to_str().unwrap(),
    ]);
    assert!(
        imported.status.success(),
        "ctr images import failed: {}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let images = ctrd.ctr(&["images", "list", "--quiet"]);
    assert!(
        String::from_utf8_lossy(&images.stdout)
            .lines()
            .any(|l| l == IMAGE),
        "imported image missing: {}",
        String::from_utf8_lossy(&images.stdout)
    );

    // By runtime name: containerd looks up containerd-shim-migrate-v2 on its PATH.
    assert_runs_through_the_shim(&ctrd, "io.containerd.migrate.v2", "by-name");
    // By absolute path: what CRI does with `runtime_path`.
    assert_runs_through_the_shim(&ctrd, SHIM, "by-path");
    // Same id again: nothing of the first run may linger (bundle, socket, record).
    assert_runs_through_the_shim(&ctrd, "io.containerd.migrate.v2", "by-name");
    // The containerd 1.6 stanza's name: the last two parts pick the same binary.
    assert_runs_through_the_shim(&ctrd, "io.containerd.runc.migrate.v2", "by-runc-name");

    // The shim's tracing output travels through the bundle's log FIFO into containerd's log.
    assert!(
        eventually(Duration::from_secs(5), || ctrd
            .log_text()
            .contains("shutdown: no tasks hosted, exiting")),
        "shim log lines did not reach containerd's log"
    );
    eprintln!("end-to-end took {:?}", started.elapsed());
}

/// The `version = 2` toml blocks of docs/containerd.md (the 1.7 and the 1.6 stanza).
fn documented_stanzas() -> Vec<String> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/containerd.md");
    let doc = fs::read_to_string(&doc).unwrap_or_else(|e| panic!("{}: {e}", doc.display()));
    doc.split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .filter(|block| block.contains("version = 2"))
        .map(str::to_owned)
        .collect()
}

/// The `version = 2` stanzas in docs/containerd.md must use key names containerd decodes:
/// `config dump` decodes each plugin's section into its Go struct, so a misspelt key would
/// come back as the default value. Needs only the containerd binary.
#[test]
fn documented_cri_stanza_is_understood_by_containerd() {
    let Some(containerd) = containerd_tool("containerd") else {
        eprintln!("SKIPPED: `containerd` not on PATH");
        return;
    };
    let stanzas = documented_stanzas();
    let find = |marker: &str| {
        stanzas
            .iter()
            .find(|block| block.contains(marker))
            .unwrap_or_else(|| {
                panic!("docs/containerd.md has no `version = 2` block with {marker}")
            })
            .clone()
    };
    // The 1.7 stanza: runc type, our binary by path, runc options in the table.
    check_stanza(
        &containerd,
        &find("runtime_path"),
        &[
            r#"runtime_type = "io.containerd.runc.v2""#,
            r#"runtime_path = "/usr/local/bin/containerd-shim-migrate-v2""#,
            r#"pod_annotations = ["podmigrate.io/*"]"#,
        ],
        r#"BinaryName = "/usr/sbin/runc""#,
    );
    // The 1.6 stanza: our runtime name, the runc options in a file.
    check_stanza(
        &containerd,
        &find("io.containerd.runc.migrate.v2"),
        &[
            r#"runtime_type = "io.containerd.runc.migrate.v2""#,
            r#"pod_annotations = ["podmigrate.io/*"]"#,
        ],
        r#"ConfigPath = "/etc/containerd/podmigrate-runc.toml""#,
    );
}

/// The runc options file of the 1.6 stanza, as documented, is what the shim reads.
#[test]
fn documented_runc_options_file_is_read_by_the_shim() {
    use containerd_shim_migrate::runtime_options::RuncOptionsFile;
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/containerd.md");
    let doc = fs::read_to_string(&doc).unwrap();
    let block = doc
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .find(|block| block.starts_with("# /etc/containerd/podmigrate-runc.toml"))
        .expect("docs/containerd.md shows no /etc/containerd/podmigrate-runc.toml");
    let options = RuncOptionsFile::parse(block, Path::new("podmigrate-runc.toml"))
        .unwrap_or_else(|e| panic!("{e}"))
        .to_runc_options();
    assert_eq!(options.binary_name, "/usr/sbin/runc");
    assert!(!options.systemd_cgroup);
}

fn check_stanza(containerd: &Path, stanza: &str, runtime_lines: &[&str], option_line: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    fs::write(&config, stanza).unwrap();
    let out = run(
        Command::new(containerd)
            .arg("--config")
            .arg(&config)
            .args(["config", "dump"]),
        dir.path(),
    );
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "config dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let section = |header: &str| -> Vec<String> {
        dump.lines()
            .skip_while(|l| l.trim() != header)
            .skip(1)
            .take_while(|l| !l.trim().is_empty() && !l.trim_start().starts_with('['))
            .map(|l| l.trim().to_string())
            .collect()
    };
    let runtime = section(r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.migrate]"#);
    for expected in runtime_lines {
        assert!(
            runtime.iter().any(|l| l == expected),
            "{expected} not in dump: {runtime:#?}\n{dump}"
        );
    }
    // `options` is a free-form map in the CRI config (decoded later, by runtime type), so this
    // only proves the section sits where containerd looks for it.
    let options =
        section(r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.migrate.options]"#);
    assert!(
        options.iter().any(|l| l == option_line),
        "runtime options not decoded: {options:#?}"
    );
}
