//! `prepare` against real archives on a real share directory: each refusal is one message
//! naming the clone pod, its container, the archive and the reason, and leaves nothing in the
//! work dir, nothing in the new container's upper directory, nothing anywhere else.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim::protos::ttrpc::Code;
use containerd_shim::protos::types::mount::Mount;
use podmigrate_checkpoint::archive::{self, PackOptions, Source, Versions};
use podmigrate_checkpoint::layout::{CHECKPOINT_DIR, ROOTFS_DIFF_TAR};
use podmigrate_checkpoint::ops::restore::{local_criu_version, local_dir};
use podmigrate_checkpoint::prefault;

use super::*;

const NS: &str = "team-a";
const SOURCE_POD: &str = "db-0";
const CLONE_POD: &str = "db-0-clone";
const CONTAINER: &str = "db";

struct Node {
    tmp: tempfile::TempDir,
    config: ShimConfig,
    identity: ContainerIdentity,
    mounts: Vec<Mount>,
}

fn node() -> Node {
    let tmp = tempfile::tempdir().unwrap();
    for d in ["share", "work", "upper", "lower", "host"] {
        fs::create_dir_all(tmp.path().join(d)).unwrap();
    }
    fs::write(tmp.path().join("host/secret"), b"host").unwrap();
    let config = ShimConfig {
        share_root: tmp.path().join("share"),
        work_dir: tmp.path().join("work"),
        memory_dir: None,
        archive_wait: Duration::from_secs(1),
        delegate: PathBuf::from("containerd-shim-runc-v2"),
        node_name: "node-b".to_string(),
        bandwidth: Ok(podmigrate_checkpoint::bandwidth::Bandwidth::UNLIMITED),
        key_file: None,
    };
    let identity = ContainerIdentity {
        id: "c0ffee".to_string(),
        namespace: NS.to_string(),
        pod: CLONE_POD.to_string(),
        pod_uid: "uid-1".to_string(),
        container: CONTAINER.to_string(),
        image: "example/db:1".to_string(),
        is_sandbox: false,
        clone_of: Some(SOURCE_POD.to_string()),
        fallback_fresh: false,
        departure: None,
        bandwidth: None,
        spec: None,
    };
    let mounts = vec![Mount {
        type_: "overlay".to_string(),
        source: "overlay".to_string(),
        options: vec![
            format!("workdir={}", tmp.path().join("ovl-work").display()),
            format!("upperdir={}", tmp.path().join("upper").display()),
            format!("lowerdir={}", tmp.path().join("lower").display()),
        ],
        ..Default::default()
    }];
    Node {
        tmp,
        config,
        identity,
        mounts,
    }
}

impl Node {
    fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Packs a checkpoint onto the share where the clone looks for it; `tweak` edits the
    /// checkpoint directory first.
    fn archive(&self, source: (&str, &str, &str), criu: &str, tweak: impl FnOnce(&Path)) {
        self.archive_for("", source, criu, tweak)
    }

    /// [`Node::archive`], recording that it is made for the clone pod with uid `clone_uid`.
    fn archive_for(
        &self,
        clone_uid: &str,
        source: (&str, &str, &str),
        criu: &str,
        tweak: impl FnOnce(&Path),
    ) {
        let ck = self.p("ck");
        let _ = fs::remove_dir_all(&ck);
        fs::create_dir_all(ck.join(CHECKPOINT_DIR)).unwrap();
        fs::write(ck.join(CHECKPOINT_DIR).join("inventory.img"), b"criu").unwrap();
        tweak(&ck);
        let dest = self.config.share_root.join(NS).join(SOURCE_POD);
        fs::create_dir_all(&dest).unwrap();
        let options = PackOptions {
            source: Source {
                namespace: source.0.to_string(),
                pod: source.1.to_string(),
                container: source.2.to_string(),
                clone_pod_uid: clone_uid.to_string(),
                ..Default::default()
            },
            versions: Versions {
                criu: criu.to_string(),
                ..Default::default()
            },
            threads: 1,
            ..Default::default()
        };
        archive::pack(&ck, &dest.join(format!("{CONTAINER}.zip")), &options).unwrap();
    }

    fn prepare(&self) -> Result<Prepared, RestoreError> {
        prepare(&self.config, &self.identity, SOURCE_POD, &self.mounts)
    }

    /// Expects a refusal for `why`, answered with `code`, with no residue anywhere.
    fn refused(&self, why: &str, code: Code) -> String {
        let err = self.prepare().expect_err(why);
        assert_eq!(super::code(&err.failure), code, "{err}");
        let err = err.to_string();
        let archive = format!(
            "{}/{NS}/{SOURCE_POD}/{CONTAINER}.zip",
            self.config.share_root.display()
        );
        for part in [
            format!("restoring {CONTAINER} of clone pod {NS}/{CLONE_POD}"),
            archive,
            why.to_string(),
        ] {
            assert!(err.contains(&part), "expected {part:?} in: {err}");
        }
        assert!(!err.contains('\n'), "one line: {err}");
        assert!(
            !local_dir(&self.config.work_dir, NS, &self.identity.id).exists(),
            "work dir left behind: {err}"
        );
        assert_eq!(
            fs::read_dir(self.p("upper")).unwrap().count(),
            0,
            "upper dir written: {err}"
        );
        assert_eq!(fs::read(self.p("host/secret")).unwrap(), b"host");
        assert_eq!(fs::read_dir(self.p("host")).unwrap().count(), 1);
        err
    }
}

fn local_criu() -> String {
    let version = local_criu_version().to_string();
    assert!(
        !version.is_empty(),
        "CRIU must be installed (scripts/setup.sh)"
    );
    version
}

#[test]
fn an_honest_archive_is_prepared() {
    let node = node();
    let criu = local_criu();
    node.archive((NS, SOURCE_POD, CONTAINER), &criu, |_| {});
    let prepared = node.prepare().unwrap();
    assert!(prepared.images.join("inventory.img").is_file());
    discard(&prepared.dir);
}

#[test]
fn a_missing_archive_times_out_naming_the_setting() {
    let mut node = node();
    node.config.archive_wait = Duration::from_millis(100);
    node.refused("timed out", Code::DEADLINE_EXCEEDED);
    node.refused(crate::config::ENV_ARCHIVE_WAIT, Code::DEADLINE_EXCEEDED);
}

#[test]
fn a_migration_abandoned_before_its_archive_ends_the_wait_at_once() {
    let mut node = node();
    node.config.archive_wait = Duration::from_secs(60);
    let pod_dir = node.config.share_root.join(NS).join(SOURCE_POD);
    fs::create_dir_all(&pod_dir).unwrap();
    let expectation = prefault::Expectation {
        clone_pod_uid: node.identity.pod_uid.clone(),
        bytes: 4096,
        postcopy: false,
    };
    prefault::announce(&pod_dir, CONTAINER, &expectation).unwrap();
    let withdraw = std::thread::spawn({
        let pod_dir = pod_dir.clone();
        let uid = node.identity.pod_uid.clone();
        move || {
            std::thread::sleep(Duration::from_millis(300));
            prefault::withdraw(&pod_dir, &uid);
        }
    });
    let started = std::time::Instant::now();
    node.refused("before committing its archive", Code::CANCELLED);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    withdraw.join().unwrap();
}

#[test]
fn a_damaged_archive_is_data_loss() {
    let node = node();
    let dest = node.config.share_root.join(NS).join(SOURCE_POD);
    fs::create_dir_all(&dest).unwrap();
    fs::write(dest.join(format!("{CONTAINER}.zip")), b"not a zip").unwrap();
    node.refused("not a valid zip archive", Code::DATA_LOSS);
}

#[test]
fn a_source_pod_that_names_no_path_is_an_invalid_argument() {
    let node = node();
    let err = prepare(&node.config, &node.identity, "..", &node.mounts).unwrap_err();
    assert_eq!(super::code(&err.failure), Code::INVALID_ARGUMENT, "{err}");
    let message = err.to_string();
    for part in [
        format!("restoring {CONTAINER} of clone pod {NS}/{CLONE_POD}"),
        format!(
            "{}/{NS}/../{CONTAINER}.zip",
            node.config.share_root.display()
        ),
        "\"..\"".to_string(),
    ] {
        assert!(message.contains(&part), "expected {part:?} in: {message}");
    }
}

#[test]
fn a_rootfs_that_is_no_overlay_is_a_failed_precondition() {
    let mut node = node();
    let criu = local_criu();
    node.archive((NS, SOURCE_POD, CONTAINER), &criu, |_| {});
    node.mounts[0].type_ = "bind".to_string();
    node.refused("is not an overlay mount", Code::FAILED_PRECONDITION);
}

#[test]
fn an_archive_of_another_pod_namespace_or_container_is_refused() {
    let criu = local_criu();
    for source in [
        (NS, "other-pod", CONTAINER),
        ("team-b", SOURCE_POD, CONTAINER),
        (NS, SOURCE_POD, "sidecar"),
    ] {
        let node = node();
        node.archive(source, &criu, |_| {});
        let err = node.refused(&format!(
            "the archive holds pod {}/{} container {}, not the clone's source {NS}/{SOURCE_POD} container {CONTAINER}",
            source.0, source.1, source.2
        ), Code::PERMISSION_DENIED);
        assert!(!err.is_empty());
    }
}

#[test]
fn an_archive_made_for_another_clone_is_refused_and_one_for_this_clone_or_none_is_not() {
    let criu = local_criu();
    let other = node();
    other.archive_for("uid-2", (NS, SOURCE_POD, CONTAINER), &criu, |_| {});
    other.refused(
        "the archive was made for clone pod uid uid-2, not for this pod (uid uid-1): \
         it belongs to another migration of the same source",
        Code::PERMISSION_DENIED,
    );
    for made_for in ["uid-1", ""] {
        let node = node();
        node.archive_for(made_for, (NS, SOURCE_POD, CONTAINER), &criu, |_| {});
        let prepared = node
            .prepare()
            .unwrap_or_else(|e| panic!("archive made for {made_for:?}: {e}"));
        discard(&prepared.dir);
    }
}

#[test]
fn credentials_are_checked_against_the_clone_spec_before_the_diff_is_applied() {
    let criu = local_criu();
    let mut node = node();
    let spec = node.p("config.json");
    fs::write(
        &spec,
        br#"{"process":{"user":{"uid":0,"gid":0},"capabilities":{"bounding":[]}}}"#,
    )
    .unwrap();
    node.identity.spec = Some(spec);
    // A diff that would write into the upper directory, and images without any task: refused
    // before the diff is applied.
    node.archive((NS, SOURCE_POD, CONTAINER), &criu, |ck| {
        let mut b = tar::Builder::new(fs::File::create(ck.join(ROOTFS_DIFF_TAR)).unwrap());
        let mut f = tar::Header::new_gnu();
        f.set_entry_type(tar::EntryType::Regular);
        f.set_mode(0o644);
        f.set_mtime(0);
        f.set_size(2);
        b.append_data(&mut f, "tmp/count", &b"5\n"[..]).unwrap();
        b.finish().unwrap();
    });
    node.refused("no task credentials (core-*.img) in", Code::DATA_LOSS);
}

#[test]
fn an_archive_from_a_newer_criu_is_refused() {
    let node = node();
    let criu = local_criu();
    node.archive((NS, SOURCE_POD, CONTAINER), "99.0.0", |_| {});
    node.refused(
        &format!("the checkpoint was made by CRIU 99.0.0, newer than this node's CRIU {criu}"),
        Code::FAILED_PRECONDITION,
    );
}

#[test]
fn a_hostile_rootfs_diff_is_refused_before_anything_is_written() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let node = node();
    let criu = local_criu();
    let host = node.p("host");
    node.archive((NS, SOURCE_POD, CONTAINER), &criu, |ck| {
        let mut b = tar::Builder::new(fs::File::create(ck.join(ROOTFS_DIFF_TAR)).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        b.append_link(&mut h, "tmp", &host).unwrap();
        let mut f = tar::Header::new_gnu();
        f.set_entry_type(tar::EntryType::Regular);
        f.set_mode(0o644);
        f.set_uid(0);
        f.set_gid(0);
        f.set_mtime(0);
        f.set_size(5);
        b.append_data(&mut f, "tmp/planted", &b"pwned"[..]).unwrap();
        b.finish().unwrap();
    });
    node.refused("applying the rootfs changes", Code::PERMISSION_DENIED);
    assert!(!node.p("host/planted").exists());
}

#[test]
fn a_container_restored_once_on_this_node_starts_fresh_when_kubelet_restarts_it() {
    let node = node();
    let work = &node.config.work_dir;
    let id = &node.identity;
    assert_eq!(
        plan(work, id, false),
        CreatePlan::Restore { source: SOURCE_POD }
    );
    let marker = marker(work, id).unwrap();
    mark_restored(&marker, id, Path::new("/share/db.zip")).unwrap();
    // The restarted container: a new id, the same pod uid and container name.
    let restarted = ContainerIdentity {
        id: "decaf".to_string(),
        ..id.clone()
    };
    assert_eq!(
        plan(work, &restarted, false),
        CreatePlan::Restarted {
            source: SOURCE_POD,
            marker
        }
    );
    // Another container of the pod, or the same name in another pod, still restores.
    for other in [
        ContainerIdentity {
            container: "sidecar".to_string(),
            ..id.clone()
        },
        ContainerIdentity {
            pod_uid: "uid-2".to_string(),
            ..id.clone()
        },
    ] {
        assert_eq!(
            plan(work, &other, false),
            CreatePlan::Restore { source: SOURCE_POD }
        );
    }
}

#[test]
fn only_a_clones_app_container_without_a_checkpoint_is_restored() {
    let node = node();
    let work = &node.config.work_dir;
    let id = &node.identity;
    assert_eq!(plan(work, id, true), CreatePlan::AsAsked);
    let sandbox = ContainerIdentity {
        is_sandbox: true,
        ..id.clone()
    };
    assert_eq!(plan(work, &sandbox, false), CreatePlan::AsAsked);
    let not_a_clone = ContainerIdentity {
        clone_of: None,
        ..id.clone()
    };
    assert_eq!(plan(work, &not_a_clone, false), CreatePlan::AsAsked);
    // Without a pod uid (outside Kubernetes) nothing can be recorded: restored every time.
    let no_uid = ContainerIdentity {
        pod_uid: String::new(),
        ..id.clone()
    };
    assert_eq!(marker(work, &no_uid), None);
    assert_eq!(
        plan(work, &no_uid, false),
        CreatePlan::Restore { source: SOURCE_POD }
    );
}
