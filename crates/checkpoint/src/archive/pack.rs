//! `pack`: a checkpoint directory into one archive, committed atomically.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use podmigrate_proto::v1::{ArchiveManifest, Entry, EntryKind, Source, Versions};
use sha2::{Digest, Sha256};
use tracing::{debug, info};

use super::codec::{ChunkCompressor, Compression};
use super::error::ArchiveError;
use super::follow::Follow;
use super::key::ArchiveKey;
use super::manifest::{self, entry_name_problem};
use super::pipeline::{self, BufferPool};
use super::seal::{Sealer, ENVELOPE_ENTRY, SEALED_MANIFEST_ENTRY};
use super::zipwriter::{OpenEntry, ZipStreamWriter};
use super::{worker_threads, EntryDigest, ARCHIVE_COMMENT, DEFAULT_CHUNK_SIZE, FORMAT_VERSION};
use crate::bandwidth::{Bandwidth, TokenBucket};
use crate::layout::MANIFEST_ENTRY;

#[derive(Debug, Clone)]
pub struct PackOptions {
    pub compression: Compression,
    /// `None` takes the method's default.
    pub level: Option<i32>,
    pub chunk_size: usize,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    pub source: Source,
    pub versions: Versions,
    /// Cap on the bytes per second written onto the share (zero: none).
    pub bandwidth: Bandwidth,
    /// Seal the archive (encrypt and authenticate it) with this key; `None` writes it plain.
    pub key: Option<Arc<ArchiveKey>>,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            compression: Compression::Zstd,
            level: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            threads: 0,
            source: Source::default(),
            versions: Versions {
                podmigrate: env!("CARGO_PKG_VERSION").to_string(),
                ..Versions::default()
            },
            bandwidth: Bandwidth::UNLIMITED,
            key: None,
        }
    }
}

/// What `pack` produced.
#[derive(Debug, Clone)]
pub struct PackSummary {
    pub archive: PathBuf,
    /// SHA-256 of the manifest, which names every entry's digest: the archive's identity.
    pub manifest_sha256: String,
    pub archive_bytes: u64,
    pub content_bytes: u64,
    pub entries: usize,
    pub elapsed: Duration,
    /// Time spent waiting on the bandwidth cap.
    pub throttled: Duration,
    /// The id of the key that sealed the archive, if it is sealed.
    pub sealed_with: Option<String>,
}

/// A file or directory found in the checkpoint directory.
struct Planned {
    name: String,
    path: PathBuf,
    is_dir: bool,
    mode: u32,
    mtime_nanos: i64,
    size: u64,
}

enum Job {
    Dir(usize),
    Chunk {
        entry: usize,
        /// The chunk's number within its entry.
        index: usize,
        data: Vec<u8>,
        last: bool,
    },
}

enum Packed {
    Dir(usize),
    Chunk {
        entry: usize,
        compressed: Vec<u8>,
        /// CRC-32 of what the zip entry stores uncompressed: the content, or the sealed bytes.
        crc32: u32,
        crc_len: u64,
        len: u64,
        last: bool,
        /// SHA-256 of the uncompressed chunk.
        sha256: [u8; 32],
    },
}

/// Removes a temporary archive unless it was committed, so that a failed or interrupted pack
/// leaves nothing behind.
struct TempArchive {
    path: PathBuf,
    committed: bool,
}

impl Drop for TempArchive {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Packs `dir` into the zip archive `archive`.
///
/// The archive is written under a temporary name beside its final one, fsynced, and renamed:
/// the rename is the single commit point, so a reader on another node never sees a partial
/// archive under the final name, however slow the share is.
pub fn pack(
    dir: &Path,
    archive: &Path,
    options: &PackOptions,
) -> Result<PackSummary, ArchiveError> {
    pack_impl(dir, archive, options, None)
}

/// [`pack`], started while the pages pipe is still being written; see [`Follow`]. Once the
/// writer is done, the rest of `dir` is packed as `pack` would.
pub fn pack_following(
    dir: &Path,
    archive: &Path,
    options: &PackOptions,
    follow: &Follow<'_>,
) -> Result<PackSummary, ArchiveError> {
    let started = Instant::now();
    let packed = pack_impl(dir, archive, options, Some(follow));
    if packed.is_err() {
        follow.drain(started);
    }
    packed
}

fn pack_impl(
    dir: &Path,
    archive: &Path,
    options: &PackOptions,
    follow: Option<&Follow<'_>>,
) -> Result<PackSummary, ArchiveError> {
    let started = Instant::now();
    let compression = options.compression;
    let level = options.level.unwrap_or(compression.default_level());
    if !compression.level_range().contains(&level) {
        return Err(ArchiveError::BadInput {
            path: archive.to_path_buf(),
            reason: format!(
                "compression level {level} is out of range for {compression} ({:?})",
                compression.level_range()
            ),
        });
    }
    let chunk_size = options.chunk_size as u64;
    if !(manifest::MIN_CHUNK_SIZE..=manifest::MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(ArchiveError::BadInput {
            path: archive.to_path_buf(),
            reason: format!("chunk size {chunk_size} is out of range"),
        });
    }
    // Entry 0 is the followed file, if any; the rest of the directory is planned once the
    // writer is done (at once without a followed file).
    check_archive_outside(dir, archive)?;
    let followed = follow.map(|f| Planned {
        name: f.pipe.name().to_string(),
        path: f.pipe.path().to_path_buf(),
        is_dir: false,
        mode: 0o600,
        mtime_nanos: 0,
        // Unknown until complete: the zip entry takes the zip64 layout.
        size: u64::MAX,
    });
    let base = usize::from(followed.is_some());
    let rest: OnceLock<Vec<Planned>> = OnceLock::new();
    if follow.is_none() {
        let _ = rest.set(plan(dir, archive)?);
    }
    let planned = |i: usize| -> &Planned {
        match (&followed, i) {
            (Some(f), 0) => f,
            _ => &rest.get().expect("planned before any job names it")[i - base],
        }
    };
    let sealer = match options.key.as_deref() {
        Some(key) => Some(Sealer::new(key).map_err(|_| ArchiveError::Io {
            op: "drawing a random salt for",
            path: archive.to_path_buf(),
            source: io::Error::other("the system random number generator failed"),
        })?),
        None => None,
    };
    let sealer = sealer.as_ref();
    // A sealed entry is opaque to zip tools: stored, with the CRC of the sealed bytes.
    let zip_method = if sealer.is_some() {
        Compression::Stored
    } else {
        compression
    };
    let temp_path = temp_name(archive)?;
    let file = OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp_path)
        .map_err(ArchiveError::io("creating", &temp_path))?;
    let mut temp = TempArchive {
        path: temp_path.clone(),
        committed: false,
    };

    let mut manifest = ArchiveManifest {
        format_version: FORMAT_VERSION,
        created_at: now_rfc3339(),
        compression: compression.to_proto() as i32,
        compression_level: level,
        chunk_size,
        versions: Some(options.versions.clone()),
        source: Some(options.source.clone()),
        entries: Vec::new(),
    };
    let mut writer = ZipStreamWriter::new(file);
    let mut throttle = TokenBucket::for_bandwidth(options.bandwidth);
    let io_err = |op| ArchiveError::io(op, &temp_path);
    if let Some(sealer) = sealer {
        let envelope = sealer.envelope();
        let entry = writer
            .begin_entry(
                ENVELOPE_ENTRY,
                false,
                Compression::Stored,
                0o600,
                now_seconds(),
                0,
            )
            .map_err(io_err("writing"))?;
        writer.write_data(envelope).map_err(io_err("writing"))?;
        writer
            .end_entry(entry, crc32fast::hash(envelope), envelope.len() as u64)
            .map_err(io_err("writing"))?;
    }

    // The entry being written, with its running CRC, digest and chunk sizes.
    let mut open: Option<(OpenEntry, crc32fast::Hasher, EntryDigest, Entry)> = None;
    let workers = worker_threads(options.threads);
    let in_flight = 2 * workers + 2;
    let raw_buffers = &BufferPool::new(in_flight + 2);
    let packed_buffers = &BufferPool::new(in_flight + 2);
    pipeline::run(
        workers,
        in_flight,
        |submit| {
            if let Some(follow) = follow {
                let mut submit_chunk = |data, index, last| {
                    submit(Job::Chunk {
                        entry: 0,
                        index,
                        data,
                        last,
                    })
                };
                if !follow.read_chunks(
                    started,
                    options.chunk_size,
                    raw_buffers,
                    &mut submit_chunk,
                )? {
                    return Ok(());
                }
                follow.pipe.unlink()?;
                let _ = rest.set(plan(dir, archive)?);
            }
            let rest = rest.get().expect("planned above");
            produce(rest, base, options.chunk_size, raw_buffers, submit)
        },
        || {
            let mut compressor = ChunkCompressor::new(compression, level);
            move |job: Job| -> Result<Packed, ArchiveError> {
                match job {
                    Job::Dir(i) => Ok(Packed::Dir(i)),
                    Job::Chunk {
                        entry,
                        index,
                        data,
                        last,
                    } => {
                        let sha256 = EntryDigest::chunk(&data);
                        let compressor = compressor.as_mut().map_err(|e| ArchiveError::Io {
                            op: "starting the compressor for",
                            path: planned(entry).path.clone(),
                            source: io::Error::new(e.kind(), e.to_string()),
                        })?;
                        let mut compressed = packed_buffers.get(0);
                        compressor
                            .compress_into(&data, last, &mut compressed)
                            .map_err(ArchiveError::io("compressing", &planned(entry).path))?;
                        let (crc32, crc_len) = match sealer {
                            Some(sealer) => {
                                sealer.seal_chunk(
                                    entry,
                                    index,
                                    last,
                                    &planned(entry).name,
                                    &mut compressed,
                                );
                                (crc32fast::hash(&compressed), compressed.len() as u64)
                            }
                            None => (crc32fast::hash(&data), data.len() as u64),
                        };
                        let packed = Packed::Chunk {
                            entry,
                            crc32,
                            crc_len,
                            len: data.len() as u64,
                            compressed,
                            last,
                            sha256,
                        };
                        raw_buffers.put(data);
                        Ok(packed)
                    }
                }
            }
        },
        |packed| match packed {
            Packed::Dir(i) => {
                let p = planned(i);
                let entry = writer
                    .begin_entry(
                        &p.name,
                        true,
                        compression,
                        p.mode,
                        p.mtime_nanos.div_euclid(1_000_000_000),
                        0,
                    )
                    .map_err(io_err("writing"))?;
                writer.end_entry(entry, 0, 0).map_err(io_err("writing"))?;
                manifest.entries.push(Entry {
                    name: p.name.clone(),
                    kind: EntryKind::Directory as i32,
                    mode: p.mode,
                    mtime_unix_nanos: p.mtime_nanos,
                    ..Entry::default()
                });
                Ok(())
            }
            Packed::Chunk {
                entry: i,
                compressed,
                crc32,
                crc_len,
                len,
                last,
                sha256,
            } => {
                let (_, crc, digest, record) = match &mut open {
                    Some(current) => current,
                    None => {
                        let p = planned(i);
                        let zip_entry = writer
                            .begin_entry(
                                &p.name,
                                false,
                                zip_method,
                                p.mode,
                                p.mtime_nanos.div_euclid(1_000_000_000),
                                p.size,
                            )
                            .map_err(io_err("writing"))?;
                        let record = Entry {
                            name: p.name.clone(),
                            kind: EntryKind::File as i32,
                            mode: p.mode,
                            mtime_unix_nanos: p.mtime_nanos,
                            ..Entry::default()
                        };
                        open.insert((
                            zip_entry,
                            crc32fast::Hasher::new(),
                            EntryDigest::default(),
                            record,
                        ))
                    }
                };
                if let Some(throttle) = throttle.as_mut() {
                    throttle.take(compressed.len() as u64);
                }
                writer.write_data(&compressed).map_err(io_err("writing"))?;
                let compressed_len = compressed.len() as u64;
                packed_buffers.put(compressed);
                crc.combine(&crc32fast::Hasher::new_with_initial_len(crc32, crc_len));
                digest.add(&sha256);
                record.size += len;
                record.compressed_size += compressed_len;
                record.chunk_compressed_sizes.push(compressed_len);
                if last {
                    let (zip_entry, crc, digest, mut record) = open.take().expect("entry is open");
                    record.sha256 = digest.finish().to_vec();
                    if let (Some(follow), 0) = (follow, i) {
                        // Complete now: its final mode and mtime.
                        (record.mode, record.mtime_unix_nanos) = follow.pipe.mode_and_mtime()?;
                    }
                    // A stored entry's size is what it stores.
                    let zip_size = if sealer.is_some() {
                        record.compressed_size
                    } else {
                        record.size
                    };
                    writer
                        .end_entry(zip_entry, crc.finalize(), zip_size)
                        .map_err(io_err("writing"))?;
                    manifest.entries.push(record);
                }
                Ok(())
            }
        },
    )?;

    let manifest_bytes = manifest::encode(&manifest);
    let manifest_sha256 = hex::encode(Sha256::digest(&manifest_bytes));
    let (manifest_name, manifest_bytes) = match sealer {
        Some(sealer) => (SEALED_MANIFEST_ENTRY, sealer.seal_manifest(&manifest_bytes)),
        None => (MANIFEST_ENTRY, manifest_bytes),
    };
    let entry = writer
        .begin_entry(
            manifest_name,
            false,
            Compression::Stored,
            0o600,
            now_seconds(),
            0,
        )
        .map_err(io_err("writing"))?;
    writer
        .write_data(&manifest_bytes)
        .map_err(io_err("writing"))?;
    writer
        .end_entry(
            entry,
            crc32fast::hash(&manifest_bytes),
            manifest_bytes.len() as u64,
        )
        .map_err(io_err("writing"))?;
    let file = writer.finish(ARCHIVE_COMMENT).map_err(io_err("writing"))?;
    file.sync_all().map_err(io_err("fsyncing"))?;
    let archive_bytes = file
        .metadata()
        .map_err(io_err("reading metadata of"))?
        .len();
    drop(file);

    fs::rename(&temp_path, archive).map_err(ArchiveError::io("committing (rename)", archive))?;
    temp.committed = true;
    sync_parent(archive)?;

    let summary = PackSummary {
        archive: archive.to_path_buf(),
        manifest_sha256,
        archive_bytes,
        content_bytes: manifest.entries.iter().map(|e| e.size).sum(),
        entries: manifest.entries.len(),
        elapsed: started.elapsed(),
        throttled: throttle.as_ref().map_or(Duration::ZERO, |t| t.waited()),
        sealed_with: sealer.map(|s| s.key_id().to_string()),
    };
    info!(
        archive = %archive.display(),
        entries = summary.entries,
        content_bytes = summary.content_bytes,
        archive_bytes = summary.archive_bytes,
        elapsed_ms = summary.elapsed.as_millis() as u64,
        throttled_ms = summary.throttled.as_millis() as u64,
        %compression,
        level,
        sealed_with = summary.sealed_with.as_deref().unwrap_or("-"),
        "packed checkpoint"
    );
    Ok(summary)
}

/// Reads every file in order, chunk by chunk: the one sequential pass (hashing is the workers').
fn produce(
    planned: &[Planned],
    base: usize,
    chunk_size: usize,
    buffers: &BufferPool,
    submit: &mut dyn FnMut(Job) -> bool,
) -> Result<(), ArchiveError> {
    for (i, p) in planned.iter().enumerate() {
        let i = base + i;
        if p.is_dir {
            if !submit(Job::Dir(i)) {
                return Ok(());
            }
            continue;
        }
        let mut file = File::open(&p.path).map_err(ArchiveError::io("opening", &p.path))?;
        let mut index = 0;
        let mut current = read_chunk(&mut file, buffers.get(chunk_size), chunk_size, &p.path)?;
        loop {
            let next = if current.len() == chunk_size {
                read_chunk(&mut file, buffers.get(chunk_size), chunk_size, &p.path)?
            } else {
                Vec::new()
            };
            let last = next.is_empty();
            if !submit(Job::Chunk {
                entry: i,
                index,
                data: current,
                last,
            }) {
                return Ok(());
            }
            if last {
                break;
            }
            index += 1;
            current = next;
        }
    }
    Ok(())
}

fn read_chunk(
    file: &mut File,
    mut buf: Vec<u8>,
    chunk_size: usize,
    path: &Path,
) -> Result<Vec<u8>, ArchiveError> {
    file.take(chunk_size as u64)
        .read_to_end(&mut buf)
        .map_err(ArchiveError::io("reading", path))?;
    Ok(buf)
}

/// Lists the checkpoint directory in a stable order, refusing anything but regular files and
/// directories: a restore must never be handed a link or a device.
fn plan(dir: &Path, archive: &Path) -> Result<Vec<Planned>, ArchiveError> {
    let meta = fs::metadata(dir).map_err(ArchiveError::io("reading", dir))?;
    if !meta.is_dir() {
        return Err(ArchiveError::BadInput {
            path: dir.to_path_buf(),
            reason: "not a directory".to_string(),
        });
    }
    check_archive_outside(dir, archive)?;

    let mut planned = Vec::new();
    for item in walkdir::WalkDir::new(dir)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
    {
        let item = item.map_err(|e| {
            let path = e.path().unwrap_or(dir).to_path_buf();
            ArchiveError::Io {
                op: "listing",
                path,
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| io::Error::other("filesystem loop")),
            }
        })?;
        let rel = item
            .path()
            .strip_prefix(dir)
            .expect("walkdir yields paths under its root");
        let name = rel
            .to_str()
            .ok_or_else(|| ArchiveError::BadInput {
                path: item.path().to_path_buf(),
                reason: "file name is not UTF-8".to_string(),
            })?
            .to_string();
        let file_type = item.file_type();
        let kind = if file_type.is_dir() || file_type.is_file() {
            None
        } else if file_type.is_symlink() {
            Some("symbolic link")
        } else {
            Some("special file (device, socket or fifo)")
        };
        if let Some(kind) = kind {
            return Err(ArchiveError::UnsupportedFile {
                dir: dir.to_path_buf(),
                name,
                kind,
            });
        }
        if let Some(problem) = entry_name_problem(&name) {
            return Err(ArchiveError::BadInput {
                path: item.path().to_path_buf(),
                reason: problem.to_string(),
            });
        }
        let meta = item.metadata().map_err(|e| ArchiveError::Io {
            op: "reading metadata of",
            path: item.path().to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| io::Error::other("metadata")),
        })?;
        planned.push(Planned {
            name,
            path: item.path().to_path_buf(),
            is_dir: file_type.is_dir(),
            mode: meta.permissions().mode() & 0o777,
            mtime_nanos: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            size: if file_type.is_dir() { 0 } else { meta.len() },
        });
    }
    debug!(dir = %dir.display(), entries = planned.len(), "planned archive");
    Ok(planned)
}

/// An archive written inside the directory it packs would read itself.
fn check_archive_outside(dir: &Path, archive: &Path) -> Result<(), ArchiveError> {
    let dir_real = fs::canonicalize(dir).map_err(ArchiveError::io("resolving", dir))?;
    let archive_parent = parent_dir(archive);
    let parent_real = fs::canonicalize(&archive_parent)
        .map_err(ArchiveError::io("resolving", &archive_parent))?;
    if parent_real.starts_with(&dir_real) {
        return Err(ArchiveError::BadInput {
            path: archive.to_path_buf(),
            reason: format!(
                "the archive may not be written inside the directory it packs ({})",
                dir.display()
            ),
        });
    }
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The share's temporary name for `archive` (see [`crate::share::temp_archive_path`]).
fn temp_name(archive: &Path) -> Result<PathBuf, ArchiveError> {
    crate::share::temp_archive_path(archive).ok_or_else(|| ArchiveError::BadInput {
        path: archive.to_path_buf(),
        reason: "archive path has no file name".to_string(),
    })
}

/// Makes the rename durable: on NFS and most local filesystems a directory fsync is what
/// persists a new name.
fn sync_parent(archive: &Path) -> Result<(), ArchiveError> {
    let parent = parent_dir(archive);
    match File::open(&parent).and_then(|d| d.sync_all()) {
        Ok(()) => Ok(()),
        // Some FUSE and SMB mounts refuse fsync on directories; the rename itself is atomic
        // and already committed the archive. Only these two answers mean "not supported".
        Err(e)
            if e.raw_os_error() == Some(libc::EINVAL)
                || e.raw_os_error() == Some(libc::ENOTSUP) =>
        {
            info!(dir = %parent.display(), error = %e, "the share does not sync directories; the rename stands");
            Ok(())
        }
        Err(e) => Err(ArchiveError::Io {
            op: "fsyncing",
            path: parent,
            source: e,
        }),
    }
}

fn now_seconds() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("UTC time always formats")
}
