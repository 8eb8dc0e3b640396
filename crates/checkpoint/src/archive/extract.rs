//! `unpack` and `verify`: every chunk decompressed on all cores, every byte checked against the
//! manifest's SHA-256 and the zip's CRC-32, in one pass.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use podmigrate_proto::v1::{ArchiveManifest, Entry, EntryKind};
use tracing::info;

use super::codec::decompress_chunk;
use super::error::ArchiveError;
use super::key::ArchiveKey;
use super::pipeline::{self, BufferPool};
use super::read::{open_with_key, OpenArchive};
use super::{worker_threads, EntryDigest};

#[derive(Debug, Clone, Default)]
pub struct UnpackOptions {
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// This node's archive key: with one, only archives sealed with it are read; without one,
    /// sealed archives are refused.
    pub key: Option<Arc<ArchiveKey>>,
    /// Memory reserved ahead for one entry (see [`crate::prefault`]).
    pub reserved: Option<Reserved>,
}

/// An unnamed file reserved ahead for entry `entry` (see [`crate::prefault::reserve`]): the
/// first unpack that meets the entry links it into its staging directory and writes the entry
/// into it, so the entry's pages are ready. If it cannot be linked there (another filesystem),
/// a new file is made as usual.
#[derive(Debug, Clone)]
pub struct Reserved {
    entry: String,
    file: Arc<Mutex<Option<File>>>,
}

impl Reserved {
    pub fn new(entry: impl Into<String>, file: File) -> Self {
        Reserved {
            entry: entry.into(),
            file: Arc::new(Mutex::new(Some(file))),
        }
    }

    /// The file, once: a reservation becomes exactly one unpacked file.
    fn take(&self) -> Option<File> {
        self.file.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A verified archive's manifest and what reading it cost.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: ArchiveManifest,
    pub manifest_sha256: String,
    pub archive_bytes: u64,
    pub content_bytes: u64,
    pub elapsed: Duration,
}

/// Checks every entry of `archive` against its manifest without writing anything.
pub fn verify(archive: &Path, options: &UnpackOptions) -> Result<Verified, ArchiveError> {
    let started = Instant::now();
    let opened = open_with_key(archive, options.key.as_deref())?;
    stream(&opened, options, None)?;
    Ok(finish(opened, started, "verified archive"))
}

/// Extracts `archive` into `dest`, which must not exist or be an empty directory.
///
/// Entries are written to a staging directory inside `dest` and moved into place only after
/// every digest matched, so a bad archive leaves `dest` as it was and nothing anywhere else.
pub fn unpack(
    archive: &Path,
    dest: &Path,
    options: &UnpackOptions,
) -> Result<Verified, ArchiveError> {
    let started = Instant::now();
    let opened = open_with_key(archive, options.key.as_deref())?;
    unpack_from(opened, dest, options, started)
}

/// [`unpack`] for an archive already opened (with the key in `options`), for a caller that
/// looked at its manifest first.
pub fn unpack_opened(
    opened: OpenArchive,
    dest: &Path,
    options: &UnpackOptions,
) -> Result<Verified, ArchiveError> {
    unpack_from(opened, dest, options, Instant::now())
}

fn unpack_from(
    opened: OpenArchive,
    dest: &Path,
    options: &UnpackOptions,
    started: Instant,
) -> Result<Verified, ArchiveError> {
    let created_dest = prepare_destination(dest)?;
    let staging = dest.join(format!(".podmigrate-unpack-{}", std::process::id()));
    let mut guard = Cleanup {
        staging: staging.clone(),
        dest: created_dest.then(|| dest.to_path_buf()),
        armed: true,
    };
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(ArchiveError::io("creating", &staging))?;
    let manifest = &opened.manifest;
    for entry in manifest.entries.iter().filter(|e| is_dir(e)) {
        let path = staging.join(&entry.name);
        fs::create_dir_all(&path).map_err(ArchiveError::io("creating", &path))?;
    }
    stream(&opened, options, Some(&staging))?;
    // Directory modes and times last: writing files into them changed their mtimes.
    for entry in manifest.entries.iter().rev().filter(|e| is_dir(e)) {
        apply_metadata(&staging.join(&entry.name), entry)?;
    }
    for item in fs::read_dir(&staging).map_err(ArchiveError::io("listing", &staging))? {
        let item = item.map_err(ArchiveError::io("listing", &staging))?;
        let target = dest.join(item.file_name());
        fs::rename(item.path(), &target).map_err(ArchiveError::io("moving into place", &target))?;
    }
    fs::remove_dir(&staging).map_err(ArchiveError::io("removing", &staging))?;
    guard.armed = false;
    Ok(finish(opened, started, "unpacked archive"))
}

fn finish(opened: OpenArchive, started: Instant, what: &'static str) -> Verified {
    let verified = Verified {
        content_bytes: opened.manifest.entries.iter().map(|e| e.size).sum(),
        manifest_sha256: opened.manifest_sha256,
        archive_bytes: opened.archive_bytes,
        manifest: opened.manifest,
        elapsed: started.elapsed(),
    };
    info!(
        archive = %opened.path.display(),
        content_bytes = verified.content_bytes,
        elapsed_ms = verified.elapsed.as_millis() as u64,
        "{what}"
    );
    verified
}

fn is_dir(entry: &Entry) -> bool {
    entry.kind == EntryKind::Directory as i32
}

/// Undoes a failed unpack: the staging directory, and `dest` itself if unpack created it.
struct Cleanup {
    staging: PathBuf,
    dest: Option<PathBuf>,
    armed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_dir_all(&self.staging);
            if let Some(dest) = &self.dest {
                let _ = fs::remove_dir(dest);
            }
        }
    }
}

/// Returns whether `dest` had to be created.
fn prepare_destination(dest: &Path) -> Result<bool, ArchiveError> {
    match fs::symlink_metadata(dest) {
        Ok(meta) => {
            let empty = meta.is_dir()
                && fs::read_dir(dest)
                    .map_err(ArchiveError::io("listing", dest))?
                    .next()
                    .is_none();
            if empty {
                Ok(false)
            } else {
                Err(ArchiveError::DestinationNotEmpty {
                    path: dest.to_path_buf(),
                })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir(dest).map_err(ArchiveError::io("creating", dest))?;
            Ok(true)
        }
        Err(e) => Err(ArchiveError::Io {
            op: "reading metadata of",
            path: dest.to_path_buf(),
            source: e,
        }),
    }
}

fn apply_metadata(path: &Path, entry: &Entry) -> Result<(), ArchiveError> {
    fs::set_permissions(path, fs::Permissions::from_mode(entry.mode))
        .map_err(ArchiveError::io("setting the mode of", path))?;
    let mtime = SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_nanos(entry.mtime_unix_nanos.max(0) as u64))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let file = File::open(path).map_err(ArchiveError::io("opening", path))?;
    file.set_modified(mtime)
        .map_err(ArchiveError::io("setting the mtime of", path))
}

struct Compressed {
    entry: usize,
    /// The chunk's number within its entry.
    index: usize,
    data: Vec<u8>,
    expected_len: usize,
    last: bool,
}

struct Decompressed {
    entry: usize,
    data: Vec<u8>,
    crc32: u32,
    /// SHA-256 of the decompressed chunk.
    sha256: [u8; 32],
    last: bool,
}

/// Reads, decompresses and checks every file entry; writes each under `staging` when given.
///
/// Workers decompress, CRC and hash chunks in parallel; the caller's thread writes them in
/// order and folds the chunk digests into each entry's digest.
fn stream(
    opened: &OpenArchive,
    options: &UnpackOptions,
    staging: Option<&Path>,
) -> Result<(), ArchiveError> {
    let manifest = &opened.manifest;
    let path = opened.path.as_path();
    let chunk_size = manifest.chunk_size;
    let compression = opened.compression;
    let workers = worker_threads(options.threads);
    // A sealed entry's CRC-32 covers its sealed bytes; its AEAD tags are the stronger check.
    let expected_crc: Vec<Option<u32>> = {
        let mut crcs = vec![None; manifest.entries.len()];
        for d in opened.data.iter().filter(|_| opened.sealer.is_none()) {
            crcs[d.entry] = Some(d.crc32);
        }
        crcs
    };

    let in_flight = 2 * workers + 2;
    let compressed_buffers = &BufferPool::new(in_flight + 2);
    let plain_buffers = &BufferPool::new(in_flight + 2);
    // Every file is created up front, so that workers write their chunks in place, in parallel.
    let mut files: Vec<Option<File>> = (0..manifest.entries.len()).map(|_| None).collect();
    if let Some(staging) = staging {
        for location in &opened.data {
            let name = &manifest.entries[location.entry].name;
            let path = staging.join(name);
            let reserved = match options.reserved.as_ref().filter(|r| r.entry == *name) {
                Some(r) => r
                    .take()
                    .map(|file| adopt_reserved(file, &path, manifest.entries[location.entry].size))
                    .transpose()?
                    .flatten(),
                None => None,
            };
            files[location.entry] = Some(match reserved {
                Some(file) => file,
                None => create_file(&path)?,
            });
        }
    }
    let files = &files;
    let mut current: Option<(usize, crc32fast::Hasher, EntryDigest)> = None;
    pipeline::run(
        workers,
        in_flight,
        |submit| {
            for location in &opened.data {
                let entry = &manifest.entries[location.entry];
                let mut offset = location.data_start;
                let chunks = entry.chunk_compressed_sizes.len();
                for (k, &compressed_len) in entry.chunk_compressed_sizes.iter().enumerate() {
                    let expected_len =
                        (entry.size - k as u64 * chunk_size).min(chunk_size) as usize;
                    let mut data = compressed_buffers.get(compressed_len as usize);
                    data.resize(compressed_len as usize, 0);
                    opened.file.read_exact_at(&mut data, offset).map_err(|e| {
                        ArchiveError::bad_entry(path, &entry.name, format!("reading its data: {e}"))
                    })?;
                    offset += compressed_len;
                    let job = Compressed {
                        entry: location.entry,
                        index: k,
                        data,
                        expected_len,
                        last: k + 1 == chunks,
                    };
                    if !submit(job) {
                        return Ok(());
                    }
                }
            }
            Ok(())
        },
        || {
            |mut job: Compressed| {
                if let Some(sealer) = &opened.sealer {
                    let name = &manifest.entries[job.entry].name;
                    sealer
                        .open_chunk(job.entry, job.index, job.last, name, &mut job.data)
                        .map_err(|problem| {
                            ArchiveError::unauthentic(
                                path,
                                format!("entry {name:?} chunk {}", job.index),
                                problem,
                            )
                        })?;
                }
                let mut data = plain_buffers.get(0);
                decompress_chunk(
                    compression,
                    &job.data,
                    job.expected_len,
                    job.last,
                    &mut data,
                )
                .map_err(|reason| {
                    ArchiveError::bad_entry(path, &manifest.entries[job.entry].name, reason)
                })?;
                compressed_buffers.put(job.data);
                if let (Some(file), Some(staging)) = (&files[job.entry], staging) {
                    let name = &manifest.entries[job.entry].name;
                    file.write_all_at(&data, job.index as u64 * chunk_size)
                        .map_err(ArchiveError::io("writing", staging.join(name)))?;
                }
                Ok(Decompressed {
                    entry: job.entry,
                    crc32: crc32fast::hash(&data),
                    sha256: EntryDigest::chunk(&data),
                    data,
                    last: job.last,
                })
            }
        },
        |chunk| {
            let entry = &manifest.entries[chunk.entry];
            let (_, crc, digest) = current.get_or_insert_with(|| {
                (
                    chunk.entry,
                    crc32fast::Hasher::new(),
                    EntryDigest::default(),
                )
            });
            crc.combine(&crc32fast::Hasher::new_with_initial_len(
                chunk.crc32,
                chunk.data.len() as u64,
            ));
            digest.add(&chunk.sha256);
            plain_buffers.put(chunk.data);
            if chunk.last {
                // Every chunk of this entry was written by the worker that returned it.
                let (index, crc, digest) = current.take().expect("entry is open");
                if opened.sealer.is_none() && Some(crc.finalize()) != expected_crc[index] {
                    return Err(ArchiveError::bad_entry(
                        path,
                        &entry.name,
                        "CRC-32 mismatch",
                    ));
                }
                let digest = digest.finish();
                if digest.as_slice() != entry.sha256.as_slice() {
                    return Err(ArchiveError::DigestMismatch {
                        path: path.to_path_buf(),
                        name: entry.name.clone(),
                        expected: hex::encode(&entry.sha256),
                        actual: hex::encode(digest),
                    });
                }
                if let Some(staging) = staging {
                    apply_metadata(&staging.join(&entry.name), entry)?;
                }
            }
            Ok(())
        },
    )
}

/// Gives the unnamed reserved file the name `path` and sizes it to `size`; `None` if it cannot
/// be linked there.
fn adopt_reserved(file: File, path: &Path, size: u64) -> Result<Option<File>, ArchiveError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(ArchiveError::io("creating", parent))?;
    }
    let linked = rustix::fs::linkat(
        rustix::fs::CWD,
        format!("/proc/self/fd/{}", file.as_raw_fd()),
        rustix::fs::CWD,
        path,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    );
    if linked.is_err() {
        return Ok(None);
    }
    file.set_len(size)
        .map_err(ArchiveError::io("sizing", path))?;
    Ok(Some(file))
}

/// Creates a new file; never follows or replaces anything already there.
fn create_file(path: &Path) -> Result<File, ArchiveError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(ArchiveError::io("creating", parent))?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(ArchiveError::io("creating", path))
}
