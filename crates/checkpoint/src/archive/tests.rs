//! Round trips, and every kind of bad input a reader must refuse with a clear error and no
//! side effect: missing, not a zip, truncated, flipped bits, wrong digests, unsafe names,
//! links and devices, duplicates, and entries larger than declared.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use podmigrate_proto::v1::{ArchiveManifest, Entry, EntryKind};
use sha2::{Digest, Sha256};

use super::codec::{ChunkCompressor, Compression};
use super::zipwriter::ZipStreamWriter;
use super::*;
use crate::layout::MANIFEST_ENTRY;

/// `len` bytes like CRIU page images of a real process: the first `random` pseudo-random
/// (incompressible), the rest repeated text.
pub(super) fn sample_pages(len: usize, random: usize) -> Vec<u8> {
    let mut pages = Vec::with_capacity(len);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..len {
        if i < random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            pages.push(x as u8);
        } else {
            pages.push(b"the quick brown fox jumps "[i % 26]);
        }
    }
    pages
}

/// A small checkpoint-like directory: nested dirs, an empty file, a multi-chunk file.
pub(super) fn sample_checkpoint(root: &Path) -> PathBuf {
    let dir = root.join("ck");
    fs::create_dir_all(dir.join("checkpoint")).unwrap();
    fs::create_dir_all(dir.join("empty-dir")).unwrap();
    let pages = sample_pages(600_000, 200_000);
    fs::write(dir.join("checkpoint/pages-1.img"), &pages).unwrap();
    fs::write(dir.join("checkpoint/inventory.img"), b"inventory").unwrap();
    fs::write(dir.join("deleted.files"), b"").unwrap();
    fs::write(dir.join("spec.dump"), br#"{"ociVersion":"1.0.2"}"#).unwrap();
    fs::set_permissions(dir.join("spec.dump"), fs::Permissions::from_mode(0o640)).unwrap();
    dir
}

fn small_chunks(compression: Compression) -> PackOptions {
    PackOptions {
        compression,
        chunk_size: 64 << 10,
        ..PackOptions::default()
    }
}

pub(super) fn assert_same_tree(a: &Path, b: &Path) {
    let list = |root: &Path| -> Vec<(String, Option<Vec<u8>>, u32)> {
        walkdir::WalkDir::new(root)
            .min_depth(1)
            .sort_by_file_name()
            .into_iter()
            .map(|e| {
                let e = e.unwrap();
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                let meta = e.metadata().unwrap();
                let content = meta.is_file().then(|| fs::read(e.path()).unwrap());
                (rel, content, meta.permissions().mode() & 0o777)
            })
            .collect()
    };
    assert_eq!(list(a), list(b));
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn pack_then_unpack_reproduces_the_directory_for_every_compression() {
    for compression in [Compression::Zstd, Compression::Deflate, Compression::Stored] {
        let tmp = tempfile::tempdir().unwrap();
        let src = sample_checkpoint(tmp.path());
        let archive = tmp.path().join("share/ck.zip");
        fs::create_dir(tmp.path().join("share")).unwrap();
        let summary = pack(&src, &archive, &small_chunks(compression)).unwrap();
        assert_eq!(summary.entries, 6);
        // Only the committed archive is left on the share: no temporary file.
        assert_eq!(names_in(&tmp.path().join("share")), ["ck.zip"]);
        assert_eq!(
            fs::metadata(&archive).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let verified = verify(&archive, &UnpackOptions::default()).unwrap();
        assert_eq!(verified.manifest_sha256, summary.manifest_sha256);
        let dest = tmp.path().join("dest");
        unpack(&archive, &dest, &UnpackOptions::default()).unwrap();
        assert_same_tree(&src, &dest);
        let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
        assert_eq!(
            mtime(&src.join("checkpoint/pages-1.img")),
            mtime(&dest.join("checkpoint/pages-1.img"))
        );
    }
}

#[test]
fn the_manifest_records_sources_versions_digests_and_compression() {
    let tmp = tempfile::tempdir().unwrap();
    let src = sample_checkpoint(tmp.path());
    let archive = tmp.path().join("ck.zip");
    let options = PackOptions {
        source: Source {
            node: "node-a".into(),
            namespace: "default".into(),
            pod: "counter".into(),
            container: "counter".into(),
            image: "localhost/counter:1".into(),
            ..Source::default()
        },
        versions: Versions {
            criu: "4.1.1".into(),
            runc: "1.1.5".into(),
            kernel: "6.18".into(),
            podmigrate: "0.1.0".into(),
        },
        ..small_chunks(Compression::Zstd)
    };
    pack(&src, &archive, &options).unwrap();
    let opened = open(&archive).unwrap();
    let m = &opened.manifest;
    assert_eq!(m.format_version, FORMAT_VERSION);
    assert_eq!(m.source.as_ref().unwrap().pod, "counter");
    assert_eq!(m.source.as_ref().unwrap().node, "node-a");
    assert_eq!(m.versions.as_ref().unwrap().criu, "4.1.1");
    assert_eq!(opened.compression(), Compression::Zstd);
    assert!(time::OffsetDateTime::parse(
        &m.created_at,
        &time::format_description::well_known::Rfc3339
    )
    .is_ok());
    let pages = m
        .entries
        .iter()
        .find(|e| e.name == "checkpoint/pages-1.img")
        .unwrap();
    assert_eq!(pages.size, 600_000);
    assert_eq!(pages.chunk_compressed_sizes.len(), 10);
    let content = fs::read(src.join("checkpoint/pages-1.img")).unwrap();
    // Format 2: the digest of the chunks' digests, so both ends hash chunks in parallel.
    assert_eq!(pages.sha256, EntryDigest::of(&content, 64 << 10).to_vec());
    assert_ne!(pages.sha256, Sha256::digest(&content).to_vec());
    let spec = m.entries.iter().find(|e| e.name == "spec.dump").unwrap();
    assert_eq!(spec.mode, 0o640);
}

#[test]
fn pack_refuses_links_devices_and_writing_into_itself_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = sample_checkpoint(tmp.path());
    std::os::unix::fs::symlink("/etc/passwd", src.join("checkpoint/evil")).unwrap();
    let archive = tmp.path().join("out.zip");
    let err = pack(&src, &archive, &PackOptions::default()).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert!(!archive.exists());
    assert_eq!(names_in(tmp.path()), ["ck"]);
    fs::remove_file(src.join("checkpoint/evil")).unwrap();

    let err = pack(
        &src,
        &src.join("checkpoint/self.zip"),
        &PackOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("inside the directory it packs"),
        "{err}"
    );

    let err = pack(
        &tmp.path().join("missing"),
        &archive,
        &PackOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("No such file"), "{err}");
}

#[test]
fn pack_refuses_a_fifo() {
    let tmp = tempfile::tempdir().unwrap();
    let src = sample_checkpoint(tmp.path());
    let fifo = std::ffi::CString::new(src.join("fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let err = pack(&src, &tmp.path().join("out.zip"), &PackOptions::default()).unwrap_err();
    assert!(err.to_string().contains("special file"), "{err}");
}

/// Unpacks `archive` and asserts it fails with a message containing `expected`, leaving no
/// destination and nothing new beside it.
fn assert_refused(archive: &Path, expected: &str) -> ArchiveError {
    let parent = archive.parent().unwrap();
    let before = names_in(parent);
    let dest = parent.join("dest");
    let err = unpack(archive, &dest, &UnpackOptions::default()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(expected),
        "expected {expected:?} in: {message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");
    assert!(!dest.exists(), "no destination left behind for {message}");
    assert_eq!(names_in(parent), before, "nothing new beside the archive");
    let verify_err = verify(archive, &UnpackOptions::default()).unwrap_err();
    assert!(
        verify_err.to_string().contains(expected),
        "verify: {verify_err}"
    );
    err
}

#[test]
fn missing_and_non_zip_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let err = unpack(
        &tmp.path().join("nope.zip"),
        &tmp.path().join("d"),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("nope.zip: No such file"), "{err}");
    assert!(!tmp.path().join("d").exists());

    let text = tmp.path().join("notes.zip");
    fs::write(&text, "this is not a zip file\n".repeat(100)).unwrap();
    assert_refused(&text, "not a valid zip archive");

    let empty = tmp.path().join("empty.zip");
    fs::write(&empty, b"").unwrap();
    assert_refused(&empty, "not a valid zip archive");

    // A plain zip without our manifest.
    let plain = tmp.path().join("plain.zip");
    let mut zip = zip::ZipWriter::new(fs::File::create(&plain).unwrap());
    zip.start_file("a.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    std::io::Write::write_all(&mut zip, b"hello").unwrap();
    zip.finish().unwrap();
    assert_refused(&plain, "not a podmigrate archive");
}

fn packed(tmp: &Path, compression: Compression) -> PathBuf {
    let src = sample_checkpoint(tmp);
    let share = tmp.join("share");
    fs::create_dir_all(&share).unwrap();
    let archive = share.join("ck.zip");
    pack(&src, &archive, &small_chunks(compression)).unwrap();
    archive
}

#[test]
fn truncated_archives_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = packed(tmp.path(), Compression::Zstd);
    let bytes = fs::read(&archive).unwrap();
    for keep in [bytes.len() / 2, bytes.len() - 10, 100] {
        fs::write(&archive, &bytes[..keep]).unwrap();
        assert_refused(&archive, "not a valid zip archive");
    }
}

#[test]
fn a_flipped_bit_anywhere_in_entry_data_is_caught() {
    for compression in [Compression::Zstd, Compression::Deflate, Compression::Stored] {
        let tmp = tempfile::tempdir().unwrap();
        let archive = packed(tmp.path(), compression);
        let original = fs::read(&archive).unwrap();
        let opened = open(&archive).unwrap();
        let pages = opened
            .data
            .iter()
            .find(|d| opened.manifest.entries[d.entry].name == "checkpoint/pages-1.img")
            .unwrap()
            .clone();
        let size = opened.manifest.entries[pages.entry].compressed_size;
        drop(opened);
        for offset in [
            pages.data_start + 1,
            pages.data_start + size / 2,
            pages.data_start + size - 2,
        ] {
            let mut bytes = original.clone();
            bytes[offset as usize] ^= 0x10;
            fs::write(&archive, &bytes).unwrap();
            let err = assert_refused(&archive, "checkpoint/pages-1.img");
            assert!(
                matches!(
                    err,
                    ArchiveError::BadEntry { .. } | ArchiveError::DigestMismatch { .. }
                ),
                "{compression} at {offset}: {err}"
            );
        }
    }
}

#[test]
fn a_flipped_bit_in_the_manifest_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = packed(tmp.path(), Compression::Zstd);
    let mut bytes = fs::read(&archive).unwrap();
    // The manifest is stored uncompressed, last: flip a byte inside its data.
    let opened = open(&archive).unwrap();
    let manifest_len = super::manifest::encode(&opened.manifest).len();
    drop(opened);
    let cd = zip::ZipArchive::new(fs::File::open(&archive).unwrap())
        .unwrap()
        .central_directory_start() as usize;
    bytes[cd - manifest_len / 2] ^= 0x01;
    fs::write(&archive, &bytes).unwrap();
    assert_refused(&archive, "manifest");
}

fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// One entry of a hand-made archive: what the zip holds, and what its manifest claims.
struct Crafted<'a> {
    name: &'a str,
    content: &'a [u8],
    /// The size declared in the zip and the manifest, if not the content's real size.
    declared_size: Option<u64>,
    /// The SHA-256 the manifest claims, if not the content's real digest.
    claimed_sha256: Option<[u8; 32]>,
}

impl<'a> Crafted<'a> {
    fn file(name: &'a str, content: &'a [u8]) -> Self {
        Crafted {
            name,
            content,
            declared_size: None,
            claimed_sha256: None,
        }
    }
}

/// Writes a zip with a matching manifest exactly as told, bypassing pack's own checks.
fn craft(path: &Path, entries: &[Crafted<'_>]) {
    let compression = Compression::Zstd;
    let mut writer = ZipStreamWriter::new(fs::File::create(path).unwrap());
    let mut compressor = ChunkCompressor::new(compression, 1).unwrap();
    let mut manifest = ArchiveManifest {
        format_version: FORMAT_VERSION,
        compression: compression.to_proto() as i32,
        compression_level: 1,
        chunk_size: DEFAULT_CHUNK_SIZE as u64,
        ..ArchiveManifest::default()
    };
    for e in entries {
        let size = e.declared_size.unwrap_or(e.content.len() as u64);
        let compressed = compressor.compress(e.content, true).unwrap();
        let zip_entry = writer
            .begin_entry(e.name, false, compression, 0o644, 0, size)
            .unwrap();
        writer.write_data(&compressed).unwrap();
        writer
            .end_entry(zip_entry, crc32fast::hash(e.content), size)
            .unwrap();
        manifest.entries.push(Entry {
            name: e.name.to_string(),
            kind: EntryKind::File as i32,
            mode: 0o644,
            size,
            sha256: e.claimed_sha256.map_or_else(
                || EntryDigest::of(e.content, DEFAULT_CHUNK_SIZE).to_vec(),
                |d| d.to_vec(),
            ),
            compressed_size: compressed.len() as u64,
            chunk_compressed_sizes: vec![compressed.len() as u64],
            ..Entry::default()
        });
    }
    let bytes = super::manifest::encode(&manifest);
    let m = writer
        .begin_entry(MANIFEST_ENTRY, false, Compression::Stored, 0o600, 0, 0)
        .unwrap();
    writer.write_data(&bytes).unwrap();
    writer
        .end_entry(m, crc32fast::hash(&bytes), bytes.len() as u64)
        .unwrap();
    writer.finish("crafted").unwrap();
}

/// Sets the Unix mode in an entry's central directory record.
fn set_unix_mode(path: &Path, name: &str, mode: u32) {
    let mut bytes = fs::read(path).unwrap();
    let central = find_all(&bytes, &0x0201_4b50u32.to_le_bytes())
        .into_iter()
        .find(|&at| {
            let len = u16::from_le_bytes([bytes[at + 28], bytes[at + 29]]) as usize;
            &bytes[at + 46..at + 46 + len] == name.as_bytes()
        })
        .unwrap();
    bytes[central + 38..central + 42].copy_from_slice(&(mode << 16).to_le_bytes());
    fs::write(path, bytes).unwrap();
}

#[test]
fn a_crafted_archive_that_is_honest_unpacks() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("ok.zip");
    craft(&archive, &[Crafted::file("a/b.img", b"fine")]);
    unpack(
        &archive,
        &tmp.path().join("dest"),
        &UnpackOptions::default(),
    )
    .unwrap();
    assert_eq!(fs::read(tmp.path().join("dest/a/b.img")).unwrap(), b"fine");
}

#[test]
fn a_wrong_digest_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("digest.zip");
    craft(
        &archive,
        &[
            Crafted::file("good.img", b"good"),
            Crafted {
                claimed_sha256: Some([7; 32]),
                ..Crafted::file("bad.img", b"tampered")
            },
        ],
    );
    let err = assert_refused(&archive, "bad.img");
    assert!(matches!(err, ArchiveError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("SHA-256 mismatch"), "{err}");
}

#[test]
fn traversal_and_absolute_names_are_refused_and_nothing_escapes() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    fs::create_dir(&work).unwrap();
    for (name, why) in [
        ("../escaped.txt", "path traversal"),
        ("a/../../escaped.txt", "path traversal"),
        ("/tmp/podmigrate-absolute-escape.txt", "absolute entry name"),
    ] {
        let archive = work.join("evil.zip");
        craft(&archive, &[Crafted::file(name, b"escape")]);
        assert_refused(&archive, why);
        assert!(!tmp.path().join("escaped.txt").exists());
        assert!(!Path::new("/tmp/podmigrate-absolute-escape.txt").exists());
    }
}

#[test]
fn symlink_and_device_entries_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (mode, why) in [
        (0o120777, "symbolic link"),
        (0o020644, "device"),
        (0o060644, "device"),
        (0o010644, "special-file"),
        (0o104755, "setuid"),
    ] {
        let archive = tmp.path().join("evil.zip");
        craft(&archive, &[Crafted::file("entry", b"/etc/shadow")]);
        set_unix_mode(&archive, "entry", mode);
        assert_refused(&archive, why);
    }
}

#[test]
fn duplicate_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("dup.zip");
    craft(
        &archive,
        &[Crafted::file("dup1", b"one"), Crafted::file("dup2", b"two")],
    );
    let mut bytes = fs::read(&archive).unwrap();
    for at in find_all(&bytes, b"dup2") {
        bytes[at + 3] = b'1';
    }
    fs::write(&archive, bytes).unwrap();
    assert_refused(&archive, "duplicate");
}

#[test]
fn an_entry_larger_than_declared_is_refused_without_being_extracted() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("bomb.zip");
    // 64 MiB of zeros compresses to a few KiB and claims to be 1 KiB.
    let zeros = vec![0u8; 64 << 20];
    craft(
        &archive,
        &[Crafted {
            declared_size: Some(1024),
            ..Crafted::file("bomb.img", &zeros)
        }],
    );
    assert!(fs::metadata(&archive).unwrap().len() < 1 << 20);
    assert_refused(&archive, "larger than declared");
}

#[test]
fn entries_outside_the_manifest_or_missing_from_the_zip_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = packed(tmp.path(), Compression::Zstd);
    // Rename an entry in the zip only: the zip then holds an unlisted entry.
    let mut bytes = fs::read(&archive).unwrap();
    for at in find_all(&bytes, b"inventory.img") {
        // Leave the manifest's copy of the name alone (it is the last occurrence before the
        // central directory); local and central headers get renamed.
        bytes[at] = b'X';
    }
    // Restore the manifest's copy: it is inside the stored manifest entry, whose CRC would
    // otherwise fail first.
    let cd = zip::ZipArchive::new(std::io::Cursor::new(fs::read(&archive).unwrap()))
        .unwrap()
        .central_directory_start() as usize;
    let original = fs::read(&archive).unwrap();
    let in_manifest = find_all(&original[..cd], b"inventory.img")
        .into_iter()
        .last()
        .unwrap();
    bytes[in_manifest] = b'i';
    fs::write(&archive, &bytes).unwrap();
    assert_refused(&archive, "not listed in the manifest");
}

#[test]
fn a_non_empty_destination_is_refused_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = packed(tmp.path(), Compression::Zstd);
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("keep.txt"), b"mine").unwrap();
    let err = unpack(&archive, &dest, &UnpackOptions::default()).unwrap_err();
    assert!(
        matches!(err, ArchiveError::DestinationNotEmpty { .. }),
        "{err}"
    );
    assert_eq!(names_in(&dest), ["keep.txt"]);
    // An existing empty directory is fine (it may be a tmpfs mount point).
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    unpack(&archive, &empty, &UnpackOptions::default()).unwrap();
    assert!(empty.join("checkpoint/pages-1.img").is_file());
}

/// A file reserved ahead (bigger than the entry, and full of other bytes) is adopted for the
/// pages image: the result is exactly the checkpoint, and the reservation is used up.
#[test]
fn unpack_writes_an_entry_into_its_reserved_file() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = sample_checkpoint(tmp.path());
    let archive = tmp.path().join("ck.zip");
    pack(&ck, &archive, &PackOptions::default()).unwrap();
    let pages = fs::metadata(ck.join("checkpoint/pages-1.img"))
        .unwrap()
        .len();

    let reserved_dir = tmp.path().join("reserved");
    let file = crate::prefault::reserve(&reserved_dir, pages + 12_345).unwrap();
    {
        use std::os::unix::fs::FileExt;
        file.write_all_at(&vec![0xffu8; pages as usize + 12_345], 0)
            .unwrap();
    }
    let options = UnpackOptions {
        reserved: Some(Reserved::new("checkpoint/pages-1.img", file)),
        ..UnpackOptions::default()
    };
    let out = tmp.path().join("out");
    unpack(&archive, &out, &options).unwrap();
    assert_same_tree(&ck, &out);

    // Used up: a second unpack makes its own file and leaves the first one's alone.
    let again = tmp.path().join("again");
    unpack(&archive, &again, &options).unwrap();
    assert_same_tree(&ck, &again);
    fs::write(again.join("checkpoint/pages-1.img"), b"changed").unwrap();
    assert_same_tree(&ck, &out);
}
