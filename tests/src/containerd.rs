//! A private containerd with the CRI plugin enabled, for suites that play kubelet.
//!
//! [`Containerd::start`] gives the daemon its own root, state, temp dir, sockets (gRPC and
//! ttrpc), runc root, CNI dirs, pod log root and config, all under one temp dir, so several can
//! run side by side (the two-node suite runs two). The CRI plugin is configured with our own
//! pause image ([`crate::oci::PAUSE_IMAGE`], imported at start), the overlayfs snapshotter, and
//! two runtime handlers: `runc` (stock `io.containerd.runc.v2`) and `migrate` (our shim, with
//! `pod_annotations = ["podmigrate.io/*"]`), written as docs/containerd.md tells operators for
//! the containerd being started (see [`MigrateStanza`]): on 1.7.1 and later the runc type with
//! `runtime_path` = our shim; on older ones (1.6) `runtime_type = "io.containerd.runc.migrate.v2"`
//! with our shim on containerd's `PATH` and the runc options in a file named by `ConfigPath`.
//! CNI points at empty dirs: host-network pods need none.
//!
//! Dropping it (also while unwinding from a failed assertion) stops containerd (SIGTERM, then
//! SIGKILL), force-deletes containers left in its runc root, kills shims that were started for
//! it, removes their sockets from `/run/containerd/s`, unmounts everything under the temp dir
//! and removes it (kept when panicking with `PODMIGRATE_E2E_KEEP` set).
//!
//! Which containerd: the binaries in [`CONTAINERD_BIN_DIR_ENV`] when it is set (e.g. containerd
//! 1.6 extracted from its .deb by scripts/setup.sh), else those on `PATH`. The daemon, `ctr`,
//! the runc shim behind the `runc` handler and the delegate behind our shim all come from that
//! one place (see [`ContainerdOptions::bin_dir`]).
//!
//! Shim sockets: containerd-shim puts them in `/run/containerd/s/<sha256(address, ns, id)>`
//! whatever the state dir; the hash includes the containerd socket address, so instances do
//! not collide.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::cri::CriClient;
use crate::harness::{workspace_bin, KEEP_ENV};
use crate::oci::{self, Image, K8S_NAMESPACE, PAUSE_IMAGE};

/// Our shim's binary name, as cargo builds it.
pub const SHIM_BINARY: &str = "containerd-shim-migrate-v2";
/// The CRI runtime handler served by our shim.
pub const MIGRATE_HANDLER: &str = "migrate";
/// The stock runc runtime handler.
pub const RUNC_HANDLER: &str = "runc";
/// Pod annotations the `migrate` handler copies into containers' OCI specs.
pub const POD_ANNOTATIONS: &str = "podmigrate.io/*";
/// Where containerd-shim puts shim sockets, whatever containerd's state dir.
pub const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
/// A directory holding the containerd to test against (`containerd`, `ctr`,
/// `containerd-shim-runc-v2`), e.g. `/var/cache/podmigrate/containerd-1.6/root/usr/bin`.
/// Unset or empty: the ones on `PATH`.
pub const CONTAINERD_BIN_DIR_ENV: &str = "PODMIGRATE_CONTAINERD_BIN_DIR";
/// containerd's runc shim: behind the `runc` handler, and our shim's delegate.
pub const RUNC_SHIM_BINARY: &str = "containerd-shim-runc-v2";
/// The shim's setting naming its delegate (`shim/src/config.rs`).
const DELEGATE_ENV: &str = "PODMIGRATE_DELEGATE_SHIM";
/// Our shim's runtime name for containerd 1.6's CRI. containerd maps a name to the binary
/// `containerd-shim-<last two parts>` ([`SHIM_BINARY`], looked up on its `PATH`), and treats
/// every name under `io.containerd.runc` as runc for Tasks.Checkpoint: it then takes the image
/// path from the runc checkpoint options instead of tarring a temp dir into its content store,
/// which fails with "already exists" when two checkpoints store the same bytes (measured:
/// two containers of one pod checkpointed at once under `io.containerd.migrate.v2`).
pub const MIGRATE_RUNTIME_TYPE: &str = "io.containerd.runc.migrate.v2";

/// How the `migrate` handler reaches our shim (docs/containerd.md has both stanzas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateStanza {
    /// `runtime_type = "io.containerd.runc.v2"` and `runtime_path` = our shim, runc options in
    /// the `options` table. containerd's client sends `runtime_path` along only from 1.6.21 and
    /// 1.7.1 on (before, CRI starts the plain runc shim); used from 1.7.1 on.
    RuntimePath,
    /// `runtime_type = "io.containerd.runc.migrate.v2"` ([`MIGRATE_RUNTIME_TYPE`]: our shim
    /// found on containerd's `PATH`), the `options` table holding only `ConfigPath`, a TOML
    /// file of the runc options that the shim reads and hands its runc shim. Used before 1.7.1
    /// (containerd 1.6).
    RuntimeType,
}

impl MigrateStanza {
    /// The stanza for a containerd `version` (`1.6.20~ds1`, `v1.7.24`, `2.1.0`).
    pub fn for_version(version: &str) -> Option<MigrateStanza> {
        let (major, minor, patch) = parse_version(version)?;
        Some(if (major, minor, patch) >= (1, 7, 1) {
            MigrateStanza::RuntimePath
        } else {
            MigrateStanza::RuntimeType
        })
    }
}

/// `major.minor.patch` of a containerd version string; a missing patch reads as 0.
pub fn parse_version(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        });
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// How to start a [`Containerd`].
#[derive(Debug, Clone)]
pub struct ContainerdOptions {
    /// Short label used in the temp dir name (`podmigrate-<name>-XXXXXX`), e.g. `node-a`.
    pub name: String,
    /// The binary behind the `migrate` handler (`runtime_path`). Defaults to
    /// [`default_shim_path`], which need not exist unless the handler is used.
    pub shim: PathBuf,
    /// Extra `key = <raw TOML value>` lines for `[...runtimes.migrate.options]` (runc
    /// options, e.g. `("CriuImagePath", "\"/share\"")`).
    pub migrate_options: Vec<(String, String)>,
    /// Extra `key = <raw TOML value>` lines for `[...runtimes.runc.options]`.
    pub runc_options: Vec<(String, String)>,
    /// Raw TOML appended to the config (new tables only: earlier tables cannot be reopened).
    pub extra_config: String,
    /// Extra environment for containerd, which shims inherit (our shim's own settings). A
    /// `PATH` here replaces the inherited one; [`ContainerdOptions::bin_dir`] still goes first.
    pub extra_env: Vec<(String, String)>,
    /// containerd's `--log-level` (`debug` also makes it pass `-debug` to shims).
    pub log_level: String,
    /// Bound on the daemon coming up (socket, CRI `Version`) and the pause image import.
    pub startup_timeout: Duration,
    /// The runc binary for both handlers (`BinaryName`).
    pub runc: PathBuf,
    /// A network namespace made by `ip netns add` (a name under `/run/netns`) to start
    /// containerd in, with `setns(2)` between fork and exec: its shims, and so its host-network
    /// pods, live there too. Only the network changes (not mounts or cgroups, which
    /// `ip netns exec` would remount). `None`: the caller's own.
    pub netns: Option<String>,
    /// Where `containerd`, `ctr` and `containerd-shim-runc-v2` come from; `None`: `PATH`.
    /// Defaults to [`CONTAINERD_BIN_DIR_ENV`]. When set, the dir goes first on containerd's
    /// `PATH` (containerd looks shims up there before beside itself) and our shim's delegate is
    /// pinned to its runc shim, so no binary of another containerd takes part.
    pub bin_dir: Option<PathBuf>,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        ContainerdOptions {
            name: "ctrd".into(),
            shim: default_shim_path(),
            migrate_options: Vec::new(),
            runc_options: Vec::new(),
            extra_config: String::new(),
            extra_env: Vec::new(),
            log_level: "debug".into(),
            startup_timeout: Duration::from_secs(30),
            runc: find_in_path("runc").unwrap_or_else(|| PathBuf::from("/usr/sbin/runc")),
            netns: None,
            bin_dir: containerd_bin_dir(),
        }
    }
}

impl ContainerdOptions {
    pub fn named(name: &str) -> ContainerdOptions {
        ContainerdOptions {
            name: name.to_owned(),
            ..ContainerdOptions::default()
        }
    }
}

/// `target/<profile>/containerd-shim-migrate-v2` for the profile of the running test, whether
/// or not it has been built (see [`build_shim`]).
pub fn default_shim_path() -> PathBuf {
    workspace_bin(SHIM_BINARY).unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join(SHIM_BINARY)))
            .unwrap_or_else(|| PathBuf::from(SHIM_BINARY))
    })
}

/// Builds our shim with `cargo build -p containerd-shim-migrate` in the running test's profile
/// (`$CARGO`, else `cargo`) and returns its path. Use before starting pods with the `migrate`
/// handler when the test binary alone was built (`cargo test -p podmigrate-e2e`). Runs cargo
/// once per test process; later calls return the first result.
pub fn build_shim() -> Result<PathBuf> {
    static BUILT: std::sync::Mutex<Option<std::result::Result<PathBuf, String>>> =
        std::sync::Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let result = built.get_or_insert_with(|| build_shim_now().map_err(|e| format!("{e:#}")));
    result.clone().map_err(anyhow::Error::msg)
}

/// Builds every binary of the workspace in cargo profile `profile`, as scripts/test.sh does
/// (a single package would resolve other features and rebuild shared dependencies, which
/// costs CI minutes). `what` names the binary the caller wants, for the error message.
pub fn build_workspace_bins(profile: &str, what: &str) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(oci::workspace_root())
        .args(["build", "-q", "--workspace", "--bins"]);
    // cargo sets these for the running test, not for a build: a build script that watches one
    // (ring's watches CARGO_MANIFEST_DIR) would see it change and rebuild half the tree here,
    // and again at the next plain `cargo build`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let for_the_test = [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_BIN_",
            "CARGO_CRATE_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
            || [
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&name.as_ref());
        if for_the_test {
            cmd.env_remove(name.as_ref());
        }
    }
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = run_bounded(&mut cmd, Duration::from_secs(900))?;
    ensure!(
        out.status.success(),
        "building {what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn build_shim_now() -> Result<PathBuf> {
    let path = default_shim_path();
    let profile = path
        .parent()
        .and_then(Path::file_name)
        .and_then(|p| p.to_str())
        .unwrap_or("debug")
        .to_owned();
    build_workspace_bins(&profile, SHIM_BINARY)?;
    ensure!(
        path.is_file(),
        "{} missing after cargo build",
        path.display()
    );
    Ok(path)
}

/// The first executable `name` on `PATH` (plus the sbin dirs root shells have).
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The directory named by [`CONTAINERD_BIN_DIR_ENV`], if set and not empty.
pub fn containerd_bin_dir() -> Option<PathBuf> {
    std::env::var_os(CONTAINERD_BIN_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// One of containerd's binaries (`containerd`, `ctr`, `containerd-shim-runc-v2`): in `bin_dir`
/// if given, else the first on `PATH`; `None` if it is not there.
pub fn containerd_binary_in(bin_dir: Option<&Path>, name: &str) -> Option<PathBuf> {
    match bin_dir {
        Some(dir) => Some(dir.join(name)).filter(|p| p.is_file()),
        None => find_in_path(name),
    }
}

/// [`containerd_binary_in`] the directory of [`CONTAINERD_BIN_DIR_ENV`].
pub fn containerd_binary(name: &str) -> Option<PathBuf> {
    containerd_binary_in(containerd_bin_dir().as_deref(), name)
}

/// `containerd --version`'s version field (`1.6.20~ds1`, `v1.7.24`) of the containerd the
/// harness would start, for suites that record what they ran against.
pub fn containerd_version() -> Result<String> {
    let bin = containerd_binary("containerd").context("containerd not found")?;
    version_of(&bin)
}

/// `<containerd> --version`'s version field.
pub fn version_of(bin: &Path) -> Result<String> {
    let out = run_bounded(Command::new(bin).arg("--version"), Duration::from_secs(20))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .map(str::to_owned)
        .with_context(|| format!("{} --version said {text:?}", bin.display()))
}

/// Why a CRI suite cannot run here (root, containerd, ctr, runc, gcc, busybox-static), if it
/// cannot. Pass the result to [`crate::harness::skip`].
pub fn cri_skip_reason() -> Option<String> {
    if !crate::harness::is_root() {
        return Some("not running as root (containerd and runc need it)".into());
    }
    let bin_dir = containerd_bin_dir();
    for tool in ["containerd", "ctr", RUNC_SHIM_BINARY] {
        if containerd_binary_in(bin_dir.as_deref(), tool).is_none() {
            return Some(match &bin_dir {
                Some(dir) => format!(
                    "`{tool}` not found in {} ({CONTAINERD_BIN_DIR_ENV})",
                    dir.display()
                ),
                None => format!("`{tool}` not found (scripts/setup.sh installs it)"),
            });
        }
    }
    for tool in ["runc", "gcc"] {
        if find_in_path(tool).is_none() {
            return Some(format!("`{tool}` not found (scripts/setup.sh installs it)"));
        }
    }
    if !Path::new(crate::bundle::BUSYBOX).is_file() {
        return Some(format!(
            "{} missing (busybox-static)",
            crate::bundle::BUSYBOX
        ));
    }
    None
}

/// Runs `cmd` to completion with stdin closed, capturing stdout and stderr through anonymous
/// temp files (a chatty child can never block on a pipe); kills it after `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let stdout = tempfile::tempfile()?;
    let stderr = tempfile::tempfile()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(stdout.try_clone()?)
        .stderr(stderr.try_clone()?)
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let Some(status) = wait_deadline(&mut child, timeout)? else {
        bail!("{cmd:?} did not finish within {timeout:?}; killed");
    };
    let read = |mut f: fs::File| -> Result<Vec<u8>> {
        use std::io::{Read, Seek};
        let mut buf = Vec::new();
        f.seek(std::io::SeekFrom::Start(0))?;
        f.read_to_end(&mut buf)?;
        Ok(buf)
    };
    Ok(Output {
        status,
        stdout: read(stdout)?,
        stderr: read(stderr)?,
    })
}

/// Waits for `child` up to `limit`; kills and reaps it and returns `None` on timeout.
fn wait_deadline(child: &mut Child, limit: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

/// A private containerd with CRI; see the module docs.
pub struct Containerd {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    socket: PathBuf,
    log: PathBuf,
    shim: PathBuf,
    /// The `ctr` of the same containerd.
    ctr: PathBuf,
    /// `/run/containerd` and `/run/containerd/s` if we created them (removed when empty).
    created_run_dirs: Vec<PathBuf>,
    cleaned: bool,
    launch: Launch,
    /// `containerd --version`'s version field.
    version: String,
    stanza: MigrateStanza,
}

/// How the daemon is started, kept for [`Containerd::restart`].
struct Launch {
    /// The `containerd` binary (from [`ContainerdOptions::bin_dir`] or PATH).
    binary: PathBuf,
    config: PathBuf,
    log_level: String,
    env: Vec<(String, String)>,
    netns: Option<String>,
    startup_timeout: Duration,
}

impl Launch {
    /// Spawns `containerd --config ...` in `root`, appending to `log`, inside the network
    /// namespace if one is set.
    fn spawn(&self, root: &Path, log: &Path) -> Result<Child> {
        let log_file = fs::OpenOptions::new().append(true).open(log)?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--config")
            .arg(&self.config)
            .args(["--log-level", &self.log_level])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        // Kept open until the spawn: the child enters it before exec.
        let netns = match &self.netns {
            Some(name) => {
                let path = Path::new("/run/netns").join(name);
                let file = fs::File::open(&path)
                    .with_context(|| format!("opening network namespace {}", path.display()))?;
                let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
                // SAFETY: setns(2) is async-signal-safe and fd stays open until spawn returns.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                Some(file)
            }
            None => None,
        };
        let child = cmd.spawn().context("spawning containerd")?;
        drop(netns);
        Ok(child)
    }
}

const CRI: &str = r#"plugins."io.containerd.grpc.v1.cri""#;

/// With [`MigrateStanza::RuntimeType`]: the runc options file (`ConfigPath`) under the temp dir.
const MIGRATE_RUNC_OPTIONS_FILE: &str = "migrate-runc-options.toml";
/// With [`MigrateStanza::RuntimeType`]: the dir holding (a link to) our shim, first on
/// containerd's `PATH`.
const SHIM_BIN_DIR: &str = "shim-bin";

impl Containerd {
    /// The runc options of the `migrate` handler, `key = value` lines.
    fn migrate_runc_options(dir: &Path, opts: &ContainerdOptions) -> Vec<String> {
        Self::runc_option_lines(dir, opts, &opts.migrate_options)
    }

    fn runc_option_lines(
        dir: &Path,
        opts: &ContainerdOptions,
        extra: &[(String, String)],
    ) -> Vec<String> {
        let mut lines = vec![
            format!("BinaryName = {}", toml_path(&opts.runc)),
            // runc's state (runc --root <Root>/<namespace>): ours, not /run/containerd/runc.
            format!("Root = {}", toml_path(&dir.join("runc"))),
            "SystemdCgroup = false".to_owned(),
        ];
        for (key, value) in extra {
            lines.retain(|l| !l.starts_with(&format!("{key} =")));
            lines.push(format!("{key} = {value}"));
        }
        lines
    }

    /// The `migrate` handler's tables.
    fn migrate_tables(dir: &Path, opts: &ContainerdOptions, stanza: MigrateStanza) -> String {
        let indent = |lines: &[String]| {
            lines
                .iter()
                .map(|l| format!("      {l}\n"))
                .collect::<String>()
        };
        match stanza {
            MigrateStanza::RuntimePath => format!(
                r#"    [{CRI}.containerd.runtimes.migrate]
      # runc v2 type so the typed runc options reach the shim (see docs/containerd.md).
      runtime_type = "io.containerd.runc.v2"
      runtime_path = {shim}
      pod_annotations = [{pod_annotations}]
    [{CRI}.containerd.runtimes.migrate.options]
{options}"#,
                shim = toml_path(&opts.shim),
                pod_annotations = toml_str(POD_ANNOTATIONS),
                options = indent(&Self::migrate_runc_options(dir, opts)),
            ),
            MigrateStanza::RuntimeType => format!(
                r#"    [{CRI}.containerd.runtimes.migrate]
      # containerd before 1.7.1 does not apply runtime_path: our runtime name, our binary on
      # containerd's PATH (see docs/containerd.md).
      runtime_type = {runtime_type}
      pod_annotations = [{pod_annotations}]
    [{CRI}.containerd.runtimes.migrate.options]
      # runtimeoptions.v1.Options: the shim reads the runc options from this file.
      ConfigPath = {config_path}
"#,
                runtime_type = toml_str(MIGRATE_RUNTIME_TYPE),
                pod_annotations = toml_str(POD_ANNOTATIONS),
                config_path = toml_path(&dir.join(MIGRATE_RUNC_OPTIONS_FILE)),
            ),
        }
    }

    /// The config file text for a daemon rooted at `dir`, with the `migrate` handler written
    /// as `stanza`. With [`MigrateStanza::RuntimeType`], [`Containerd::start`] also writes the
    /// runc options file and puts our shim on containerd's `PATH`.
    pub fn config_toml(dir: &Path, opts: &ContainerdOptions, stanza: MigrateStanza) -> String {
        let runc_options = |extra: &[(String, String)]| {
            Self::runc_option_lines(dir, opts, extra)
                .iter()
                .map(|l| format!("      {l}\n"))
                .collect::<String>()
        };
        format!(
            r#"version = 2
root = {root}
state = {state}
temp = {temp}

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[plugins]
  # Defaults to /opt/containerd.
  [plugins."io.containerd.internal.v1.opt"]
    path = {opt}

  [{CRI}]
    sandbox_image = {pause}
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    # Host-dependent confinement would make runs differ between machines (and CRIU restores).
    disable_apparmor = true
    enable_selinux = false
    # Network namespaces (not used by host-network pods) under our state dir, not /var/run/netns.
    netns_mounts_under_state_dir = true
    enable_cdi = false
    # Never ask for an oom_score_adj below containerd's own: lowering it needs CAP_SYS_RESOURCE,
    # which a containerised CI host may lack (runc then fails in nsexec, e.g. for the pause
    # container's -998).
    restrict_oom_score_adj = true

    # Empty: host-network pods need no CNI; other pods would fail to get a network.
    [{CRI}.cni]
      bin_dir = {cni_bin}
      conf_dir = {cni_conf}
      max_conf_num = 1

    [{CRI}.containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      discard_unpacked_layers = false

    [{CRI}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [{CRI}.containerd.runtimes.runc.options]
{runc_opts}
{migrate}
{extra}
"#,
            root = toml_path(&dir.join("root")),
            state = toml_path(&dir.join("state")),
            temp = toml_path(&dir.join("tmp")),
            socket = toml_path(&dir.join("containerd.sock")),
            ttrpc = toml_path(&dir.join("containerd.sock.ttrpc")),
            opt = toml_path(&dir.join("opt")),
            pause = toml_str(PAUSE_IMAGE),
            cni_bin = toml_path(&dir.join("cni/bin")),
            cni_conf = toml_path(&dir.join("cni/net.d")),
            runc_opts = runc_options(&opts.runc_options),
            migrate = Self::migrate_tables(dir, opts, stanza),
            extra = opts.extra_config,
        )
    }

    /// Starts containerd, waits (bounded) until the CRI `Version` call answers, and imports the
    /// pause image.
    pub async fn start(opts: ContainerdOptions) -> Result<Containerd> {
        let created_run_dirs = ["/run/containerd", SHIM_SOCKET_DIR]
            .iter()
            .map(PathBuf::from)
            .filter(|d| !d.exists())
            .collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("podmigrate-{}-", opts.name))
            .tempdir()
            .context("creating containerd's temp dir")?;
        let root = dir.path().to_owned();
        for sub in ["tmp", "cni/bin", "cni/net.d", "pod-logs", "images", "runc"] {
            fs::create_dir_all(root.join(sub))?;
        }
        let socket = root.join("containerd.sock");
        let log = root.join("containerd.log");

        let binary = |name: &str| {
            containerd_binary_in(opts.bin_dir.as_deref(), name).with_context(|| {
                match &opts.bin_dir {
                    Some(dir) => format!("{name} not found in {}", dir.display()),
                    None => format!("{name} not found on PATH"),
                }
            })
        };
        let containerd = binary("containerd")?;
        let ctr = binary("ctr")?;
        let version = version_of(&containerd)?;
        let stanza = MigrateStanza::for_version(&version).with_context(|| {
            format!(
                "{} --version: unparsable version {version:?}",
                containerd.display()
            )
        })?;
        let config = root.join("config.toml");
        fs::write(&config, Self::config_toml(&root, &opts, stanza))?;
        let shim_bin = root.join(SHIM_BIN_DIR);
        if stanza == MigrateStanza::RuntimeType {
            let file = root.join(MIGRATE_RUNC_OPTIONS_FILE);
            let mut text = Self::migrate_runc_options(&root, &opts).join("\n");
            text.push('\n');
            fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
            fs::create_dir_all(&shim_bin)?;
            std::os::unix::fs::symlink(&opts.shim, shim_bin.join(SHIM_BINARY)).with_context(
                || {
                    format!(
                        "linking {} into {}",
                        opts.shim.display(),
                        shim_bin.display()
                    )
                },
            )?;
        }
        // Shims look for runc and criu on PATH (the caller's `extra_env` PATH, else ours):
        // make sure the sbin dirs are on it. containerd looks up `containerd-shim-runc-v2` on
        // PATH before beside itself: the chosen dir goes first.
        let mut path = match opts.extra_env.iter().rev().find(|(k, _)| k == "PATH") {
            Some((_, v)) => v.clone(),
            None => std::env::var("PATH").unwrap_or_default(),
        };
        if let Some(dir) = &opts.bin_dir {
            path = format!("{}:{path}", dir.display());
        }
        // containerd finds `io.containerd.migrate.v2` as `containerd-shim-migrate-v2` on PATH.
        if stanza == MigrateStanza::RuntimeType {
            path = format!("{}:{path}", shim_bin.display());
        }
        for dir in [
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ] {
            if !path.split(':').any(|p| p == dir) {
                path.push(':');
                path.push_str(dir);
            }
        }
        fs::File::create(&log)?;
        let mut env = vec![("PATH".to_owned(), path)];
        // Our shim's delegate: this containerd's runc shim (unless the caller names one).
        if opts.bin_dir.is_some() && !opts.extra_env.iter().any(|(k, _)| k == DELEGATE_ENV) {
            env.push((
                DELEGATE_ENV.to_owned(),
                binary(RUNC_SHIM_BINARY)?.display().to_string(),
            ));
        }
        env.extend(opts.extra_env.iter().filter(|(k, _)| k != "PATH").cloned());
        let launch = Launch {
            binary: containerd,
            config,
            log_level: opts.log_level.clone(),
            env,
            netns: opts.netns.clone(),
            startup_timeout: opts.startup_timeout,
        };
        let child = launch.spawn(&root, &log)?;

        let mut daemon = Containerd {
            child: Some(child),
            dir: Some(dir),
            socket,
            log,
            shim: opts.shim.clone(),
            ctr,
            created_run_dirs,
            cleaned: false,
            launch,
            version,
            stanza,
        };
        daemon
            .wait_ready(opts.startup_timeout)
            .await
            .with_context(|| format!("containerd log:\n{}", daemon.log_tail(60)))?;
        daemon
            .import(&oci::pause_image()?, opts.startup_timeout)
            .context("importing the pause image")?;
        Ok(daemon)
    }

    /// `containerd --version`'s version field of this daemon (`1.6.20~ds1`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// How the `migrate` handler reaches our shim in this daemon's config.
    pub fn migrate_stanza(&self) -> MigrateStanza {
        self.stanza
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Restarts the daemon as an operator's `systemctl restart containerd` does: SIGTERM
    /// (SIGKILL after 10 s), then the same command again. Shims and containers keep running;
    /// the new daemon reconnects to them. Waits until CRI answers again.
    pub async fn restart(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of the child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if !matches!(
                wait_deadline(&mut child, Duration::from_secs(10)),
                Ok(Some(_))
            ) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let root = self.dir().to_owned();
        self.child = Some(self.launch.spawn(&root, &self.log)?);
        let timeout = self.launch.startup_timeout;
        self.wait_ready(timeout)
            .await
            .with_context(|| format!("containerd log:\n{}", self.log_tail(60)))
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut last_error = String::from("socket not created");
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("containerd exited early ({status})");
            }
            if self.socket.exists() {
                match self.try_version().await {
                    Ok(()) => return Ok(()),
                    Err(e) => last_error = format!("{e:#}"),
                }
            }
            if start.elapsed() >= timeout {
                bail!("containerd's CRI did not answer Version within {timeout:?}: {last_error}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn try_version(&self) -> Result<()> {
        let mut cri = self.cri().await?;
        cri.rpc_timeout = Duration::from_secs(2);
        let v = cri.version().await?;
        ensure!(
            v.runtime_name == "containerd",
            "unexpected runtime {:?}",
            v.runtime_name
        );
        Ok(())
    }

    /// A new CRI client on this daemon's socket, with pod logs under [`Containerd::log_root`].
    pub async fn cri(&self) -> Result<CriClient> {
        CriClient::connect(&self.socket, &self.log_root()).await
    }

    /// The temp dir everything lives in.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    /// containerd's gRPC socket (CRI and containerd API).
    pub fn address(&self) -> &Path {
        &self.socket
    }

    /// Root of pod log directories (`<ns>_<name>_<uid>/<container>/0.log`).
    pub fn log_root(&self) -> PathBuf {
        self.dir().join("pod-logs")
    }

    /// runc's root for both handlers; runc state is in `<runc_root>/k8s.io/<container id>`.
    pub fn runc_root(&self) -> PathBuf {
        self.dir().join("runc")
    }

    /// containerd's state dir (bundles: `state/io.containerd.runtime.v2.task/k8s.io/<id>`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// containerd's root dir (content, snapshots, metadata).
    pub fn root_dir(&self) -> PathBuf {
        self.dir().join("root")
    }

    /// The binary behind the `migrate` handler.
    pub fn shim(&self) -> &Path {
        &self.shim
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The last `n` lines of containerd's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The `ctr` of this containerd.
    pub fn ctr_binary(&self) -> &Path {
        &self.ctr
    }

    /// Runs `ctr --address <socket> --namespace k8s.io <args>`, bounded.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        run_bounded(
            Command::new(&self.ctr)
                .arg("--address")
                .arg(&self.socket)
                .args(["--namespace", K8S_NAMESPACE])
                .args(args),
            Duration::from_secs(60),
        )
    }

    /// Packs `image` into `<dir>/images/` and imports it into the `k8s.io` namespace.
    pub fn import(&self, image: &Image, timeout: Duration) -> Result<()> {
        let file = image
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect::<String>();
        let archive = self.dir().join("images").join(format!("{file}.tar"));
        image.write_archive(&archive)?;
        oci::import(&self.ctr, &self.socket, &archive, &image.name, timeout)
            .with_context(|| format!("importing {}", image.name))?;
        let _ = fs::remove_file(&archive);
        Ok(())
    }

    /// Pids of shims started for this daemon (their command line names our socket).
    pub fn shim_pids(&self) -> Vec<i32> {
        self.shim_processes()
            .into_iter()
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Shims started for this daemon, with their binary (`argv[0]`): containerd-shim-runc-v2
    /// for the `runc` handler, ours for `migrate`.
    pub fn shim_processes(&self) -> Vec<(i32, PathBuf)> {
        let needle = self.socket.as_os_str().as_bytes().to_vec();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        let own = self.child.as_ref().map(|c| c.id() as i32);
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| Some(*pid) != own)
            .filter_map(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let mut args = cmdline.split(|b| *b == 0);
                let argv0 = args.next()?;
                let is_shim = argv0.windows(15).any(|w| w == b"containerd-shim");
                let ours = cmdline
                    .split(|b| *b == 0)
                    .any(|arg| arg == needle.as_slice());
                (is_shim && ours).then(|| (pid, PathBuf::from(std::ffi::OsStr::from_bytes(argv0))))
            })
            .collect()
    }

    /// Shim socket paths recorded in bundles (`address` files), i.e. in `/run/containerd/s`.
    fn shim_sockets(&self) -> Vec<PathBuf> {
        let tasks = self.state_dir().join("io.containerd.runtime.v2.task");
        let mut out = Vec::new();
        for ns in fs::read_dir(&tasks).into_iter().flatten().flatten() {
            for bundle in fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                if let Ok(address) = fs::read_to_string(bundle.path().join("address")) {
                    let path = address.trim().trim_start_matches("unix://");
                    if path.starts_with(SHIM_SOCKET_DIR) {
                        out.push(PathBuf::from(path));
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The sockets of the runc shims our shims delegate to. Their `address` files name only our
    /// shim's socket, and a killed runc shim leaves its own behind in `/run/containerd/s`.
    fn delegate_sockets(&self) -> Vec<PathBuf> {
        let key = format!(
            "{}=",
            containerd_shim_migrate::delegate::ENV_DELEGATE_ADDRESS
        );
        self.shim_pids()
            .into_iter()
            .filter_map(|pid| fs::read(format!("/proc/{pid}/environ")).ok())
            .filter_map(|environ| {
                environ
                    .split(|b| *b == 0)
                    .find_map(|var| var.strip_prefix(key.as_bytes()).map(<[u8]>::to_vec))
            })
            .filter_map(|address| {
                let address = String::from_utf8(address).ok()?;
                let path = address.trim_start_matches("unix://").to_owned();
                path.starts_with(SHIM_SOCKET_DIR)
                    .then(|| PathBuf::from(path))
            })
            .collect()
    }

    /// Mount points under our temp dir, deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let prefix = self.dir().as_os_str().as_bytes().to_vec();
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<PathBuf> = info
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|mp| mp.as_bytes().starts_with(&prefix))
            .map(PathBuf::from)
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        mounts.dedup();
        mounts
    }

    /// Stops containerd and removes everything it left (see the module docs). Idempotent; Drop
    /// calls it. Returns what could not be cleaned.
    pub fn shutdown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.cleaned {
            return problems;
        }
        self.cleaned = true;
        let mut sockets = self.shim_sockets();
        sockets.extend(self.delegate_sockets());

        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of the child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            match wait_deadline(&mut child, Duration::from_secs(10)) {
                Ok(Some(_)) => {}
                _ => problems.push("containerd ignored SIGTERM; killed".into()),
            }
        }

        // Containers left running: our runc root holds only ours.
        let runc_ns = self.runc_root().join(K8S_NAMESPACE);
        let leftover: Vec<String> = fs::read_dir(&runc_ns)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        for id in leftover {
            let out = run_bounded(
                Command::new("runc")
                    .arg("--root")
                    .arg(&runc_ns)
                    .args(["delete", "--force", &id]),
                Duration::from_secs(20),
            );
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => problems.push(format!(
                    "runc delete --force {id}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => problems.push(format!("runc delete --force {id}: {e:#}")),
            }
        }

        let shims = self.shim_pids();
        for &pid in &shims {
            // SAFETY: kill(2) on a shim started for our containerd (matched by socket path).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.shim_pids().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if !shims.is_empty() {
            problems.push(format!("killed leftover shims {shims:?}"));
        }
        for socket in sockets {
            let _ = fs::remove_file(socket);
        }

        for _ in 0..3 {
            let mounts = self.mounts();
            if mounts.is_empty() {
                break;
            }
            for mount in mounts {
                let Ok(c) = CString::new(mount.as_os_str().as_bytes()) else {
                    continue;
                };
                // SAFETY: a valid NUL-terminated path; lazy unmount of a mount under our dir.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let left = self.mounts();
        if !left.is_empty() {
            problems.push(format!("could not unmount {left:?}"));
        }
        for dir in self.created_run_dirs.iter().rev() {
            let _ = fs::remove_dir(dir); // only when empty: never touch others' sockets
        }

        if let Some(dir) = self.dir.take() {
            if thread::panicking() && std::env::var_os(KEEP_ENV).is_some() {
                eprintln!("kept containerd dir {}", dir.keep().display());
            } else {
                let path = dir.path().to_owned();
                if let Err(e) = dir.close() {
                    problems.push(format!("removing {}: {e}", path.display()));
                }
            }
        }
        problems
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        if thread::panicking() {
            eprintln!(
                "---- containerd log (last 150 lines) ----\n{}\n----------------------------",
                self.log_tail(150)
            );
        }
        for problem in self.shutdown() {
            eprintln!("containerd cleanup: {problem}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn config_is_rooted_in_the_temp_dir() {
        let opts = ContainerdOptions {
            shim: PathBuf::from("/x/shim"),
            migrate_options: vec![("CriuImagePath".into(), "\"/share\"".into())],
            ..ContainerdOptions::default()
        };
        let text = Containerd::config_toml(Path::new("/tmp/d"), &opts, MigrateStanza::RuntimePath);
        assert!(text.contains(r#"root = "/tmp/d/root""#), "{text}");
        assert!(text.contains(r#"address = "/tmp/d/containerd.sock""#));
        assert!(text.contains(r#"runtime_path = "/x/shim""#));
        assert!(text.contains(r#"CriuImagePath = "/share""#));
        assert!(text.contains(r#"sandbox_image = "localhost/podmigrate/pause:1""#));
        assert!(!text.contains("/run/containerd"), "{text}");
        assert!(!text.contains("/var/lib"), "{text}");

        let text = Containerd::config_toml(Path::new("/tmp/d"), &opts, MigrateStanza::RuntimeType);
        assert!(
            text.contains(r#"runtime_type = "io.containerd.runc.migrate.v2""#),
            "{text}"
        );
        assert!(
            text.contains(r#"ConfigPath = "/tmp/d/migrate-runc-options.toml""#),
            "{text}"
        );
        assert!(!text.contains("runtime_path ="), "{text}");
        assert!(!text.contains(r#"CriuImagePath"#), "{text}");
        let file = Containerd::migrate_runc_options(Path::new("/tmp/d"), &opts);
        assert!(
            file.contains(&r#"CriuImagePath = "/share""#.to_owned()),
            "{file:?}"
        );
        assert!(
            file.contains(&r#"Root = "/tmp/d/runc""#.to_owned()),
            "{file:?}"
        );
    }

    #[test]
    fn the_stanza_follows_the_containerd_version() {
        use MigrateStanza::*;
        for (version, stanza) in [
            ("1.6.20~ds1", Some(RuntimeType)),
            ("v1.6.38", Some(RuntimeType)),
            ("1.7.0", Some(RuntimeType)),
            ("1.7.1", Some(RuntimePath)),
            ("1.7.24~ds1", Some(RuntimePath)),
            ("v2.1.4", Some(RuntimePath)),
            ("2.0", Some(RuntimePath)),
            ("devel", None),
        ] {
            assert_eq!(MigrateStanza::for_version(version), stanza, "{version}");
        }
    }

    /// `containerd config dump` must read back our keys where the CRI plugin looks for them.
    #[test]
    fn containerd_understands_the_config() {
        let Some(containerd) = containerd_binary("containerd") else {
            eprintln!("skipped: containerd not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let opts = ContainerdOptions {
            shim: PathBuf::from("/x/shim"),
            ..ContainerdOptions::default()
        };
        for stanza in [MigrateStanza::RuntimePath, MigrateStanza::RuntimeType] {
            let config = dir.path().join("config.toml");
            fs::write(&config, Containerd::config_toml(dir.path(), &opts, stanza)).unwrap();
            let out = run_bounded(
                Command::new(&containerd)
                    .arg("--config")
                    .arg(&config)
                    .args(["config", "dump"]),
                Duration::from_secs(30),
            )
            .unwrap();
            let dump = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let mut expected = vec![
                r#"sandbox_image = "localhost/podmigrate/pause:1""#.to_owned(),
                r#"pod_annotations = ["podmigrate.io/*"]"#.to_owned(),
                format!("bin_dir = \"{}/cni/bin\"", dir.path().display()),
                format!("Root = \"{}/runc\"", dir.path().display()),
            ];
            expected.push(match stanza {
                MigrateStanza::RuntimePath => r#"runtime_path = "/x/shim""#.to_owned(),
                MigrateStanza::RuntimeType => {
                    r#"runtime_type = "io.containerd.runc.migrate.v2""#.to_owned()
                }
            });
            if stanza == MigrateStanza::RuntimeType {
                expected.push(format!(
                    "ConfigPath = \"{}/migrate-runc-options.toml\"",
                    dir.path().display()
                ));
            }
            for expected in expected {
                assert!(
                    dump.contains(&expected),
                    "{stanza:?}: {expected} missing from:\n{dump}"
                );
            }
        }
    }
}
