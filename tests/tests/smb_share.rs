//! The share over real SMB: a private smbd on the host side of two nodes' links, mounted on
//! node-a and node-b through FUSE (smbnetfs) from inside each node's network namespace
//! (podmigrate_e2e::smb), so every byte crosses the links like on a cluster.
//!
//! * The original proof of concept's upload race, reproduced: a writer on node-a writes an
//!   archive straight under its final name, in pieces; a reader on node-b polls for the name as
//!   the PoC did and reads the archive as soon as it appears. It sees a short file, and our
//!   reader refuses it.
//! * The same situation with our commit protocol (pack under a temporary name, fsync, rename,
//!   directory fsync; the reader waits with `wait_for_archive`): a spy on node-b that lists the
//!   directory all the while sees the temporary name grow, but never the final name at less than
//!   its full size; the archive verifies on node-b and unpacks byte-identical to the source.
//!
//! Needs root, smbd, smbnetfs, fusermount3, /dev/fuse and iproute2 (scripts/setup.sh); skips
//! otherwise, unless `PODMIGRATE_E2E_REQUIRE` is set.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use podmigrate_checkpoint::archive::{self, PackOptions, UnpackOptions};
use podmigrate_checkpoint::share::{archive_path, wait_for_archive};
use podmigrate_e2e::cluster::{NODE_A, NODE_B};
use podmigrate_e2e::harness::{is_root, skip, tree_contents, Scratch};
use podmigrate_e2e::netns::{unique_tag, NetNs, NETNS_PREFIX};
use podmigrate_e2e::smb::{self, SmbShare};

/// One share at a time (the two tests would otherwise share two cores' worth of SMB traffic).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Two node namespaces and the share mounted in each. Fields drop in order: mounts and server,
/// then the namespaces, then the scratch directory.
struct Fixture {
    share: SmbShare,
    _namespaces: Vec<NetNs>,
    scratch: Scratch,
}

impl Fixture {
    fn start() -> Fixture {
        let scratch = Scratch::new("podmigrate-smb-").unwrap();
        let tag = unique_tag();
        let namespaces: Vec<NetNs> = [NODE_A, NODE_B]
            .iter()
            .enumerate()
            .map(|(i, node)| {
                NetNs::create(
                    &format!("{NETNS_PREFIX}{tag}-{node}"),
                    &format!("pm{tag}{i}"),
                )
                .unwrap()
            })
            .collect();
        let nodes: Vec<(&str, &str, _)> = [NODE_A, NODE_B]
            .iter()
            .zip(&namespaces)
            .map(|(node, ns)| (*node, ns.name.as_str(), ns.host_ip))
            .collect();
        let share = SmbShare::start(scratch.path(), &nodes).unwrap();
        Fixture {
            share,
            _namespaces: namespaces,
            scratch,
        }
    }

    /// The share as `node` sees it.
    fn on(&self, node: &str) -> &Path {
        let i = [NODE_A, NODE_B].iter().position(|n| *n == node).unwrap();
        &self.share.mounts[i].share_root
    }
}

fn ready() -> Option<std::sync::MutexGuard<'static, ()>> {
    let reason = if !is_root() {
        Some("needs root (network namespaces, FUSE mounts)".to_string())
    } else {
        smb::skip_reason().or_else(podmigrate_e2e::netns::skip_reason)
    };
    if let Some(reason) = reason {
        skip(&reason);
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

/// A checkpoint-like directory: a page image of incompressible bytes (as a heap is, mostly),
/// a compressible one, and small metadata files.
fn checkpoint_dir(root: &Path, mib: usize) -> PathBuf {
    let dir = root.join("checkpoint");
    fs::create_dir_all(dir.join("checkpoint")).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = Vec::with_capacity(mib << 20);
    while noise.len() < mib << 20 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        noise.extend_from_slice(&state.to_le_bytes());
    }
    fs::write(dir.join("checkpoint").join("pages-1.img"), &noise).unwrap();
    let text: String = (0..200_000).map(|i| format!("line {i}\n")).collect();
    fs::write(dir.join("checkpoint").join("pages-2.img"), text).unwrap();
    fs::write(dir.join("checkpoint").join("inventory.img"), b"inventory").unwrap();
    fs::write(dir.join("config.dump"), b"{\"id\":\"app\"}").unwrap();
    fs::write(dir.join("rootfs-diff.tar"), vec![0u8; 10240]).unwrap();
    dir
}

#[test]
fn a_file_written_under_its_final_name_reaches_a_polling_reader_partial() {
    let Some(_turn) = ready() else { return };
    let t0 = Instant::now();
    let fx = Fixture::start();
    eprintln!("[{:>7.2?}] smbd and both mounts up", t0.elapsed());
    let src = checkpoint_dir(fx.scratch.path(), 24);
    let local = fx.scratch.path().join("local.zip");
    archive::pack(&src, &local, &PackOptions::default()).unwrap();
    let bytes = fs::read(&local).unwrap();

    let on_a = archive_path(fx.on(NODE_A), "default", "counter", "counter").unwrap();
    let on_b = archive_path(fx.on(NODE_B), "default", "counter", "counter").unwrap();
    fs::create_dir_all(on_a.parent().unwrap()).unwrap();

    // node-b, as the PoC: poll for the name, then unzip at once.
    let reader = {
        let on_b = on_b.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !on_b.exists() {
                assert!(
                    Instant::now() < deadline,
                    "{} never appeared",
                    on_b.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let seen = fs::metadata(&on_b).unwrap().len();
            let verdict = archive::verify(&on_b, &UnpackOptions::default());
            (seen, verdict.map(|v| v.manifest_sha256))
        })
    };
    // node-a, as the PoC: the archive straight under its final name, piece by piece.
    let started = Instant::now();
    let mut file = fs::File::create(&on_a).unwrap();
    for piece in bytes.chunks(512 << 10) {
        file.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    file.sync_all().unwrap();
    drop(file);
    let upload = started.elapsed();
    let (seen, verdict) = reader.join().unwrap();
    eprintln!(
        "[{:>7.2?}] node-a wrote {} bytes in {upload:.2?}; node-b saw the name at {seen} bytes: {verdict:?}",
        t0.elapsed(),
        bytes.len()
    );
    assert!(
        seen < bytes.len() as u64,
        "node-b saw {seen} of {} bytes: the race did not show",
        bytes.len()
    );
    let err = verdict.expect_err("a partial archive must not verify");
    assert!(
        err.to_string().contains(&on_b.display().to_string()),
        "the error names the archive: {err}"
    );
    // Only the timing was wrong: the finished upload verifies on node-b.
    let verified = archive::verify(&on_b, &UnpackOptions::default()).unwrap();
    assert_eq!(verified.archive_bytes, bytes.len() as u64);
}

#[test]
fn the_commit_protocol_never_shows_a_partial_archive_across_smb() {
    let Some(_turn) = ready() else { return };
    let t0 = Instant::now();
    let fx = Fixture::start();
    eprintln!("[{:>7.2?}] smbd and both mounts up", t0.elapsed());
    let src = checkpoint_dir(fx.scratch.path(), 24);
    let on_a = archive_path(fx.on(NODE_A), "default", "counter", "counter").unwrap();
    let on_b = archive_path(fx.on(NODE_B), "default", "counter", "counter").unwrap();
    fs::create_dir_all(on_a.parent().unwrap()).unwrap();
    let dir_b = on_b.parent().unwrap().to_owned();
    let final_name = on_b.file_name().unwrap().to_owned();

    // node-b's spy: every listing of the directory, with the size of each name.
    let stop = Arc::new(AtomicBool::new(false));
    let spy = {
        let stop = stop.clone();
        let dir_b = dir_b.clone();
        std::thread::spawn(move || {
            let mut listings: Vec<Vec<(String, u64)>> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut listing = Vec::new();
                for entry in fs::read_dir(&dir_b).unwrap().flatten() {
                    // A name may vanish between the listing and the stat (the rename).
                    if let Ok(meta) = fs::metadata(entry.path()) {
                        listing
                            .push((entry.file_name().to_string_lossy().into_owned(), meta.len()));
                    }
                }
                listings.push(listing);
                std::thread::sleep(Duration::from_millis(5));
            }
            listings
        })
    };
    // node-b's shim: wait for the committed archive, then verify and unpack it at once.
    let reader = {
        let on_b = on_b.clone();
        let out = fx.scratch.path().join("unpacked");
        std::thread::spawn(move || {
            let waited = Instant::now();
            wait_for_archive(
                &on_b,
                Duration::from_secs(90),
                Duration::from_secs(5),
                |_| Ok(()),
            )
            .unwrap();
            let appeared = waited.elapsed();
            let size = fs::metadata(&on_b).unwrap().len();
            let verified = archive::unpack(&on_b, &out, &UnpackOptions::default());
            (appeared, size, verified, out)
        })
    };
    // node-a's shim: pack onto the share.
    std::thread::sleep(Duration::from_millis(200));
    let summary = archive::pack(&src, &on_a, &PackOptions::default()).unwrap();
    eprintln!(
        "[{:>7.2?}] node-a packed {} bytes onto the share in {:.2?}",
        t0.elapsed(),
        summary.archive_bytes,
        summary.elapsed
    );
    let (appeared, size, verified, out) = reader.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let listings = spy.join().unwrap();
    eprintln!(
        "[{:>7.2?}] node-b saw the archive after {appeared:.2?} at {size} bytes; the spy listed the directory {} times",
        t0.elapsed(),
        listings.len()
    );

    assert_eq!(
        size, summary.archive_bytes,
        "node-b's first look at the archive"
    );
    let verified = verified.unwrap();
    assert_eq!(verified.manifest_sha256, summary.manifest_sha256);
    assert_eq!(
        tree_contents(&out).unwrap(),
        tree_contents(&src).unwrap(),
        "unpacked on node-b, byte for byte"
    );
    let final_name = final_name.to_string_lossy();
    let mut temp_seen = 0;
    for listing in &listings {
        for (name, len) in listing {
            if *name == final_name {
                assert_eq!(
                    *len, summary.archive_bytes,
                    "node-b listed {name} at {len} bytes, not the committed {}",
                    summary.archive_bytes
                );
            } else {
                assert!(name.starts_with(".counter.zip.tmp-"), "unexpected {name}");
                temp_seen += 1;
            }
        }
    }
    assert!(
        temp_seen > 0,
        "the spy never saw the temporary archive: the window this test is about did not open"
    );
}
