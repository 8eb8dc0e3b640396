//! Property tests over everything a restore reads from an untrusted archive: the zip reader and
//! unpacker (arbitrary bytes, mutated valid archives), the manifest decoder (arbitrary bytes,
//! mutated and structurally arbitrary manifests) and the rootfs diff applier (mutated valid
//! tars, arbitrary entry lists aimed at a "host" directory beside the rootfs).
//!
//! Each must never panic, never write outside its destination, and leave nothing behind when
//! it refuses. cargo-fuzz needs a nightly toolchain; these run on stable in CI with a bounded
//! number of cases (`PODMIGRATE_PROPTEST_CASES`, default 48 per property) and can run much
//! longer by raising it.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Cursor, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use podmigrate_checkpoint::archive::{
    self, ArchiveManifest, Entry, EntryKind, PackOptions, UnpackOptions,
};
use podmigrate_checkpoint::layout::{DELETED_FILES, MANIFEST_ENTRY, ROOTFS_DIFF_TAR};
use podmigrate_checkpoint::rootfs;
use proptest::prelude::*;
use prost::Message;

fn config() -> ProptestConfig {
    let cases = std::env::var("PODMIGRATE_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

type Snapshot = BTreeMap<PathBuf, (u32, u64, Vec<u8>)>;

/// Every path below `root` except `skip` and what it holds, with mode, link count (files
/// only: a directory's changes with its subdirectories) and content.
fn snapshot(root: &Path, skip: &Path) -> Snapshot {
    walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| e.path() != skip)
        .filter_map(Result::ok)
        .map(|e| {
            let meta = e.path().symlink_metadata().unwrap();
            let data = if meta.is_file() {
                fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            let links = if meta.is_dir() { 0 } else { meta.nlink() };
            (e.path().to_path_buf(), (meta.mode(), links, data))
        })
        .collect()
}

/// A small valid archive (two chunk sizes' worth of data, a directory, a rootfs diff), packed
/// once.
/// The paths on which two snapshots differ, for a readable failure.
fn changed(before: &Snapshot, after: &Snapshot) -> Vec<PathBuf> {
    before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .cloned()
        .collect()
}

fn valid_archive() -> &'static Vec<u8> {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("ck");
        fs::create_dir_all(ck.join("checkpoint/sub")).unwrap();
        let pages: Vec<u8> = (0..150_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(ck.join("checkpoint/pages-1.img"), pages).unwrap();
        fs::write(ck.join("checkpoint/inventory.img"), b"inventory").unwrap();
        fs::write(ck.join("spec.dump"), br#"{"ociVersion":"1.0.2"}"#).unwrap();
        fs::write(ck.join(DELETED_FILES), br#"["/etc/motd"]"#).unwrap();
        fs::write(ck.join(ROOTFS_DIFF_TAR), valid_tar()).unwrap();
        let zip = tmp.path().join("a.zip");
        archive::pack(
            &ck,
            &zip,
            &PackOptions {
                chunk_size: 64 << 10,
                threads: 1,
                ..PackOptions::default()
            },
        )
        .unwrap();
        fs::read(zip).unwrap()
    })
}

/// The manifest bytes of the valid archive.
fn valid_manifest() -> &'static Vec<u8> {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let mut zip = zip::ZipArchive::new(Cursor::new(valid_archive())).unwrap();
        let mut out = Vec::new();
        zip.by_name(MANIFEST_ENTRY)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    })
}

/// A zip holding only a manifest entry with these bytes.
fn zip_with_manifest(bytes: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    w.start_file(
        MANIFEST_ENTRY,
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored),
    )
    .unwrap();
    w.write_all(bytes).unwrap();
    w.finish().unwrap().into_inner()
}

/// Unpacks `bytes` as an archive into a fresh sandbox: never a panic; on refusal no
/// destination and nothing else; on success everything inside the destination.
fn unpack_checked(bytes: &[u8]) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let zip = tmp.path().join("in.zip");
    fs::write(&zip, bytes).unwrap();
    let dest = tmp.path().join("dest");
    let before = snapshot(tmp.path(), &dest);
    let result = archive::unpack(
        &zip,
        &dest,
        &UnpackOptions {
            threads: 1,
            ..UnpackOptions::default()
        },
    );
    let after = snapshot(tmp.path(), &dest);
    prop_assert!(
        after == before,
        "written outside dest: {:?}",
        changed(&before, &after)
    );
    match result {
        Err(e) => {
            prop_assert!(!dest.exists(), "refused ({e}) but left {}", dest.display());
            prop_assert!(!e.to_string().contains('\n'));
        }
        Ok(_) => {
            for item in walkdir::WalkDir::new(&dest).min_depth(1) {
                let item = item.unwrap();
                prop_assert!(!item.path_is_symlink(), "symlink unpacked");
                let meta = item.metadata().unwrap();
                prop_assert!(meta.is_file() || meta.is_dir());
                prop_assert_eq!(meta.mode() & 0o7000, 0);
            }
        }
    }
    Ok(())
}

/// Byte edits: (position as a fraction of the length, new byte).
fn mutations() -> impl Strategy<Value = (Vec<(f64, u8)>, Option<f64>)> {
    (
        prop::collection::vec((0.0..1.0f64, any::<u8>()), 1..8),
        prop::option::weighted(0.2, 0.0..1.0f64),
    )
}

fn mutate(base: &[u8], edits: &[(f64, u8)], truncate: Option<f64>) -> Vec<u8> {
    let mut bytes = base.to_vec();
    for (at, byte) in edits {
        let i = ((*at * bytes.len() as f64) as usize).min(bytes.len() - 1);
        bytes[i] = *byte;
    }
    if let Some(keep) = truncate {
        bytes.truncate((keep * bytes.len() as f64) as usize);
    }
    bytes
}

/// Names a hostile archive or tar might use.
fn hostile_name() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        Just("..".to_string()),
        Just(".".to_string()),
        Just(String::new()),
        Just("host".to_string()),
        Just("etc".to_string()),
        Just("checkpoint".to_string()),
        Just(MANIFEST_ENTRY.to_string()),
        "[a-c]{1,2}",
        "[\\x00-\\x7f]{1,3}",
    ];
    (prop::bool::weighted(0.2), prop::collection::vec(part, 1..4))
        .prop_map(|(abs, parts)| format!("{}{}", if abs { "/" } else { "" }, parts.join("/")))
}

fn arbitrary_manifest() -> impl Strategy<Value = ArchiveManifest> {
    let entry = (
        hostile_name(),
        0..4i32,
        prop::sample::select(vec![0u32, 0o644, 0o4755, 0o7777, 0o170000]),
        prop::sample::select(vec![0u64, 1, 65_536, u64::MAX]),
        prop::collection::vec(prop::sample::select(vec![0u64, 1, 100, u64::MAX]), 0..3),
        prop_oneof![Just(Vec::new()), prop::collection::vec(any::<u8>(), 32)],
    )
        .prop_map(|(name, kind, mode, size, chunks, sha256)| Entry {
            name,
            kind,
            mode,
            size,
            compressed_size: chunks.iter().fold(0u64, |a, b| a.wrapping_add(*b)),
            chunk_compressed_sizes: chunks,
            sha256,
            ..Entry::default()
        });
    (
        prop::sample::select(vec![0u32, 1, 2]),
        0..4i32,
        prop::sample::select(vec![0u64, 65_536, 4 << 20, 1 << 40]),
        prop::collection::vec(entry, 0..6),
    )
        .prop_map(
            |(format_version, compression, chunk_size, entries)| ArchiveManifest {
                format_version,
                compression,
                chunk_size,
                entries,
                ..ArchiveManifest::default()
            },
        )
}

/// The valid rootfs diff: a directory, files, an absolute symlink, a hard link.
fn valid_tar() -> Vec<u8> {
    tar_of(&[
        TarEntry::new("tmp", tar::EntryType::Directory, ""),
        TarEntry::new("tmp/count", tar::EntryType::Regular, ""),
        TarEntry::new("tmp/link", tar::EntryType::Symlink, "/tmp/count"),
        TarEntry::new("tmp/hard", tar::EntryType::Link, "tmp/count"),
        TarEntry::new("var/log/app.log", tar::EntryType::Regular, ""),
    ])
}

#[derive(Debug, Clone)]
struct TarEntry {
    name: String,
    kind: tar::EntryType,
    link: String,
    mode: u32,
}

impl TarEntry {
    fn new(name: &str, kind: tar::EntryType, link: &str) -> Self {
        TarEntry {
            name: name.to_string(),
            kind,
            link: link.to_string(),
            mode: 0o755,
        }
    }
}

/// Raw ustar headers, so that any name (absolute, `..`) can be written.
fn tar_of(entries: &[TarEntry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let data: &[u8] = if e.kind == tar::EntryType::Regular {
            b"data\n"
        } else {
            b""
        };
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(e.kind);
        h.set_size(data.len() as u64);
        h.set_mode(e.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        let u = h.as_ustar_mut().unwrap();
        let name = &e.name.as_bytes()[..e.name.len().min(100)];
        u.name[..name.len()].copy_from_slice(name);
        let link = &e.link.as_bytes()[..e.link.len().min(100)];
        u.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn arbitrary_tar_entries(host: String) -> impl Strategy<Value = Vec<TarEntry>> {
    let kind = prop::sample::select(vec![
        tar::EntryType::Regular,
        tar::EntryType::Directory,
        tar::EntryType::Symlink,
        tar::EntryType::Link,
        tar::EntryType::Char,
        tar::EntryType::Fifo,
    ]);
    let link = prop_oneof![
        Just(host.clone()),
        Just(format!("{host}/etc")),
        Just(format!("{host}/etc/passwd")),
        Just("../../host".to_string()),
        Just("/etc/passwd".to_string()),
        hostile_name(),
    ];
    let mode = prop::sample::select(vec![0o644u32, 0o755, 0o4755, 0o2755, 0o1777]);
    prop::collection::vec(
        (hostile_name(), kind, link, mode).prop_map(|(name, kind, link, mode)| TarEntry {
            name,
            kind,
            link,
            mode,
        }),
        1..8,
    )
}

/// A sandbox with `host/` beside `upper/`: applying must change nothing but `upper/`.
fn apply_checked(tar: &[u8], deleted: Option<&[u8]>) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let (ck, upper, host) = (
        tmp.path().join("ck"),
        tmp.path().join("upper"),
        tmp.path().join("host"),
    );
    for d in [&ck, &upper, &host.join("etc")] {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(host.join("etc/passwd"), b"root:x:0:0\n").unwrap();
    fs::write(ck.join(ROOTFS_DIFF_TAR), tar).unwrap();
    if let Some(deleted) = deleted {
        fs::write(ck.join(DELETED_FILES), deleted).unwrap();
    }
    let before = snapshot(tmp.path(), &upper);
    let result = rootfs::apply_diff(&ck, &upper, &[]);
    let after = snapshot(tmp.path(), &upper);
    prop_assert!(
        after == before,
        "written outside upper/: {:?}",
        changed(&before, &after)
    );
    if let Err(e) = result {
        prop_assert!(!e.to_string().contains('\n'));
        prop_assert_eq!(
            fs::read_dir(&upper).unwrap().count(),
            0,
            "refused ({}) but upper/ not empty",
            e
        );
    } else {
        for item in walkdir::WalkDir::new(&upper).min_depth(1) {
            let meta = item.unwrap().into_path().symlink_metadata().unwrap();
            prop_assert!(meta.is_file() || meta.is_dir() || meta.is_symlink() || meta.rdev() == 0);
            if !meta.is_dir() {
                prop_assert_eq!(meta.mode() & 0o6000, 0, "set-id file applied");
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_valid_archives_never_escape_or_panic((edits, truncate) in mutations()) {
        unpack_checked(&mutate(valid_archive(), &edits, truncate))?;
    }

    #[test]
    fn arbitrary_bytes_are_refused_as_archives(
        prefix in prop::sample::select(vec![&b""[..], b"PK\x03\x04", b"PK\x05\x06"]),
        body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut bytes = prefix.to_vec();
        bytes.extend(body);
        let tmp = tempfile::tempdir().unwrap();
        let zip = tmp.path().join("a.zip");
        fs::write(&zip, &bytes).unwrap();
        prop_assert!(archive::open(&zip).is_err());
    }

    #[test]
    fn mutated_manifests_never_panic((edits, truncate) in mutations()) {
        let manifest = mutate(valid_manifest(), &edits, truncate);
        unpack_checked(&zip_with_manifest(&manifest))?;
    }

    #[test]
    fn arbitrary_manifests_never_panic_and_never_pass_unsafe_names(manifest in arbitrary_manifest()) {
        let tmp = tempfile::tempdir().unwrap();
        let zip = tmp.path().join("m.zip");
        fs::write(&zip, zip_with_manifest(&manifest.encode_to_vec())).unwrap();
        if let Ok(open) = archive::open(&zip) {
            for entry in &open.manifest.entries {
                prop_assert!(!entry.name.starts_with('/') && !entry.name.split('/').any(|c| c == ".."));
                prop_assert_eq!(entry.mode & !0o777, 0);
                prop_assert!(entry.kind == EntryKind::File as i32 || entry.kind == EntryKind::Directory as i32);
            }
        }
        unpack_checked(&zip_with_manifest(&manifest.encode_to_vec()))?;
    }

    #[test]
    fn mutated_valid_diffs_never_escape_the_rootfs((edits, truncate) in mutations()) {
        if is_root() {
            apply_checked(&mutate(&valid_tar(), &edits, truncate), None)?;
        }
    }

    #[test]
    fn arbitrary_diffs_never_escape_the_rootfs(
        entries in arbitrary_tar_entries(std::env::temp_dir().join("podmigrate-no-such-host").display().to_string()),
        deleted in prop::collection::vec(hostile_name(), 0..3),
    ) {
        if is_root() {
            let deleted: Vec<String> = deleted.into_iter().map(|d| format!("/{d}")).collect();
            apply_checked(&tar_of(&entries), Some(&serde_json::to_vec(&deleted).unwrap()))?;
        }
    }
}

/// The arbitrary-diff property aims links at a fixed host path; this one aims them at the
/// sandbox's real `host/` directory, which exists, so a followed link would show.
#[test]
fn diffs_aimed_at_a_real_host_directory_never_reach_it() {
    if !is_root() {
        return;
    }
    let mut runner = proptest::test_runner::TestRunner::new(config());
    let tmp = tempfile::tempdir().unwrap();
    let host = tmp.path().join("host");
    fs::create_dir_all(host.join("etc")).unwrap();
    fs::write(host.join("etc/passwd"), b"root:x:0:0\n").unwrap();
    let strategy = arbitrary_tar_entries(host.display().to_string());
    runner
        .run(&strategy, |entries| {
            let before = snapshot(&host, Path::new("/nonexistent"));
            let upper = tempfile::tempdir().unwrap();
            let ck = tempfile::tempdir().unwrap();
            fs::write(ck.path().join(ROOTFS_DIFF_TAR), tar_of(&entries)).unwrap();
            let _ = rootfs::apply_diff(ck.path(), upper.path(), &[]);
            let after = snapshot(&host, Path::new("/nonexistent"));
            prop_assert!(
                after == before,
                "host changed: {:?}",
                changed(&before, &after)
            );
            Ok(())
        })
        .unwrap();
}

/// The base the mutations start from is itself accepted, so mutations test refusals of
/// something that was valid.
#[test]
fn the_unmutated_inputs_are_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = tmp.path().join("a.zip");
    fs::write(&zip, valid_archive()).unwrap();
    archive::unpack(&zip, &tmp.path().join("dest"), &UnpackOptions::default()).unwrap();
    if is_root() {
        let upper = tmp.path().join("upper");
        fs::create_dir(&upper).unwrap();
        let applied = rootfs::apply_diff(&tmp.path().join("dest"), &upper, &[]).unwrap();
        assert_eq!(applied.files, 2);
        assert_eq!(applied.deleted, vec!["/etc/motd".to_string()]);
        assert_eq!(fs::read(upper.join("tmp/hard")).unwrap(), b"data\n");
    }
}
