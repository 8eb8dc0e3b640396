//! The cluster's archive key: 32 random bytes shared by every node, read from a file (on a node,
//! copied from a Kubernetes Secret). It seals archives (`seal.rs`).
//!
//! The key is never printed: `Debug` shows only its id (a one-way derivation, safe to log), and
//! every error names the file and what is wrong with it, never its content. The bytes are wiped
//! from memory when the key is dropped.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64ct::{Base64, Encoding};
use ring::hkdf;
use zeroize::Zeroizing;

/// Bytes in a key: AES-256.
pub const KEY_LEN: usize = 32;
/// A key file is 32 raw bytes or their base64 (44 characters); anything much larger is a
/// mistake, and is not read whole.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// What is wrong with a key file. Messages name the file and the problem only.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("archive key file {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("archive key file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The archive key, loaded and checked.
pub struct ArchiveKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    id: String,
}

impl fmt::Debug for ArchiveKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArchiveKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// How a key file must be written, for error messages.
const KEY_FILE_HINT: &str =
    "it must hold 32 random bytes, raw or base64 (make one with `openssl rand -base64 32`)";

impl ArchiveKey {
    /// Reads and checks a key file: a regular file (symbolic links, as in Secret volumes, are
    /// followed), not accessible to other users, holding 32 random bytes raw or in base64.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let invalid = |reason: String| KeyError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let io = |op: &'static str| {
            move |source| KeyError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        };
        let mut file = File::open(path).map_err(io("opening"))?;
        let meta = file.metadata().map_err(io("reading metadata"))?;
        if !meta.is_file() {
            return Err(invalid("not a regular file".to_string()));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o007 != 0 {
            return Err(invalid(format!(
                "other users may access it (mode {mode:04o}, owner uid {}); make it 0600 or 0400 \
                 (a Secret volume: defaultMode: 0400)",
                meta.uid()
            )));
        }
        let mut content = Zeroizing::new(Vec::with_capacity(64));
        (&mut file)
            .take(MAX_KEY_FILE_BYTES + 1)
            .read_to_end(&mut content)
            .map_err(io("reading"))?;
        if content.len() as u64 > MAX_KEY_FILE_BYTES {
            return Err(invalid(format!(
                "larger than {MAX_KEY_FILE_BYTES} bytes; {KEY_FILE_HINT}"
            )));
        }
        let bytes = parse(&content).ok_or_else(|| {
            invalid(format!(
                "holds {} bytes that are neither 32 raw bytes nor the base64 of 32 bytes; {KEY_FILE_HINT}",
                content.len()
            ))
        })?;
        Self::from_bytes(*bytes).map_err(|reason| invalid(reason.to_string()))
    }

    /// A key from its bytes. Refuses a key whose bytes are all equal (an all-zero or
    /// placeholder key is not a secret).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Result<Self, &'static str> {
        let bytes = Zeroizing::new(bytes);
        if bytes.iter().all(|b| *b == bytes[0]) {
            return Err("the key is not random (all its bytes are equal)");
        }
        let id = key_id(&bytes);
        Ok(ArchiveKey { bytes, id })
    }

    /// A short public name for this key (16 hex digits), derived one-way: it tells which key
    /// sealed an archive without revealing anything about the key.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn secret(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    /// Writes this key (raw) to `path`, mode 0600, replacing any file there atomically: a
    /// temporary file beside it, fsynced, then renamed. Its directory is created (0700) if
    /// missing. This is how a node's agent hands the Secret's key to the host-side shim.
    pub fn install(&self, path: &Path) -> Result<(), KeyError> {
        let io = |op: &'static str, at: &Path| {
            let at = at.to_path_buf();
            move |source| KeyError::Io {
                op,
                path: at,
                source,
            }
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(io("creating the directory of", path))?;
        let file_name = path.file_name().ok_or_else(|| KeyError::Invalid {
            path: path.to_path_buf(),
            reason: "has no file name".to_string(),
        })?;
        let temp = parent.join(format!(
            ".{}.tmp-{}",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(&self.bytes[..])?;
            file.sync_all()?;
            std::fs::rename(&temp, path)?;
            File::open(&parent)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written.map_err(io("writing", path))
    }
}

/// 32 raw bytes, or base64 of 32 bytes with surrounding whitespace (a trailing newline).
fn parse(content: &[u8]) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if content.len() == KEY_LEN {
        key.copy_from_slice(content);
        return Some(key);
    }
    let text = content.trim_ascii();
    let text = std::str::from_utf8(text).ok()?;
    let decoded = Base64::decode(text, &mut key[..]).ok()?;
    (decoded.len() == KEY_LEN).then_some(key)
}

/// The hkdf output length for a plain byte array.
pub(crate) struct Len(pub(crate) usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn key_id(key: &[u8; KEY_LEN]) -> String {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"podmigrate archive key id").extract(key);
    let mut id = [0u8; 8];
    prk.expand(&[b"podmigrate key id v1"], Len(id.len()))
        .and_then(|okm| okm.fill(&mut id))
        .expect("8 bytes is a valid HKDF-SHA256 output length");
    hex::encode(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn sample() -> [u8; KEY_LEN] {
        std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11))
    }

    #[test]
    fn raw_and_base64_files_load_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let raw = write(dir.path(), "raw", &sample(), 0o600);
        let b64 = Base64::encode_string(&sample()) + "\n";
        let text = write(dir.path(), "b64", b64.as_bytes(), 0o400);
        let a = ArchiveKey::load(&raw).unwrap();
        let b = ArchiveKey::load(&text).unwrap();
        assert_eq!(a.secret(), &sample());
        assert_eq!(a.secret(), b.secret());
        assert_eq!(a.id(), b.id());
        assert_eq!(a.id().len(), 16);
        // Through a symbolic link, as a Secret volume presents its files.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&raw, &link).unwrap();
        assert_eq!(ArchiveKey::load(&link).unwrap().id(), a.id());
    }

    #[test]
    fn bad_key_files_are_refused_without_showing_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let b64 = Base64::encode_string(&sample());
        for (name, content, mode, expected) in [
            ("short", &b"0123456789"[..], 0o600, "neither 32 raw bytes"),
            ("long", &[7u8; 33][..], 0o600, "neither 32 raw bytes"),
            (
                "b64-short",
                &b"c2hvcnQ=\n"[..],
                0o600,
                "neither 32 raw bytes",
            ),
            ("zero", &[0u8; 32][..], 0o600, "not random"),
            (
                "world",
                b64.as_bytes(),
                0o644,
                "other users may access it (mode 0644",
            ),
            (
                "huge",
                &vec![b'a'; 5000][..],
                0o600,
                "larger than 4096 bytes",
            ),
        ] {
            let path = write(dir.path(), name, content, mode);
            let err = ArchiveKey::load(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "{name}: {err}");
            assert!(err.contains(path.to_str().unwrap()), "{name}: {err}");
            assert!(!err.contains(&b64[..8]), "{name}: {err}");
        }
        let err = ArchiveKey::load(&dir.path().join("absent")).unwrap_err();
        assert!(err.to_string().contains("opening"), "{err}");
        let err = ArchiveKey::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn install_writes_the_raw_key_0600_and_replaces_an_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("keys/archive.key");
        let key = ArchiveKey::from_bytes(sample()).unwrap();
        key.install(&dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), sample());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dest), 0o600);
        assert_eq!(mode(&dir.path().join("keys")), 0o700);
        let other = ArchiveKey::from_bytes(
            [9; 31]
                .into_iter()
                .chain([1])
                .collect::<Vec<_>>()
                .try_into()
                .unwrap(),
        )
        .unwrap();
        other.install(&dest).unwrap();
        assert_eq!(ArchiveKey::load(&dest).unwrap().id(), other.id());
        assert_eq!(fs::read_dir(dir.path().join("keys")).unwrap().count(), 1);
    }

    #[test]
    fn debug_shows_the_id_never_the_key() {
        let key = ArchiveKey::from_bytes(sample()).unwrap();
        let shown = format!("{key:?} {key:#?}");
        assert!(shown.contains(key.id()), "{shown}");
        assert!(!shown.contains(&hex::encode(sample())[..8]), "{shown}");
        assert!(
            !shown.contains(&Base64::encode_string(&sample())[..8]),
            "{shown}"
        );
        assert!(!shown.contains("11, "), "{shown}");
    }
}
