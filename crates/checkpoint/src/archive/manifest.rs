//! Reading, writing and checking the manifest, and the entry-name rules both sides enforce.

use std::collections::HashSet;
use std::path::Path;

use podmigrate_proto::v1::{ArchiveManifest, EntryKind};
use prost::Message;

use super::codec::Compression;
use super::error::ArchiveError;
use super::FORMAT_VERSION;
use crate::layout::MANIFEST_ENTRY;

/// No real manifest comes near this; a bigger one is hostile.
pub(crate) const MAX_MANIFEST_BYTES: u64 = 64 << 20;
pub(crate) const MIN_CHUNK_SIZE: u64 = 64 << 10;
pub(crate) const MAX_CHUNK_SIZE: u64 = 256 << 20;
const MAX_NAME_BYTES: usize = 4096;

/// Why a name may not be an entry, or `None` if it may. Names are relative, '/'-separated,
/// with no empty, `.` or `..` component, so that joining one to a directory stays inside it.
pub(crate) fn entry_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("empty entry name");
    }
    if name.len() > MAX_NAME_BYTES {
        return Some("entry name is too long");
    }
    if name.starts_with('/') {
        return Some("absolute entry name");
    }
    if name.contains('\\') {
        return Some("backslash in entry name");
    }
    if name.bytes().any(|b| b == 0 || b < 0x20) {
        return Some("control character in entry name");
    }
    for component in name.split('/') {
        match component {
            "" => return Some("empty path component in entry name"),
            "." => return Some("'.' component in entry name"),
            ".." => return Some("'..' component in entry name (path traversal)"),
            _ => {}
        }
    }
    if name == MANIFEST_ENTRY
        || name == super::seal::ENVELOPE_ENTRY
        || name == super::seal::SEALED_MANIFEST_ENTRY
    {
        return Some("entry name is reserved for the manifest");
    }
    None
}

pub(crate) fn encode(manifest: &ArchiveManifest) -> Vec<u8> {
    manifest.encode_to_vec()
}

/// Decodes and checks a manifest, so that everything downstream can trust its shape: sizes add
/// up, names are safe and unique, and no file is also a directory prefix.
pub(crate) fn decode(archive: &Path, bytes: &[u8]) -> Result<ArchiveManifest, ArchiveError> {
    let bad = |reason: String| ArchiveError::bad_manifest(archive, reason);
    let manifest = ArchiveManifest::decode(bytes).map_err(|e| bad(format!("undecodable: {e}")))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {} is not supported (this podmigrate reads version {FORMAT_VERSION})",
            manifest.format_version
        )));
    }
    Compression::from_proto(manifest.compression)
        .ok_or_else(|| bad(format!("unknown compression {}", manifest.compression)))?;
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&manifest.chunk_size) {
        return Err(bad(format!(
            "chunk size {} is out of range",
            manifest.chunk_size
        )));
    }
    let mut names = HashSet::with_capacity(manifest.entries.len());
    let mut dirs = HashSet::new();
    let mut files = HashSet::new();
    for entry in &manifest.entries {
        let name = entry.name.as_str();
        let entry_bad = |reason: String| ArchiveError::bad_entry(archive, name, reason);
        if let Some(problem) = entry_name_problem(name) {
            return Err(entry_bad(problem.to_string()));
        }
        if !names.insert(name) {
            return Err(entry_bad("listed twice in the manifest".to_string()));
        }
        if entry.mode & !0o777 != 0 {
            return Err(entry_bad(format!(
                "mode {:o} has bits beyond rwx (setuid, setgid or sticky)",
                entry.mode
            )));
        }
        match EntryKind::try_from(entry.kind) {
            Ok(EntryKind::Directory) => {
                if entry.size != 0
                    || entry.compressed_size != 0
                    || !entry.chunk_compressed_sizes.is_empty()
                {
                    return Err(entry_bad("directory with content".to_string()));
                }
                dirs.insert(name);
            }
            Ok(EntryKind::File) => {
                if entry.sha256.len() != 32 {
                    return Err(entry_bad(
                        "SHA-256 digest is missing or malformed".to_string(),
                    ));
                }
                let chunks = entry.size.div_ceil(manifest.chunk_size).max(1);
                if entry.chunk_compressed_sizes.len() as u64 != chunks {
                    return Err(entry_bad(format!(
                        "{} chunks listed for {} bytes in {}-byte chunks",
                        entry.chunk_compressed_sizes.len(),
                        entry.size,
                        manifest.chunk_size
                    )));
                }
                let total = entry
                    .chunk_compressed_sizes
                    .iter()
                    .try_fold(0u64, |sum, size| sum.checked_add(*size));
                if total != Some(entry.compressed_size) {
                    return Err(entry_bad(
                        "chunk sizes do not add up to the compressed size".to_string(),
                    ));
                }
                files.insert(name);
            }
            _ => return Err(entry_bad(format!("unknown entry kind {}", entry.kind))),
        }
    }
    // A file may not also be a parent of another entry.
    for name in &names {
        let mut parent = *name;
        while let Some((head, _)) = parent.rsplit_once('/') {
            if files.contains(head) {
                return Err(ArchiveError::bad_entry(
                    archive,
                    *name,
                    format!("its parent {head:?} is a file"),
                ));
            }
            parent = head;
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_names_are_refused_and_ordinary_ones_accepted() {
        for ok in [
            "checkpoint",
            "checkpoint/pages-1.img",
            "rootfs-diff.tar",
            "a/.hidden",
            "a/..b",
        ] {
            assert_eq!(entry_name_problem(ok), None, "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("../escape", "'..'"),
            ("a/../../b", "'..'"),
            ("a//b", "empty path component"),
            ("./a", "'.'"),
            ("a/", "empty path component"),
            ("a\\..\\b", "backslash"),
            ("a\nb", "control"),
            (MANIFEST_ENTRY, "reserved"),
        ] {
            let problem = entry_name_problem(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(problem.contains(why), "{bad:?}: {problem}");
        }
    }
}
