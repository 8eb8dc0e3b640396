//! `pack`, `unpack`, `verify` and `inspect`: the archive commands.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use comfy_table::{presets::ASCII_FULL, ContentArrangement, Table};
use podmigrate_checkpoint::archive::{
    self, ArchiveManifest, Compression, EntryKind, PackOptions, Source, UnpackOptions, Versions,
    DEFAULT_CHUNK_SIZE,
};
use podmigrate_checkpoint::bandwidth::Bandwidth;
use podmigrate_checkpoint::layout::{ContainerConfig, CHECKPOINT_DIR, ROOTFS_DIFF_TAR};
use podmigrate_checkpoint::{criu, runc};
use serde_json::json;

use super::key::KeyArgs;

#[derive(Debug, Args)]
pub struct PackArgs {
    /// The checkpoint directory (CRIU images under checkpoint/, plus rootfs-diff.tar etc.).
    pub checkpoint_dir: PathBuf,
    /// The archive to write; it appears only when complete.
    pub archive: PathBuf,
    /// zstd (fastest; read by podmigrate, bsdtar, Python 3.14), deflate (read by every zip
    /// tool, Info-ZIP's unzip included) or none.
    #[arg(long, default_value = "zstd")]
    pub compression: Compression,
    /// Compression level (zstd: -7..19, default 1; deflate: 0..9, default 1).
    #[arg(long, allow_hyphen_values = true)]
    pub level: Option<i32>,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Chunk size in KiB; chunks are compressed independently, in parallel.
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE / 1024)]
    pub chunk_kib: usize,
    /// Cap on bytes per second written, a Kubernetes quantity like `64Mi` (0: none).
    #[arg(long, default_value = "0", value_parser = |v: &str| Bandwidth::parse(v))]
    pub bandwidth: Bandwidth,
    /// Source node (default: this host's name).
    #[arg(long)]
    pub node: Option<String>,
    #[arg(long, default_value = "")]
    pub namespace: String,
    #[arg(long, default_value = "")]
    pub pod: String,
    #[arg(long, default_value = "")]
    pub pod_uid: String,
    /// Uid of the only clone pod allowed to restore the archive (default: any clone).
    #[arg(long, default_value = "")]
    pub clone_pod_uid: String,
    /// Container name (default: from config.dump).
    #[arg(long)]
    pub container: Option<String>,
    /// Container ID (default: from config.dump).
    #[arg(long)]
    pub container_id: Option<String>,
    /// Image reference (default: from config.dump).
    #[arg(long)]
    pub image: Option<String>,
    /// CRIU version that made the checkpoint (default: this node's `criu --version`).
    #[arg(long)]
    pub criu_version: Option<String>,
    /// runc version that made the checkpoint (default: this node's `runc --version`).
    #[arg(long)]
    pub runc_version: Option<String>,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct UnpackArgs {
    pub archive: PathBuf,
    /// Must not exist, or be an empty directory.
    pub dest_dir: PathBuf,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    pub archive: PathBuf,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    pub archive: PathBuf,
    /// Print the manifest as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub key: KeyArgs,
}

pub fn pack(args: PackArgs) -> anyhow::Result<()> {
    let config = ContainerConfig::read_from(&args.checkpoint_dir)?.unwrap_or_default();
    let image = if config.rootfs_image_name.is_empty() {
        config.rootfs_image_ref.clone()
    } else {
        config.rootfs_image_name.clone()
    };
    let options = PackOptions {
        compression: args.compression,
        level: args.level,
        chunk_size: args.chunk_kib.saturating_mul(1024),
        threads: args.threads,
        source: Source {
            node: args.node.unwrap_or_else(hostname),
            namespace: args.namespace,
            pod: args.pod,
            pod_uid: args.pod_uid,
            container: args.container.unwrap_or(config.name),
            container_id: args.container_id.unwrap_or(config.id),
            image: args.image.unwrap_or(image),
            clone_pod_uid: args.clone_pod_uid,
        },
        versions: Versions {
            criu: args.criu_version.unwrap_or_else(local_criu_version),
            runc: args.runc_version.unwrap_or_else(local_runc_version),
            kernel: kernel_release(),
            podmigrate: env!("CARGO_PKG_VERSION").to_string(),
        },
        bandwidth: args.bandwidth,
        key: args.key.load()?,
    };
    let summary = archive::pack(&args.checkpoint_dir, &args.archive, &options).context("pack")?;
    println!(
        "packed {} -> {}: {} entries, {} -> {} ({}, {:.0}%{}) in {:.2}s{}, manifest sha256 {}",
        args.checkpoint_dir.display(),
        summary.archive.display(),
        summary.entries,
        human_bytes(summary.content_bytes),
        human_bytes(summary.archive_bytes),
        options.compression,
        100.0 * summary.archive_bytes as f64 / summary.content_bytes.max(1) as f64,
        sealed_note(summary.sealed_with.as_deref()),
        summary.elapsed.as_secs_f64(),
        if options.bandwidth.is_unlimited() {
            String::new()
        } else {
            format!(
                " ({:.2}s waiting on the {} cap)",
                summary.throttled.as_secs_f64(),
                options.bandwidth
            )
        },
        summary.manifest_sha256,
    );
    Ok(())
}

pub fn unpack(args: UnpackArgs) -> anyhow::Result<()> {
    let options = UnpackOptions {
        threads: args.threads,
        key: args.key.load()?,
        reserved: None,
    };
    let verified = archive::unpack(&args.archive, &args.dest_dir, &options).context("unpack")?;
    println!(
        "unpacked {} -> {}: {} entries, {} verified in {:.2}s",
        args.archive.display(),
        args.dest_dir.display(),
        verified.manifest.entries.len(),
        human_bytes(verified.content_bytes),
        verified.elapsed.as_secs_f64(),
    );
    Ok(())
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let options = UnpackOptions {
        threads: args.threads,
        key: args.key.load()?,
        reserved: None,
    };
    let verified = archive::verify(&args.archive, &options).context("verify")?;
    println!(
        "ok {}: {} entries{}, {} verified in {:.2}s, manifest sha256 {}",
        args.archive.display(),
        verified.manifest.entries.len(),
        sealed_note(options.key.as_ref().map(|k| k.id())),
        human_bytes(verified.content_bytes),
        verified.elapsed.as_secs_f64(),
        verified.manifest_sha256,
    );
    Ok(())
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let key = args.key.load()?;
    let opened = archive::open_with_key(&args.archive, key.as_deref())
        .with_context(|| format!("inspect {}", args.archive.display()))?;
    let manifest = &opened.manifest;
    let sizes = CheckpointSizes::of(manifest);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&manifest_json(&args.archive, &opened, &sizes))?
        );
        return Ok(());
    }
    let source = manifest.source.clone().unwrap_or_default();
    let versions = manifest.versions.clone().unwrap_or_default();
    println!(
        "Displaying podmigrate checkpoint archive {}\n",
        args.archive.display()
    );
    let mut summary = Table::new();
    summary
        .load_preset(ASCII_FULL)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header([
            "CONTAINER",
            "POD",
            "NODE",
            "IMAGE",
            "ID",
            "CREATED",
            "ENGINE",
            "CHKPT SIZE",
            "ROOT FS DIFF SIZE",
            "ARCHIVE SIZE",
        ])
        .add_row([
            source.container.clone(),
            qualified(&source.namespace, &source.pod),
            source.node.clone(),
            source.image.clone(),
            short_id(&source.container_id),
            manifest.created_at.clone(),
            format!(
                "CRIU {}, runc {}",
                dash(&versions.criu),
                dash(&versions.runc)
            ),
            human_bytes(sizes.checkpoint),
            human_bytes(sizes.rootfs_diff),
            human_bytes(opened.archive_bytes),
        ]);
    println!("{summary}\n");
    println!(
        "Format: podmigrate v{}, {} level {}, {} chunks; kernel {}; podmigrate {}",
        manifest.format_version,
        opened.compression(),
        manifest.compression_level,
        human_bytes(manifest.chunk_size),
        dash(&versions.kernel),
        dash(&versions.podmigrate),
    );
    println!(
        "Sealed: {}",
        match opened.sealed_with() {
            Some(id) => format!("AES-256-GCM, key id {id}"),
            None => "no".to_string(),
        }
    );
    println!(
        "Made for clone: {}",
        if source.clone_pod_uid.is_empty() {
            "any (no clone recorded)".to_string()
        } else {
            format!("pod uid {}", source.clone_pod_uid)
        }
    );
    println!("Manifest SHA-256: {}\n", opened.manifest_sha256);
    let mut entries = Table::new();
    entries
        .load_preset(ASCII_FULL)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(["ENTRY", "MODE", "SIZE", "COMPRESSED", "SHA-256"]);
    for entry in &manifest.entries {
        let dir = entry.kind == EntryKind::Directory as i32;
        entries.add_row([
            if dir {
                format!("{}/", entry.name)
            } else {
                entry.name.clone()
            },
            format!("{:04o}", entry.mode),
            if dir {
                "-".into()
            } else {
                human_bytes(entry.size)
            },
            if dir {
                "-".into()
            } else {
                human_bytes(entry.compressed_size)
            },
            if dir {
                "-".into()
            } else {
                hex::encode(&entry.sha256)[..16].to_string()
            },
        ]);
    }
    println!("{entries}");
    Ok(())
}

/// What checkpointctl reports: CRIU's images and the rootfs diff, separately.
struct CheckpointSizes {
    checkpoint: u64,
    rootfs_diff: u64,
    total: u64,
}

impl CheckpointSizes {
    fn of(manifest: &ArchiveManifest) -> Self {
        let prefix = format!("{CHECKPOINT_DIR}/");
        let sum = |pred: &dyn Fn(&str) -> bool| -> u64 {
            manifest
                .entries
                .iter()
                .filter(|e| pred(&e.name))
                .map(|e| e.size)
                .sum()
        };
        CheckpointSizes {
            checkpoint: sum(&|n| n.starts_with(&prefix)),
            rootfs_diff: sum(&|n| n == ROOTFS_DIFF_TAR),
            total: sum(&|_| true),
        }
    }
}

fn manifest_json(
    path: &Path,
    opened: &archive::OpenArchive,
    sizes: &CheckpointSizes,
) -> serde_json::Value {
    let m = &opened.manifest;
    let source = m.source.clone().unwrap_or_default();
    let versions = m.versions.clone().unwrap_or_default();
    json!({
        "archive": path,
        "archiveSize": opened.archive_bytes,
        "manifestSha256": opened.manifest_sha256,
        "sealedWithKeyId": opened.sealed_with(),
        "formatVersion": m.format_version,
        "createdAt": m.created_at,
        "compression": opened.compression().to_string(),
        "compressionLevel": m.compression_level,
        "chunkSize": m.chunk_size,
        "versions": {
            "criu": versions.criu,
            "runc": versions.runc,
            "kernel": versions.kernel,
            "podmigrate": versions.podmigrate,
        },
        "source": {
            "node": source.node,
            "namespace": source.namespace,
            "pod": source.pod,
            "podUid": source.pod_uid,
            "container": source.container,
            "containerId": source.container_id,
            "image": source.image,
            "clonePodUid": source.clone_pod_uid,
        },
        "checkpointSize": sizes.checkpoint,
        "rootfsDiffSize": sizes.rootfs_diff,
        "contentSize": sizes.total,
        "entries": m.entries.iter().map(|e| {
            let dir = e.kind == EntryKind::Directory as i32;
            json!({
                "name": e.name,
                "kind": if dir { "directory" } else { "file" },
                "mode": format!("{:04o}", e.mode),
                "size": e.size,
                "compressedSize": e.compressed_size,
                "sha256": if dir { serde_json::Value::Null } else { json!(hex::encode(&e.sha256)) },
                "mtimeUnixNanos": e.mtime_unix_nanos,
            })
        }).collect::<Vec<_>>(),
    })
}

/// ", sealed with key <id>" when a key sealed or opened the archive.
fn sealed_note(key_id: Option<&str>) -> String {
    key_id.map_or_else(String::new, |id| format!(", sealed with key {id}"))
}

fn qualified(namespace: &str, pod: &str) -> String {
    match (namespace.is_empty(), pod.is_empty()) {
        (_, true) => "-".into(),
        (true, false) => pod.into(),
        (false, false) => format!("{namespace}/{pod}"),
    }
}

fn dash(value: &str) -> &str {
    if value.is_empty() {
        "-"
    } else {
        value
    }
}

fn short_id(id: &str) -> String {
    if id.is_empty() {
        "-".into()
    } else {
        id.chars().take(12).collect()
    }
}

/// Binary units, one decimal, as checkpointctl prints them.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Empty when this node has no CRIU: the manifest then says the version is unknown.
fn local_criu_version() -> String {
    criu::version("criu").unwrap_or_default()
}

fn local_runc_version() -> String {
    runc::Runc::new("/run/runc")
        .version()
        .map(|v| v.version)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
    }
}
