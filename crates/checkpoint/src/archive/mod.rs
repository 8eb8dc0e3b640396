//! The checkpoint archive: one zip file on the share holding a checkpoint directory and a
//! manifest of every entry's size and SHA-256.
//!
//! Entries are compressed in independent chunks on every core (zstd by default, deflate for
//! Info-ZIP compatibility), streamed with bounded memory, and committed by a single rename.
//! Readers treat the archive as untrusted: names, types, sizes and digests are all checked
//! against the manifest, and nothing is written outside the destination.

mod codec;
mod error;
mod extract;
mod follow;
mod key;
mod manifest;
mod pack;
mod pipeline;
mod read;
mod seal;
mod zipwriter;

pub use codec::Compression;
pub use error::ArchiveError;
pub use extract::{unpack, unpack_opened, verify, Reserved, UnpackOptions, Verified};
pub use follow::{Follow, PagesPipe};
pub use key::{ArchiveKey, KeyError, KEY_LEN};
pub use pack::{pack, pack_following, PackOptions, PackSummary};
pub use podmigrate_proto::v1::{ArchiveManifest, Entry, EntryKind, Source, Versions};
pub use read::{open, open_with_key, OpenArchive};
pub use seal::{ENVELOPE_ENTRY, SEALED_MANIFEST_ENTRY};

/// The manifest format this build writes and reads. 2: entry digests are over chunk digests.
pub const FORMAT_VERSION: u32 = 2;

/// An entry's digest in format 2: SHA-256 over its chunks' SHA-256 digests, fed in order.
#[derive(Default)]
pub struct EntryDigest(sha2::Sha256);

impl EntryDigest {
    pub(crate) fn chunk(data: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(data).into()
    }

    pub(crate) fn add(&mut self, chunk_digest: &[u8; 32]) {
        use sha2::Digest;
        self.0.update(chunk_digest);
    }

    pub(crate) fn finish(self) -> [u8; 32] {
        use sha2::Digest;
        self.0.finalize().into()
    }

    /// The digest of a whole entry held in memory, chunked as `chunk_size`.
    pub fn of(content: &[u8], chunk_size: usize) -> [u8; 32] {
        let mut digest = EntryDigest::default();
        if content.is_empty() {
            digest.add(&Self::chunk(content));
        }
        for chunk in content.chunks(chunk_size.max(1)) {
            digest.add(&Self::chunk(chunk));
        }
        digest.finish()
    }
}
/// 4 MiB: large enough for zstd to find its matches, small enough to keep every core busy
/// and memory low.
pub const DEFAULT_CHUNK_SIZE: usize = 4 << 20;
/// The zip comment, for anyone who opens the archive with another tool.
pub(crate) const ARCHIVE_COMMENT: &str =
    "podmigrate checkpoint archive; see podmigrate.manifest.pb";

/// Worker threads for `requested` (0: one per core).
pub(crate) fn worker_threads(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_follow;
#[cfg(test)]
mod tests_sealed;
