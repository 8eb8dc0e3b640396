//! Sealed archives through the real binary: `--key-file` on pack, unpack, verify and inspect,
//! `podmigrate key`, and the error contract (exit 1, one stderr line naming the problem,
//! nothing left behind). The key must never show: not in the archive, not in any output, not
//! even with debug logging on.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64ct::{Base64, Encoding};

const KEY: [u8; 32] = *b"sealed-cli-test-key-0123456789ab";

fn podmigrate_env(args: &[&str], rust_log: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_podmigrate"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("PODMIGRATE_KEY_FILE");
    if let Some(filter) = rust_log {
        command.env("RUST_LOG", filter);
    }
    command.output().expect("running podmigrate")
}

fn podmigrate(args: &[&str]) -> Output {
    podmigrate_env(args, None)
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

fn checkpoint_dir(root: &Path) -> PathBuf {
    let dir = root.join("ck");
    fs::create_dir_all(dir.join("checkpoint")).unwrap();
    let mut x: u32 = 2_463_534_242;
    let pages: Vec<u8> = (0..300_000)
        .map(|i| {
            if i % 2 == 0 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            } else {
                b'p'
            }
        })
        .collect();
    fs::write(dir.join("checkpoint/pages-1.img"), pages).unwrap();
    fs::write(dir.join("checkpoint/inventory.img"), b"inventory-content").unwrap();
    fs::write(
        dir.join("config.dump"),
        r#"{"id":"abc","name":"counter","rootfsImageName":"localhost/counter:1"}"#,
    )
    .unwrap();
    dir
}

fn key_file(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, content).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn assert_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_fails_cleanly(args: &[&str], expected: &str) -> String {
    let out = podmigrate(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr:?}");
    assert!(
        stderr.contains(expected),
        "{args:?}: expected {expected:?} in {stderr:?}"
    );
    assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
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

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn sealed_pack_round_trips_and_the_key_shows_nowhere() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = checkpoint_dir(tmp.path());
    let b64 = Base64::encode_string(&KEY);
    // The Secret's way: base64 text with a newline, mode 0400.
    let key = key_file(tmp.path(), "key", format!("{b64}\n").as_bytes(), 0o400);
    let share = tmp.path().join("share");
    fs::create_dir(&share).unwrap();
    let zip = share.join("ck.zip");

    let pack = podmigrate_env(
        &["pack", &p(&ck), &p(&zip), "--key-file", &p(&key)],
        Some("trace"),
    );
    let stdout = assert_ok(&pack);
    let key_id = assert_ok(&podmigrate(&["key", "id", &p(&key)]))
        .trim()
        .to_string();
    assert_eq!(key_id.len(), 16, "{key_id}");
    assert!(
        stdout.contains(&format!("sealed with key {key_id}")),
        "{stdout}"
    );
    assert_eq!(names(&share), ["ck.zip"]);
    assert_eq!(
        fs::metadata(&zip).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let verify = podmigrate_env(&["verify", &p(&zip), "--key-file", &p(&key)], Some("trace"));
    assert!(assert_ok(&verify).starts_with("ok "));
    let dest = tmp.path().join("dest");
    let unpack = podmigrate_env(
        &["unpack", &p(&zip), &p(&dest), "--key-file", &p(&key)],
        Some("trace"),
    );
    assert_ok(&unpack);
    assert_eq!(
        fs::read(dest.join("checkpoint/pages-1.img")).unwrap(),
        fs::read(ck.join("checkpoint/pages-1.img")).unwrap()
    );
    let inspect = podmigrate(&["inspect", &p(&zip), "--key-file", &p(&key)]);
    assert!(
        assert_ok(&inspect).contains(&format!("Sealed: AES-256-GCM, key id {key_id}")),
        "{}",
        String::from_utf8_lossy(&inspect.stdout)
    );

    // The key in none of its forms: not in the archive, not in any output or log line.
    let archive = fs::read(&zip).unwrap();
    let hex: String = KEY.iter().map(|b| format!("{b:02x}")).collect();
    for (what, haystack) in [
        ("the archive", archive.clone()),
        ("pack's output", [pack.stdout, pack.stderr].concat()),
        ("verify's output", [verify.stdout, verify.stderr].concat()),
        ("unpack's output", [unpack.stdout, unpack.stderr].concat()),
        (
            "inspect's output",
            [inspect.stdout, inspect.stderr].concat(),
        ),
    ] {
        for needle in [
            &KEY[..],
            b64.as_bytes(),
            &b64.as_bytes()[..20],
            hex.as_bytes(),
        ] {
            assert!(!contains(&haystack, needle), "the key shows in {what}");
        }
    }
    assert!(!contains(&archive, b"inventory-content"));
}

#[test]
fn key_policy_and_tampering_fail_with_one_line_and_no_residue() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = checkpoint_dir(tmp.path());
    let key = key_file(tmp.path(), "key", &KEY, 0o600);
    let other = key_file(
        tmp.path(),
        "other",
        b"another-cluster-key-0123456789ab",
        0o600,
    );
    let share = tmp.path().join("share");
    fs::create_dir(&share).unwrap();
    let sealed = share.join("sealed.zip");
    let plain = share.join("plain.zip");
    assert_ok(&podmigrate(&[
        "pack",
        &p(&ck),
        &p(&sealed),
        "--key-file",
        &p(&key),
    ]));
    assert_ok(&podmigrate(&["pack", &p(&ck), &p(&plain)]));
    let dest = tmp.path().join("dest");

    assert_fails_cleanly(&["verify", &p(&sealed)], "this node has no archive key");
    assert_fails_cleanly(&["unpack", &p(&sealed), &p(&dest)], "no archive key");
    assert_fails_cleanly(&["inspect", &p(&sealed)], "no archive key");
    assert_fails_cleanly(
        &["unpack", &p(&plain), &p(&dest), "--key-file", &p(&key)],
        "the archive is not sealed",
    );
    assert_fails_cleanly(
        &["verify", &p(&sealed), "--key-file", &p(&other)],
        "sealed with another key",
    );

    let original = fs::read(&sealed).unwrap();
    for offset in [original.len() / 3, original.len() / 2] {
        let mut bytes = original.clone();
        bytes[offset] ^= 0x08;
        fs::write(&sealed, &bytes).unwrap();
        assert_fails_cleanly(
            &["unpack", &p(&sealed), &p(&dest), "--key-file", &p(&key)],
            "failed authentication",
        );
    }
    assert!(!dest.exists(), "no destination left behind");

    // A bad key file: pack refuses before writing anything.
    let loose = key_file(tmp.path(), "loose", &KEY, 0o644);
    let short = key_file(tmp.path(), "short", b"0123456789", 0o600);
    let out = share.join("new.zip");
    let err = assert_fails_cleanly(
        &["pack", &p(&ck), &p(&out), "--key-file", &p(&loose)],
        "other users may access it (mode 0644",
    );
    assert!(err.contains(&p(&loose)), "{err}");
    assert_fails_cleanly(
        &["pack", &p(&ck), &p(&out), "--key-file", &p(&short)],
        "neither 32 raw bytes nor the base64 of 32 bytes",
    );
    assert_eq!(names(&share), ["plain.zip", "sealed.zip"]);
}

#[test]
fn key_install_copies_the_key_0600_and_optional_removes_a_stale_one() {
    let tmp = tempfile::tempdir().unwrap();
    let b64 = Base64::encode_string(&KEY);
    let secret = key_file(
        tmp.path(),
        "secret-key",
        format!("{b64}\n").as_bytes(),
        0o400,
    );
    let host = tmp.path().join("host/keys/archive.key");
    let out = assert_ok(&podmigrate(&[
        "key",
        "install",
        "--from",
        &p(&secret),
        "--to",
        &p(&host),
    ]));
    assert!(out.starts_with("installed archive key "), "{out}");
    assert!(!out.contains(&b64[..12]), "{out}");
    assert_eq!(fs::read(&host).unwrap(), KEY);
    assert_eq!(
        fs::metadata(&host).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let id = |f: &Path| assert_ok(&podmigrate(&["key", "id", &p(f)]));
    assert_eq!(id(&host), id(&secret));

    let absent = tmp.path().join("no-secret/key");
    assert_fails_cleanly(
        &["key", "install", "--from", &p(&absent), "--to", &p(&host)],
        "opening",
    );
    assert!(host.exists(), "a failed install keeps the installed key");
    assert_ok(&podmigrate(&[
        "key",
        "install",
        "--from",
        &p(&absent),
        "--to",
        &p(&host),
        "--optional",
    ]));
    assert!(
        !host.exists(),
        "an absent optional Secret leaves no stale key"
    );
}
