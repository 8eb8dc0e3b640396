//! The archive commands as an operator meets them: real binary, real files. Bad input must end
//! with exit code 1, exactly one line on stderr naming the problem, and nothing left behind.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn podmigrate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_podmigrate"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running podmigrate")
}

fn checkpoint_dir(root: &Path) -> std::path::PathBuf {
    let dir = root.join("ck");
    fs::create_dir_all(dir.join("checkpoint")).unwrap();
    // Incompressible, so the page data is most of the archive.
    let mut x: u32 = 2_463_534_242;
    let pages: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    fs::write(dir.join("checkpoint/pages-1.img"), pages).unwrap();
    fs::write(dir.join("checkpoint/inventory.img"), b"inventory").unwrap();
    fs::write(
        dir.join("config.dump"),
        r#"{"id":"abc","name":"counter","rootfsImageName":"localhost/counter:1"}"#,
    )
    .unwrap();
    dir
}

/// Runs a failing command and checks the error contract; returns the one stderr line.
fn assert_fails_cleanly(args: &[&str], expected: &str) -> String {
    let out = podmigrate(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: one line on stderr: {stderr:?}"
    );
    assert!(
        stderr.contains(expected),
        "{args:?}: expected {expected:?} in {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn pack_verify_inspect_unpack_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = checkpoint_dir(tmp.path());
    let zip = tmp.path().join("ck.zip");
    let p = |s: &Path| s.to_str().unwrap().to_string();

    let out = podmigrate(&[
        "pack",
        &p(&ck),
        &p(&zip),
        "--pod",
        "counter",
        "--namespace",
        "default",
        "--clone-pod-uid",
        "uid-of-the-clone",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("manifest sha256"));

    let out = podmigrate(&["verify", &p(&zip)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = podmigrate(&["inspect", &p(&zip)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for column in [
        "CONTAINER",
        "CHKPT SIZE",
        "ROOT FS DIFF SIZE",
        "counter",
        "default/counter",
        "localhost/counter:1",
        "Made for clone: pod uid uid-of-the-clone",
    ] {
        assert!(text.contains(column), "inspect lacks {column:?}:\n{text}");
    }

    let out = podmigrate(&["inspect", "--json", &p(&zip)]);
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("inspect --json is JSON");
    assert_eq!(json["source"]["pod"], "counter");
    assert_eq!(json["source"]["clonePodUid"], "uid-of-the-clone");
    assert_eq!(json["compression"], "zstd");
    assert_eq!(json["checkpointSize"], 300_009);
    let pages = json["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "checkpoint/pages-1.img")
        .unwrap();
    assert_eq!(pages["sha256"].as_str().unwrap().len(), 64);

    let dest = tmp.path().join("dest");
    let out = podmigrate(&["unpack", &p(&zip), &p(&dest)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read(dest.join("checkpoint/pages-1.img")).unwrap(),
        fs::read(ck.join("checkpoint/pages-1.img")).unwrap()
    );
}

#[test]
fn deflate_archives_open_with_info_zip() {
    if Command::new("unzip").arg("-v").output().is_err() {
        eprintln!("skipped: unzip is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ck = checkpoint_dir(tmp.path());
    let zip = tmp.path().join("ck.zip");
    let out = podmigrate(&[
        "pack",
        "--compression",
        "deflate",
        ck.to_str().unwrap(),
        zip.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let test = Command::new("unzip").arg("-tq").arg(&zip).output().unwrap();
    assert!(
        test.status.success(),
        "unzip -t: {}",
        String::from_utf8_lossy(&test.stdout)
    );
    let dest = tmp.path().join("unzipped");
    let out = Command::new("unzip")
        .arg("-q")
        .arg(&zip)
        .arg("-d")
        .arg(&dest)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        fs::read(dest.join("checkpoint/pages-1.img")).unwrap(),
        fs::read(ck.join("checkpoint/pages-1.img")).unwrap()
    );
}

#[test]
fn bad_input_fails_with_one_line_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let ck = checkpoint_dir(root);
    let good = root.join("good.zip");
    assert!(podmigrate(&["pack", &s(&ck), &s(&good)]).status.success());

    // Missing archive, for each reader.
    for cmd in ["verify", "inspect"] {
        assert_fails_cleanly(
            &[cmd, &s(&root.join("missing.zip"))],
            "missing.zip: No such file",
        );
    }
    assert_fails_cleanly(
        &[
            "unpack",
            &s(&root.join("missing.zip")),
            &s(&root.join("out")),
        ],
        "No such file",
    );
    assert!(!root.join("out").exists());

    // Not a zip.
    let text = root.join("text.zip");
    fs::write(&text, "hello\n".repeat(50)).unwrap();
    assert_fails_cleanly(&["verify", &s(&text)], "not a valid zip archive");

    // Truncated.
    let bytes = fs::read(&good).unwrap();
    let truncated = root.join("truncated.zip");
    fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    assert_fails_cleanly(
        &["unpack", &s(&truncated), &s(&root.join("out"))],
        "not a valid zip archive",
    );
    assert!(!root.join("out").exists());

    // A flipped bit in the page data.
    let mut flipped = bytes.clone();
    let at = bytes.len() / 3;
    flipped[at] ^= 0x40;
    let flipped_path = root.join("flipped.zip");
    fs::write(&flipped_path, &flipped).unwrap();
    assert_fails_cleanly(
        &["unpack", &s(&flipped_path), &s(&root.join("out"))],
        "pages-1.img",
    );
    assert!(!root.join("out").exists());

    // A destination that is not empty is left alone.
    let busy = root.join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("mine"), b"keep").unwrap();
    assert_fails_cleanly(&["unpack", &s(&good), &s(&busy)], "not an empty directory");
    assert_eq!(names(&busy), ["mine"]);

    // Pack: a missing directory, and an archive path whose directory does not exist.
    assert_fails_cleanly(
        &["pack", &s(&root.join("nodir")), &s(&root.join("x.zip"))],
        "nodir",
    );
    assert_fails_cleanly(
        &["pack", &s(&ck), &s(&root.join("no/such/dir/x.zip"))],
        "no/such/dir",
    );

    // Nothing but what the test made is in the work directory: no temporary archives.
    assert_eq!(
        names(root),
        [
            "busy",
            "ck",
            "flipped.zip",
            "good.zip",
            "text.zip",
            "truncated.zip"
        ]
    );
}

/// `podmigrate inspect ... | grep -q` must not panic when grep leaves early: the command ends
/// as other Unix tools do, killed by SIGPIPE, with nothing on stderr.
#[test]
fn a_report_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;

    let tmp = tempfile::tempdir().unwrap();
    let ck = checkpoint_dir(tmp.path());
    let zip = tmp.path().join("ck.zip");
    let out = podmigrate(&["pack", ck.to_str().unwrap(), zip.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut inspect = Command::new(env!("CARGO_BIN_EXE_podmigrate"))
        .args(["inspect", zip.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running podmigrate inspect");
    // The reader leaves before the report is written.
    drop(inspect.stdout.take());
    let out = inspect.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{stderr}");
    assert!(stderr.is_empty(), "nothing on stderr: {stderr:?}");
}
