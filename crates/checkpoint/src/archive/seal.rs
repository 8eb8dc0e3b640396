//! Sealed archives: every chunk and the manifest encrypted and authenticated with AES-256-GCM
//! under a key derived for this archive alone.
//!
//! - The envelope (`podmigrate.seal`, the first entry) holds a magic, the format and
//!   algorithm, a random 256-bit salt and the key's public id.
//! - The archive key is HKDF-SHA256(node key, salt): unique to the archive, so counter nonces
//!   can never repeat across archives, and a chunk moved from another archive fails.
//! - A chunk's nonce is (kind, entry index, chunk index), where kind marks an entry's last
//!   chunk; its additional data repeats them and adds the entry's name. Reordered, swapped,
//!   dropped or appended chunks therefore fail to open.
//! - The manifest (`podmigrate.manifest.sealed`, the last entry) is sealed with its own nonce
//!   kind, and the whole envelope as additional data, so a changed header fails too. It is
//!   encrypted because it lists every file's SHA-256, which would let anyone confirm a guess of
//!   a file's content; names and sizes stay visible in the zip directory.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use super::key::ArchiveKey;

/// The envelope's entry name; its presence marks a sealed archive.
pub const ENVELOPE_ENTRY: &str = "podmigrate.seal";
/// The sealed manifest's entry name (a plain archive has `podmigrate.manifest.pb` instead).
pub const SEALED_MANIFEST_ENTRY: &str = "podmigrate.manifest.sealed";
/// Bytes an AEAD tag adds to every sealed chunk.
pub const TAG_LEN: usize = 16;

const MAGIC: &[u8; 16] = b"podmigrate-seal\n";
const VERSION: u8 = 1;
const ALGORITHM_AES_256_GCM: u8 = 1;
const SALT_LEN: usize = 32;
const KEY_ID_LEN: usize = 8;
pub(crate) const ENVELOPE_LEN: usize = MAGIC.len() + 4 + SALT_LEN + KEY_ID_LEN;

const NONCE_CHUNK: u8 = 1;
const NONCE_LAST_CHUNK: u8 = 2;
const NONCE_MANIFEST: u8 = 3;
const CHUNK_AAD_LABEL: &[u8] = b"podmigrate chunk v1\0";
const MANIFEST_AAD_LABEL: &[u8] = b"podmigrate manifest v1\0";

/// Why a sealed archive was refused; the reader turns it into one error naming the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SealProblem {
    /// Not an envelope this build understands.
    Envelope(String),
    /// Sealed with another key than the node's.
    OtherKey { archive: String, node: String },
    /// An AEAD tag did not verify.
    Forged,
}

/// Seals or opens one archive's chunks and manifest.
pub(crate) struct Sealer {
    key: LessSafeKey,
    envelope: [u8; ENVELOPE_LEN],
    key_id: String,
}

impl Sealer {
    /// A sealer for a new archive, with a fresh random salt.
    pub(crate) fn new(key: &ArchiveKey) -> Result<Self, ring::error::Unspecified> {
        let mut salt = [0u8; SALT_LEN];
        SystemRandom::new().fill(&mut salt)?;
        let mut envelope = [0u8; ENVELOPE_LEN];
        envelope[..MAGIC.len()].copy_from_slice(MAGIC);
        envelope[MAGIC.len()] = VERSION;
        envelope[MAGIC.len() + 1] = ALGORITHM_AES_256_GCM;
        envelope[MAGIC.len() + 4..MAGIC.len() + 4 + SALT_LEN].copy_from_slice(&salt);
        let id = hex::decode(key.id()).expect("key ids are hex");
        envelope[ENVELOPE_LEN - KEY_ID_LEN..].copy_from_slice(&id);
        Ok(Sealer {
            key: derive(key, &salt),
            envelope,
            key_id: key.id().to_string(),
        })
    }

    /// The sealer of an existing archive, from its envelope.
    pub(crate) fn from_envelope(key: &ArchiveKey, envelope: &[u8]) -> Result<Self, SealProblem> {
        let bad = |reason: &str| SealProblem::Envelope(reason.to_string());
        if envelope.len() != ENVELOPE_LEN || !envelope.starts_with(MAGIC) {
            return Err(bad("the seal header is not a podmigrate seal header"));
        }
        let version = envelope[MAGIC.len()];
        if version != VERSION {
            return Err(SealProblem::Envelope(format!(
                "seal format {version} is not supported (this podmigrate reads format {VERSION})"
            )));
        }
        if envelope[MAGIC.len() + 1] != ALGORITHM_AES_256_GCM
            || envelope[MAGIC.len() + 2..MAGIC.len() + 4] != [0, 0]
        {
            return Err(bad("the seal header names an unknown algorithm"));
        }
        let archive_key_id = hex::encode(&envelope[ENVELOPE_LEN - KEY_ID_LEN..]);
        if archive_key_id != key.id() {
            return Err(SealProblem::OtherKey {
                archive: archive_key_id,
                node: key.id().to_string(),
            });
        }
        let salt = &envelope[MAGIC.len() + 4..MAGIC.len() + 4 + SALT_LEN];
        Ok(Sealer {
            key: derive(key, salt),
            envelope: envelope.try_into().expect("length checked"),
            key_id: archive_key_id,
        })
    }

    pub(crate) fn envelope(&self) -> &[u8] {
        &self.envelope
    }

    pub(crate) fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Encrypts `buf` in place and appends the tag.
    pub(crate) fn seal_chunk(
        &self,
        entry: usize,
        chunk: usize,
        last: bool,
        name: &str,
        buf: &mut Vec<u8>,
    ) {
        let (nonce, aad) = chunk_nonce_aad(entry, chunk, last, name);
        self.key
            .seal_in_place_append_tag(nonce, Aad::from(aad), buf)
            .expect("a chunk is far below AES-GCM's message limit");
    }

    /// Checks the tag and decrypts `buf` in place, leaving the plaintext.
    pub(crate) fn open_chunk(
        &self,
        entry: usize,
        chunk: usize,
        last: bool,
        name: &str,
        buf: &mut Vec<u8>,
    ) -> Result<(), SealProblem> {
        let (nonce, aad) = chunk_nonce_aad(entry, chunk, last, name);
        let len = self
            .key
            .open_in_place(nonce, Aad::from(aad), buf)
            .map_err(|_| SealProblem::Forged)?
            .len();
        buf.truncate(len);
        Ok(())
    }

    pub(crate) fn seal_manifest(&self, manifest: &[u8]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(manifest.len() + TAG_LEN);
        buf.extend_from_slice(manifest);
        self.key
            .seal_in_place_append_tag(self.manifest_nonce(), self.manifest_aad(), &mut buf)
            .expect("a manifest is far below AES-GCM's message limit");
        buf
    }

    pub(crate) fn open_manifest(&self, mut sealed: Vec<u8>) -> Result<Vec<u8>, SealProblem> {
        let len = self
            .key
            .open_in_place(self.manifest_nonce(), self.manifest_aad(), &mut sealed)
            .map_err(|_| SealProblem::Forged)?
            .len();
        sealed.truncate(len);
        Ok(sealed)
    }

    fn manifest_nonce(&self) -> Nonce {
        let mut nonce = [0u8; aead::NONCE_LEN];
        nonce[0] = NONCE_MANIFEST;
        Nonce::assume_unique_for_key(nonce)
    }

    fn manifest_aad(&self) -> Aad<Vec<u8>> {
        Aad::from([MANIFEST_AAD_LABEL, &self.envelope[..]].concat())
    }
}

/// The archive's own AES-256-GCM key: HKDF-SHA256 of the node key with the archive's salt.
fn derive(key: &ArchiveKey, salt: &[u8]) -> LessSafeKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(key.secret());
    let okm = prk
        .expand(&[b"podmigrate archive v1 aes-256-gcm"], &AES_256_GCM)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// Nonce: kind (1 byte), 3 zero bytes, entry index and chunk index (u32, big-endian). Unique
/// within an archive, since an entry's chunks are numbered and entries are too.
fn chunk_nonce_aad(entry: usize, chunk: usize, last: bool, name: &str) -> (Nonce, Vec<u8>) {
    let entry = u32::try_from(entry).expect("entry count is checked by the writer and reader");
    let chunk = u32::try_from(chunk).expect("chunk count is checked by the writer and reader");
    let mut nonce = [0u8; aead::NONCE_LEN];
    nonce[0] = if last { NONCE_LAST_CHUNK } else { NONCE_CHUNK };
    nonce[4..8].copy_from_slice(&entry.to_be_bytes());
    nonce[8..12].copy_from_slice(&chunk.to_be_bytes());
    let mut aad = Vec::with_capacity(CHUNK_AAD_LABEL.len() + aead::NONCE_LEN + name.len());
    aad.extend_from_slice(CHUNK_AAD_LABEL);
    aad.extend_from_slice(&nonce);
    aad.extend_from_slice(name.as_bytes());
    (Nonce::assume_unique_for_key(nonce), aad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> ArchiveKey {
        ArchiveKey::from_bytes(std::array::from_fn(|i| seed ^ i as u8)).unwrap()
    }

    #[test]
    fn chunks_open_only_in_their_place_and_archive() {
        let k = key(1);
        let a = Sealer::new(&k).unwrap();
        let b = Sealer::new(&k).unwrap();
        assert_ne!(
            a.envelope(),
            b.envelope(),
            "every archive gets its own salt"
        );
        let mut sealed = b"page data".to_vec();
        a.seal_chunk(3, 7, false, "checkpoint/pages-1.img", &mut sealed);
        assert_eq!(sealed.len(), 9 + TAG_LEN);

        let reopened = Sealer::from_envelope(&k, a.envelope()).unwrap();
        let mut ok = sealed.clone();
        reopened
            .open_chunk(3, 7, false, "checkpoint/pages-1.img", &mut ok)
            .unwrap();
        assert_eq!(ok, b"page data");

        for (entry, chunk, last, name) in [
            (3, 8, false, "checkpoint/pages-1.img"),
            (2, 7, false, "checkpoint/pages-1.img"),
            (3, 7, true, "checkpoint/pages-1.img"),
            (3, 7, false, "checkpoint/pages-2.img"),
        ] {
            let mut moved = sealed.clone();
            assert_eq!(
                reopened.open_chunk(entry, chunk, last, name, &mut moved),
                Err(SealProblem::Forged),
                "{entry} {chunk} {last} {name}"
            );
        }
        let mut other = sealed.clone();
        assert_eq!(
            b.open_chunk(3, 7, false, "checkpoint/pages-1.img", &mut other),
            Err(SealProblem::Forged),
            "a chunk from another archive"
        );
    }

    #[test]
    fn envelope_changes_and_other_keys_are_refused() {
        let k = key(1);
        let sealer = Sealer::new(&k).unwrap();
        let manifest = sealer.seal_manifest(b"manifest");
        assert_eq!(
            Sealer::from_envelope(&k, sealer.envelope())
                .unwrap()
                .open_manifest(manifest.clone())
                .unwrap(),
            b"manifest"
        );
        // A flipped salt byte derives another key: the manifest no longer opens.
        let mut salt_flipped = sealer.envelope().to_vec();
        salt_flipped[MAGIC.len() + 10] ^= 1;
        let other = Sealer::from_envelope(&k, &salt_flipped).unwrap();
        assert_eq!(
            other.open_manifest(manifest.clone()),
            Err(SealProblem::Forged)
        );
        for at in [0, MAGIC.len(), MAGIC.len() + 1, MAGIC.len() + 3] {
            let mut env = sealer.envelope().to_vec();
            env[at] ^= 1;
            assert!(matches!(
                Sealer::from_envelope(&k, &env),
                Err(SealProblem::Envelope(_))
            ));
        }
        assert!(matches!(
            Sealer::from_envelope(&key(2), sealer.envelope()),
            Err(SealProblem::OtherKey { .. })
        ));
    }
}
