//! The decision on credentials, and the image reader, on images written in CRIU's format (the
//! real images of a CRIU dump are read by `shim_checkpoint_restore`).

use podmigrate_proto::criu::ThreadCoreEntry;

use super::*;

/// The default capabilities of a containerd/CRI container.
const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

fn words(names: &[&str]) -> Vec<u32> {
    let set = CapSet::from_names(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    vec![set.0 as u32, (set.0 >> 32) as u32]
}

/// A root process with the default capabilities, as CRIU dumps the counter.
fn root_creds() -> CredsEntry {
    CredsEntry {
        cap_inh: words(&[]),
        cap_prm: words(&DEFAULT_CAPS),
        cap_eff: words(&DEFAULT_CAPS),
        cap_bnd: words(&DEFAULT_CAPS),
        cap_amb: words(&[]),
        groups: vec![0, 10],
        ..Default::default()
    }
}

fn spec(dir: &Path, process: serde_json::Value) -> PathBuf {
    let path = dir.join("config.json");
    fs::write(
        &path,
        serde_json::to_vec(&serde_json::json!({ "ociVersion": "1.1.0", "process": process }))
            .unwrap(),
    )
    .unwrap();
    path
}

fn caps(names: &[&str]) -> serde_json::Value {
    serde_json::json!({ "bounding": names, "effective": names, "permitted": names })
}

/// Writes `core-<tid>.img` as CRIU does: common magic, core magic, length, entry.
fn write_core(images: &Path, tid: u32, creds: Option<CredsEntry>) {
    let entry = CoreEntry {
        thread_core: Some(ThreadCoreEntry {
            creds,
            comm: Some("counter".into()),
        }),
    }
    .encode_to_vec();
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    bytes.extend_from_slice(&CORE_MAGIC.to_le_bytes());
    bytes.extend_from_slice(&(entry.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&entry);
    fs::write(images.join(format!("core-{tid}.img")), bytes).unwrap();
}

fn images_with(creds: &[CredsEntry]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (i, c) in creds.iter().enumerate() {
        write_core(dir.path(), 1 + i as u32, Some(c.clone()));
    }
    fs::write(dir.path().join("inventory.img"), b"not read").unwrap();
    dir
}

#[test]
fn the_sources_own_credentials_restore_under_the_same_spec() {
    let images = images_with(&[root_creds(), root_creds()]);
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec(
        tmp.path(),
        serde_json::json!({ "user": { "uid": 0, "gid": 0, "additionalGids": [0, 10] }, "capabilities": caps(&DEFAULT_CAPS) }),
    );
    assert_eq!(check(images.path(), &spec).unwrap(), 2);
}

#[test]
fn capabilities_beyond_the_spec_are_refused_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let images = images_with(&[root_creds()]);
    // The clone drops everything but CAP_KILL.
    let tight = spec(
        tmp.path(),
        serde_json::json!({ "user": { "uid": 0, "gid": 0, "additionalGids": [0, 10] }, "capabilities": caps(&["CAP_KILL"]) }),
    );
    let err = check(images.path(), &tight).unwrap_err().to_string();
    for part in [
        "the checkpoint's task 1 (counter) has credentials the clone's spec",
        &tight.display().to_string(),
        "bounding capabilities CAP_CHOWN,",
        "effective capabilities CAP_CHOWN,",
        "beyond the spec's bounding set",
    ] {
        assert!(err.contains(part), "expected {part:?} in: {err}");
    }
    assert!(!err.contains("CAP_KILL"), "{err}");
    assert!(!err.contains('\n'), "{err}");
    // A forged CAP_SYS_ADMIN under the default spec.
    let mut forged = root_creds();
    forged.cap_eff = words(&["CAP_SYS_ADMIN"]);
    forged.cap_prm = words(&["CAP_SYS_ADMIN"]);
    let images = images_with(&[root_creds(), forged]);
    let default = spec(
        tmp.path(),
        serde_json::json!({ "user": { "uid": 0, "gid": 0, "additionalGids": [0, 10] }, "capabilities": caps(&DEFAULT_CAPS) }),
    );
    let err = check(images.path(), &default).unwrap_err().to_string();
    assert!(err.contains("task 2 (counter)"), "{err}");
    assert!(
        err.contains("permitted capabilities CAP_SYS_ADMIN"),
        "{err}"
    );
}

#[test]
fn without_cap_setuid_the_uids_must_be_the_specs_user() {
    let tmp = tempfile::tempdir().unwrap();
    let images = images_with(&[root_creds()]);
    // A clone running as 1000 with no capabilities: a root task exceeds it.
    let user = spec(
        tmp.path(),
        serde_json::json!({ "user": { "uid": 1000, "gid": 1000 }, "capabilities": caps(&[]) }),
    );
    let err = check(images.path(), &user).unwrap_err().to_string();
    for part in [
        "uid 0, not the spec's user 1000 (and no CAP_SETUID)",
        "euid 0",
        "gid 0, not the spec's group 1000",
        "supplementary groups 0,10 not in the spec",
        "permitted capabilities CAP_CHOWN",
    ] {
        assert!(err.contains(part), "expected {part:?} in: {err}");
    }
    // The same task as uid 1000 without capabilities restores.
    let mut own = root_creds();
    (own.uid, own.euid, own.suid, own.fsuid) = (1000, 1000, 1000, 1000);
    (own.gid, own.egid, own.sgid, own.fsgid) = (1000, 1000, 1000, 1000);
    own.groups = vec![1000];
    for set in [&mut own.cap_prm, &mut own.cap_eff, &mut own.cap_bnd] {
        *set = words(&[]);
    }
    let images = images_with(&[own]);
    assert_eq!(check(images.path(), &user).unwrap(), 1);
}

#[test]
fn a_user_that_may_regain_cap_setuid_may_hold_other_uids_unless_no_new_privileges() {
    let tmp = tempfile::tempdir().unwrap();
    // Running as 1000 with the default bounding set and nothing permitted: a set-uid binary in
    // the image could make it root again, so a root task is within reach...
    let mut root = root_creds();
    root.cap_prm = words(&[]);
    root.cap_eff = words(&[]);
    let images = images_with(&[root]);
    let process = |nnp: bool| {
        serde_json::json!({
            "user": { "uid": 1000, "gid": 1000, "additionalGids": [0, 10] },
            "capabilities": { "bounding": DEFAULT_CAPS, "permitted": [], "effective": [] },
            "noNewPrivileges": nnp,
        })
    };
    assert_eq!(
        check(images.path(), &spec(tmp.path(), process(false))).unwrap(),
        1
    );
    // ... but not with noNewPrivileges.
    let err = check(images.path(), &spec(tmp.path(), process(true)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("uid 0, not the spec's user 1000"), "{err}");
    // And with noNewPrivileges, permitted capabilities beyond the spec's are refused.
    let images = images_with(&[root_creds()]);
    let err = check(images.path(), &spec(tmp.path(), process(true)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("permitted capabilities CAP_CHOWN")
            && err.contains("beyond the spec's permitted set (noNewPrivileges)"),
        "{err}"
    );
}

#[test]
fn a_spec_without_capabilities_allows_none() {
    let tmp = tempfile::tempdir().unwrap();
    let images = images_with(&[root_creds()]);
    let bare = spec(
        tmp.path(),
        serde_json::json!({ "user": { "uid": 0, "gid": 0 } }),
    );
    let err = check(images.path(), &bare).unwrap_err().to_string();
    assert!(err.contains("bounding capabilities CAP_CHOWN"), "{err}");
}

#[test]
fn malformed_images_and_specs_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let good_spec = spec(
        tmp.path(),
        serde_json::json!({ "user": { "uid": 0, "gid": 0 }, "capabilities": caps(&DEFAULT_CAPS) }),
    );
    let images = tempfile::tempdir().unwrap();
    // No core image at all.
    let err = check(images.path(), &good_spec).unwrap_err().to_string();
    assert!(err.contains("no task credentials"), "{err}");
    let core = images.path().join("core-1.img");
    for (bytes, why) in [
        (vec![1u8, 2], "shorter than its magic"),
        (
            [IMG_COMMON_MAGIC.to_le_bytes(), 0x1234_5678u32.to_le_bytes()].concat(),
            "is not CRIU's core image magic",
        ),
        (
            [
                IMG_COMMON_MAGIC.to_le_bytes(),
                CORE_MAGIC.to_le_bytes(),
                100u32.to_le_bytes(),
            ]
            .concat(),
            "truncated",
        ),
        (
            [
                IMG_COMMON_MAGIC.to_le_bytes(),
                CORE_MAGIC.to_le_bytes(),
                u32::MAX.to_le_bytes(),
            ]
            .concat(),
            "too large",
        ),
        (
            [
                IMG_COMMON_MAGIC.to_le_bytes().as_slice(),
                CORE_MAGIC.to_le_bytes().as_slice(),
                3u32.to_le_bytes().as_slice(),
                &[0xff, 0xff, 0xff],
            ]
            .concat(),
            "undecodable core entry",
        ),
    ] {
        fs::write(&core, bytes).unwrap();
        let err = check(images.path(), &good_spec).unwrap_err().to_string();
        assert!(
            err.contains(why) && err.contains(&core.display().to_string()),
            "{why}: {err}"
        );
    }
    // A task without credentials is refused rather than waved through.
    write_core(images.path(), 1, None);
    let err = check(images.path(), &good_spec).unwrap_err().to_string();
    assert!(err.contains("the task has no credentials"), "{err}");
    // A spec that is not JSON, or has no process.
    write_core(images.path(), 1, Some(root_creds()));
    fs::write(&good_spec, b"{").unwrap();
    let err = check(images.path(), &good_spec).unwrap_err().to_string();
    assert!(err.contains("reading the clone's spec"), "{err}");
    fs::write(&good_spec, b"{\"ociVersion\":\"1.1.0\"}").unwrap();
    let err = check(images.path(), &good_spec).unwrap_err().to_string();
    assert!(err.contains("has no process"), "{err}");
}
