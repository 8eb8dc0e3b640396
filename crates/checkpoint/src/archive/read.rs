//! Opening an archive: the structural checks every reader runs before trusting a byte of it.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use podmigrate_proto::v1::{ArchiveManifest, EntryKind};
use sha2::{Digest, Sha256};
use zip::CompressionMethod;

use super::codec::Compression;
use super::error::ArchiveError;
use super::key::ArchiveKey;
use super::manifest::{self, entry_name_problem, MAX_MANIFEST_BYTES};
use super::seal::{Sealer, ENVELOPE_ENTRY, SEALED_MANIFEST_ENTRY};
use crate::layout::MANIFEST_ENTRY;

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;

/// Where a file entry's data lies in the archive.
#[derive(Debug, Clone)]
pub(crate) struct DataLocation {
    /// Index into the manifest's entries.
    pub(crate) entry: usize,
    pub(crate) data_start: u64,
    pub(crate) crc32: u32,
}

/// An archive whose structure and manifest passed every check; its data is verified as it is
/// read.
pub struct OpenArchive {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub manifest: ArchiveManifest,
    pub(crate) compression: Compression,
    /// File entries, in the order their data lies in the archive.
    pub(crate) data: Vec<DataLocation>,
    pub archive_bytes: u64,
    /// SHA-256 of the manifest: the archive's identity.
    pub manifest_sha256: String,
    /// Opens the chunks of a sealed archive.
    pub(crate) sealer: Option<Sealer>,
}

impl OpenArchive {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// The id of the key that sealed the archive (`None`: not sealed).
    pub fn sealed_with(&self) -> Option<&str> {
        self.sealer.as_ref().map(|s| s.key_id())
    }
}

fn expected_method(compression: Compression) -> CompressionMethod {
    match compression {
        Compression::Zstd => CompressionMethod::Zstd,
        Compression::Deflate => CompressionMethod::Deflated,
        Compression::Stored => CompressionMethod::Stored,
    }
}

/// Opens `path` and checks its structure against its manifest, without reading entry data.
/// Refuses a sealed archive: see [`open_with_key`].
pub fn open(path: &Path) -> Result<OpenArchive, ArchiveError> {
    open_with_key(path, None)
}

/// Opens `path` as [`open`] does, under this node's key policy: with a key, only an archive
/// sealed with that key opens, and its manifest is authenticated here (its chunks as they are
/// read); without one, a sealed archive is refused with an error saying a key is needed.
pub fn open_with_key(path: &Path, key: Option<&ArchiveKey>) -> Result<OpenArchive, ArchiveError> {
    let file = File::open(path).map_err(ArchiveError::io("opening", path))?;
    let meta = file
        .metadata()
        .map_err(ArchiveError::io("reading metadata of", path))?;
    if !meta.is_file() {
        return Err(ArchiveError::BadInput {
            path: path.to_path_buf(),
            reason: "not a regular file".to_string(),
        });
    }
    let not_zip = |e: zip::result::ZipError| ArchiveError::NotZip {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut zip = zip::ZipArchive::new(&file).map_err(not_zip)?;
    if zip.has_duplicate_names() {
        return Err(ArchiveError::BadInput {
            path: path.to_path_buf(),
            reason: "duplicate entry names in the zip directory".to_string(),
        });
    }
    let central_directory_start = zip.central_directory_start();

    struct ZipEntry {
        name: String,
        is_dir: bool,
        method: CompressionMethod,
        compressed_size: u64,
        size: u64,
        crc32: u32,
        data_start: u64,
    }
    let mut zip_entries = Vec::with_capacity(zip.len());
    let mut manifest_index = None;
    let mut seal_indices = [None, None];
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(not_zip)?;
        let raw = entry.name_raw();
        let full_name = std::str::from_utf8(raw).map_err(|_| {
            ArchiveError::bad_entry(path, String::from_utf8_lossy(raw), "name is not UTF-8")
        })?;
        let is_dir = full_name.ends_with('/');
        let name = full_name.strip_suffix('/').unwrap_or(full_name).to_string();
        if name == MANIFEST_ENTRY {
            manifest_index = Some(i);
        } else if name == ENVELOPE_ENTRY || name == SEALED_MANIFEST_ENTRY {
            seal_indices[usize::from(name == SEALED_MANIFEST_ENTRY)] = Some(i);
        } else if let Some(problem) = entry_name_problem(&name) {
            return Err(ArchiveError::bad_entry(path, full_name, problem));
        }
        if entry.encrypted() {
            return Err(ArchiveError::bad_entry(
                path,
                &name,
                "encrypted entries are not supported",
            ));
        }
        // Unix modes live in the high half of the external attributes. They are checked
        // whatever "made by" system the entry claims, so a link cannot hide behind a DOS tag.
        let mode = entry.external_attributes() >> 16;
        if mode != 0 {
            let kind = mode & S_IFMT;
            let problem = match kind {
                S_IFLNK => {
                    Some("symbolic link entry (refused: it could point outside the destination)")
                }
                0 | S_IFREG | S_IFDIR => None,
                _ => Some("device or special-file entry (refused)"),
            };
            if let Some(problem) = problem {
                return Err(ArchiveError::bad_entry(path, &name, problem));
            }
            if mode & 0o7000 != 0 {
                return Err(ArchiveError::bad_entry(
                    path,
                    &name,
                    "setuid, setgid or sticky bit (refused)",
                ));
            }
            if (kind == S_IFDIR) != is_dir && kind != 0 {
                return Err(ArchiveError::bad_entry(
                    path,
                    &name,
                    "file type disagrees with its name",
                ));
            }
        }
        let data_start = entry.data_start().ok_or_else(|| {
            ArchiveError::bad_entry(path, &name, "local header could not be located")
        })?;
        zip_entries.push(ZipEntry {
            name,
            is_dir,
            method: entry.compression(),
            compressed_size: entry.compressed_size(),
            size: entry.size(),
            crc32: entry.crc32(),
            data_start,
        });
    }

    let sealed = open_sealed_manifest(path, &mut zip, key, seal_indices, |i| zip_entries[i].size)?;
    let (manifest_bytes, sealer, own_entries) = match sealed {
        Some((bytes, sealer)) => (bytes, Some(sealer), seal_indices),
        None => {
            let manifest_index = manifest_index.ok_or(ArchiveError::NoManifest {
                path: path.to_path_buf(),
                entry: MANIFEST_ENTRY,
            })?;
            let declared = zip_entries[manifest_index].size;
            if declared > MAX_MANIFEST_BYTES {
                return Err(ArchiveError::bad_manifest(
                    path,
                    format!("declared size {declared} exceeds the {MAX_MANIFEST_BYTES}-byte limit"),
                ));
            }
            let mut entry = zip
                .by_index(manifest_index)
                .map_err(|e| ArchiveError::bad_manifest(path, format!("unreadable: {e}")))?;
            let mut bytes = Vec::with_capacity(declared as usize);
            // zip checks the CRC-32 when the entry is read to its end.
            (&mut entry)
                .take(MAX_MANIFEST_BYTES + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| ArchiveError::bad_manifest(path, format!("unreadable: {e}")))?;
            if bytes.len() as u64 != declared {
                return Err(ArchiveError::bad_manifest(
                    path,
                    "size differs from its declared size",
                ));
            }
            (bytes, None, [Some(manifest_index), None])
        }
    };
    let manifest = manifest::decode(path, &manifest_bytes)?;
    let manifest_sha256 = hex::encode(Sha256::digest(&manifest_bytes));
    let compression = Compression::from_proto(manifest.compression).expect("decode checked it");

    let by_name: HashMap<&str, usize> = manifest
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.name.as_str(), i))
        .collect();
    let mut seen = vec![false; manifest.entries.len()];
    let mut data = Vec::new();
    let mut ranges = Vec::new();
    for (i, z) in zip_entries.iter().enumerate() {
        if own_entries.contains(&Some(i)) {
            continue;
        }
        let bad = |reason: String| ArchiveError::bad_entry(path, &z.name, reason);
        let Some(&m) = by_name.get(z.name.as_str()) else {
            return Err(bad("not listed in the manifest".to_string()));
        };
        seen[m] = true;
        let listed = &manifest.entries[m];
        let listed_dir = listed.kind == EntryKind::Directory as i32;
        if listed_dir != z.is_dir {
            return Err(bad(
                "is a file in the zip and a directory in the manifest, or the reverse".to_string(),
            ));
        }
        if z.is_dir {
            continue;
        }
        // A sealed entry is stored: the zip sees only its sealed bytes.
        let (method, listed_size) = match sealer {
            Some(_) => (CompressionMethod::Stored, listed.compressed_size),
            None => (expected_method(compression), listed.size),
        };
        if z.method != method {
            return Err(bad(format!(
                "compressed with {:?}, but the manifest says {compression}",
                z.method
            )));
        }
        if z.size != listed_size {
            return Err(bad(format!(
                "zip declares {} bytes, the manifest {} bytes",
                z.size, listed_size
            )));
        }
        if z.compressed_size != listed.compressed_size {
            return Err(bad(format!(
                "zip declares {} compressed bytes, the manifest {}",
                z.compressed_size, listed.compressed_size
            )));
        }
        let end = z.data_start.checked_add(z.compressed_size);
        if end.is_none_or(|end| end > central_directory_start) {
            return Err(bad(
                "data runs past the end of the archive's data (truncated?)".to_string(),
            ));
        }
        ranges.push((z.data_start, z.data_start + z.compressed_size, m));
        data.push(DataLocation {
            entry: m,
            data_start: z.data_start,
            crc32: z.crc32,
        });
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(ArchiveError::bad_entry(
            path,
            &manifest.entries[missing].name,
            "listed in the manifest but missing from the archive",
        ));
    }
    // Entries that share bytes are how some zip bombs multiply their output.
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(ArchiveError::bad_entry(
                path,
                &manifest.entries[pair[1].2].name,
                "data overlaps another entry's",
            ));
        }
    }
    data.sort_by_key(|d| d.data_start);

    Ok(OpenArchive {
        path: path.to_path_buf(),
        file,
        manifest,
        compression,
        data,
        archive_bytes: meta.len(),
        manifest_sha256,
        sealer,
    })
}

/// Applies the key policy, and for a sealed archive reads its envelope and authenticates and
/// decrypts its manifest. `None`: a plain archive, on a node without a key.
fn open_sealed_manifest(
    path: &Path,
    zip: &mut zip::ZipArchive<&File>,
    key: Option<&ArchiveKey>,
    [envelope, sealed]: [Option<usize>; 2],
    declared_size: impl Fn(usize) -> u64,
) -> Result<Option<(Vec<u8>, Sealer)>, ArchiveError> {
    let key = match (envelope.is_some() || sealed.is_some(), key) {
        (false, None) => return Ok(None),
        (false, Some(_)) => {
            return Err(ArchiveError::NotSealed {
                path: path.to_path_buf(),
            })
        }
        (true, None) => {
            return Err(ArchiveError::KeyRequired {
                path: path.to_path_buf(),
            })
        }
        (true, Some(key)) => key,
    };
    let missing = |entry| {
        ArchiveError::unauthentic(
            path,
            "the seal",
            super::seal::SealProblem::Envelope(format!("entry {entry} is missing")),
        )
    };
    let envelope = envelope.ok_or_else(|| missing(ENVELOPE_ENTRY))?;
    let sealed = sealed.ok_or_else(|| missing(SEALED_MANIFEST_ENTRY))?;
    // Raw reads: the AEAD tag, not the zip's CRC-32, is what decides.
    let mut read_raw = |index: usize, limit: u64| -> Result<Vec<u8>, ArchiveError> {
        let declared = declared_size(index);
        let name = if index == envelope {
            ENVELOPE_ENTRY
        } else {
            SEALED_MANIFEST_ENTRY
        };
        if declared > limit {
            return Err(ArchiveError::bad_manifest(
                path,
                format!("{name}: declared size {declared} exceeds the {limit}-byte limit"),
            ));
        }
        let entry = zip
            .by_index_raw(index)
            .map_err(|e| ArchiveError::bad_manifest(path, format!("{name} is unreadable: {e}")))?;
        let mut bytes = Vec::with_capacity(declared as usize);
        entry
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ArchiveError::bad_manifest(path, format!("{name} is unreadable: {e}")))?;
        Ok(bytes)
    };
    let envelope_bytes = read_raw(envelope, super::seal::ENVELOPE_LEN as u64)?;
    let sealed_bytes = read_raw(sealed, MAX_MANIFEST_BYTES + super::seal::TAG_LEN as u64)?;
    let sealer = Sealer::from_envelope(key, &envelope_bytes)
        .map_err(|problem| ArchiveError::unauthentic(path, "the seal header", problem))?;
    let manifest = sealer
        .open_manifest(sealed_bytes)
        .map_err(|problem| ArchiveError::unauthentic(path, "the manifest", problem))?;
    Ok(Some((manifest, sealer)))
}
