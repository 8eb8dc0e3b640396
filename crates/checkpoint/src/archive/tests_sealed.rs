//! Sealed archives: round trips, the key policy both ways, and every tampering a node with a key
//! must refuse with one clear error and no side effect: a flipped bit in a chunk, the manifest
//! or the seal header, truncation, reordered chunks, swapped entries, and chunks or manifests
//! taken from another archive sealed with the same key.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64ct::{Base64, Encoding};

use super::*;

const KEY_BYTES: [u8; 32] = *b"podmigrate-test-key-0123456789ab";

fn key() -> Arc<ArchiveKey> {
    Arc::new(ArchiveKey::from_bytes(KEY_BYTES).unwrap())
}

fn with_key(key: &Arc<ArchiveKey>) -> UnpackOptions {
    UnpackOptions {
        key: Some(Arc::clone(key)),
        ..UnpackOptions::default()
    }
}

/// Like the plain tests' sample, plus two files of the same size whose data could be swapped,
/// and enough incompressible pages for several equal-sized chunks.
fn sample_checkpoint(root: &Path) -> PathBuf {
    let dir = root.join("ck");
    fs::create_dir_all(dir.join("checkpoint")).unwrap();
    fs::create_dir_all(dir.join("empty-dir")).unwrap();
    let pages = super::tests::sample_pages(600_000, 300_000);
    fs::write(dir.join("checkpoint/pages-1.img"), &pages).unwrap();
    fs::write(dir.join("checkpoint/core-1.img"), b"core one").unwrap();
    fs::write(dir.join("checkpoint/core-2.img"), b"core two").unwrap();
    fs::write(dir.join("deleted.files"), b"").unwrap();
    fs::write(dir.join("spec.dump"), br#"{"ociVersion":"1.0.2"}"#).unwrap();
    fs::set_permissions(dir.join("spec.dump"), fs::Permissions::from_mode(0o640)).unwrap();
    dir
}

fn options(compression: Compression, key: Option<&Arc<ArchiveKey>>) -> PackOptions {
    PackOptions {
        compression,
        chunk_size: 64 << 10,
        key: key.cloned(),
        ..PackOptions::default()
    }
}

/// Packs the sample into `<tmp>/share/<name>`, sealed with `key`.
fn sealed(tmp: &Path, name: &str, key: &Arc<ArchiveKey>) -> PathBuf {
    let src = tmp.join("ck");
    if !src.exists() {
        sample_checkpoint(tmp);
    }
    let share = tmp.join("share");
    fs::create_dir_all(&share).unwrap();
    let archive = share.join(name);
    pack(&src, &archive, &options(Compression::Zstd, Some(key))).unwrap();
    archive
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Unpacks and verifies `archive` with `unpack_options`, asserting both fail with one line
/// containing `expected` and leave nothing behind.
fn assert_refused(archive: &Path, unpack_options: &UnpackOptions, expected: &str) -> ArchiveError {
    let parent = archive.parent().unwrap();
    let before = names_in(parent);
    let dest = parent.join("dest");
    let err = unpack(archive, &dest, unpack_options).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(expected),
        "expected {expected:?} in: {message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");
    assert!(!dest.exists(), "no destination left behind for {message}");
    assert_eq!(names_in(parent), before, "nothing new beside the archive");
    let verify_err = verify(archive, unpack_options).unwrap_err();
    assert!(
        verify_err.to_string().contains(expected),
        "verify: {verify_err}"
    );
    err
}

fn assert_unauthentic(archive: &Path, key: &Arc<ArchiveKey>, what: &str) {
    let err = assert_refused(archive, &with_key(key), "failed authentication");
    match &err {
        ArchiveError::Unauthentic { what: w, .. } => assert!(w.contains(what), "{err}"),
        other => panic!("expected an authentication failure of {what}, got: {other}"),
    }
}

/// Where an entry's sealed data lies, and its sealed chunk sizes.
fn data_of(archive: &Path, key: &Arc<ArchiveKey>, name: &str) -> (usize, Vec<u64>) {
    let opened = open_with_key(archive, Some(key)).unwrap();
    let location = opened
        .data
        .iter()
        .find(|d| opened.manifest.entries[d.entry].name == name)
        .unwrap();
    (
        location.data_start as usize,
        opened.manifest.entries[location.entry]
            .chunk_compressed_sizes
            .clone(),
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn sealed_archives_round_trip_for_every_compression_and_name_their_key() {
    let key = key();
    for compression in [Compression::Zstd, Compression::Deflate, Compression::Stored] {
        let tmp = tempfile::tempdir().unwrap();
        let src = sample_checkpoint(tmp.path());
        let share = tmp.path().join("share");
        fs::create_dir(&share).unwrap();
        let archive = share.join("ck.zip");
        let summary = pack(&src, &archive, &options(compression, Some(&key))).unwrap();
        assert_eq!(summary.sealed_with.as_deref(), Some(key.id()));
        assert_eq!(names_in(&share), ["ck.zip"]);
        assert_eq!(
            fs::metadata(&archive).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let opened = open_with_key(&archive, Some(&key)).unwrap();
        assert_eq!(opened.sealed_with(), Some(key.id()));
        assert_eq!(opened.manifest_sha256, summary.manifest_sha256);
        let verified = verify(&archive, &with_key(&key)).unwrap();
        assert_eq!(verified.manifest_sha256, summary.manifest_sha256);
        let dest = tmp.path().join("dest");
        unpack(&archive, &dest, &with_key(&key)).unwrap();
        for name in [
            "checkpoint/pages-1.img",
            "checkpoint/core-1.img",
            "spec.dump",
        ] {
            assert_eq!(
                fs::read(src.join(name)).unwrap(),
                fs::read(dest.join(name)).unwrap(),
                "{compression} {name}"
            );
        }
        assert!(dest.join("empty-dir").is_dir());

        // Any zip tool sees a consistent zip of opaque entries: CRCs and sizes hold.
        let mut zip = zip::ZipArchive::new(fs::File::open(&archive).unwrap()).unwrap();
        for i in 0..zip.len() {
            let mut entry = zip.by_index(i).unwrap();
            std::io::copy(&mut entry, &mut std::io::sink()).unwrap();
        }
        assert!(zip.by_name(crate::layout::MANIFEST_ENTRY).is_err());
    }
}

#[test]
fn the_key_and_the_content_never_appear_in_a_sealed_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key();
    let archive = sealed(tmp.path(), "ck.zip", &key);
    let bytes = fs::read(&archive).unwrap();
    let b64 = Base64::encode_string(&KEY_BYTES);
    for (what, needle) in [
        ("the key", &KEY_BYTES[..]),
        ("the key's base64", b64.as_bytes()),
        ("the key's hex", hex::encode(KEY_BYTES).as_bytes()),
        ("file content", b"the quick brown fox jumps"),
        ("file content", b"core one"),
        ("the spec", b"ociVersion"),
    ] {
        assert_eq!(find(&bytes, needle), None, "{what} found in the archive");
    }
    // Names and sizes are not secret: the zip directory shows them.
    assert!(find(&bytes, b"checkpoint/pages-1.img").is_some());
}

#[test]
fn a_node_with_a_key_refuses_plain_archives_and_a_node_without_one_refuses_sealed_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key();
    let src = sample_checkpoint(tmp.path());
    let share = tmp.path().join("share");
    fs::create_dir(&share).unwrap();
    let plain = share.join("plain.zip");
    pack(&src, &plain, &options(Compression::Zstd, None)).unwrap();
    let err = assert_refused(&plain, &with_key(&key), "is not sealed");
    assert!(matches!(err, ArchiveError::NotSealed { .. }), "{err}");

    let sealed = sealed(tmp.path(), "sealed.zip", &key);
    let err = assert_refused(&sealed, &UnpackOptions::default(), "no archive key");
    assert!(matches!(err, ArchiveError::KeyRequired { .. }), "{err}");
    assert!(err.to_string().contains("PODMIGRATE_KEY_FILE"), "{err}");
    assert!(matches!(
        open(&sealed),
        Err(ArchiveError::KeyRequired { .. })
    ));

    let other = Arc::new(ArchiveKey::from_bytes(*b"another-cluster-key-0123456789ab").unwrap());
    let err = assert_refused(&sealed, &with_key(&other), "sealed with another key");
    assert!(err.to_string().contains(key.id()), "{err}");
    assert!(err.to_string().contains(other.id()), "{err}");
}

#[test]
fn a_flipped_bit_in_any_chunk_or_tag_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key();
    let archive = sealed(tmp.path(), "ck.zip", &key);
    let original = fs::read(&archive).unwrap();
    let (start, chunks) = data_of(&archive, &key, "checkpoint/pages-1.img");
    assert!(chunks.len() >= 5, "{chunks:?}");
    let total: u64 = chunks.iter().sum();
    let last_start = start + (total - chunks[chunks.len() - 1]) as usize;
    for (offset, chunk) in [
        (start, "chunk 0"),
        (start + chunks[0] as usize - 1, "chunk 0"), // its tag
        (start + chunks[0] as usize + 7, "chunk 1"),
        (
            start + total as usize - 1,
            &*format!("chunk {}", chunks.len() - 1),
        ),
        (last_start, &*format!("chunk {}", chunks.len() - 1)),
    ] {
        let mut bytes = original.clone();
        bytes[offset] ^= 0x10;
        fs::write(&archive, &bytes).unwrap();
        assert_unauthentic(
            &archive,
            &key,
            &format!("entry \"checkpoint/pages-1.img\" {chunk}"),
        );
    }
    let (small, _) = data_of_original(&original, &archive, &key, "checkpoint/core-1.img");
    let mut bytes = original.clone();
    bytes[small] ^= 0x01;
    fs::write(&archive, &bytes).unwrap();
    assert_unauthentic(&archive, &key, "entry \"checkpoint/core-1.img\" chunk 0");
}

/// `data_of` on the untampered bytes.
fn data_of_original(
    original: &[u8],
    archive: &Path,
    key: &Arc<ArchiveKey>,
    name: &str,
) -> (usize, Vec<u64>) {
    fs::write(archive, original).unwrap();
    data_of(archive, key, name)
}

#[test]
fn a_flipped_bit_in_the_manifest_or_the_seal_header_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key();
    let archive = sealed(tmp.path(), "ck.zip", &key);
    let original = fs::read(&archive).unwrap();
    // The sealed manifest is stored last, right before the central directory.
    let cd = zip::ZipArchive::new(fs::File::open(&archive).unwrap())
        .unwrap()
        .central_directory_start() as usize;
    for back in [1, 16, 40] {
        let mut bytes = original.clone();
        bytes[cd - back] ^= 0x04;
        fs::write(&archive, &bytes).unwrap();
        assert_unauthentic(&archive, &key, "the manifest");
    }
    // The envelope: its magic, then a salt byte (another derived key: the manifest fails).
    let magic = find(&original, b"podmigrate-seal\n").unwrap();
    let mut bytes = original.clone();
    bytes[magic + 3] ^= 0x20;
    fs::write(&archive, &bytes).unwrap();
    assert_unauthentic(&archive, &key, "the seal header");
    let mut bytes = original.clone();
    bytes[magic + 16 + 4 + 5] ^= 0x01;
    fs::write(&archive, &bytes).unwrap();
    assert_unauthentic(&archive, &key, "the manifest");
}

#[test]
fn truncated_sealed_archives_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key();
    let archive = sealed(tmp.path(), "ck.zip", &key);
    let bytes = fs::read(&archive).unwrap();
    for keep in [bytes.len() / 2, bytes.len() - 10, 100] {
        fs::write(&archive, &bytes[..keep]).unwrap();
        assert_refused(&archive, &with_key(&key), "not a valid zip archive");
    }
}

#[test]
fn reordered_chunks_and_swapped_entries_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key();
    let archive = sealed(tmp.path(), "ck.zip", &key);
    let original = fs::read(&archive).unwrap();

    // Two chunks of the same sealed size, swapped in place.
    let (start, chunks) = data_of(&archive, &key, "checkpoint/pages-1.img");
    assert_eq!(
        chunks[0], chunks[1],
        "incompressible chunks seal to equal sizes"
    );
    let len = chunks[0] as usize;
    let mut bytes = original.clone();
    let (first, second) = bytes[start..start + 2 * len].split_at_mut(len);
    first.swap_with_slice(second);
    fs::write(&archive, &bytes).unwrap();
    assert_unauthentic(&archive, &key, "entry \"checkpoint/pages-1.img\" chunk 0");

    // Two files of the same size, their data swapped.
    let (a, a_chunks) = data_of_original(&original, &archive, &key, "checkpoint/core-1.img");
    let (b, b_chunks) = data_of(&archive, &key, "checkpoint/core-2.img");
    assert_eq!(a_chunks, b_chunks);
    let len = a_chunks[0] as usize;
    let mut bytes = original.clone();
    let a_data = bytes[a..a + len].to_vec();
    bytes.copy_within(b..b + len, a);
    bytes[b..b + len].copy_from_slice(&a_data);
    fs::write(&archive, &bytes).unwrap();
    assert_unauthentic(&archive, &key, "entry \"checkpoint/core-1.img\" chunk 0");
}

#[test]
fn chunks_and_manifests_from_another_archive_with_the_same_key_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key();
    let a = sealed(tmp.path(), "a.zip", &key);
    let b = sealed(tmp.path(), "b.zip", &key);
    let a_bytes = fs::read(&a).unwrap();
    let b_bytes = fs::read(&b).unwrap();

    // Same content and chunking, so chunk offsets and sizes agree; only the seals differ.
    let (start, chunks) = data_of(&a, &key, "checkpoint/pages-1.img");
    assert_eq!(
        data_of(&b, &key, "checkpoint/pages-1.img"),
        (start, chunks.clone())
    );
    let len = chunks[2] as usize;
    let at = start + (chunks[0] + chunks[1]) as usize;
    assert_ne!(a_bytes[at..at + len], b_bytes[at..at + len]);
    let mut bytes = a_bytes.clone();
    bytes[at..at + len].copy_from_slice(&b_bytes[at..at + len]);
    fs::write(&a, &bytes).unwrap();
    assert_unauthentic(&a, &key, "entry \"checkpoint/pages-1.img\" chunk 2");
    fs::write(&a, &a_bytes).unwrap();

    // b's sealed manifest, or b's seal header, in a.
    for (from_b, what) in [
        (SEALED_MANIFEST_ENTRY, "the manifest"),
        (ENVELOPE_ENTRY, "the manifest"),
    ] {
        let mixed = tmp.path().join("share/mixed.zip");
        let mut a_zip = zip::ZipArchive::new(fs::File::open(&a).unwrap()).unwrap();
        let mut b_zip = zip::ZipArchive::new(fs::File::open(&b).unwrap()).unwrap();
        let mut writer = zip::ZipWriter::new(fs::File::create(&mixed).unwrap());
        for i in 0..a_zip.len() {
            let entry = a_zip.by_index_raw(i).unwrap();
            if entry.name().unwrap() == from_b {
                drop(entry);
                let index = b_zip.index_for_name(from_b).unwrap();
                writer
                    .raw_copy_file(b_zip.by_index_raw(index).unwrap())
                    .unwrap();
            } else {
                writer.raw_copy_file(entry).unwrap();
            }
        }
        writer.finish().unwrap();
        assert_unauthentic(&mixed, &key, what);
        fs::remove_file(&mixed).unwrap();
    }
}

#[test]
fn an_entry_dropped_from_a_sealed_archive_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key();
    let archive = sealed(tmp.path(), "ck.zip", &key);
    // Rewrite the zip without one entry, copying the others byte for byte.
    let mut source = zip::ZipArchive::new(fs::File::open(&archive).unwrap()).unwrap();
    let cut = tmp.path().join("share/cut.zip");
    let mut writer = zip::ZipWriter::new(fs::File::create(&cut).unwrap());
    for i in 0..source.len() {
        let entry = source.by_index_raw(i).unwrap();
        if entry.name().unwrap() != "checkpoint/core-2.img" {
            writer.raw_copy_file(entry).unwrap();
        }
    }
    writer.finish().unwrap();
    fs::remove_file(&archive).unwrap();
    assert_refused(&cut, &with_key(&key), "missing from the archive");
}
