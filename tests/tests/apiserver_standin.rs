//! The kube-apiserver stand-in (`podmigrate_e2e::apiserver`) driven by a real kube-rs client:
//! if kube's own request building, error parsing, watcher and event recorder work against it,
//! the agent's and CLI's Kubernetes code can be tested against it too.
//!
//! Needs nothing but loopback; every test is bounded by a timeout.

use std::future::Future;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::events::v1::Event as EventsV1;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    ValidationDirective, WatchEvent, WatchParams,
};
use kube::runtime::events::{Event as RecorderEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use podmigrate_e2e::apiserver::{ApiServer, Kind, PodDeletion};
use serde_json::{json, Value};

/// Bound on each whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on each single wait inside a test.
const STEP: Duration = Duration::from_secs(10);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound")
}

async fn step<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn pod(name: &str, labels: Value, node: Option<&str>) -> Pod {
    let mut spec = json!({"containers": [{"name": "app", "image": "busybox:1.36"}]});
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }))
    .expect("pod literal")
}

fn api_status(err: kube::Error) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(status) => status,
        other => panic!("expected an API Status error, got {other:?}"),
    }
}

/// The next event of a raw watch stream, which must not end or fail.
async fn next_event<S>(stream: &mut S) -> WatchEvent<Pod>
where
    S: futures::Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin,
{
    step("watch event", stream.try_next())
        .await
        .expect("watch stream")
        .expect("stream ended")
}

fn names(pods: &[Pod]) -> Vec<String> {
    pods.iter().map(|p| p.name_any()).collect()
}

#[tokio::test]
async fn create_get_list_with_selectors() {
    bounded(async {
        let server = ApiServer::start().await;
        server.add_node("node-a").expect("node");
        let pods: Api<Pod> = Api::namespaced(server.client(), "default");
        let pp = PostParams::default();
        let created = pods
            .create(
                &pp,
                &pod("web-1", json!({"app": "web", "tier": "fe"}), Some("node-a")),
            )
            .await
            .expect("create web-1");
        pods.create(
            &pp,
            &pod("web-2", json!({"app": "web", "tier": "be"}), Some("node-b")),
        )
        .await
        .expect("create web-2");
        pods.create(&pp, &pod("db-1", json!({"app": "db"}), None))
            .await
            .expect("create db-1");

        // Server-assigned fields and defaults.
        assert!(created
            .metadata
            .uid
            .as_deref()
            .is_some_and(|u| u.len() == 36));
        assert!(created.metadata.creation_timestamp.is_some());
        let rv: u64 = created
            .resource_version()
            .expect("rv")
            .parse()
            .expect("numeric rv");
        assert!(rv > 0);
        let status = created.status.as_ref().expect("status");
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        assert_eq!(status.qos_class.as_deref(), Some("BestEffort"));
        let spec = created.spec.as_ref().expect("spec");
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            spec.containers[0].image_pull_policy.as_deref(),
            Some("IfNotPresent")
        );

        let got = pods.get("web-1").await.expect("get");
        assert_eq!(got.metadata.uid, created.metadata.uid);

        let list = |lp: ListParams| {
            let pods = pods.clone();
            async move { pods.list(&lp).await.expect("list").items }
        };
        assert_eq!(
            names(&list(ListParams::default()).await),
            ["db-1", "web-1", "web-2"]
        );
        assert_eq!(
            names(&list(ListParams::default().labels("app=web")).await),
            ["web-1", "web-2"]
        );
        assert_eq!(
            names(&list(ListParams::default().labels("app!=web")).await),
            ["db-1"]
        );
        assert_eq!(
            names(&list(ListParams::default().labels("tier in (fe,xx)")).await),
            ["web-1"]
        );
        assert_eq!(
            names(&list(ListParams::default().labels("app,!tier")).await),
            ["db-1"]
        );
        assert_eq!(
            names(&list(ListParams::default().fields("spec.nodeName=node-a")).await),
            ["web-1"]
        );
        assert_eq!(
            names(&list(ListParams::default().fields("spec.nodeName=")).await),
            ["db-1"]
        );
        assert_eq!(
            names(
                &list(ListParams::default().fields("metadata.name=web-2,status.phase=Pending"))
                    .await
            ),
            ["web-2"]
        );
        // Pagination: kube passes limit/continue through; three pages of one.
        let page1 = pods
            .list(&ListParams::default().limit(1))
            .await
            .expect("page 1");
        assert_eq!(names(&page1.items), ["db-1"]);
        let token = page1.metadata.continue_.clone().expect("continue token");
        let page2 = pods
            .list(&ListParams::default().limit(1).continue_token(&token))
            .await
            .expect("page 2");
        assert_eq!(names(&page2.items), ["web-1"]);
        assert_eq!(
            page2.metadata.resource_version,
            page1.metadata.resource_version
        );

        // All namespaces, and a field label the real server refuses.
        let all: Api<Pod> = Api::all(server.client());
        assert_eq!(
            all.list(&ListParams::default())
                .await
                .expect("all")
                .items
                .len(),
            3
        );
        let err = pods
            .list(&ListParams::default().fields("spec.bogus=x"))
            .await
            .expect_err("unsupported field label");
        assert_eq!(api_status(err).code, 400);

        // The request log shows what the client asked for.
        let asked = server
            .requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path == "/api/v1/namespaces/default/pods")
            .filter_map(|r| r.param("fieldSelector"))
            .collect::<Vec<_>>();
        assert!(
            asked.contains(&"spec.nodeName=node-a".to_string()),
            "{asked:?}"
        );

        // Cluster-scoped kinds through kube too.
        let nodes: Api<Node> = Api::all(server.client());
        assert_eq!(
            names_of(
                &nodes
                    .list(&ListParams::default())
                    .await
                    .expect("nodes")
                    .items
            ),
            ["node-a"]
        );
        let namespaces: Api<Namespace> = Api::all(server.client());
        let default_ns = namespaces.get("default").await.expect("default namespace");
        assert_eq!(
            default_ns
                .labels()
                .get("kubernetes.io/metadata.name")
                .map(String::as_str),
            Some("default")
        );
    })
    .await
}

fn names_of<K: ResourceExt>(items: &[K]) -> Vec<String> {
    items.iter().map(|i| i.name_any()).collect()
}

#[tokio::test]
async fn patches_merge_json_strategic_and_status() {
    bounded(async {
        let server = ApiServer::start().await;
        let pods: Api<Pod> = Api::namespaced(server.client(), "default");
        let created = pods
            .create(&PostParams::default(), &pod("p", json!({"app": "x"}), Some("node-a")))
            .await
            .expect("create");
        let rv0: u64 = created.resource_version().expect("rv").parse().expect("rv");

        let pp = PatchParams::default();
        let merged = pods
            .patch(
                "p",
                &pp,
                &Patch::Merge(json!({"metadata": {"annotations": {"podmigrate.io/phase": "Checkpointing"}}})),
            )
            .await
            .expect("merge patch");
        assert_eq!(
            merged.annotations().get("podmigrate.io/phase").map(String::as_str),
            Some("Checkpointing")
        );
        let rv1: u64 = merged.resource_version().expect("rv").parse().expect("rv");
        assert!(rv1 > rv0);
        let stored = server.get_pod("default", "p").expect("stored");
        assert_eq!(stored["metadata"]["annotations"]["podmigrate.io/phase"], "Checkpointing");

        // The same patch again is a no-op: no new resourceVersion.
        let again = pods
            .patch(
                "p",
                &pp,
                &Patch::Merge(json!({"metadata": {"annotations": {"podmigrate.io/phase": "Checkpointing"}}})),
            )
            .await
            .expect("no-op patch");
        assert_eq!(again.resource_version(), merged.resource_version());

        // JSON patch (RFC 6902), including a failing `test` → 422.
        let jp: json_patch::Patch = serde_json::from_value(json!([
            {"op": "add", "path": "/metadata/labels/json", "value": "yes"},
        ]))
        .expect("json patch");
        let patched = pods.patch("p", &pp, &Patch::<Value>::Json(jp)).await.expect("json patch");
        assert_eq!(patched.labels().get("json").map(String::as_str), Some("yes"));
        let failing: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/labels/json", "value": "no"},
        ]))
        .expect("json patch");
        let err = pods
            .patch("p", &pp, &Patch::<Value>::Json(failing))
            .await
            .expect_err("failing test op");
        assert_eq!(api_status(err).code, 422);

        // Strategic merge: containers merge by name, so changing one image keeps the rest.
        let smp = pods
            .patch(
                "p",
                &pp,
                &Patch::Strategic(json!({"spec": {"containers": [{"name": "app", "image": "busybox:1.37"}]}})),
            )
            .await
            .expect("strategic patch");
        let c = &smp.spec.as_ref().expect("spec").containers[0];
        assert_eq!(c.image.as_deref(), Some("busybox:1.37"));
        assert_eq!(c.termination_message_path.as_deref(), Some("/dev/termination-log"));
        assert_eq!(smp.metadata.generation, Some(2));

        // Other spec changes are refused as upstream does.
        let err = pods
            .patch("p", &pp, &Patch::Merge(json!({"spec": {"hostname": "other"}})))
            .await
            .expect_err("immutable spec");
        let status = api_status(err);
        assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));

        // The main resource ignores status; /status takes only status.
        let ignored = pods
            .patch("p", &pp, &Patch::Merge(json!({"status": {"phase": "Running"}})))
            .await
            .expect("status via main resource");
        assert_eq!(ignored.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Pending"));
        let running = pods
            .patch_status("p", &pp, &Patch::Merge(json!({"status": {"phase": "Running"}, "metadata": {"labels": {"ignored": "x"}}})))
            .await
            .expect("status patch");
        assert_eq!(running.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Running"));
        assert!(!running.labels().contains_key("ignored"));

        // A stale resourceVersion inside a patch is a conflict.
        let err = pods
            .patch("p", &pp, &Patch::Merge(json!({"metadata": {"resourceVersion": "1", "labels": {"a": "b"}}})))
            .await
            .expect_err("stale rv in patch");
        assert_eq!(api_status(err).code, 409);

        // Server-side apply (approximated): needs a field manager, creates when missing.
        let apply = Patch::Apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "applied", "labels": {"via": "ssa"}},
            "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]},
        }));
        let err = pods.patch("applied", &pp, &apply).await.expect_err("no field manager");
        assert_eq!(api_status(err).code, 422);
        let applied = pods
            .patch("applied", &PatchParams::apply("podmigrate").force(), &apply)
            .await
            .expect("apply");
        assert_eq!(applied.labels().get("via").map(String::as_str), Some("ssa"));

        // A body that is not JSON at all is a 400.
        let req = hyper::Request::builder()
            .method("PATCH")
            .uri("/api/v1/namespaces/default/pods/p")
            .header("Content-Type", "application/merge-patch+json")
            .body(b"{not json".to_vec())
            .expect("request");
        let err = server.client().request_text(req).await.expect_err("bad patch body");
        assert_eq!(api_status(err).code, 400);
        let req = hyper::Request::builder()
            .method("PATCH")
            .uri("/api/v1/namespaces/default/pods/p")
            .header("Content-Type", "text/plain")
            .body(b"{}".to_vec())
            .expect("request");
        let err = server.client().request_text(req).await.expect_err("bad content type");
        assert_eq!(api_status(err).code, 415);

        // The in-process kubelet helpers.
        server
            .patch_pod_status("default", "p", json!({"podIP": "10.0.0.7"}))
            .expect("kubelet status patch");
        let p = pods.get_status("p").await.expect("get status");
        let st = p.status.expect("status");
        assert_eq!(st.pod_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(st.phase.as_deref(), Some("Running"));
        server
            .set_pod_status("default", "p", json!({"phase": "Succeeded"}))
            .expect("kubelet status update");
        let p = pods.get("p").await.expect("get");
        assert_eq!(p.status.and_then(|s| s.pod_ip), None);
    })
    .await
}

#[tokio::test]
async fn watcher_sees_added_modified_deleted() {
    bounded(async {
        let server = ApiServer::start().await;
        let pods: Api<Pod> = Api::namespaced(server.client(), "default");

        // kube-runtime's watcher with its default config: a most-recent LIST paged by 500, then a
        // WATCH from the list's resourceVersion with bookmarks.
        let mut events = watcher(pods.clone(), watcher::Config::default()).boxed();
        loop {
            match step("watcher init", events.try_next())
                .await
                .expect("watcher")
            {
                Some(watcher::Event::InitDone) => break,
                Some(watcher::Event::Init) => {}
                other => panic!("unexpected before InitDone: {other:?}"),
            }
        }
        pods.create(&PostParams::default(), &pod("w", json!({}), None))
            .await
            .expect("create");
        match step("ADDED", events.try_next()).await.expect("watcher") {
            Some(watcher::Event::Apply(p)) => assert_eq!(p.name_any(), "w"),
            other => panic!("expected Apply for ADDED, got {other:?}"),
        }
        pods.patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"step": "2"}}})),
        )
        .await
        .expect("patch");
        match step("MODIFIED", events.try_next()).await.expect("watcher") {
            Some(watcher::Event::Apply(p)) => {
                assert_eq!(p.annotations().get("step").map(String::as_str), Some("2"))
            }
            other => panic!("expected Apply for MODIFIED, got {other:?}"),
        }
        let deleted = pods
            .delete("w", &DeleteParams::default())
            .await
            .expect("delete");
        assert!(deleted.is_left(), "pod deletion returns the pod");
        match step("DELETED", events.try_next()).await.expect("watcher") {
            Some(watcher::Event::Delete(p)) => assert_eq!(p.name_any(), "w"),
            other => panic!("expected Delete, got {other:?}"),
        }
        assert!(server.get_pod("default", "w").is_none());

        let log = server.requests();
        let list = log
            .iter()
            .find(|r| r.method == "GET" && !r.is_watch())
            .expect("the watcher listed");
        assert_eq!(list.param("resourceVersion"), None);
        assert_eq!(list.param("limit").as_deref(), Some("500"));
        let watch = log
            .iter()
            .find(|r| r.is_watch())
            .expect("the watcher watched");
        assert_eq!(watch.param("allowWatchBookmarks").as_deref(), Some("true"));
        assert_eq!(watch.param("timeoutSeconds").as_deref(), Some("290"));
    })
    .await
}

#[tokio::test]
async fn raw_watch_events_and_selector_transitions() {
    bounded(async {
        let server = ApiServer::start().await;
        let pods: Api<Pod> = Api::namespaced(server.client(), "default");
        pods.create(&PostParams::default(), &pod("pre", json!({"app": "web"}), None))
            .await
            .expect("create");
        let wp = WatchParams::default().labels("app=web");
        let mut stream = pods.watch(&wp, "0").await.expect("watch").boxed();
        // rv=0: the current state first, as synthetic ADDED.
        assert!(matches!(next_event(&mut stream).await, WatchEvent::Added(p) if p.name_any() == "pre"));
        pods.patch(
            "pre",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}})),
        )
        .await
        .expect("relabel");
        // Leaving the selector is a DELETED for this watch.
        assert!(matches!(next_event(&mut stream).await, WatchEvent::Deleted(p) if p.name_any() == "pre"));
        pods.patch(
            "pre",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "web"}}})),
        )
        .await
        .expect("relabel back");
        assert!(matches!(next_event(&mut stream).await, WatchEvent::Added(p) if p.name_any() == "pre"));
        pods.patch(
            "pre",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}})),
        )
        .await
        .expect("annotate");
        assert!(matches!(next_event(&mut stream).await, WatchEvent::Modified(p) if p.name_any() == "pre"));
        pods.delete("pre", &DeleteParams::default()).await.expect("delete");
        assert!(matches!(next_event(&mut stream).await, WatchEvent::Deleted(p) if p.name_any() == "pre"));
        drop(stream);

        // Resuming from a resourceVersion replays what happened after it.
        let rv = server.resource_version().to_string();
        pods.create(&PostParams::default(), &pod("late", json!({"app": "web"}), None))
            .await
            .expect("create late");
        let mut resumed = pods.watch(&wp, &rv).await.expect("watch from rv").boxed();
        assert!(matches!(next_event(&mut resumed).await, WatchEvent::Added(p) if p.name_any() == "late"));

        // Too old after compaction: one ERROR event carrying a 410 Expired Status.
        server.compact_history();
        let mut expired = pods.watch(&wp, "1").await.expect("watch from rv 1").boxed();
        match next_event(&mut expired).await {
            WatchEvent::Error(status) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
            }
            other => panic!("expected a 410 ERROR event, got {other:?}"),
        }
        assert!(step("end of expired watch", expired.try_next()).await.expect("stream").is_none());

        // Bookmarks and timeoutSeconds: a 1 s watch ends by itself.
        let quiet = WatchParams::default().timeout(1).labels("app=none");
        let events: Vec<_> = step("timed-out watch", pods.watch(&quiet, &server.resource_version().to_string()).await.expect("watch").collect::<Vec<_>>()).await;
        assert!(events.iter().all(|e| matches!(e, Ok(WatchEvent::Bookmark(_)))));
    })
    .await
}

#[tokio::test]
async fn streaming_list_watcher_and_bookmarks() {
    bounded(async {
        let server = ApiServer::builder()
            .bookmark_interval(Duration::from_millis(200))
            .start()
            .await;
        let pods: Api<Pod> = Api::namespaced(server.client(), "default");
        pods.create(&PostParams::default(), &pod("existing", json!({}), Some("node-a")))
            .await
            .expect("create");
        let cfg = watcher::Config::default()
            .streaming_lists()
            .fields("spec.nodeName=node-a");
        let mut events = watcher(pods.clone(), cfg).boxed();
        let mut initial = Vec::new();
        loop {
            match step("streaming init", events.try_next()).await.expect("watcher") {
                Some(watcher::Event::Init) => {}
                Some(watcher::Event::InitApply(p)) => initial.push(p.name_any()),
                Some(watcher::Event::InitDone) => break,
                other => panic!("unexpected during streaming init: {other:?}"),
            }
        }
        assert_eq!(initial, ["existing"]);
        let watch = server
            .requests()
            .into_iter()
            .find(|r| r.is_watch())
            .expect("a watch request");
        assert_eq!(watch.param("sendInitialEvents").as_deref(), Some("true"));
        assert_eq!(watch.param("fieldSelector").as_deref(), Some("spec.nodeName=node-a"));

        // Periodic bookmarks do not disturb the stream; the next change still arrives.
        tokio::time::sleep(Duration::from_millis(500)).await;
        pods.create(&PostParams::default(), &pod("later", json!({}), Some("node-a")))
            .await
            .expect("create later");
        pods.create(&PostParams::default(), &pod("elsewhere", json!({}), Some("node-b")))
            .await
            .expect("create elsewhere");
        pods.patch(
            "existing",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}})),
        )
        .await
        .expect("patch");
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match step("live events", events.try_next()).await.expect("watcher") {
                Some(watcher::Event::Apply(p)) => seen.push(p.name_any()),
                other => panic!("unexpected: {other:?}"),
            }
        }
        assert_eq!(seen, ["later", "existing"]);

        // Streaming lists need bookmarks, as upstream validates (kube checks this client-side
        // too, so ask over raw HTTP).
        let req = hyper::Request::builder()
            .uri("/api/v1/namespaces/default/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan")
            .body(Vec::new())
            .expect("request");
        let err = server.client().request_text(req).await.expect_err("sendInitialEvents without bookmarks");
        assert_eq!(api_status(err).code, 422);
    })
    .await
}

#[tokio::test]
async fn recorder_publishes_events() {
    bounded(async {
        let server = ApiServer::start().await;
        let client = server.client();
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let p = pods
            .create(
                &PostParams::default(),
                &pod("migrating", json!({}), Some("node-a")),
            )
            .await
            .expect("create");
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "podmigrate-agent".into(),
                instance: Some("node-a".into()),
            },
        );
        let ev = RecorderEvent {
            type_: EventType::Normal,
            reason: "Checkpointed".into(),
            note: Some("checkpoint written".into()),
            action: "Checkpoint".into(),
            secondary: None,
        };
        let reference = p.object_ref(&());
        recorder.publish(&ev, &reference).await.expect("publish");
        let stored = server.events();
        assert_eq!(stored.len(), 1, "{stored:?}");
        let e = &stored[0];
        assert_eq!(e["apiVersion"], "events.k8s.io/v1");
        assert_eq!(e["note"], "checkpoint written");
        assert_eq!(e["regarding"]["name"], "migrating");
        assert_eq!(e["regarding"]["uid"], json!(p.metadata.uid));
        assert_eq!(e["reportingController"], "podmigrate-agent");

        // The same event again becomes a `series` merge patch on the stored event.
        recorder
            .publish(&ev, &reference)
            .await
            .expect("publish again");
        let stored = server.events();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0]["series"]["count"], 2);
        let log = server.requests();
        assert!(log
            .iter()
            .any(|r| r.method == "POST"
                && r.path == "/apis/events.k8s.io/v1/namespaces/default/events"));
        assert!(log.iter().any(|r| r.method == "PATCH"
            && r.path
                .starts_with("/apis/events.k8s.io/v1/namespaces/default/events/migrating.")));

        // And they can be listed back through kube with the events.k8s.io field selectors.
        let events: Api<EventsV1> = Api::namespaced(client, "default");
        let found = events
            .list(&ListParams::default().fields("regarding.name=migrating,reason=Checkpointed"))
            .await
            .expect("list events");
        assert_eq!(found.items.len(), 1);
    })
    .await
}

#[tokio::test]
async fn error_statuses_match_upstream() {
    bounded(async {
        let server = ApiServer::start().await;
        let pods: Api<Pod> = Api::namespaced(server.client(), "default");
        let pp = PostParams::default();
        pods.create(&pp, &pod("dup", json!({}), None))
            .await
            .expect("create");

        // 409 AlreadyExists.
        let s = api_status(
            pods.create(&pp, &pod("dup", json!({}), None))
                .await
                .expect_err("duplicate"),
        );
        assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
        assert_eq!(s.message, "pods \"dup\" already exists");

        // 404 NotFound with details.
        let s = api_status(pods.get("nope").await.expect_err("missing"));
        assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
        assert_eq!(s.message, "pods \"nope\" not found");
        let details = s.details.as_ref().expect("details");
        assert_eq!(
            (details.name.as_str(), details.kind.as_str()),
            ("nope", "pods")
        );
        assert!(pods.get_opt("nope").await.expect("get_opt").is_none());

        // The raw body is a metav1.Status.
        let req = hyper::Request::builder()
            .uri("/api/v1/namespaces/default/pods/nope")
            .body(kube::client::Body::empty())
            .expect("request");
        let resp = server.client().send(req).await.expect("send");
        assert_eq!(resp.status().as_u16(), 404);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["code"], 404);

        // 422 for a pod without a name, with causes.
        let mut nameless = pod("x", json!({}), None);
        nameless.metadata.name = None;
        let s = api_status(pods.create(&pp, &nameless).await.expect_err("nameless"));
        assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
        let causes = &s.details.as_ref().expect("details").causes;
        assert_eq!(causes[0].field, "metadata.name");
        // generateName works.
        nameless.metadata.generate_name = Some("clone-".into());
        let generated = pods.create(&pp, &nameless).await.expect("generateName");
        assert!(generated.name_any().starts_with("clone-") && generated.name_any().len() == 11);

        // 422 for a pod without containers / images.
        let bad: Pod = serde_json::from_value(
            json!({"metadata": {"name": "bad"}, "spec": {"containers": [{"name": "c"}]}}),
        )
        .expect("pod");
        let s = api_status(pods.create(&pp, &bad).await.expect_err("no image"));
        assert_eq!(s.code, 422);
        assert!(
            s.message
                .contains("spec.containers[0].image: Required value"),
            "{}",
            s.message
        );

        // 404 for a namespace that does not exist.
        let elsewhere: Api<Pod> = Api::namespaced(server.client(), "missing-ns");
        let s = api_status(
            elsewhere
                .create(&pp, &pod("p", json!({}), None))
                .await
                .expect_err("no ns"),
        );
        assert_eq!(s.code, 404);
        assert_eq!(s.message, "namespaces \"missing-ns\" not found");

        // 409 Conflict for a PUT with a stale resourceVersion.
        let mut first = pods.get("dup").await.expect("get");
        let stale = first.clone();
        first.labels_mut().insert("updated".into(), "yes".into());
        let replaced = pods.replace("dup", &pp, &first).await.expect("replace");
        assert_ne!(replaced.resource_version(), stale.resource_version());
        let s = api_status(
            pods.replace("dup", &pp, &stale)
                .await
                .expect_err("stale replace"),
        );
        assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
        assert!(
            s.message.contains("the object has been modified"),
            "{}",
            s.message
        );
        // Without a resourceVersion, PUT is unconditional (as for pods upstream).
        let mut unconditional = stale.clone();
        unconditional.metadata.resource_version = None;
        pods.replace("dup", &pp, &unconditional)
            .await
            .expect("unconditional replace");

        // Injected failures: 503 is retried by kube's retry layer, 500 surfaces.
        server.fail_requests("GET", "/pods/dup", 503, 2);
        pods.get("dup").await.expect("retried past two 503s");
        server.fail_requests("GET", "/pods/dup", 500, 1);
        let s = api_status(pods.get("dup").await.expect_err("injected 500"));
        assert_eq!(s.code, 500);
    })
    .await
}

#[tokio::test]
async fn unknown_field_pruning_switch() {
    bounded(async {
        let with_clone_pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "clone"},
            "spec": {
                "containers": [{"name": "app", "image": "busybox:1.36", "checkpointRef": "x"}],
                "clonePod": {"sourcePod": "default/orig", "checkpoint": "ckpt-1"},
            },
        });
        let ar = ApiResource::erase::<Pod>(&());

        // Default: pruned like a stock API server, with a Warning header per field.
        let stock = ApiServer::start().await;
        let api: Api<DynamicObject> = Api::namespaced_with(stock.client(), "default", &ar);
        let obj: DynamicObject = serde_json::from_value(with_clone_pod.clone()).expect("dynamic");
        let created = api
            .create(&PostParams::default(), &obj)
            .await
            .expect("create");
        assert!(created.data["spec"].get("clonePod").is_none());
        assert!(stock.get_pod("default", "clone").expect("stored")["spec"]
            .get("clonePod")
            .is_none());
        assert!(
            stock.get_pod("default", "clone").expect("stored")["spec"]["containers"][0]
                .get("checkpointRef")
                .is_none()
        );
        // fieldValidation=Strict refuses instead.
        let strict = PatchParams {
            field_validation: Some(ValidationDirective::Strict),
            ..PatchParams::default()
        };
        let s = api_status(
            api.patch(
                "clone",
                &strict,
                &Patch::Merge(json!({"spec": {"clonePod": {"sourcePod": "x"}}})),
            )
            .await
            .expect_err("strict"),
        );
        assert_eq!(s.code, 400);
        assert!(
            s.message.contains("unknown field \"spec.clonePod\""),
            "{}",
            s.message
        );
        // And a raw POST sees the Warning header.
        let req = hyper::Request::builder()
            .method("POST")
            .uri("/api/v1/namespaces/default/pods")
            .header("Content-Type", "application/json")
            .body(kube::client::Body::from(
                serde_json::to_vec(&json!({
                    "metadata": {"name": "warned"},
                    "spec": {"containers": [{"name": "a", "image": "b"}], "clonePod": {}},
                }))
                .expect("json"),
            ))
            .expect("request");
        let resp = stock.client().send(req).await.expect("send");
        assert_eq!(resp.status().as_u16(), 201);
        let warning = resp
            .headers()
            .get("Warning")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert_eq!(warning, r#"299 - "unknown field \"spec.clonePod\"""#);
        stock.shutdown().await;

        // keep_unknown_fields: stored and returned verbatim.
        let keeping = ApiServer::builder().keep_unknown_fields(true).start().await;
        let api: Api<DynamicObject> = Api::namespaced_with(keeping.client(), "default", &ar);
        let created = api
            .create(&PostParams::default(), &obj)
            .await
            .expect("create");
        assert_eq!(created.data["spec"]["clonePod"]["checkpoint"], "ckpt-1");
        let stored = keeping.get_pod("default", "clone").expect("stored");
        assert_eq!(stored["spec"]["clonePod"]["sourcePod"], "default/orig");
        assert_eq!(stored["spec"]["containers"][0]["checkpointRef"], "x");
        // Typed kube clients still read such pods (serde ignores the extra fields).
        let typed: Api<Pod> = Api::namespaced(keeping.client(), "default");
        typed.get("clone").await.expect("typed get");
    })
    .await
}

#[tokio::test]
async fn graceful_deletion_and_finalizers() {
    bounded(async {
        let server = ApiServer::builder()
            .pod_deletion(PodDeletion::Graceful)
            .start()
            .await;
        let pods: Api<Pod> = Api::namespaced(server.client(), "default");
        let pp = PostParams::default();
        pods.create(&pp, &pod("bound", json!({}), Some("node-a")))
            .await
            .expect("create");
        pods.create(&pp, &pod("unbound", json!({}), None))
            .await
            .expect("create");

        // A bound pod only starts terminating.
        let first = pods
            .delete("bound", &DeleteParams::default())
            .await
            .expect("delete");
        let terminating = first.left().expect("the pod comes back");
        assert!(terminating.metadata.deletion_timestamp.is_some());
        assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(30));
        assert!(server.get_pod("default", "bound").is_some());
        // An unbound one goes at once (no kubelet to wait for), as upstream.
        pods.delete("unbound", &DeleteParams::default())
            .await
            .expect("delete");
        assert!(server.get_pod("default", "unbound").is_none());

        // The test kubelet confirms; the watch sees DELETED.
        let mut stream = pods
            .watch(
                &WatchParams::default(),
                &server.resource_version().to_string(),
            )
            .await
            .expect("watch")
            .boxed();
        assert_eq!(
            server
                .confirm_pod_deletion("default", "bound")
                .expect("confirm"),
            None
        );
        match step("DELETED", stream.try_next()).await.expect("stream") {
            Some(WatchEvent::Deleted(p)) => assert_eq!(p.name_any(), "bound"),
            other => panic!("expected DELETED, got {other:?}"),
        }

        // Finalizers hold an object until an update removes the last one.
        let mut held = pod("held", json!({}), None);
        held.metadata.finalizers = Some(vec!["podmigrate.io/checkpoint".into()]);
        pods.create(&pp, &held).await.expect("create");
        pods.delete("held", &DeleteParams::default())
            .await
            .expect("delete");
        let still = server.get_pod("default", "held").expect("still there");
        assert!(still["metadata"]["deletionTimestamp"].is_string());
        pods.patch(
            "held",
            &PatchParams::default(),
            &Patch::Json::<Value>(
                serde_json::from_value(json!([{"op": "remove", "path": "/metadata/finalizers"}]))
                    .expect("patch"),
            ),
        )
        .await
        .expect("drop finalizer");
        server
            .wait_for_pod("default", "held", STEP, |p| p.is_none())
            .await
            .expect("removed once unfinalized");

        // Preconditions.
        pods.create(&pp, &pod("pre", json!({}), None))
            .await
            .expect("create");
        let s = api_status(
            pods.delete(
                "pre",
                &DeleteParams::default().preconditions(kube::api::Preconditions {
                    uid: Some("not-the-uid".into()),
                    resource_version: None,
                }),
            )
            .await
            .expect_err("uid precondition"),
        );
        assert_eq!(s.code, 409);
    })
    .await
}

#[tokio::test]
async fn discovery_kubeconfig_and_shutdown() {
    bounded(async {
        let server = ApiServer::start().await;

        // kube's (non-aggregated) discovery understands the documents.
        let discovery = kube::Discovery::new(server.client())
            .run()
            .await
            .expect("discovery");
        assert!(discovery.has_group("events.k8s.io"));
        let (pods_ar, caps) = discovery
            .groups()
            .find(|g| g.name().is_empty())
            .and_then(|core| core.recommended_kind("Pod"))
            .expect("pods discovered");
        assert_eq!(pods_ar.plural, "pods");
        assert!(caps
            .subresources
            .iter()
            .any(|(ar, _)| ar.plural == "status"));

        // A child process would reach it through KUBECONFIG; same code path here.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kubeconfig");
        server.write_kubeconfig(&path).expect("write kubeconfig");
        let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("config");
        let client = kube::Client::try_from(config).expect("client");
        let version = client.apiserver_version().await.expect("/version");
        assert_eq!(
            (version.major.as_str(), version.minor.as_str()),
            ("1", "37")
        );
        assert!(server.requests().iter().any(|r| r.path == "/version"));

        // Namespaces through kube, and a cascade on deletion.
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": "migrations"}})).expect("ns");
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .expect("create ns");
        let pods: Api<Pod> = Api::namespaced(client.clone(), "migrations");
        pods.create(&PostParams::default(), &pod("inside", json!({}), None))
            .await
            .expect("create");
        namespaces
            .delete("migrations", &DeleteParams::default())
            .await
            .expect("delete ns");
        assert!(server
            .get(Kind::Pod, Some("migrations"), "inside")
            .is_none());

        // Shutdown closes the listener and an open watch.
        let addr = server.addr();
        let all: Api<Pod> = Api::all(client);
        let mut open_watch = all
            .watch(&WatchParams::default(), "0")
            .await
            .expect("watch")
            .boxed();
        server.shutdown().await;
        let end = step("watch end after shutdown", open_watch.next()).await;
        assert!(!matches!(end, Some(Ok(_))), "watch must end, got {end:?}");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "listener still open"
        );

        // Dropping (instead of shutdown) stops it too.
        let dropped = ApiServer::start().await;
        let addr = dropped.addr();
        drop(dropped);
        let mut closed = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed, "listener still open after drop");
    })
    .await
}

#[tokio::test]
async fn watcher_relists_after_410_expired() {
    bounded(async {
        let server = ApiServer::start().await;
        let pods: Api<Pod> = Api::namespaced(server.client(), "default");
        // A 1 s server-side timeout makes the watcher re-watch from its last resourceVersion.
        let mut events = watcher(pods.clone(), watcher::Config::default().timeout(1)).boxed();
        loop {
            if let Some(watcher::Event::InitDone) = step("watcher init", events.try_next())
                .await
                .expect("watcher")
            {
                break;
            }
        }
        // A change the watcher does not see (other namespace), then the history is lost: its
        // resourceVersion is now too old, the server answers 410, and the watcher re-lists.
        let elsewhere: Api<Pod> = Api::namespaced(server.client(), "kube-system");
        elsewhere
            .create(&PostParams::default(), &pod("other", json!({}), None))
            .await
            .expect("create elsewhere");
        server.compact_history();
        server
            .create_pod(
                "default",
                serde_json::to_value(pod("during-gap", json!({}), None)).expect("json"),
            )
            .expect("in-process create");
        let mut saw_error = false;
        let mut relisted = Vec::new();
        loop {
            match step("re-list", events.next())
                .await
                .expect("watcher stream")
            {
                Err(watcher::Error::WatchError(status)) => {
                    assert_eq!(status.code, 410);
                    saw_error = true;
                }
                Err(other) => panic!("unexpected watcher error {other:?}"),
                Ok(watcher::Event::Init) => assert!(saw_error, "re-list before the 410"),
                Ok(watcher::Event::InitApply(p)) => relisted.push(p.name_any()),
                Ok(watcher::Event::InitDone) => break,
                Ok(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(relisted, ["during-gap"]);
    })
    .await
}

#[tokio::test]
async fn delete_collection_dry_run_and_wait_helpers() {
    bounded(async {
        let server = ApiServer::builder()
            .auto_create_namespaces(true)
            .start()
            .await;
        let pods: Api<Pod> = Api::namespaced(server.client(), "auto");
        for name in ["a", "b", "c"] {
            let labels = if name == "c" {
                json!({"keep": "yes"})
            } else {
                json!({})
            };
            pods.create(&PostParams::default(), &pod(name, labels, None))
                .await
                .expect("create");
        }
        assert!(
            server.get(Kind::Namespace, None, "auto").is_some(),
            "namespace auto-created"
        );

        // dryRun answers without storing.
        let dry = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        pods.create(&dry, &pod("dry", json!({}), None))
            .await
            .expect("dry-run create");
        assert!(server.get_pod("auto", "dry").is_none());

        let deleted = pods
            .delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels("!keep"),
            )
            .await
            .expect("delete collection");
        let list = deleted.left().expect("a list of deleted pods");
        assert_eq!(names(&list.items), ["a", "b"]);
        assert_eq!(
            names_of(&pods.list(&ListParams::default()).await.expect("list").items),
            ["c"]
        );

        // wait_for_pod wakes on writes from any side.
        let waiter = server.wait_for_pod("auto", "c", STEP, |p| {
            p.is_some_and(|p| p["status"]["phase"] == "Running")
        });
        let kubelet = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            pods.patch_status(
                "c",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Running"}})),
            )
            .await
            .expect("status patch");
        };
        let (seen, ()) = tokio::join!(waiter, kubelet);
        assert_eq!(
            seen.expect("in time").expect("present")["status"]["phase"],
            "Running"
        );
        assert_eq!(
            server
                .wait_until(Duration::from_millis(50), |s| s.pods().is_empty())
                .await,
            Err(podmigrate_e2e::apiserver::WaitTimeout(
                Duration::from_millis(50)
            ))
        );

        // Binding (the scheduler's way of setting spec.nodeName) and its conflict.
        server.bind_pod("auto", "c", "node-a").expect("bind");
        assert_eq!(
            server.get_pod("auto", "c").expect("pod")["spec"]["nodeName"],
            "node-a"
        );
        let s = server.bind_pod("auto", "c", "node-b").expect_err("rebind");
        assert_eq!(s.code, 409);
    })
    .await
}
