//! The operation with a dump that writes a checkpoint's images as CRIU would: its pages into
//! the pipe, the rest as files.

use std::fs::{self, OpenOptions};
use std::io::Write;

use super::*;
use crate::layout::{CONFIG_DUMP, ROOTFS_DIFF_TAR};

#[derive(Debug)]
enum Failure {
    Op(CheckpointError),
    Dump(&'static str),
}

impl From<CheckpointError> for Failure {
    fn from(err: CheckpointError) -> Self {
        Failure::Op(err)
    }
}

struct Node {
    tmp: tempfile::TempDir,
    share: PathBuf,
    local_dir: PathBuf,
    spec: PathBuf,
}

impl Node {
    fn new() -> Node {
        let tmp = tempfile::tempdir().unwrap();
        for dir in ["share", "ck", "upper/tmp", "bundle"] {
            fs::create_dir_all(tmp.path().join(dir)).unwrap();
        }
        fs::write(tmp.path().join("upper/tmp/count"), b"5\n").unwrap();
        fs::write(tmp.path().join("bundle/config.json"), b"{}").unwrap();
        Node {
            share: tmp.path().join("share"),
            local_dir: tmp.path().join("ck"),
            spec: tmp.path().join("bundle/config.json"),
            tmp,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn checkpoint(&self) -> Checkpoint<'_> {
        Checkpoint {
            share_root: &self.share,
            key_file: None,
            source: Source {
                node: "node-a".into(),
                namespace: "team-a".into(),
                pod: "db-0".into(),
                container: "db".into(),
                container_id: "c0ffee".into(),
                image: "example/db:1".into(),
                ..Default::default()
            },
            versions: Versions::default(),
            bandwidth: Bandwidth::UNLIMITED,
            local_dir: &self.local_dir,
            spec: &self.spec,
            upperdir: Some(self.p("upper")),
        }
    }

    fn pod_dir(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.p("share/team-a/db-0"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// What CRIU leaves: its pages through the pipe, its other images as files.
fn criu_dump(local_dir: &Path) -> Result<(), Failure> {
    let images = local_dir.join(CHECKPOINT_DIR);
    fs::write(images.join("inventory.img"), b"criu").unwrap();
    let mut pages = OpenOptions::new()
        .write(true)
        .open(local_dir.join(FIRST_PAGES_IMAGE))
        .unwrap();
    pages.write_all(&[7u8; 100_000]).unwrap();
    Ok(())
}

#[test]
fn a_dump_is_packed_with_its_extras_and_committed_with_its_record() {
    let node = Node::new();
    let op = node.checkpoint();
    let summary = op.run(|_| criu_dump(op.local_dir)).unwrap();
    assert_eq!(summary.archive, node.p("share/team-a/db-0/db.zip"));
    assert_eq!(node.pod_dir(), [".db.commit", "db.zip"]);
    let record = share::read_commit_record(&summary.archive, "")
        .unwrap()
        .expect("a commit record");
    assert_eq!(record.manifest_sha256, summary.manifest_sha256);

    let out = node.p("out");
    let verified = archive::unpack(&summary.archive, &out, &Default::default()).unwrap();
    let source = verified.manifest.source.unwrap();
    assert_eq!(
        (
            source.namespace.as_str(),
            source.pod.as_str(),
            source.container.as_str()
        ),
        ("team-a", "db-0", "db")
    );
    assert_eq!(
        fs::read(out.join(FIRST_PAGES_IMAGE)).unwrap(),
        [7u8; 100_000]
    );
    assert_eq!(
        fs::read(out.join("checkpoint/inventory.img")).unwrap(),
        b"criu"
    );
    assert_eq!(fs::read(out.join(SPEC_DUMP)).unwrap(), b"{}");
    assert!(fs::read_to_string(out.join(CONFIG_DUMP))
        .unwrap()
        .contains("c0ffee"));
    assert!(out.join(ROOTFS_DIFF_TAR).is_file());
}

#[test]
fn a_failed_dump_is_the_callers_failure_and_leaves_no_archive() {
    let node = Node::new();
    let op = node.checkpoint();
    match op.run(|_| Err(Failure::Dump("CRIU died"))) {
        Err(Failure::Dump("CRIU died")) => {}
        other => panic!("expected the dump's own failure: {other:?}"),
    }
    assert!(node.pod_dir().is_empty(), "{:?}", node.pod_dir());
}

#[test]
fn a_key_that_does_not_load_fails_before_anything_is_made() {
    let node = Node::new();
    let key = node.p("no-such-key");
    let op = Checkpoint {
        key_file: Some(&key),
        ..node.checkpoint()
    };
    let mut dumped = false;
    let err = op
        .run(|_| {
            dumped = true;
            Ok(())
        })
        .unwrap_err();
    match err {
        Failure::Op(err @ CheckpointError::Key(_)) => {
            let message = err.to_string();
            assert!(message.contains(key.to_str().unwrap()), "{message}");
        }
        other => panic!("expected a key failure: {other:?}"),
    }
    assert!(!dumped);
    assert!(!node.p("share/team-a").exists());
}
