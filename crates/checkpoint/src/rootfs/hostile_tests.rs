//! Hostile rootfs diffs: each must be refused with an error naming the tar, the entry and the
//! reason, with nothing written outside the upper directory (and, when refused before
//! writing, nothing written at all). Runs as root (chown, xattrs, whiteouts); skips otherwise.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;
use crate::layout::{DELETED_FILES, ROOTFS_DIFF_TAR};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// One entry of a hand-made tar: names are raw bytes, so `..` and absolute names can be
/// written (tar's own setters refuse them).
struct Raw {
    name: &'static str,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    link: Option<String>,
    data: Vec<u8>,
    pax: Vec<(String, Vec<u8>)>,
}

fn raw(name: &'static str, kind: tar::EntryType) -> Raw {
    Raw {
        name,
        kind,
        mode: if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        },
        uid: 0,
        link: None,
        data: Vec::new(),
        pax: Vec::new(),
    }
}

fn file(name: &'static str, data: &[u8]) -> Raw {
    Raw {
        data: data.to_vec(),
        ..raw(name, tar::EntryType::Regular)
    }
}

fn link(name: &'static str, kind: tar::EntryType, target: &str) -> Raw {
    Raw {
        link: Some(target.to_string()),
        mode: 0o777,
        ..raw(name, kind)
    }
}

fn pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let body = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        write!(out, "{len} {key}=").unwrap();
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

fn write_tar(path: &Path, entries: &[Raw]) {
    let mut builder = tar::Builder::new(File::create(path).unwrap());
    for e in entries {
        if !e.pax.is_empty() {
            let data = pax_records(&e.pax);
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.as_ustar_mut().unwrap().name[..9].copy_from_slice(b"PaxHeader");
            h.set_cksum();
            builder.append(&h, &data[..]).unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(e.kind);
        h.set_size(e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.uid);
        h.set_mtime(1_700_000_000);
        let ustar = h.as_ustar_mut().unwrap();
        ustar.name[..e.name.len()].copy_from_slice(e.name.as_bytes());
        if let Some(target) = &e.link {
            ustar.linkname[..target.len()].copy_from_slice(target.as_bytes());
        }
        h.set_cksum();
        builder.append(&h, &e.data[..]).unwrap();
    }
    builder.finish().unwrap();
}

/// A sandbox: `host/` stands for the host (a sentinel file and directory that links in the
/// diff aim at), `upper/` the new container's upper directory, `lower/` the image.
struct Sandbox {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Sandbox {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        for d in ["host/etc", "upper", "lower", "ck"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("host/etc/passwd"), b"root:x:0:0\n").unwrap();
        Sandbox { _tmp: tmp, root }
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
    fn host(&self) -> String {
        self.p("host").display().to_string()
    }
    fn diff(&self, entries: &[Raw]) -> &Self {
        write_tar(&self.p("ck").join(ROOTFS_DIFF_TAR), entries);
        self
    }
    fn deleted(&self, list: &[&str]) -> &Self {
        fs::write(
            self.p("ck").join(DELETED_FILES),
            serde_json::to_vec(list).unwrap(),
        )
        .unwrap();
        self
    }
    fn apply(&self) -> Result<DiffSummary, RootfsError> {
        apply_diff(&self.p("ck"), &self.p("upper"), &[self.p("lower")])
    }
    /// Everything outside `upper/`, with contents and modes.
    fn outside(&self) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
        walkdir::WalkDir::new(&self.root)
            .into_iter()
            .filter_entry(|e| e.path() != self.p("upper"))
            .map(|e| e.unwrap())
            .map(|e| {
                let meta = e.path().symlink_metadata().unwrap();
                let data = if meta.is_file() {
                    fs::read(e.path()).unwrap()
                } else {
                    Vec::new()
                };
                (e.path().to_path_buf(), (meta.mode(), data))
            })
            .collect()
    }
    fn upper_entries(&self) -> Vec<PathBuf> {
        walkdir::WalkDir::new(self.p("upper"))
            .min_depth(1)
            .into_iter()
            .map(|e| e.unwrap().path().to_path_buf())
            .collect()
    }
}

/// Applies the sandbox's diff, expecting a refusal naming `why`; nothing may change outside
/// `upper/`, and `upper/` must be as empty as it started.
fn refused(sb: &Sandbox, why: &str) -> String {
    let before = sb.outside();
    let err = sb.apply().expect_err(why).to_string();
    assert!(err.contains(why), "expected {why:?} in: {err}");
    assert!(
        err.contains(&sb.p("ck").display().to_string()),
        "error names the checkpoint: {err}"
    );
    assert_eq!(
        sb.outside(),
        before,
        "{why}: something changed outside upper/"
    );
    assert_eq!(sb.upper_entries(), Vec::<PathBuf>::new(), "{why}: upper/");
    err
}

#[test]
fn traversal_and_absolute_names_are_refused() {
    if !is_root() {
        return;
    }
    for (name, why) in [
        ("../escape", "'..'"),
        ("a/../../escape", "'..'"),
        ("/etc/evil", "absolute"),
    ] {
        let sb = Sandbox::new();
        sb.diff(&[file(name, b"x")]);
        refused(&sb, why);
        assert!(!sb.p("escape").exists() && !sb.p("host/etc/evil").exists());
    }
}

#[test]
fn devices_fifos_and_whiteouts_in_the_tar_are_refused() {
    if !is_root() {
        return;
    }
    for (kind, why) in [
        (tar::EntryType::Char, "device node"),
        (tar::EntryType::Block, "device node"),
        (tar::EntryType::Fifo, "fifo"),
        (tar::EntryType::GNUSparse, "sparse"),
        (tar::EntryType::XGlobalHeader, "only files"),
    ] {
        let sb = Sandbox::new();
        sb.diff(&[raw("dev/evil", kind)]);
        refused(&sb, why);
    }
}

#[test]
fn set_id_files_are_refused_unless_the_image_has_them() {
    if !is_root() {
        return;
    }
    let sb = Sandbox::new();
    sb.diff(&[Raw {
        mode: 0o4755,
        ..file("bin/evil", b"#!")
    }]);
    refused(&sb, "setuid or setgid");

    // Same name in the image, but not set-id there: still refused.
    fs::create_dir_all(sb.p("lower/bin")).unwrap();
    fs::write(sb.p("lower/bin/evil"), b"#!").unwrap();
    refused(&sb, "setuid or setgid");

    // The image's own setuid-root file (a copied-up /usr/bin/passwd): kept.
    fs::set_permissions(sb.p("lower/bin/evil"), fs::Permissions::from_mode(0o4755)).unwrap();
    sb.apply().unwrap();
    assert_eq!(
        fs::metadata(sb.p("upper/bin/evil")).unwrap().mode() & 0o7777,
        0o4755
    );

    // Same bits, other owner: refused.
    let sb2 = Sandbox::new();
    fs::create_dir_all(sb2.p("lower/bin")).unwrap();
    fs::write(sb2.p("lower/bin/evil"), b"#!").unwrap();
    fs::set_permissions(sb2.p("lower/bin/evil"), fs::Permissions::from_mode(0o4755)).unwrap();
    sb2.diff(&[Raw {
        mode: 0o4755,
        uid: 1000,
        ..file("bin/evil", b"#!")
    }]);
    refused(&sb2, "setuid or setgid");

    // A setgid directory only hands its group on: kept.
    let sb3 = Sandbox::new();
    sb3.diff(&[Raw {
        mode: 0o2775,
        ..raw("var/mail", tar::EntryType::Directory)
    }]);
    sb3.apply().unwrap();
    assert_eq!(
        fs::metadata(sb3.p("upper/var/mail")).unwrap().mode() & 0o7777,
        0o2775
    );
}

#[test]
fn xattrs_are_refused_unless_the_image_has_the_same_one() {
    if !is_root() {
        return;
    }
    let cap = (
        "SCHILY.xattr.security.capability".to_string(),
        vec![
            1, 0, 0, 2, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    let sb = Sandbox::new();
    sb.diff(&[Raw {
        pax: vec![cap.clone()],
        ..file("bin/tool", b"#!")
    }]);
    refused(
        &sb,
        "xattr \"security.capability\" is not on this file in the image",
    );

    let user = (
        "SCHILY.xattr.trusted.podmigrate-test".to_string(),
        b"v1".to_vec(),
    );
    let sb = Sandbox::new();
    fs::create_dir_all(sb.p("lower/bin")).unwrap();
    fs::write(sb.p("lower/bin/tool"), b"#!").unwrap();
    rustix::fs::setxattr(
        sb.p("lower/bin/tool"),
        "trusted.podmigrate-test",
        b"v0",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    sb.diff(&[Raw {
        pax: vec![user.clone()],
        ..file("bin/tool", b"#!")
    }]);
    refused(&sb, "not on this file in the image with this value");
    rustix::fs::setxattr(
        sb.p("lower/bin/tool"),
        "trusted.podmigrate-test",
        b"v1",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    sb.apply().unwrap();
    let mut buf = [0u8; 16];
    let n = rustix::fs::getxattr(
        sb.p("upper/bin/tool"),
        "trusted.podmigrate-test",
        &mut buf[..],
    )
    .unwrap();
    assert_eq!(&buf[..n], b"v1");

    for key in [
        "SCHILY.acl.access",
        "LIBARCHIVE.xattr.user.x",
        "GNU.sparse.map",
    ] {
        let sb = Sandbox::new();
        sb.diff(&[Raw {
            pax: vec![(key.to_string(), b"x".to_vec())],
            ..file("f", b"")
        }]);
        refused(&sb, "is not supported");
    }
}

#[test]
fn nothing_is_written_through_a_link_planted_by_the_diff() {
    if !is_root() {
        return;
    }
    let sb = Sandbox::new();
    let host = sb.host();
    sb.diff(&[
        link("hostdir", tar::EntryType::Symlink, &host),
        file("hostdir/planted", b"pwned"),
    ]);
    refused(
        &sb,
        "lies under hostdir, a symbolic link earlier in this diff",
    );
    assert!(!sb.p("host/planted").exists());

    // Deeper: a link to the host's /etc, then a file two levels below it.
    let sb = Sandbox::new();
    let etc = format!("{}/etc", sb.host());
    sb.diff(&[
        raw("a", tar::EntryType::Directory),
        link("a/etc", tar::EntryType::Symlink, &etc),
        file("a/etc/passwd", b"evil"),
    ]);
    refused(&sb, "symbolic link earlier in this diff");
    assert_eq!(fs::read(sb.p("host/etc/passwd")).unwrap(), b"root:x:0:0\n");

    // A file under a file.
    let sb = Sandbox::new();
    sb.diff(&[file("a", b""), file("a/b", b"")]);
    refused(&sb, "lies under a, a file earlier in this diff");
}

#[test]
fn links_already_in_the_upper_directory_are_never_followed() {
    if !is_root() {
        return;
    }
    // A directory link in the way: refused (pass 2), the host untouched.
    let sb = Sandbox::new();
    std::os::unix::fs::symlink(sb.p("host"), sb.p("upper/tmp")).unwrap();
    sb.diff(&[file("tmp/planted", b"pwned")]);
    let before = sb.outside();
    let err = sb.apply().unwrap_err().to_string();
    assert!(err.contains("\"tmp\" is a symbolic link"), "{err}");
    assert_eq!(sb.outside(), before);
    assert!(!sb.p("host/planted").exists());

    // A link at the very name being written: replaced, its target untouched.
    let sb = Sandbox::new();
    std::os::unix::fs::symlink(sb.p("host/etc/passwd"), sb.p("upper/passwd")).unwrap();
    sb.diff(&[file("passwd", b"container's own")]);
    let before = sb.outside();
    sb.apply().unwrap();
    assert_eq!(sb.outside(), before);
    assert_eq!(fs::read(sb.p("upper/passwd")).unwrap(), b"container's own");
    assert!(fs::symlink_metadata(sb.p("upper/passwd"))
        .unwrap()
        .is_file());

    // A link, then a directory of the same name, then a file in it: the link is replaced.
    let sb = Sandbox::new();
    let host = sb.host();
    sb.diff(&[
        link("d", tar::EntryType::Symlink, &host),
        raw("d", tar::EntryType::Directory),
        file("d/f", b"in the container"),
    ]);
    let before = sb.outside();
    sb.apply().unwrap();
    assert_eq!(sb.outside(), before);
    assert!(sb.p("upper/d").symlink_metadata().unwrap().is_dir());
    assert_eq!(fs::read(sb.p("upper/d/f")).unwrap(), b"in the container");
}

#[test]
fn symlink_targets_stay_in_the_containers_view() {
    if !is_root() {
        return;
    }
    // Absolute targets are the container's own paths: kept verbatim, never followed here.
    let sb = Sandbox::new();
    let host_passwd = format!("{}/etc/passwd", sb.host());
    sb.diff(&[
        link("etc/abs", tar::EntryType::Symlink, "/etc/passwd"),
        link("etc/host", tar::EntryType::Symlink, &host_passwd),
        link("usr/lib/rel", tar::EntryType::Symlink, "../../etc/passwd"),
    ]);
    let before = sb.outside();
    sb.apply().unwrap();
    assert_eq!(sb.outside(), before);
    assert_eq!(
        fs::read_link(sb.p("upper/etc/abs")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        fs::read_link(sb.p("upper/usr/lib/rel")).unwrap(),
        Path::new("../../etc/passwd")
    );

    // Relative targets that climb above the root.
    for (name, target) in [
        ("usr/lib/up", "../../../etc/passwd"),
        ("top", ".."),
        ("a/b/c", "../../x/../../../y"),
    ] {
        let sb = Sandbox::new();
        sb.diff(&[link(name, tar::EntryType::Symlink, target)]);
        refused(&sb, "climbs above the container's root");
    }
}

#[test]
fn hard_links_only_join_files_of_the_same_diff() {
    if !is_root() {
        return;
    }
    let sb = Sandbox::new();
    let host_passwd = format!("{}/etc/passwd", sb.host());
    for (entries, why) in [
        (
            vec![link("stolen", tar::EntryType::Link, &host_passwd)],
            "hard link target is absolute",
        ),
        (
            vec![link("stolen", tar::EntryType::Link, "../host/etc/passwd")],
            "'..'",
        ),
        (
            vec![link("stolen", tar::EntryType::Link, "etc/passwd")],
            "not a regular file earlier in this diff",
        ),
        (
            vec![
                link("etc", tar::EntryType::Symlink, "/etc"),
                link("stolen", tar::EntryType::Link, "etc"),
            ],
            "not a regular file earlier in this diff",
        ),
        (
            vec![
                raw("d", tar::EntryType::Directory),
                link("stolen", tar::EntryType::Link, "d"),
            ],
            "not a regular file earlier in this diff",
        ),
    ] {
        let sb = Sandbox::new();
        sb.diff(&entries);
        refused(&sb, why);
        assert_eq!(
            fs::metadata(sb.p("host/etc/passwd")).unwrap().nlink(),
            1,
            "{why}"
        );
    }

    sb.diff(&[file("a", b"shared"), link("b", tar::EntryType::Link, "a")]);
    sb.apply().unwrap();
    assert_eq!(
        fs::metadata(sb.p("upper/a")).unwrap().ino(),
        fs::metadata(sb.p("upper/b")).unwrap().ino()
    );
}

#[test]
fn deleted_files_never_leave_the_rootfs() {
    if !is_root() {
        return;
    }
    for (list, why) in [
        (
            vec!["/../host/etc/passwd"],
            "not a path inside the container",
        ),
        (vec!["/"], "not a path inside the container"),
        (vec![""], "not a path inside the container"),
    ] {
        let sb = Sandbox::new();
        sb.deleted(&list);
        refused(&sb, why);
    }
    let sb = Sandbox::new();
    fs::write(sb.p("ck").join(DELETED_FILES), b"{not json").unwrap();
    refused(&sb, "deleted.files");

    // Through a link the diff itself made: the old code's create_dir_all followed it and made
    // directories on the host. Refused, the host untouched, and upper/ emptied again.
    let sb = Sandbox::new();
    let host = sb.host();
    sb.diff(&[link("d", tar::EntryType::Symlink, &host)])
        .deleted(&["/d/newdir/gone"]);
    let err = refused(&sb, "\"d\" is a symbolic link");
    assert!(err.contains("/d/newdir/gone"), "{err}");
    assert!(!sb.p("host/newdir").exists());

    // A whiteout over a file the same diff writes: contradictory, refused.
    let sb = Sandbox::new();
    sb.diff(&[file("x", b"")]).deleted(&["/x"]);
    refused(&sb, "is also in rootfs-diff.tar");
}

#[test]
fn a_refused_diff_names_the_tar_entry_and_reason_in_one_line() {
    if !is_root() {
        return;
    }
    let sb = Sandbox::new();
    sb.diff(&[Raw {
        mode: 0o6755,
        ..file("usr/bin/sudo", b"")
    }]);
    let err = refused(&sb, "setuid");
    assert!(!err.contains('\n'), "{err}");
    assert!(err.contains("\"usr/bin/sudo\""), "{err}");
}
