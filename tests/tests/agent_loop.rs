//! The agent's watch, decide, patch and Event loop against the API server stand-in, with a
//! real (private) containerd behind it: refused clones are marked on the clone and reported
//! as Events on both pods, and a clone made by hand gets the label its source's agent needs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use podmigrate_e2e::apiserver::ApiServer;
use podmigrate_e2e::containerd::{cri_skip_reason, Containerd, ContainerdOptions};
use podmigrate_e2e::harness::skip;
use podmigrate_kubelet_plugin::agent::containerd::Containerd as AgentContainerd;
use podmigrate_kubelet_plugin::agent::metrics::Metrics;
use podmigrate_kubelet_plugin::agent::migration::{Agent, AgentConfig};
use podmigrate_kubelet_plugin::agent::vocabulary::{Mode, CLONE_OF_LABEL, PHASE, REASON};
use podmigrate_kubelet_plugin::agent::watch;
use podmigrate_kubelet_plugin::cli::clone_pod::build_clone_pod;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

fn running_pod(name: &str, node: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"nodeName": node, "runtimeClassName": "migrate",
                 "containers": [{"name": "counter", "image": "localhost/podmigrate/counter:1"}]}
    })
}

fn running_status() -> Value {
    json!({"phase": "Running", "containerStatuses": [{
        "name": "counter", "ready": true, "restartCount": 0,
        "image": "localhost/podmigrate/counter:1", "imageID": "",
        "state": {"running": {"startedAt": "2026-11-21T08:00:00Z"}}}]})
}

fn annotation<'a>(pod: Option<&'a Value>, key: &str) -> Option<&'a str> {
    pod?.pointer("/metadata/annotations")?.get(key)?.as_str()
}

/// Runs the agent for `node-a` in this process, against the stand-in and a real containerd.
async fn start_agent(
    api: &ApiServer,
    ctrd: &Containerd,
    work: &std::path::Path,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let client = api.client();
    let agent = Arc::new(Agent::new(
        client.clone(),
        AgentContainerd::connect(ctrd.address()).await.unwrap(),
        AgentConfig {
            node_name: "node-a".into(),
            share_root: work.join("share"),
            work_dir: work.join("work"),
            containerd_socket: PathBuf::from(ctrd.address()),
            max_outbound: 2,
            checkpoint_timeout: Duration::from_secs(30),
            clone_timeout: Duration::from_secs(30),
            prepare_wait: Duration::ZERO,
            poll_interval: Duration::from_millis(100),
            key_file: None,
        },
        Arc::new(Metrics::default()),
        Recorder::new(
            client,
            Reporter {
                controller: "podmigrate-agent".into(),
                instance: Some("node-a".into()),
            },
        ),
    ));
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(watch::run(agent, shutdown.clone()));
    (shutdown, running)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clone_named_only_in_spec_clone_pod_is_refused_with_the_way_out() {
    if let Some(reason) = cri_skip_reason() {
        skip(&reason);
        return;
    }
    // As a patched API server would: spec.clonePod is kept.
    let api = ApiServer::builder().keep_unknown_fields(true).start().await;
    api.add_node("node-a").unwrap();
    let ctrd = Containerd::start(ContainerdOptions::named("agent-field"))
        .await
        .expect("starting containerd");
    let work = tempfile::tempdir().unwrap();
    let (shutdown, running) = start_agent(&api, &ctrd, work.path()).await;

    api.create_pod(
        "default",
        running_pod(
            "counter",
            "node-a",
            json!({"podmigrate.io/migratable": "true"}),
        ),
    )
    .unwrap();
    api.create_pod(
        "default",
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "poc-clone", "namespace": "default"},
            "spec": {"nodeName": "node-a", "clonePod": "counter", "runtimeClassName": "migrate",
                     "containers": [{"name": "counter", "image": "localhost/podmigrate/counter:1"}]}
        }),
    )
    .unwrap();
    let refused = api
        .wait_for_pod("default", "poc-clone", WAIT, |p| {
            annotation(p, PHASE) == Some("Failed")
        })
        .await
        .expect("the field-only clone is refused");
    let reason = annotation(refused.as_ref(), REASON)
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("spec.clonePod") && reason.contains("podmigrate apply"),
        "{reason}"
    );
    api.wait_until(WAIT, |srv| {
        srv.events().iter().any(|e| {
            e.pointer("/regarding/name").and_then(Value::as_str) == Some("poc-clone")
                && e.get("reason").and_then(Value::as_str) == Some("CloneFieldOnly")
        })
    })
    .await
    .expect("a CloneFieldOnly Event on the clone");
    // Nothing happened to the source.
    assert!(annotation(api.get_pod("default", "counter").as_ref(), PHASE).is_none());

    shutdown.cancel();
    tokio::time::timeout(WAIT, running)
        .await
        .expect("the agent stops")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_clones_are_marked_and_reported_and_hand_made_clones_labelled() {
    if let Some(reason) = cri_skip_reason() {
        skip(&reason);
        return;
    }
    let api = ApiServer::start().await;
    api.add_node("node-a").unwrap();
    api.add_node("node-b").unwrap();
    let ctrd = Containerd::start(ContainerdOptions::named("agent-loop"))
        .await
        .expect("starting containerd");
    let work = tempfile::tempdir().unwrap();

    let client = api.client();
    let (shutdown, running) = start_agent(&api, &ctrd, work.path()).await;

    // A source that did not opt in, and a clone of it as `kubectl migrate` builds one.
    api.create_pod(
        "default",
        running_pod("private", "node-a", json!({"app": "counter"})),
    )
    .unwrap();
    api.set_pod_status("default", "private", running_status())
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let source = pods.get("private").await.unwrap();
    let clone = build_clone_pod(&source, "node-b", "private-clone", Mode::Migrate, false);
    pods.create(&PostParams::default(), &clone).await.unwrap();

    let refused = api
        .wait_for_pod("default", "private-clone", WAIT, |p| {
            annotation(p, PHASE) == Some("Failed")
        })
        .await
        .expect("the clone is marked Failed");
    let reason = annotation(refused.as_ref(), REASON)
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("podmigrate.io/migratable"),
        "reason: {reason}"
    );
    api.wait_until(WAIT, |srv| {
        let events = srv.events();
        ["private", "private-clone"].iter().all(|pod| {
            events.iter().any(|e| {
                e.pointer("/regarding/name").and_then(Value::as_str) == Some(pod)
                    && e.get("reason").and_then(Value::as_str) == Some("NotMigratable")
            })
        })
    })
    .await
    .expect("a NotMigratable Event on both pods");
    // The source was never touched: still there, not deleted.
    assert!(api.get_pod("default", "private").is_some());

    // A clone made by hand, annotation only, on this node: the agent labels it, and the
    // labelled clone then reaches the controller (and is refused: its source does not exist).
    api.create_pod(
        "default",
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "by-hand", "namespace": "default",
                         "annotations": {"podmigrate.io/clone-pod": "nobody"}},
            "spec": {"nodeName": "node-a", "runtimeClassName": "migrate",
                     "containers": [{"name": "counter", "image": "localhost/podmigrate/counter:1"}]}
        }),
    )
    .unwrap();
    let handled = api
        .wait_for_pod("default", "by-hand", WAIT, |p| {
            p.and_then(|p| p.pointer("/metadata/labels"))
                .and_then(|l| l.get(CLONE_OF_LABEL))
                .and_then(Value::as_str)
                == Some("nobody")
                && annotation(p, PHASE) == Some("Failed")
        })
        .await
        .expect("the hand-made clone is labelled and then refused");
    assert!(
        annotation(handled.as_ref(), REASON)
            .unwrap_or_default()
            .contains("does not exist"),
        "{handled:?}"
    );
    // The agent watched this node's pods with a field selector, as a DaemonSet pod should.
    assert!(api.requests().iter().any(
        |r| r.is_watch() && r.param("fieldSelector").as_deref() == Some("spec.nodeName=node-a")
    ));

    shutdown.cancel();
    tokio::time::timeout(WAIT, running)
        .await
        .expect("the agent stops when asked")
        .unwrap();
}
