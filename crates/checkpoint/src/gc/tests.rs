//! GC on real directories: age, count, leases, pins, temp files, symlinks, and the re-check
//! between plan and removal.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::*;

const HOUR: Duration = Duration::from_secs(3600);

/// Writes `path` with its mtime `age` before `now`.
fn file(path: &Path, age: Duration, now: SystemTime) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, b"archive bytes").unwrap();
    let f = fs::File::options().write(true).open(path).unwrap();
    f.set_modified(now - age).unwrap();
}

fn removed(plan: &Plan) -> Vec<String> {
    let mut v: Vec<String> = plan
        .remove
        .iter()
        .map(|r| r.path.to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn kept_reason<'a>(plan: &'a Plan, path: &Path) -> &'a str {
    plan.keep
        .iter()
        .find(|k| k.path == path)
        .map(|k| k.reason.as_str())
        .unwrap_or_else(|| panic!("{} not listed as kept: {plan:?}", path.display()))
}

fn policy(max_age: Option<Duration>, keep_last: Option<usize>) -> GcPolicy {
    GcPolicy {
        max_age,
        keep_last,
        temp_max_age: HOUR,
    }
}

#[test]
fn old_archives_go_young_ones_stay_and_a_dry_run_removes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let now = SystemTime::now();
    let old = share.join("default/counter/app.zip");
    let young = share.join("default/web/app.zip");
    file(&old, 30 * HOUR, now);
    file(&young, HOUR, now);

    let plan = plan(
        Some(&share),
        None,
        &policy(Some(24 * HOUR), None),
        &InFlight::default(),
        now,
    )
    .unwrap();
    assert_eq!(removed(&plan), [old.to_string_lossy()]);
    assert!(
        plan.remove[0].reason.contains("1d6h old (limit 1d0h)"),
        "{:?}",
        plan.remove[0]
    );
    // Planning is the dry run: nothing is gone.
    assert!(old.exists() && young.exists());

    let outcome = execute(plan, now);
    assert_eq!(outcome.removed.len(), 1);
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    assert!(!old.exists() && young.exists());
    // The emptied pod directory went with its last archive; the other stays.
    assert!(!share.join("default/counter").exists());
    assert!(share.join("default/web").exists());
}

#[test]
fn keep_last_keeps_the_newest_n() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let now = SystemTime::now();
    for (pod, hours) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
        file(&share.join(format!("ns/{pod}/app.zip")), hours * HOUR, now);
    }
    let plan = plan(
        Some(&share),
        None,
        &policy(None, Some(2)),
        &InFlight::default(),
        now,
    )
    .unwrap();
    assert_eq!(
        removed(&plan),
        [
            share.join("ns/c/app.zip").to_string_lossy(),
            share.join("ns/d/app.zip").to_string_lossy()
        ]
    );
    assert!(
        plan.remove[0].reason.contains("beyond the newest 2"),
        "{:?}",
        plan.remove
    );
    // Age and count together: the age limit takes b as well.
    let plan = super::plan(
        Some(&share),
        None,
        &policy(Some(90 * 60 * Duration::from_secs(1)), Some(2)),
        &InFlight::default(),
        now,
    )
    .unwrap();
    assert_eq!(plan.remove.len(), 3);
}

#[test]
fn a_live_lease_protects_its_pod_directory_and_work_units_an_expired_one_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let work = tmp.path().join("work");
    // Work units age by change time, which cannot be set back: look from 100h ahead.
    let now = SystemTime::now() + 100 * HOUR;
    let busy = share.join("ns/busy/app.zip");
    let done = share.join("ns/done/app.zip");
    file(&busy, 48 * HOUR, now);
    file(&done, 48 * HOUR, now);
    file(
        &work.join("checkpoints/uid-busy/app/pages-1.img"),
        48 * HOUR,
        now,
    );
    file(
        &work.join("checkpoints/uid-old/app/pages-1.img"),
        48 * HOUR,
        now,
    );
    let live = write_lease(
        &share.join("ns/busy"),
        "uid-busy",
        &Lease {
            holder: "agent on node-a for clone ns/busy-x".into(),
            deadline_unix_ms: unix_ms(now + HOUR),
            work_units: vec!["checkpoints/uid-busy".into()],
            page_stream: None,
        },
    )
    .unwrap();
    let expired = write_lease(
        &share.join("ns/done"),
        "uid-done",
        &Lease {
            holder: "agent on node-a for clone ns/done-x".into(),
            deadline_unix_ms: unix_ms(now - HOUR),
            work_units: vec!["checkpoints/uid-old".into()],
            page_stream: None,
        },
    )
    .unwrap();

    let plan = plan(
        Some(&share),
        Some(&work),
        &policy(Some(24 * HOUR), None),
        &InFlight::default(),
        now,
    )
    .unwrap();
    assert_eq!(
        removed(&plan),
        [
            expired.to_string_lossy(),
            done.to_string_lossy(),
            work.join("checkpoints/uid-old").to_string_lossy(),
        ]
    );
    assert!(kept_reason(&plan, &busy).contains("held by agent on node-a for clone ns/busy-x"));
    assert!(kept_reason(&plan, &work.join("checkpoints/uid-busy")).contains("in flight"));
    let outcome = execute(plan, now);
    assert_eq!(outcome.removed.len(), 3, "{outcome:?}");
    assert!(busy.exists() && live.exists() && work.join("checkpoints/uid-busy").exists());
    assert!(!work.join("checkpoints/uid-old").exists());
}

#[test]
fn the_api_servers_in_flight_clones_protect_like_a_lease() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let now = SystemTime::now();
    let archive = share.join("ns/counter/app.zip");
    file(&archive, 48 * HOUR, now);
    let in_flight = InFlight {
        pods: [("ns".to_string(), "counter".to_string())].into(),
        source: "the API server (clone ns/counter-x is Restoring)".into(),
        ..InFlight::default()
    };
    let plan = plan(
        Some(&share),
        None,
        &policy(Some(HOUR), Some(0)),
        &in_flight,
        now,
    )
    .unwrap();
    assert!(plan.remove.is_empty(), "{plan:?}");
    assert!(kept_reason(&plan, &archive).contains("API server"));
}

#[test]
fn restore_markers_go_by_age_unless_their_pod_still_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    // Work units age by change time, which cannot be set back: look from 100h ahead.
    let now = SystemTime::now() + 100 * HOUR;
    let marker = |uid: &str| crate::share::restored_marker(&work, uid, "app").unwrap();
    for uid in ["uid-gone", "uid-live"] {
        file(&marker(uid), 48 * HOUR, now);
    }
    let in_flight = InFlight {
        pod_uids: ["uid-live".to_string()].into(),
        ..InFlight::default()
    };
    let plan = plan(
        None,
        Some(&work),
        &policy(Some(24 * HOUR), None),
        &in_flight,
        now,
    )
    .unwrap();
    assert_eq!(
        removed(&plan),
        [work.join("restored/uid-gone").to_string_lossy()]
    );
    assert!(kept_reason(&plan, &work.join("restored/uid-live")).contains("still exists"));
    execute(plan, now);
    assert!(!marker("uid-gone").exists() && marker("uid-live").exists());
}

#[test]
fn keep_files_pin_an_archive_a_pod_directory_or_a_work_unit() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let work = tmp.path().join("work");
    // Work units age by change time, which cannot be set back: look from 100h ahead.
    let now = SystemTime::now() + 100 * HOUR;
    let pinned = share.join("ns/a/app.zip");
    let sibling = share.join("ns/a/sidecar.zip");
    file(&pinned, 48 * HOUR, now);
    file(&sibling, 48 * HOUR, now);
    fs::write(share.join("ns/a/app.zip.keep"), b"").unwrap();
    let in_pinned_dir = share.join("ns/b/app.zip");
    file(&in_pinned_dir, 48 * HOUR, now);
    fs::write(share.join("ns/b/.keep"), b"").unwrap();
    file(
        &work.join("restore/ns/c1/checkpoint/pages-1.img"),
        48 * HOUR,
        now,
    );
    fs::write(work.join("restore/ns/c1/.keep"), b"").unwrap();
    file(
        &work.join("restore/ns/c2/checkpoint/pages-1.img"),
        48 * HOUR,
        now,
    );

    // keep_last 0: everything unpinned goes, the pins hold.
    let plan = plan(
        Some(&share),
        Some(&work),
        &policy(Some(HOUR), Some(0)),
        &InFlight::default(),
        now,
    )
    .unwrap();
    assert_eq!(
        removed(&plan),
        [
            sibling.to_string_lossy(),
            work.join("restore/ns/c2").to_string_lossy()
        ]
    );
    assert!(kept_reason(&plan, &pinned).contains("app.zip.keep"));
    assert!(kept_reason(&plan, &in_pinned_dir).contains("ns/b/.keep"));
    assert!(kept_reason(&plan, &work.join("restore/ns/c1")).contains(".keep"));
    execute(plan, now);
    assert!(pinned.exists() && in_pinned_dir.exists() && !sibling.exists());
}

#[test]
fn temp_files_of_interrupted_packs_go_after_their_own_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let now = SystemTime::now();
    let stale = share.join("ns/p/.app.zip.tmp-123-000000001");
    let writing = share.join("ns/p/.app.zip.tmp-456-000000002");
    let other = share.join("ns/p/notes.txt");
    file(&stale, 2 * HOUR, now);
    file(&writing, Duration::from_secs(5), now);
    file(&other, 100 * HOUR, now);
    let plan = plan(
        Some(&share),
        None,
        &policy(Some(24 * HOUR), None),
        &InFlight::default(),
        now,
    )
    .unwrap();
    assert_eq!(removed(&plan), [stale.to_string_lossy()]);
    assert!(plan.remove[0].reason.contains("interrupted pack"));
    execute(plan, now);
    assert!(!stale.exists() && writing.exists() && other.exists());
}

#[test]
fn symbolic_links_are_never_followed_out_of_the_share_or_work_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let work = tmp.path().join("work");
    let outside = tmp.path().join("outside");
    let now = SystemTime::now();
    let victim = outside.join("pod/app.zip");
    file(&victim, 48 * HOUR, now);
    file(&outside.join("unit/pages-1.img"), 48 * HOUR, now);
    fs::create_dir_all(share.join("ns")).unwrap();
    // A namespace, a pod directory and an archive that are links to outside.
    symlink(&outside, share.join("linked-ns")).unwrap();
    symlink(outside.join("pod"), share.join("ns/linked-pod")).unwrap();
    fs::create_dir_all(share.join("ns/real")).unwrap();
    symlink(&victim, share.join("ns/real/app.zip")).unwrap();
    fs::create_dir_all(work.join("checkpoints")).unwrap();
    symlink(outside.join("unit"), work.join("checkpoints/linked-unit")).unwrap();
    symlink(&outside, work.join("restore")).unwrap();

    let plan = plan(
        Some(&share),
        Some(&work),
        &policy(Some(HOUR), Some(0)),
        &InFlight::default(),
        now,
    )
    .unwrap();
    assert!(plan.remove.is_empty(), "{:?}", plan.remove);
    for link in [
        share.join("linked-ns"),
        share.join("ns/linked-pod"),
        share.join("ns/real/app.zip"),
        work.join("checkpoints/linked-unit"),
        work.join("restore"),
    ] {
        assert!(
            kept_reason(&plan, &link).contains("symbolic link"),
            "{}",
            link.display()
        );
    }
    execute(plan, now);
    assert!(victim.exists() && outside.join("unit/pages-1.img").exists());
    assert!(share.join("ns/real/app.zip").symlink_metadata().is_ok());
}

#[test]
fn removal_rechecks_the_file_and_the_leases_first() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let now = SystemTime::now();
    let replaced = share.join("ns/a/app.zip");
    let leased = share.join("ns/b/app.zip");
    file(&replaced, 48 * HOUR, now);
    file(&leased, 48 * HOUR, now);
    let plan = plan(
        Some(&share),
        None,
        &policy(Some(HOUR), None),
        &InFlight::default(),
        now,
    )
    .unwrap();
    assert_eq!(plan.remove.len(), 2);
    // Between plan and removal: a new archive is committed under the old name, and a
    // migration of b starts.
    fs::remove_file(&replaced).unwrap();
    file(&replaced, Duration::ZERO, now);
    write_lease(
        &share.join("ns/b"),
        "uid",
        &Lease {
            holder: "agent on node-b".into(),
            deadline_unix_ms: unix_ms(now + HOUR),
            work_units: vec![],
            page_stream: None,
        },
    )
    .unwrap();
    let outcome = execute(plan, now);
    assert!(outcome.removed.is_empty(), "{outcome:?}");
    assert_eq!(outcome.skipped.len(), 2);
    assert!(replaced.exists() && leased.exists());
}
