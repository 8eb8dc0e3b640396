//! `pack_following`: packing a pages image from its pipe while another thread still writes it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::tests::{assert_same_tree, sample_checkpoint};
use super::*;

const PAGES: &str = "checkpoint/pages-1.img";
const CHUNK: usize = 64 << 10;

fn follow<'a>(pipe: &'a PagesPipe, done: &'a AtomicBool, failed: &'a AtomicBool) -> Follow<'a> {
    Follow {
        pipe,
        done,
        failed,
        poll: Duration::from_millis(1),
        timeout: Duration::from_secs(30),
    }
}

fn options() -> PackOptions {
    PackOptions {
        chunk_size: CHUNK,
        threads: 2,
        ..PackOptions::default()
    }
}

/// Moves the pages image of a sample checkpoint aside, puts its pipe in its place, then packs
/// the directory while a writer (as CRIU does) opens the pipe's path and writes the image in
/// `pieces` uneven writes; the unpacked result must equal the sample exactly.
fn pack_while_writing(total_len: usize, pieces: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let reference = sample_checkpoint(tmp.path());
    let pages = super::tests::sample_pages(total_len, total_len / 3);
    fs::write(reference.join(PAGES), &pages).unwrap();
    fs::set_permissions(reference.join(PAGES), fs::Permissions::from_mode(0o600)).unwrap();
    let dir = tmp.path().join("growing");
    fs::create_dir_all(dir.join("checkpoint")).unwrap();
    for entry in walkdir::WalkDir::new(&reference).min_depth(1) {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(&reference).unwrap();
        if rel == Path::new(PAGES) {
            continue;
        }
        if entry.file_type().is_dir() {
            fs::create_dir_all(dir.join(rel)).unwrap();
            continue;
        }
        fs::copy(entry.path(), dir.join(rel)).unwrap();
        fs::set_permissions(dir.join(rel), entry.metadata().unwrap().permissions()).unwrap();
    }
    let pipe = PagesPipe::create(&dir, PAGES).unwrap();
    let archive = tmp.path().join("out.zip");
    let (done, failed) = (AtomicBool::new(false), AtomicBool::new(false));
    let summary = std::thread::scope(|scope| {
        let packer = scope
            .spawn(|| pack_following(&dir, &archive, &options(), &follow(&pipe, &done, &failed)));
        // As CRIU opens an image: create, truncate, write only.
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(PAGES))
            .unwrap();
        let step = total_len.div_ceil(pieces.max(1)).max(1);
        for (k, piece) in pages.chunks(step).enumerate() {
            // Uneven: split each piece once more so writes straddle chunk boundaries.
            let (a, b) = piece.split_at(piece.len() / (2 + k % 3));
            file.write_all(a).unwrap();
            std::thread::sleep(Duration::from_millis(2));
            file.write_all(b).unwrap();
        }
        drop(file);
        done.store(true, Ordering::Release);
        packer.join().unwrap()
    })
    .unwrap();
    assert_eq!(summary.content_bytes as usize, dir_bytes(&reference));
    assert!(!dir.join(PAGES).exists(), "the pipe is removed once read");
    let out = tmp.path().join("unpacked");
    unpack(&archive, &out, &UnpackOptions::default()).unwrap();
    assert_same_tree(&reference, &out);
    let opened = open(&archive).unwrap();
    assert_eq!(
        opened.manifest.entries[0].name, PAGES,
        "the followed file goes first"
    );
    assert_eq!(
        opened.manifest.entries[0].chunk_compressed_sizes.len(),
        total_len.div_ceil(CHUNK).max(1)
    );
}

fn dir_bytes(dir: &Path) -> usize {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().unwrap().len() as usize)
        .sum()
}

#[test]
fn a_file_packed_while_it_grows_unpacks_exactly() {
    pack_while_writing(1_000_000, 7);
}

#[test]
fn a_file_ending_on_a_chunk_boundary() {
    pack_while_writing(4 * CHUNK, 3);
}

#[test]
fn an_empty_followed_file() {
    pack_while_writing(0, 1);
}

#[test]
fn a_failed_writer_abandons_the_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sample_checkpoint(tmp.path());
    let archive = tmp.path().join("out.zip");
    fs::remove_file(dir.join(PAGES)).unwrap();
    let pipe = PagesPipe::create(&dir, PAGES).unwrap();
    let (done, failed) = (AtomicBool::new(false), AtomicBool::new(false));
    let err = std::thread::scope(|scope| {
        let packer = scope
            .spawn(|| pack_following(&dir, &archive, &options(), &follow(&pipe, &done, &failed)));
        std::thread::sleep(Duration::from_millis(20));
        failed.store(true, Ordering::Release);
        packer.join().unwrap()
    })
    .unwrap_err();
    assert!(err.to_string().contains("the writer failed"), "{err}");
    assert!(!archive.exists());
    let left: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("ck")],
        "no temporary archive left"
    );
}

#[test]
fn a_writer_that_never_finishes_times_out_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sample_checkpoint(tmp.path());
    let archive = tmp.path().join("out.zip");
    fs::remove_file(dir.join(PAGES)).unwrap();
    let pipe = PagesPipe::create(&dir, PAGES).unwrap();
    let (done, failed) = (AtomicBool::new(false), AtomicBool::new(false));
    let mut f = follow(&pipe, &done, &failed);
    f.timeout = Duration::from_millis(50);
    let err = pack_following(&dir, &archive, &options(), &f).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("pages-1.img") && msg.contains("50ms"), "{msg}");
    assert!(!archive.exists());
}

/// A pack that fails while the writer is still writing (here: the archive's directory is
/// gone) keeps reading the pipe until the writer is done: CRIU must never block on a full pipe
/// with the container frozen.
#[test]
fn a_failed_pack_drains_the_pipe_until_the_writer_is_done() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sample_checkpoint(tmp.path());
    fs::remove_file(dir.join(PAGES)).unwrap();
    let pipe = PagesPipe::create(&dir, PAGES).unwrap();
    let archive = tmp.path().join("missing-dir/out.zip");
    let (done, failed) = (AtomicBool::new(false), AtomicBool::new(false));
    let written = 8 << 20; // far more than the pipe holds
    let err = std::thread::scope(|scope| {
        let packer = scope
            .spawn(|| pack_following(&dir, &archive, &options(), &follow(&pipe, &done, &failed)));
        let mut file = OpenOptions::new()
            .write(true)
            .open(dir.join(PAGES))
            .unwrap();
        file.write_all(&vec![7u8; written]).unwrap();
        drop(file);
        done.store(true, Ordering::Release);
        packer.join().unwrap()
    })
    .unwrap_err();
    assert!(err.to_string().contains("missing-dir"), "{err}");
}
