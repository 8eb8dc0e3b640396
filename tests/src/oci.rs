//! OCI images built locally, for containerds that cannot pull: layers written with the `tar`
//! crate, an image config, a manifest and an `index.json`, packed as an OCI image-layout tarball
//! that `ctr images import` reads. Everything is reproducible (mtime 0, uid/gid 0, sorted
//! entries), so the same inputs always give the same digests.
//!
//! Ready-made images: [`pause_image`] (our own static pause, [`PAUSE_IMAGE`], the CRI
//! `sandbox_image` of [`crate::containerd::Containerd`]), [`busybox_image`] and [`counter_image`]
//! (busybox plus the static `counter` test app).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::bundle::{APPLETS, BUSYBOX};

/// The pod sandbox image every harness containerd is configured with (`sandbox_image`).
pub const PAUSE_IMAGE: &str = "localhost/podmigrate/pause:1";
/// Static busybox with applet symlinks, `/tmp` and `/etc/passwd`.
pub const BUSYBOX_IMAGE: &str = "localhost/podmigrate/busybox:1";
/// [`BUSYBOX_IMAGE`] plus `/bin/counter` (tests/apps/counter) as the entrypoint.
pub const COUNTER_IMAGE: &str = "localhost/podmigrate/counter:1";

/// The CRI plugin's containerd namespace, where images must be imported to be seen by CRI.
pub const K8S_NAMESPACE: &str = "k8s.io";

/// Applets linked in [`busybox_image`] beyond [`crate::bundle::APPLETS`].
pub const EXTRA_APPLETS: &[&str] = &[
    "wget",
    "nc",
    "netstat",
    "ip",
    "awk",
    "cut",
    "tr",
    "sort",
    "uniq",
    "stat",
    "pidof",
    "timeout",
    "xargs",
    "tee",
    "cp",
    "mv",
    "ln",
    "chmod",
    "du",
    "df",
    "mount",
    "umount",
    "sync",
    "uname",
    "md5sum",
    "sha256sum",
    "dd",
    "find",
    "nslookup",
    "vi",
    "less",
    "top",
    "free",
    "usleep",
];

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// The workspace root (the parent of this crate's directory, `tests/`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_owned()
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in hash.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The OCI architecture name of this machine.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Layers

/// One uncompressed layer tar under construction. Parent directories are added automatically
/// (mode 0755) the first time a path below them is added; paths are relative (`bin/sh`), a
/// leading `/` is stripped.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
    dirs: BTreeSet<String>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> LayerBuilder {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Deterministic);
        LayerBuilder {
            tar,
            dirs: BTreeSet::new(),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header
    }

    fn normalize(path: &str) -> Result<String> {
        let trimmed = path.trim_start_matches('/').trim_end_matches('/');
        ensure!(!trimmed.is_empty(), "empty layer path {path:?}");
        ensure!(
            !trimmed.split('/').any(|c| c == ".." || c.is_empty()),
            "bad layer path {path:?}"
        );
        Ok(trimmed.to_owned())
    }

    fn parents(&mut self, path: &str) -> Result<()> {
        let mut prefix = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for component in &components[..components.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(component);
            if !self.dirs.contains(&prefix) {
                let p = prefix.clone();
                self.add_dir_entry(&p, 0o755)?;
            }
        }
        Ok(())
    }

    fn add_dir_entry(&mut self, path: &str, mode: u32) -> Result<()> {
        let mut header = Self::header(tar::EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut header, format!("{path}/"), std::io::empty())
            .with_context(|| format!("adding directory {path} to a layer"))?;
        self.dirs.insert(path.to_owned());
        Ok(())
    }

    /// Adds a directory with `mode` (e.g. `0o1777` for `tmp`). Re-adding an existing one is a
    /// no-op (the first mode wins).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self> {
        let path = Self::normalize(path)?;
        if !self.dirs.contains(&path) {
            self.parents(&path)?;
            self.add_dir_entry(&path, mode)?;
        }
        Ok(self)
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<&mut Self> {
        let path = Self::normalize(path)?;
        self.parents(&path)?;
        let mut header = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.tar
            .append_data(&mut header, &path, data)
            .with_context(|| format!("adding {path} to a layer"))?;
        Ok(self)
    }

    /// Adds a symlink `path -> target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        let path = Self::normalize(path)?;
        self.parents(&path)?;
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut header, &path, target)
            .with_context(|| format!("adding symlink {path} to a layer"))?;
        Ok(self)
    }

    /// Adds `(path, bytes, mode)` regular files.
    pub fn entries(&mut self, entries: &[(&str, &[u8], u32)]) -> Result<&mut Self> {
        for (path, data, mode) in entries {
            self.file(path, data, *mode)?;
        }
        Ok(self)
    }

    /// Adds the tree under the host directory `dir` (directories, regular files and symlinks,
    /// with their permission bits, owned by root) below `at` (`""` for the layer root).
    pub fn host_dir(&mut self, dir: &Path, at: &str) -> Result<&mut Self> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        for name in names {
            let host = dir.join(&name);
            let name = name
                .to_str()
                .with_context(|| format!("non-UTF-8 name {}", host.display()))?;
            let path = if at.trim_matches('/').is_empty() {
                name.to_owned()
            } else {
                format!("{}/{name}", at.trim_matches('/'))
            };
            let meta = fs::symlink_metadata(&host)?;
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                self.dir(&path, mode)?;
                self.host_dir(&host, &path)?;
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&host)?;
                let target = target
                    .to_str()
                    .with_context(|| format!("non-UTF-8 link {}", host.display()))?;
                self.symlink(&path, target)?;
            } else if meta.is_file() {
                let data =
                    fs::read(&host).with_context(|| format!("reading {}", host.display()))?;
                self.file(&path, &data, mode)?;
            } else {
                bail!("{}: unsupported file type in a layer", host.display());
            }
        }
        Ok(self)
    }

    /// The finished layer tar.
    pub fn finish(self) -> Result<Vec<u8>> {
        self.tar.into_inner().context("finishing a layer tar")
    }
}

// ---------------------------------------------------------------------------------------------
// Images

/// The parts of the OCI image config's `config` object the CRI plugin uses.
#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=value` strings.
    pub env: Vec<String>,
    pub working_dir: String,
    pub labels: BTreeMap<String, String>,
    /// e.g. `SIGTERM`; empty for the runtime default.
    pub stop_signal: String,
}

/// An image to be packed as an OCI image layout: named layers plus a config.
#[derive(Debug, Clone)]
pub struct Image {
    /// Full reference, e.g. `localhost/podmigrate/pause:1`.
    pub name: String,
    pub layers: Vec<Vec<u8>>,
    pub config: ImageConfig,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

impl Image {
    /// An image without layers, with `PATH` set like Docker's default.
    pub fn new(name: &str) -> Image {
        Image {
            name: name.to_owned(),
            layers: Vec::new(),
            config: ImageConfig {
                env: vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ],
                working_dir: "/".into(),
                ..ImageConfig::default()
            },
        }
    }

    /// Appends a finished layer tar (uncompressed).
    pub fn layer(mut self, tar: Vec<u8>) -> Image {
        self.layers.push(tar);
        self
    }

    /// Appends a layer holding the host directory `dir` as the root.
    pub fn layer_from_dir(self, dir: &Path) -> Result<Image> {
        let mut layer = LayerBuilder::new();
        layer.host_dir(dir, "")?;
        Ok(self.layer(layer.finish()?))
    }

    /// Appends a layer of `(path, bytes, mode)` regular files.
    pub fn layer_from_entries(self, entries: &[(&str, &[u8], u32)]) -> Result<Image> {
        let mut layer = LayerBuilder::new();
        layer.entries(entries)?;
        Ok(self.layer(layer.finish()?))
    }

    pub fn entrypoint(mut self, args: &[&str]) -> Image {
        self.config.entrypoint = strings(args);
        self
    }

    pub fn cmd(mut self, args: &[&str]) -> Image {
        self.config.cmd = strings(args);
        self
    }

    /// Sets (or replaces) one environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Image {
        let prefix = format!("{key}=");
        self.config.env.retain(|e| !e.starts_with(&prefix));
        self.config.env.push(format!("{key}={value}"));
        self
    }

    pub fn working_dir(mut self, dir: &str) -> Image {
        self.config.working_dir = dir.to_owned();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Image {
        self.config.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// The image config blob.
    pub fn config_json(&self) -> Vec<u8> {
        let c = &self.config;
        let mut config = serde_json::Map::new();
        if !c.entrypoint.is_empty() {
            config.insert("Entrypoint".into(), json!(c.entrypoint));
        }
        if !c.cmd.is_empty() {
            config.insert("Cmd".into(), json!(c.cmd));
        }
        if !c.env.is_empty() {
            config.insert("Env".into(), json!(c.env));
        }
        if !c.working_dir.is_empty() {
            config.insert("WorkingDir".into(), json!(c.working_dir));
        }
        if !c.labels.is_empty() {
            config.insert("Labels".into(), json!(c.labels));
        }
        if !c.stop_signal.is_empty() {
            config.insert("StopSignal".into(), json!(c.stop_signal));
        }
        // Uncompressed layers: each diff id is the layer's own digest.
        let diff_ids: Vec<String> = self.layers.iter().map(|l| sha256_digest(l)).collect();
        let value = json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": oci_arch(),
            "os": "linux",
            "config": Value::Object(config),
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": self.layers.iter().map(|_| json!({
                "created": "1970-01-01T00:00:00Z",
                "created_by": "podmigrate-e2e oci::Image",
            })).collect::<Vec<_>>(),
        });
        serde_json::to_vec(&value).expect("serializing a JSON value")
    }

    /// The image's tag (after the last `:` of the last path component), `latest` if none.
    pub fn tag(&self) -> &str {
        let last = self.name.rsplit('/').next().unwrap_or(&self.name);
        match last.rsplit_once(':') {
            Some((_, tag)) => tag,
            None => "latest",
        }
    }

    /// The OCI image layout tarball: `oci-layout`, `index.json` (annotated with
    /// `io.containerd.image.name` = the full name, so `ctr images import` names it, and
    /// `org.opencontainers.image.ref.name` = the tag) and `blobs/sha256/*`.
    pub fn archive(&self) -> Result<Vec<u8>> {
        ensure!(!self.layers.is_empty(), "image {} has no layers", self.name);
        let config = self.config_json();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {
                "mediaType": CONFIG_MEDIA_TYPE,
                "digest": sha256_digest(&config),
                "size": config.len(),
            },
            "layers": self.layers.iter().map(|l| json!({
                "mediaType": LAYER_MEDIA_TYPE,
                "digest": sha256_digest(l),
                "size": l.len(),
            })).collect::<Vec<_>>(),
        }))?;
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [{
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": sha256_digest(&manifest),
                "size": manifest.len(),
                "platform": { "architecture": oci_arch(), "os": "linux" },
                "annotations": {
                    "io.containerd.image.name": self.name,
                    "org.opencontainers.image.ref.name": self.tag(),
                },
            }],
        }))?;

        let mut blobs: BTreeMap<String, &[u8]> = BTreeMap::new();
        for layer in &self.layers {
            blobs.insert(sha256_digest(layer), layer);
        }
        blobs.insert(sha256_digest(&config), &config);
        blobs.insert(sha256_digest(&manifest), &manifest);

        let mut out = LayerBuilder::new();
        out.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644)?;
        out.file("index.json", &index, 0o644)?;
        out.dir("blobs/sha256", 0o755)?;
        for (digest, blob) in blobs {
            let hex = digest.trim_start_matches("sha256:");
            out.file(&format!("blobs/sha256/{hex}"), blob, 0o644)?;
        }
        out.finish()
    }

    /// Writes [`Image::archive`] to `path`.
    pub fn write_archive(&self, path: &Path) -> Result<()> {
        let bytes = self.archive()?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
    }
}

/// Imports the OCI archive at `archive` into containerd at `address` (namespace
/// [`K8S_NAMESPACE`], where the CRI plugin sees it) with `ctr images import` (`ctr`: that
/// containerd's), then checks that `image` is listed. Bounded by `timeout`.
pub fn import(
    ctr: &Path,
    address: &Path,
    archive: &Path,
    image: &str,
    timeout: Duration,
) -> Result<()> {
    let out = crate::containerd::run_bounded(
        Command::new(ctr)
            .arg("--address")
            .arg(address)
            .args(["--namespace", K8S_NAMESPACE, "images", "import"])
            .arg(archive),
        timeout,
    )?;
    ensure!(
        out.status.success(),
        "ctr images import {} failed ({}): {}",
        archive.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let listed = crate::containerd::run_bounded(
        Command::new(ctr).arg("--address").arg(address).args([
            "--namespace",
            K8S_NAMESPACE,
            "images",
            "list",
            "--quiet",
        ]),
        timeout,
    )?;
    let names = String::from_utf8_lossy(&listed.stdout);
    ensure!(
        names.lines().any(|l| l.trim() == image),
        "imported {} but {image} is not listed; ctr said: {} / images: {}",
        archive.display(),
        String::from_utf8_lossy(&out.stdout).trim(),
        names.trim()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ready-made images

/// Serializes the test-time builds of helper binaries within one test process.
static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// A cache directory for test-time artifacts: `target/<profile>/podmigrate-e2e/` next to the
/// running test binary (`target/<profile>/deps/<test>`), or under the system temp dir when the
/// layout is unexpected.
pub fn cache_dir() -> PathBuf {
    let dir = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("podmigrate-e2e")))
        .unwrap_or_else(|| std::env::temp_dir().join("podmigrate-e2e-cache"));
    let _ = fs::create_dir_all(&dir);
    dir
}

fn mtime(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The pause program's C source, tests/fixtures/pause.c.
pub fn pause_source() -> PathBuf {
    workspace_root().join("tests/fixtures/pause.c")
}

/// Our static pause binary, compiled with `gcc -static -O2` into [`cache_dir`] when missing or
/// older than its source.
pub fn pause_binary() -> Result<PathBuf> {
    let _lock = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let source = pause_source();
    ensure!(source.is_file(), "{} missing", source.display());
    let out = cache_dir().join("pause");
    if out.is_file() && mtime(&out) >= mtime(&source) {
        return Ok(out);
    }
    // Build under a temporary name, then rename: another test binary may read it meanwhile.
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let result = crate::containerd::run_bounded(
        Command::new("gcc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&tmp)
            .arg(&source),
        Duration::from_secs(120),
    )
    .context("running gcc (apt-get install gcc libc6-dev)")?;
    ensure!(
        result.status.success(),
        "gcc -static {} failed ({}; static linking needs libc6-dev): {}",
        source.display(),
        result.status,
        String::from_utf8_lossy(&result.stderr).trim()
    );
    fs::rename(&tmp, &out)?;
    Ok(out)
}

/// [`PAUSE_IMAGE`]: `/pause` (see [`pause_binary`]) as the entrypoint, nothing else.
pub fn pause_image() -> Result<Image> {
    let binary = fs::read(pause_binary()?)?;
    Ok(Image::new(PAUSE_IMAGE)
        .layer_from_entries(&[("pause", &binary, 0o755)])?
        .entrypoint(&["/pause"]))
}

/// A busybox root filesystem layer: `/bin/busybox` (the host's static busybox), symlinks for
/// [`crate::bundle::APPLETS`] and [`EXTRA_APPLETS`], the usual mount points, a sticky
/// world-writable `/tmp`, `/etc/passwd` and `/etc/group`.
pub fn busybox_layer() -> Result<LayerBuilder> {
    let busybox = fs::read(BUSYBOX)
        .with_context(|| format!("reading {BUSYBOX} (apt-get install busybox-static)"))?;
    let mut layer = LayerBuilder::new();
    for dir in ["bin", "dev", "proc", "sys", "etc", "root", "run", "var"] {
        layer.dir(dir, 0o755)?;
    }
    layer.dir("tmp", 0o1777)?;
    layer.file("bin/busybox", &busybox, 0o755)?;
    let mut seen = BTreeSet::new();
    for applet in APPLETS.iter().chain(EXTRA_APPLETS) {
        if seen.insert(*applet) {
            layer.symlink(&format!("bin/{applet}"), "busybox")?;
        }
    }
    layer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)?;
    layer.file("etc/group", b"root:x:0:\n", 0o644)?;
    Ok(layer)
}

/// [`BUSYBOX_IMAGE`]: [`busybox_layer`] with `Cmd ["/bin/sh"]`.
pub fn busybox_image() -> Result<Image> {
    Ok(Image::new(BUSYBOX_IMAGE)
        .layer(busybox_layer()?.finish()?)
        .cmd(&["/bin/sh"]))
}

/// Where tests/apps/counter/build.sh puts the static counter: `$COUNTER_OUT`, else
/// `<workspace>/target/counter/counter`.
pub fn counter_binary_path() -> PathBuf {
    match std::env::var_os("COUNTER_OUT") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join("target/counter/counter"),
    }
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = mtime(dir);
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            mtime(&path)
        };
        newest = newest.max(t);
    }
    newest
}

/// The static counter binary, (re)built with tests/apps/counter/build.sh when missing or older
/// than the app's sources or Cargo.toml.
pub fn counter_binary() -> Result<PathBuf> {
    let _lock = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let app = workspace_root().join("tests/apps/counter");
    let out = counter_binary_path();
    let sources = newest_mtime(&app.join("src")).max(mtime(&app.join("Cargo.toml")));
    if out.is_file() && mtime(&out) >= sources {
        return Ok(out);
    }
    let script = app.join("build.sh");
    ensure!(script.is_file(), "{} missing", script.display());
    let result = crate::containerd::run_bounded(
        Command::new("bash")
            .arg(&script)
            .env("COUNTER_OUT", &out)
            .stdin(Stdio::null()),
        Duration::from_secs(600),
    )?;
    ensure!(
        result.status.success() && out.is_file(),
        "{} failed ({}): {}",
        script.display(),
        result.status,
        String::from_utf8_lossy(&result.stderr).trim()
    );
    Ok(out)
}

/// [`COUNTER_IMAGE`]: the busybox layer plus a second layer with `/bin/counter`
/// ([`counter_binary`]), `Entrypoint ["/bin/counter"]`.
pub fn counter_image() -> Result<Image> {
    let binary = fs::read(counter_binary()?)?;
    Ok(Image::new(COUNTER_IMAGE)
        .layer(busybox_layer()?.finish()?)
        .layer_from_entries(&[("bin/counter", &binary, 0o755)])?
        .entrypoint(&["/bin/counter"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(tar_bytes: &[u8]) -> Vec<(String, tar::EntryType, u32, Vec<u8>)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_string_lossy().into_owned();
                let kind = e.header().entry_type();
                let mode = e.header().mode().unwrap();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                (path, kind, mode, data)
            })
            .collect()
    }

    #[test]
    fn layers_get_parent_dirs_and_modes() {
        let mut layer = LayerBuilder::new();
        layer.dir("tmp", 0o1777).unwrap();
        layer.file("/usr/local/bin/x", b"hi", 0o755).unwrap();
        layer.symlink("bin/sh", "busybox").unwrap();
        let got = entries(&layer.finish().unwrap());
        let names: Vec<_> = got.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "tmp/",
                "usr/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/x",
                "bin/",
                "bin/sh"
            ]
        );
        assert_eq!(got[0].2, 0o1777);
        assert_eq!(got[4].3, b"hi");
        assert_eq!(got[4].2, 0o755);
        assert_eq!(got[6].1, tar::EntryType::Symlink);
    }

    #[test]
    fn long_paths_survive() {
        let long = format!("{}/file", "d".repeat(150));
        let mut layer = LayerBuilder::new();
        layer.file(&long, b"x", 0o644).unwrap();
        let got = entries(&layer.finish().unwrap());
        assert_eq!(got.last().unwrap().0, long);
    }

    #[test]
    fn archives_are_reproducible_and_consistent() {
        let build = || {
            Image::new("localhost/podmigrate/test:7")
                .layer_from_entries(&[("bin/a", b"a", 0o755)])
                .unwrap()
                .entrypoint(&["/bin/a"])
                .env("X", "1")
        };
        let a = build().archive().unwrap();
        assert_eq!(a, build().archive().unwrap(), "same inputs, same bytes");
        let files: BTreeMap<String, Vec<u8>> = entries(&a)
            .into_iter()
            .filter(|e| e.1 == tar::EntryType::Regular)
            .map(|e| (e.0, e.3))
            .collect();
        let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let desc = &index["manifests"][0];
        assert_eq!(
            desc["annotations"]["io.containerd.image.name"],
            "localhost/podmigrate/test:7"
        );
        assert_eq!(
            desc["annotations"]["org.opencontainers.image.ref.name"],
            "7"
        );
        // Every blob is stored under its digest, and the manifest points at the config.
        for (name, bytes) in &files {
            if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                assert_eq!(sha256_digest(bytes), format!("sha256:{hex}"));
            }
        }
        let manifest_name = format!(
            "blobs/sha256/{}",
            desc["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
        );
        let manifest: Value = serde_json::from_slice(&files[&manifest_name]).unwrap();
        let config_name = format!(
            "blobs/sha256/{}",
            manifest["config"]["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
        );
        let config: Value = serde_json::from_slice(&files[&config_name]).unwrap();
        assert_eq!(config["config"]["Entrypoint"], json!(["/bin/a"]));
        assert!(config["config"]["Env"]
            .as_array()
            .unwrap()
            .contains(&json!("X=1")));
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );
    }

    #[test]
    fn host_dir_layers_keep_links_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/b/f"), "x").unwrap();
        fs::set_permissions(dir.path().join("a/b/f"), fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink("b/f", dir.path().join("a/l")).unwrap();
        let mut layer = LayerBuilder::new();
        layer.host_dir(dir.path(), "").unwrap();
        let got = entries(&layer.finish().unwrap());
        let f = got.iter().find(|e| e.0 == "a/b/f").unwrap();
        assert_eq!((f.2, f.3.as_slice()), (0o640, &b"x"[..]));
        let l = got.iter().find(|e| e.0 == "a/l").unwrap();
        assert_eq!(l.1, tar::EntryType::Symlink);
    }

    #[test]
    fn image_tags() {
        assert_eq!(Image::new("localhost/a/b:1").tag(), "1");
        assert_eq!(Image::new("localhost:5000/a/b").tag(), "latest");
    }
}
