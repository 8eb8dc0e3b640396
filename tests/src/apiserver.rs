//! An in-process stand-in for kube-apiserver, for testing the Kubernetes-facing code (the node
//! agent's kube-rs watchers and patches, `kubectl migrate`'s clone pods) where no cluster can run.
//!
//! It serves the real JSON wire format over plain HTTP on `127.0.0.1:<ephemeral>`, so the code under
//! test talks to it through an unmodified [`kube::Client`] (hyper connector, retry layer, watch
//! framing and all) — either in-process via [`ApiServer::client`] or from a child process via
//! [`ApiServer::write_kubeconfig`] + `KUBECONFIG`. Objects are stored as raw [`serde_json::Value`]
//! so the stand-in can be told to keep fields a stock server would drop ([`Builder::keep_unknown_fields`]).
//!
//! # Served
//! * Resources: core/v1 `pods` (+ `pods/status`, `pods/binding`), `namespaces` (+ `/status`),
//!   `nodes` (+ `/status`), `events`; events.k8s.io/v1 `events` (what `kube::runtime::events::Recorder`
//!   posts to in kube 5: POST, then a merge PATCH of `series` for repeats).
//! * Discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/events.k8s.io[/v1]`, `/healthz`,
//!   `/readyz`, `/livez`. Aggregated discovery (`Accept: ...;g=apidiscovery.k8s.io`) is not served:
//!   use `Discovery::run`, not `run_aggregated`.
//! * Verbs: get, list, watch, create, update (PUT), patch, delete, deletecollection.
//!
//! # Behaviour, as upstream
//! * One global `resourceVersion` counter; every write bumps it; no-op writes don't (no event).
//! * LIST: `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `k`, `!k`), `fieldSelector` (`=`, `==`,
//!   `!=` on the labels upstream registers; others → 400), `limit` + `continue`, items without
//!   `kind`/`apiVersion`, list `metadata.resourceVersion`.
//! * WATCH: newline-delimited `{"type","object"}`; `resourceVersion` unset/`0` → synthetic ADDED for
//!   current objects first; `N` → replay of changes after `N` from a bounded history, or one ERROR
//!   event with a 410 Expired Status when `N` is older than the history (then the stream ends);
//!   `sendInitialEvents=true` (streaming lists; needs `allowWatchBookmarks=true` and
//!   `resourceVersionMatch=NotOlderThan`, else 422) ends the initial ADDED burst with a BOOKMARK
//!   annotated `k8s.io/initial-events-end`; BOOKMARKs every [`Builder::bookmark_interval`] when
//!   `allowWatchBookmarks=true`; `timeoutSeconds` closes the stream cleanly (default 1800 s).
//!   Selector transitions are translated: an object leaving the selector is sent as DELETED,
//!   one entering it as ADDED.
//! * CREATE: `generateName`, `uid`, `creationTimestamp`, `resourceVersion`; 409 AlreadyExists;
//!   422 without name; 404 when the namespace does not exist (NamespaceLifecycle), unless
//!   [`Builder::auto_create_namespaces`]; pods get `status: {phase: Pending, qosClass}` (client
//!   status is dropped), `metadata.generation: 1` and the common spec defaults (`restartPolicy`,
//!   `terminationGracePeriodSeconds`, `dnsPolicy`, `schedulerName`, `serviceAccountName`,
//!   `enableServiceLinks`, per-container `imagePullPolicy`/`terminationMessagePath`/
//!   `terminationMessagePolicy`); namespaces get `status.phase: Active` and the
//!   `kubernetes.io/metadata.name` label.
//! * UPDATE/PATCH: stale `metadata.resourceVersion` (in a PUT body or a patch) → 409 Conflict; the
//!   main resource ignores `status`, `/status` ignores everything but `status`; pod spec is
//!   immutable except `containers[*].image`, `initContainers[*].image`, `activeDeadlineSeconds`,
//!   `tolerations`, `schedulingGates` (else 422), `generation` bumps on spec changes; `uid`,
//!   `creationTimestamp`, deletion fields are kept from the stored object; `fieldValidation`
//!   `Strict` → 400 on unknown fields, `Warn` (default) → a `Warning` header per field.
//! * DELETE: preconditions (`uid`, `resourceVersion`) → 409; finalizers keep an object (with
//!   `deletionTimestamp`) until an update empties them; DELETED watch events; 200 when gone,
//!   202 when still present. Namespace deletion removes everything in it.
//! * Errors: `metav1.Status` bodies with upstream codes, reasons, messages and details.
//! * `dryRun=All` validates and answers without storing.
//!
//! # Simplified (documented differences)
//! * Pod deletion is immediate by default ([`PodDeletion::Immediate`]). With
//!   [`PodDeletion::Graceful`], deleting a pod bound to a node only sets `deletionTimestamp` and
//!   `deletionGracePeriodSeconds` until the test "kubelet" calls
//!   [`ApiServer::confirm_pod_deletion`] (or a client DELETEs with `gracePeriodSeconds=0`), as a
//!   real kubelet does; the grace period is never enforced by a timer.
//! * Strategic merge patch (the `patch` submodule): merge keys by field name for the usual pod/node lists,
//!   other lists replaced. Server-side apply (`application/apply-patch+yaml`): JSON bodies only
//!   (what kube sends), `fieldManager` required, applied as a strategic merge (creating the object
//!   if missing) with no managed-fields tracking, no conflicts and no removal of fields a manager
//!   stopped applying. `managedFields` are never populated.
//! * LIST `continue` reads the current state after the last key (no snapshot at the first page's
//!   version); `resourceVersionMatch=Exact` succeeds only for the current version (else 410).
//!   A watch from a future version just waits.
//! * core/v1 and events.k8s.io/v1 events are stored separately (upstream shares one storage and
//!   converts); [`ApiServer::events`] returns both.
//! * No admission beyond NamespaceLifecycle/ServiceAccount-name defaulting, no authn/authz, no
//!   protobuf, no `Table` output, no `pods/eviction`, `pods/log`, `exec`.

mod patch;
mod selector;
mod status;

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    io,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{
    combinators::UnsyncBoxBody, BodyExt, Full, LengthLimitError, Limited, StreamBody,
};
use hyper::{
    body::{Frame, Incoming},
    header::{HeaderValue, CONTENT_TYPE},
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{json, Map, Value};
use tokio::{
    net::TcpListener,
    sync::watch,
    task::{JoinHandle, JoinSet},
    time::Instant,
};

pub use status::ApiError;

use patch::PatchKind;
use selector::{FieldSelector, LabelSelector, Selectors};
use status::Cause;

/// The resource types the stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// core/v1 `namespaces` (cluster-scoped).
    Namespace,
    /// core/v1 `nodes` (cluster-scoped).
    Node,
    /// core/v1 `pods`.
    Pod,
    /// core/v1 `events` (what `kubectl describe` and client-go's legacy recorder use).
    Event,
    /// events.k8s.io/v1 `events` (what `kube::runtime::events::Recorder` posts).
    EventsV1Event,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Event,
        Kind::EventsV1Event,
    ];

    /// API group (`""` for core).
    pub fn group(self) -> &'static str {
        match self {
            Kind::EventsV1Event => "events.k8s.io",
            _ => "",
        }
    }

    /// `apiVersion` as written in objects.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::EventsV1Event => "events.k8s.io/v1",
            _ => "v1",
        }
    }

    /// `kind` as written in objects.
    pub fn kind_name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Event | Kind::EventsV1Event => "Event",
        }
    }

    /// URL plural.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Event | Kind::EventsV1Event => "events",
        }
    }

    /// `pods` or `events.events.k8s.io`, as upstream messages name resources.
    fn qualified_plural(self) -> String {
        if self.group().is_empty() {
            self.plural().to_string()
        } else {
            format!("{}.{}", self.plural(), self.group())
        }
    }

    /// Whether objects live in a namespace.
    pub fn namespaced(self) -> bool {
        matches!(self, Kind::Pod | Kind::Event | Kind::EventsV1Event)
    }

    /// Whether the kind has a `/status` subresource (so the main resource ignores `status`).
    fn has_status(self) -> bool {
        matches!(self, Kind::Pod | Kind::Namespace | Kind::Node)
    }

    fn from_path(group: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.group() == group && k.plural() == plural)
    }
}

/// What DELETE does to a pod bound to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodDeletion {
    /// Remove at once (DELETED event), as if the kubelet confirmed instantly.
    #[default]
    Immediate,
    /// Set `deletionTimestamp`/`deletionGracePeriodSeconds` and wait for the test kubelet's
    /// [`ApiServer::confirm_pod_deletion`] (or a DELETE with `gracePeriodSeconds=0`).
    Graceful,
}

/// Server options, fixed at start.
#[derive(Debug, Clone)]
struct Options {
    keep_unknown_fields: bool,
    pod_deletion: PodDeletion,
    history_limit: usize,
    bookmark_interval: Duration,
    auto_create_namespaces: bool,
    max_body_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            keep_unknown_fields: false,
            pod_deletion: PodDeletion::Immediate,
            history_limit: 4096,
            bookmark_interval: Duration::from_secs(10),
            auto_create_namespaces: false,
            // kube-apiserver's default max request body.
            max_body_bytes: 3 * 1024 * 1024,
        }
    }
}

/// Configures an [`ApiServer`] before it starts.
#[derive(Debug, Clone)]
pub struct Builder {
    opts: Options,
    namespaces: Vec<String>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            opts: Options::default(),
            // What a fresh cluster has.
            namespaces: vec![
                "default".into(),
                "kube-system".into(),
                "kube-public".into(),
                "kube-node-lease".into(),
            ],
        }
    }
}

impl Builder {
    /// Keep fields the typed Kubernetes schema does not know (e.g. a `spec.clonePod` extension)
    /// instead of pruning them as a stock kube-apiserver does. Default: prune.
    pub fn keep_unknown_fields(mut self, keep: bool) -> Self {
        self.opts.keep_unknown_fields = keep;
        self
    }

    /// How pod deletion behaves; default [`PodDeletion::Immediate`].
    pub fn pod_deletion(mut self, mode: PodDeletion) -> Self {
        self.opts.pod_deletion = mode;
        self
    }

    /// How many changes the watch history keeps (older `resourceVersion`s get 410). Default 4096.
    pub fn history_limit(mut self, changes: usize) -> Self {
        self.opts.history_limit = changes.max(1);
        self
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK. Default 10 s.
    pub fn bookmark_interval(mut self, interval: Duration) -> Self {
        self.opts.bookmark_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Create a missing namespace on first use instead of answering 404. Default off.
    pub fn auto_create_namespaces(mut self, auto: bool) -> Self {
        self.opts.auto_create_namespaces = auto;
        self
    }

    /// Another namespace to exist at start (besides `default`, `kube-system`, `kube-public`,
    /// `kube-node-lease`).
    pub fn namespace(mut self, name: &str) -> Self {
        self.namespaces.push(name.to_string());
        self
    }

    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn try_start(self) -> io::Result<ApiServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (notify, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(self.opts)),
            notify,
            addr,
        });
        for ns in &self.namespaces {
            shared
                .write(|s| s.create_namespace_object(ns))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        }
        let task = tokio::spawn(serve(listener, shared.clone()));
        Ok(ApiServer {
            shared,
            task: Some(task),
        })
    }

    /// [`Builder::try_start`], panicking if loopback cannot be bound (a broken test machine).
    pub async fn start(self) -> ApiServer {
        match self.try_start().await {
            Ok(server) => server,
            Err(e) => panic!("cannot start the stand-in API server on 127.0.0.1: {e}"),
        }
    }
}

/// One request as the server received it, for assertions such as "the agent watched with
/// `fieldSelector=spec.nodeName=node-a`".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// URL path, e.g. `/api/v1/namespaces/default/pods`.
    pub path: String,
    /// Raw query string (percent-encoded), `""` when absent.
    pub query: String,
    /// `Content-Type`, when sent.
    pub content_type: Option<String>,
}

impl RecordedRequest {
    /// A decoded query parameter (the last one if repeated).
    pub fn param(&self, key: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
            .last()
    }

    /// Whether this was a WATCH.
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch").as_deref(), Some("true" | "1"))
    }
}

/// A `wait_*` helper gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("condition not met within {0:?}")]
pub struct WaitTimeout(pub Duration);

/// A running stand-in API server. Dropping it stops the server and every open connection
/// (including watch streams) — nothing keeps running after the test.
pub struct ApiServer {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // The connection tasks live in a JoinSet owned by this task; aborting it drops the
            // set, which aborts them too.
            task.abort();
        }
    }
}

impl ApiServer {
    /// A server with default options.
    pub async fn start() -> ApiServer {
        Builder::default().start().await
    }

    /// A [`Builder`] for non-default options.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Stops the server and waits until its task (and every connection) is gone.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // The only error is the cancellation we just asked for.
            let _ = task.await;
        }
    }

    /// The listening address (always 127.0.0.1).
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// A [`kube::Client`] for this server with default namespace `default`. Call it inside a
    /// Tokio runtime (kube spawns its request buffer there).
    pub fn client(&self) -> kube::Client {
        let uri = match self.url().parse() {
            Ok(uri) => uri,
            Err(e) => panic!("stand-in URL {} does not parse: {e}", self.url()),
        };
        let config = kube::Config::new(uri);
        match kube::Client::try_from(config) {
            Ok(client) => client,
            Err(e) => panic!("kube cannot build a client for {}: {e}", self.url()),
        }
    }

    /// A kubeconfig (YAML) pointing at this server, with no credentials, for child processes
    /// that use `kube::Config::infer()`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {url}\n\
             contexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n    namespace: default\n\
             current-context: standin\nusers:\n- name: standin\n  user: {{}}\n",
            url = self.url()
        )
    }

    /// Writes [`ApiServer::kubeconfig`] to `path` (point `KUBECONFIG` at it).
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// The current global `resourceVersion`.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// One object as stored (with `kind`/`apiVersion`), if present. `namespace` is ignored for
    /// cluster-scoped kinds.
    pub fn get(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Option<Value> {
        let key = Key::new(kind, namespace, name);
        self.shared.lock().objects.get(&key).cloned()
    }

    /// Every stored object of `kind`, ordered by namespace then name.
    pub fn list(&self, kind: Kind) -> Vec<Value> {
        self.shared
            .lock()
            .objects
            .iter()
            .filter(|(k, _)| k.kind == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A pod as stored.
    pub fn get_pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.get(Kind::Pod, Some(namespace), name)
    }

    /// Every pod.
    pub fn pods(&self) -> Vec<Value> {
        self.list(Kind::Pod)
    }

    /// Every event: core/v1 ones first, then events.k8s.io/v1 ones (tell them apart by `apiVersion`).
    pub fn events(&self) -> Vec<Value> {
        let mut all = self.list(Kind::Event);
        all.extend(self.list(Kind::EventsV1Event));
        all
    }

    /// Every node.
    pub fn nodes(&self) -> Vec<Value> {
        self.list(Kind::Node)
    }

    /// Every namespace.
    pub fn namespaces(&self) -> Vec<Value> {
        self.list(Kind::Namespace)
    }

    /// Creates an object in-process, through the same validation and defaulting as a POST.
    pub fn create(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        object: Value,
    ) -> Result<Value, ApiError> {
        let w = WriteOpts::in_process();
        self.shared
            .write(|s| s.create(kind, namespace, object, &w))
            .map(|r| r.object)
    }

    /// Creates a pod in-process.
    pub fn create_pod(&self, namespace: &str, pod: Value) -> Result<Value, ApiError> {
        self.create(Kind::Pod, Some(namespace), pod)
    }

    /// Creates a namespace in-process.
    pub fn add_namespace(&self, name: &str) -> Result<Value, ApiError> {
        self.create(Kind::Namespace, None, json!({"metadata": {"name": name}}))
    }

    /// Creates a Ready node in-process.
    pub fn add_node(&self, name: &str) -> Result<Value, ApiError> {
        let node = self.create(Kind::Node, None, json!({"metadata": {"name": name}}))?;
        let status =
            json!({"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]});
        self.shared.write(|s| {
            let key = Key::new(Kind::Node, None, name);
            let mut obj = s.objects.get(&key).cloned().unwrap_or(node);
            obj_mut(&mut obj).insert("status".into(), status);
            s.update(Kind::Node, key, obj, Sub::Status, &WriteOpts::in_process())
                .map(|r| r.object)
        })
    }

    /// Replaces a pod's whole `status`, as a kubelet's status update would (bumps the
    /// `resourceVersion`, sends MODIFIED unless nothing changed).
    pub fn set_pod_status(
        &self,
        namespace: &str,
        name: &str,
        status: Value,
    ) -> Result<Value, ApiError> {
        let key = Key::new(Kind::Pod, Some(namespace), name);
        self.shared.write(|s| {
            let mut obj = s
                .objects
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(Kind::Pod, name))?;
            obj_mut(&mut obj).insert("status".into(), status);
            meta_mut(&mut obj).remove("resourceVersion");
            s.update(Kind::Pod, key, obj, Sub::Status, &WriteOpts::in_process())
                .map(|r| r.object)
        })
    }

    /// JSON-merge-patches a pod's `status` (e.g. `{"phase": "Running"}`).
    pub fn patch_pod_status(
        &self,
        namespace: &str,
        name: &str,
        merge_patch: Value,
    ) -> Result<Value, ApiError> {
        let body = json!({ "status": merge_patch }).to_string();
        let key = Key::new(Kind::Pod, Some(namespace), name);
        self.shared.write(|s| {
            s.patch(
                Kind::Pod,
                key,
                PatchKind::Merge,
                body.as_bytes(),
                Sub::Status,
                &WriteOpts::in_process(),
                None,
            )
            .map(|r| r.object)
        })
    }

    /// Binds a pod to a node, as the scheduler does through `pods/binding`.
    pub fn bind_pod(&self, namespace: &str, name: &str, node: &str) -> Result<Value, ApiError> {
        let key = Key::new(Kind::Pod, Some(namespace), name);
        self.shared.write(|s| s.bind(key, node, false))
    }

    /// Changes a stored object with no validation at all (identity fields are restored
    /// afterwards), for states clients cannot produce. Sends MODIFIED if anything changed.
    pub fn modify(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Result<Value, ApiError> {
        let key = Key::new(kind, namespace, name);
        self.shared.write(|s| {
            let old = s
                .objects
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(kind, name))?;
            let mut new = old.clone();
            f(&mut new);
            for field in [
                "name",
                "namespace",
                "uid",
                "resourceVersion",
                "creationTimestamp",
            ] {
                match old.get("metadata").and_then(|m| m.get(field)) {
                    Some(v) => meta_mut(&mut new).insert(field.into(), v.clone()),
                    None => meta_mut(&mut new).remove(field),
                };
            }
            if new == old {
                return Ok(old);
            }
            Ok(s.commit(key, new, ChangeType::Modified, Some(old)))
        })
    }

    /// The test kubelet's "containers are gone": finishes a pending graceful deletion. Returns
    /// `None` when the pod is now removed, `Some(pod)` when finalizers still hold it.
    pub fn confirm_pod_deletion(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Value>, ApiError> {
        let key = Key::new(Kind::Pod, Some(namespace), name);
        let del = DeleteOpts {
            grace: Some(0),
            ..DeleteOpts::default()
        };
        self.shared
            .write(|s| s.delete(Kind::Pod, key, &del, false))
            .map(|r| if r.removed { None } else { Some(r.object) })
    }

    /// Forgets the watch history, so any watch from an older `resourceVersion` gets 410 Expired
    /// (for testing re-list paths).
    pub fn compact_history(&self) {
        let mut s = self.shared.lock();
        s.history.clear();
        s.compacted_rv = s.rv;
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Makes the next `times` requests with this `method` (`""` = any) whose path contains
    /// `path_contains` fail with `code` and a matching Status (429/503/504 are retried by kube's
    /// default retry policy, others surface to the caller).
    pub fn fail_requests(&self, method: &str, path_contains: &str, code: u16, times: usize) {
        self.shared.lock().failures.push(InjectedFailure {
            method: method.to_ascii_uppercase(),
            path_contains: path_contains.to_string(),
            code,
            remaining: times,
        });
    }

    /// Waits until `condition` holds, re-checking after every write.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&ApiServer) -> bool,
    ) -> Result<(), WaitTimeout> {
        let deadline = Instant::now() + timeout;
        let mut rx = self.shared.notify.subscribe();
        loop {
            rx.borrow_and_update();
            if condition(self) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(WaitTimeout(timeout)),
            }
        }
    }

    /// Waits until `predicate` holds for the pod (`None` = absent) and returns it.
    pub async fn wait_for_pod(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
        predicate: impl Fn(Option<&Value>) -> bool,
    ) -> Result<Option<Value>, WaitTimeout> {
        let mut seen = None;
        self.wait_until(timeout, |srv| {
            let pod = srv.get_pod(namespace, name);
            let ok = predicate(pod.as_ref());
            seen = pod;
            ok
        })
        .await?;
        Ok(seen)
    }
}

// ---------------------------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------------------------

/// State shared by the server task, watch streams and the [`ApiServer`] handle.
struct Shared {
    store: Mutex<Store>,
    /// Carries the latest `resourceVersion`; watch streams and `wait_until` wake on it.
    notify: watch::Sender<u64>,
    addr: SocketAddr,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panicking test thread must not wedge the server for the others.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a mutation and wakes watchers if it bumped the `resourceVersion`.
    fn write<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let mut store = self.lock();
        let before = store.rv;
        let out = f(&mut store);
        if store.rv != before {
            self.notify.send_replace(store.rv);
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    kind: Kind,
    namespace: String,
    name: String,
}

impl Key {
    fn new(kind: Kind, namespace: Option<&str>, name: &str) -> Key {
        Key {
            kind,
            namespace: if kind.namespaced() {
                namespace.unwrap_or_default().to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One entry of the watch history.
struct Change {
    rv: u64,
    kind: Kind,
    namespace: String,
    change: ChangeType,
    object: Value,
    /// The previous state for MODIFIED, to translate selector transitions.
    old: Option<Value>,
}

struct InjectedFailure {
    method: String,
    path_contains: String,
    code: u16,
    remaining: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    Main,
    Status,
    Binding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

struct WriteOpts {
    dry_run: bool,
    validation: FieldValidation,
}

impl WriteOpts {
    fn in_process() -> Self {
        WriteOpts {
            dry_run: false,
            validation: FieldValidation::Ignore,
        }
    }
}

#[derive(Default)]
struct DeleteOpts {
    grace: Option<i64>,
    uid: Option<String>,
    resource_version: Option<String>,
}

/// Result of a write.
struct Written {
    object: Value,
    warnings: Vec<String>,
    /// The object no longer exists (DELETE answers 200 rather than 202).
    removed: bool,
    /// A create happened (201 rather than 200).
    created: bool,
}

impl Written {
    fn new(object: Value) -> Self {
        Written {
            object,
            warnings: Vec::new(),
            removed: false,
            created: false,
        }
    }
}

struct Store {
    opts: Options,
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    /// Changes with `rv <= compacted_rv` are no longer in `history`.
    compacted_rv: u64,
    requests: Vec<RecordedRequest>,
    failures: Vec<InjectedFailure>,
    rng: u64,
}

impl Store {
    fn new(opts: Options) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Store {
            opts,
            rv: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted_rv: 0,
            requests: Vec::new(),
            failures: Vec::new(),
            rng: seed | 1,
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: uniqueness and variety, not security.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn new_uid(&mut self) -> String {
        let hi = self.next_random();
        let lo = self.next_random();
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xffff,
            hi & 0x0fff,
            0x8000 | (lo >> 48 & 0x3fff),
            lo & 0xffff_ffff_ffff
        )
    }

    fn take_failure(&mut self, method: &str, path: &str) -> Option<ApiError> {
        let f = self.failures.iter_mut().find(|f| {
            f.remaining > 0
                && (f.method.is_empty() || f.method == method)
                && path.contains(&f.path_contains)
        })?;
        f.remaining -= 1;
        let code = f.code;
        self.failures.retain(|f| f.remaining > 0);
        Some(ApiError::injected(code))
    }

    /// Stores `object` under a new `resourceVersion` and records the change.
    fn commit(
        &mut self,
        key: Key,
        mut object: Value,
        change: ChangeType,
        old: Option<Value>,
    ) -> Value {
        self.rv += 1;
        meta_mut(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.objects.insert(key.clone(), object.clone());
        self.record(key, change, object.clone(), old);
        object
    }

    /// Removes the object under a new `resourceVersion` and records DELETED.
    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.rv += 1;
        meta_mut(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.record(key.clone(), ChangeType::Deleted, object.clone(), None);
        Some(object)
    }

    fn record(&mut self, key: Key, change: ChangeType, object: Value, old: Option<Value>) {
        self.history.push_back(Change {
            rv: self.rv,
            kind: key.kind,
            namespace: key.namespace,
            change,
            object,
            old,
        });
        while self.history.len() > self.opts.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted_rv = dropped.rv;
            }
        }
    }

    fn create_namespace_object(&mut self, name: &str) -> Result<Value, ApiError> {
        let key = Key::new(Kind::Namespace, None, name);
        if let Some(existing) = self.objects.get(&key) {
            return Ok(existing.clone());
        }
        self.create(
            Kind::Namespace,
            None,
            json!({"metadata": {"name": name}}),
            &WriteOpts::in_process(),
        )
        .map(|w| w.object)
    }

    /// Typed round trip through k8s-openapi: rejects bodies the real decoder would reject (400),
    /// and prunes unknown fields unless `keep_unknown_fields`.
    fn admit_schema(
        &self,
        kind: Kind,
        object: Value,
        validation: FieldValidation,
    ) -> Result<(Value, Vec<String>), ApiError> {
        let typed = roundtrip(kind, &object).map_err(|e| {
            ApiError::bad_request(format!(
                "{k} in version {v:?} cannot be handled as a {k}: {e}",
                k = kind.kind_name(),
                v = kind.api_version()
            ))
        })?;
        if self.opts.keep_unknown_fields {
            return Ok((object, Vec::new()));
        }
        let mut unknown = Vec::new();
        dropped_fields(&object, &typed, "", &mut unknown);
        let messages: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field {f:?}"))
            .collect();
        match validation {
            FieldValidation::Strict if !messages.is_empty() => Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                messages.join(", ")
            ))),
            FieldValidation::Warn => Ok((typed, messages)),
            _ => Ok((typed, Vec::new())),
        }
    }

    fn create(
        &mut self,
        kind: Kind,
        namespace: Option<&str>,
        mut body: Value,
        w: &WriteOpts,
    ) -> Result<Written, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request(format!(
                "the body of a {} create must be a JSON object",
                kind.kind_name()
            )));
        }
        check_type_meta(kind, &body)?;
        let ns = if kind.namespaced() {
            let path_ns = namespace.unwrap_or_default();
            let body_ns = meta_str(&body, "namespace");
            if !body_ns.is_empty() && body_ns != path_ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            self.require_namespace(path_ns, w)?;
            Some(path_ns.to_string())
        } else {
            None
        };
        // Name, possibly generated.
        let mut name = meta_str(&body, "name").to_string();
        if name.is_empty() {
            let prefix = meta_str(&body, "generateName").to_string();
            if prefix.is_empty() {
                return Err(ApiError::invalid_object(
                    kind,
                    "",
                    &[Cause::required("metadata.name")
                        .with_message("name or generateName is required")],
                ));
            }
            name = loop {
                let candidate = format!("{prefix}{}", self.random_suffix());
                if !self
                    .objects
                    .contains_key(&Key::new(kind, ns.as_deref(), &candidate))
                {
                    break candidate;
                }
            };
        }
        {
            let m = meta_mut(&mut body);
            m.insert("name".into(), json!(name));
            match &ns {
                Some(ns) => m.insert("namespace".into(), json!(ns)),
                None => m.remove("namespace"),
            };
        }
        validate(kind, &body)?;
        let (mut obj, warnings) = self.admit_schema(kind, body, w.validation)?;
        let key = Key::new(kind, ns.as_deref(), &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(kind, &name));
        }
        // System fields.
        let uid = self.new_uid();
        {
            let m = meta_mut(&mut obj);
            for f in [
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "managedFields",
                "selfLink",
                "generation",
            ] {
                m.remove(f);
            }
            m.insert("uid".into(), json!(uid));
            m.insert("creationTimestamp".into(), json!(rfc3339(0)));
        }
        set_type_meta(kind, &mut obj);
        apply_create_defaults(kind, &mut obj);
        let mut out = Written::new(obj.clone());
        out.warnings = warnings;
        out.created = true;
        if !w.dry_run {
            out.object = self.commit(key, obj, ChangeType::Added, None);
        }
        Ok(out)
    }

    fn random_suffix(&mut self) -> String {
        // Upstream's alphabet: no vowels (no words), no confusable characters.
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut r = self.next_random();
        (0..5)
            .map(|_| {
                let c = ALPHABET[(r % ALPHABET.len() as u64) as usize] as char;
                r /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }

    /// NamespaceLifecycle admission: namespaced objects need an existing namespace.
    fn require_namespace(&mut self, ns: &str, w: &WriteOpts) -> Result<(), ApiError> {
        if ns.is_empty() {
            return Err(ApiError::bad_request(
                "a namespace is required for namespaced resources",
            ));
        }
        if self
            .objects
            .contains_key(&Key::new(Kind::Namespace, None, ns))
        {
            return Ok(());
        }
        if self.opts.auto_create_namespaces && !w.dry_run {
            return self.create_namespace_object(ns).map(|_| ());
        }
        Err(ApiError::not_found(Kind::Namespace, ns))
    }

    /// PUT semantics shared by update, patch and the in-process status helpers.
    fn update(
        &mut self,
        kind: Kind,
        key: Key,
        mut body: Value,
        sub: Sub,
        w: &WriteOpts,
    ) -> Result<Written, ApiError> {
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, &key.name))?;
        if !body.is_object() {
            return Err(ApiError::bad_request(format!(
                "the body of a {} update must be a JSON object",
                kind.kind_name()
            )));
        }
        check_type_meta(kind, &body)?;
        let body_name = meta_str(&body, "name");
        if !body_name.is_empty() && body_name != key.name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({})",
                key.name
            )));
        }
        let body_ns = meta_str(&body, "namespace");
        if kind.namespaced() && !body_ns.is_empty() && body_ns != key.namespace {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let body_rv = meta_str(&body, "resourceVersion");
        if !body_rv.is_empty() && body_rv != meta_str(&old, "resourceVersion") {
            return Err(ApiError::stale(kind, &key.name));
        }
        {
            let m = meta_mut(&mut body);
            m.insert("name".into(), json!(key.name));
            if kind.namespaced() {
                m.insert("namespace".into(), json!(key.namespace));
            }
        }
        if sub == Sub::Main {
            validate(kind, &body)?;
        }
        let (body, warnings) = self.admit_schema(kind, body, w.validation)?;
        let mut new = match sub {
            Sub::Status => {
                let mut n = old.clone();
                match body.get("status") {
                    Some(st) => obj_mut(&mut n).insert("status".into(), st.clone()),
                    None => obj_mut(&mut n).remove("status"),
                };
                n
            }
            _ => {
                let mut n = body;
                if kind.has_status() {
                    match old.get("status") {
                        Some(st) => obj_mut(&mut n).insert("status".into(), st.clone()),
                        None => obj_mut(&mut n).remove("status"),
                    };
                }
                n
            }
        };
        // Fields clients cannot change.
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
        ] {
            match old.get("metadata").and_then(|m| m.get(field)) {
                Some(v) => meta_mut(&mut new).insert(field.into(), v.clone()),
                None => meta_mut(&mut new).remove(field),
            };
        }
        for field in ["managedFields", "selfLink"] {
            meta_mut(&mut new).remove(field);
        }
        set_type_meta(kind, &mut new);
        if kind == Kind::Pod && sub == Sub::Main {
            check_pod_spec_update(&key.name, &old, &new)?;
            if old.get("spec") != new.get("spec") {
                let generation = old
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                meta_mut(&mut new).insert("generation".into(), json!(generation + 1));
            }
        }
        validate(kind, &new)?;
        let mut out = Written::new(new.clone());
        out.warnings = warnings;
        if new == old {
            out.object = old;
            return Ok(out);
        }
        if w.dry_run {
            return Ok(out);
        }
        if deletion_complete(&new) {
            self.objects.insert(key.clone(), new);
            out.object = self.remove(&key).unwrap_or(out.object);
            out.removed = true;
        } else {
            out.object = self.commit(key, new, ChangeType::Modified, Some(old));
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn patch(
        &mut self,
        kind: Kind,
        key: Key,
        patch_kind: PatchKind,
        body: &[u8],
        sub: Sub,
        w: &WriteOpts,
        field_manager: Option<&str>,
    ) -> Result<Written, ApiError> {
        if patch_kind == PatchKind::Apply && field_manager.is_none_or(str::is_empty) {
            return Err(ApiError::invalid(
                "PatchOptions",
                "meta.k8s.io",
                "",
                &[Cause::required("fieldManager").with_message("is required for apply patch")],
            ));
        }
        let Some(old) = self.objects.get(&key).cloned() else {
            if patch_kind == PatchKind::Apply && sub == Sub::Main {
                // Server-side apply creates missing objects.
                let mut applied = patch::parse_json(body)?;
                if !applied.is_object() {
                    return Err(ApiError::bad_request(
                        "an apply patch must be a JSON object",
                    ));
                }
                let body_name = meta_str(&applied, "name");
                if !body_name.is_empty() && body_name != key.name {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({body_name}) does not match the name on the URL ({})",
                        key.name
                    )));
                }
                meta_mut(&mut applied).insert("name".into(), json!(key.name));
                let ns = kind.namespaced().then_some(key.namespace.as_str());
                return self.create(kind, ns, applied, w);
            }
            return Err(ApiError::not_found(kind, &key.name));
        };
        let patched = patch::apply(patch_kind, &old, body)?;
        self.update(kind, key, patched, sub, w)
    }

    fn delete(
        &mut self,
        kind: Kind,
        key: Key,
        del: &DeleteOpts,
        dry_run: bool,
    ) -> Result<Written, ApiError> {
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, &key.name))?;
        if let Some(uid) = &del.uid {
            let current = meta_str(&old, "uid");
            if uid != current {
                return Err(ApiError::conflict(
                    kind,
                    &key.name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {current}"),
                ));
            }
        }
        if let Some(rv) = &del.resource_version {
            let current = meta_str(&old, "resourceVersion");
            if rv != current {
                return Err(ApiError::conflict(
                    kind,
                    &key.name,
                    &format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {current}"
                    ),
                ));
            }
        }
        if dry_run {
            return Ok(Written::new(old));
        }
        if kind == Kind::Namespace {
            // Simplified namespace controller: everything in it goes at once.
            let inside: Vec<Key> = self
                .objects
                .keys()
                .filter(|k| k.kind.namespaced() && k.namespace == key.name)
                .cloned()
                .collect();
            for k in inside {
                self.remove(&k);
            }
        }
        let has_finalizers = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        let bound = old
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        let grace = if kind == Kind::Pod && self.opts.pod_deletion == PodDeletion::Graceful && bound
        {
            del.grace
                .or_else(|| {
                    old.pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                })
                .unwrap_or(30)
                .max(0)
        } else {
            0
        };
        let terminating = old.pointer("/metadata/deletionTimestamp").is_some();
        if !terminating && grace == 0 && !has_finalizers {
            let object = self.remove(&key).unwrap_or(old);
            return Ok(Written {
                removed: true,
                ..Written::new(object)
            });
        }
        let mut new = old.clone();
        {
            let m = meta_mut(&mut new);
            // A second DELETE can only shorten the grace period.
            let current = m.get("deletionGracePeriodSeconds").and_then(Value::as_i64);
            let effective = current.map_or(grace, |c| c.min(grace));
            if !terminating {
                m.insert("deletionTimestamp".into(), json!(rfc3339(effective)));
            }
            m.insert("deletionGracePeriodSeconds".into(), json!(effective));
        }
        if deletion_complete(&new) {
            self.objects.insert(key.clone(), new);
            let object = self.remove(&key).unwrap_or(old);
            return Ok(Written {
                removed: true,
                ..Written::new(object)
            });
        }
        if new == old {
            return Ok(Written::new(old));
        }
        let object = self.commit(key, new, ChangeType::Modified, Some(old));
        Ok(Written::new(object))
    }

    /// `pods/binding`: sets `spec.nodeName` once, as the scheduler does.
    fn bind(&mut self, key: Key, node: &str, dry_run: bool) -> Result<Value, ApiError> {
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(Kind::Pod, &key.name))?;
        if node.is_empty() {
            return Err(ApiError::invalid(
                "Binding",
                "",
                &key.name,
                &[Cause::required("target.name")],
            ));
        }
        let current = old
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !current.is_empty() {
            return Err(ApiError::conflict(
                Kind::Pod,
                &key.name,
                &format!("pod {} is already assigned to node {current:?}", key.name),
            ));
        }
        if old.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::conflict(
                Kind::Pod,
                &key.name,
                "pod is being deleted, cannot be assigned to a host",
            ));
        }
        let mut new = old.clone();
        match new.get_mut("spec") {
            Some(Value::Object(spec)) => {
                spec.insert("nodeName".into(), json!(node));
            }
            _ => {
                obj_mut(&mut new).insert("spec".into(), json!({"nodeName": node}));
            }
        }
        if dry_run {
            return Ok(new);
        }
        Ok(self.commit(key, new, ChangeType::Modified, Some(old)))
    }

    fn matching<'a>(
        &'a self,
        kind: Kind,
        namespace: Option<&'a str>,
        sel: &'a Selectors,
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> + 'a {
        self.objects.iter().filter(move |(k, v)| {
            k.kind == kind && namespace.is_none_or(|ns| k.namespace == ns) && sel.matches(kind, v)
        })
    }

    fn list(&self, kind: Kind, namespace: Option<&str>, q: &Query) -> Result<Value, ApiError> {
        let sel = q.selectors(kind)?;
        match (q.get("resourceVersion"), q.get("resourceVersionMatch")) {
            (Some(rv), Some("Exact")) => {
                let want = parse_rv(rv)?;
                if want != self.rv {
                    return Err(ApiError::expired(format!(
                        "too old resource version: {want} ({})",
                        self.rv
                    )));
                }
            }
            (Some(rv), _) if !rv.is_empty() => {
                parse_rv(rv)?;
            }
            _ => {}
        }
        let limit = match q.get("limit") {
            Some(l) if !l.is_empty() => Some(
                l.parse::<usize>()
                    .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
            ),
            _ => None,
        }
        .filter(|l| *l > 0);
        let (list_rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => {
                let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
                let mut parts = token.splitn(3, '/');
                let rv = parts
                    .next()
                    .and_then(|r| r.parse::<u64>().ok())
                    .ok_or_else(bad)?;
                let ns = parts.next().ok_or_else(bad)?.to_string();
                let name = parts.next().ok_or_else(bad)?.to_string();
                (
                    rv,
                    Some(Key {
                        kind,
                        namespace: ns,
                        name,
                    }),
                )
            }
            None => (self.rv, None),
        };
        let mut items = Vec::new();
        let mut last_key = None;
        let mut remaining = 0usize;
        for (k, v) in self.matching(kind, namespace, &sel) {
            if after.as_ref().is_some_and(|a| k <= a) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                remaining += 1;
                continue;
            }
            let mut item = v.clone();
            // Upstream list items carry no TypeMeta.
            if let Some(m) = item.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            items.push(item);
            last_key = Some(k.clone());
        }
        let mut metadata = Map::new();
        metadata.insert("resourceVersion".into(), json!(list_rv.to_string()));
        if remaining > 0 {
            if let Some(k) = last_key {
                metadata.insert(
                    "continue".into(),
                    json!(format!("{list_rv}/{}/{}", k.namespace, k.name)),
                );
                metadata.insert("remainingItemCount".into(), json!(remaining));
            }
        }
        Ok(json!({
            "kind": format!("{}List", kind.kind_name()),
            "apiVersion": kind.api_version(),
            "metadata": metadata,
            "items": items,
        }))
    }
}

impl Cause {
    fn with_message(mut self, detail: &str) -> Self {
        self.message = format!("{}: {detail}", self.message);
        self
    }
}

/// A terminating object is gone once no finalizer holds it and its grace period was confirmed.
fn deletion_complete(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some()
        && obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        && obj
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            == 0
}

// ---------------------------------------------------------------------------------------------
// Object helpers: validation, defaulting, pruning
// ---------------------------------------------------------------------------------------------

fn obj_mut(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!("replaced by an object just above"),
    }
}

fn meta_mut(v: &mut Value) -> &mut Map<String, Value> {
    let meta = obj_mut(v)
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    obj_mut(meta)
}

fn meta_str<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn set_type_meta(kind: Kind, obj: &mut Value) {
    let m = obj_mut(obj);
    m.insert("apiVersion".into(), json!(kind.api_version()));
    m.insert("kind".into(), json!(kind.kind_name()));
}

fn check_type_meta(kind: Kind, body: &Value) -> Result<(), ApiError> {
    if let Some(v) = body.get("apiVersion").and_then(Value::as_str) {
        if !v.is_empty() && v != kind.api_version() {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({})",
                kind.api_version()
            )));
        }
    }
    if let Some(k) = body.get("kind").and_then(Value::as_str) {
        if !k.is_empty() && k != kind.kind_name() {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                kind.kind_name()
            )));
        }
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SSZ`, `offset_secs` from now (Kubernetes `Time` has second precision).
fn rfc3339(offset_secs: i64) -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::seconds(offset_secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn roundtrip(kind: Kind, v: &Value) -> Result<Value, serde_json::Error> {
    use k8s_openapi::api::{core::v1 as core, events::v1 as events};
    fn rt<T: DeserializeOwned + Serialize>(v: &Value) -> Result<Value, serde_json::Error> {
        serde_json::to_value(T::deserialize(v)?)
    }
    match kind {
        Kind::Pod => rt::<core::Pod>(v),
        Kind::Namespace => rt::<core::Namespace>(v),
        Kind::Node => rt::<core::Node>(v),
        Kind::Event => rt::<core::Event>(v),
        Kind::EventsV1Event => rt::<events::Event>(v),
    }
}

/// Paths (`spec.containers[0].foo`) present with a non-null value in `orig` but absent from the
/// typed round trip: the fields kube-apiserver would drop as unknown.
fn dropped_fields(orig: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                if v.is_null() {
                    continue;
                }
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match t.get(k) {
                    Some(tv) => dropped_fields(v, tv, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            for (i, (ov, tv)) in o.iter().zip(t).enumerate() {
                dropped_fields(ov, tv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The validation upstream does that client code can trip over.
fn validate(kind: Kind, obj: &Value) -> Result<(), ApiError> {
    let name = meta_str(obj, "name");
    let mut causes = Vec::new();
    let name_ok = match kind {
        Kind::Namespace => is_dns_label(name),
        _ => is_dns_subdomain(name),
    };
    if !name_ok {
        let why = if kind == Kind::Namespace {
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
        } else {
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        };
        causes.push(Cause::invalid("metadata.name", name, why));
    }
    match kind {
        Kind::Pod => validate_pod(obj, &mut causes),
        Kind::EventsV1Event => {
            for field in [
                "eventTime",
                "reportingController",
                "reportingInstance",
                "action",
                "reason",
            ] {
                if obj
                    .get(field)
                    .is_none_or(|v| v.is_null() || v.as_str() == Some(""))
                {
                    causes.push(Cause::required(field));
                }
            }
            if let Some(t) = obj.get("type").and_then(Value::as_str) {
                if t != "Normal" && t != "Warning" {
                    causes.push(Cause::invalid(
                        "type",
                        t,
                        "supported values: \"Normal\", \"Warning\"",
                    ));
                }
            }
            if obj
                .get("note")
                .and_then(Value::as_str)
                .is_some_and(|n| n.len() > 1024)
            {
                causes.push(Cause::invalid(
                    "note",
                    "...",
                    "can have at most 1024 characters",
                ));
            }
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid_object(kind, name, &causes))
    }
}

fn validate_pod(pod: &Value, causes: &mut Vec<Cause>) {
    let containers = pod.pointer("/spec/containers").and_then(Value::as_array);
    let Some(containers) = containers.filter(|c| !c.is_empty()) else {
        causes.push(Cause::required("spec.containers"));
        return;
    };
    let init = pod
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut seen = Vec::new();
    for (list, items) in [
        ("containers", containers.as_slice()),
        ("initContainers", init),
    ] {
        for (i, c) in items.iter().enumerate() {
            let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
            let field = format!("spec.{list}[{i}]");
            if name.is_empty() {
                causes.push(Cause::required(format!("{field}.name")));
            } else if !is_dns_label(name) {
                causes.push(Cause::invalid(
                    format!("{field}.name"),
                    name,
                    "must be a DNS label",
                ));
            } else if seen.contains(&name) {
                causes.push(Cause {
                    reason: "FieldValueDuplicate",
                    field: format!("{field}.name"),
                    message: format!("Duplicate value: {name:?}"),
                });
            } else {
                seen.push(name);
            }
            if c.get("image")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                causes.push(Cause::required(format!("{field}.image")));
            }
        }
    }
}

/// Upstream allows only a few pod spec fields to change after creation.
fn check_pod_spec_update(name: &str, old: &Value, new: &Value) -> Result<(), ApiError> {
    fn normalize(spec: Option<&Value>) -> Value {
        let mut s = spec.cloned().unwrap_or(Value::Null);
        if let Some(m) = s.as_object_mut() {
            for f in ["activeDeadlineSeconds", "tolerations", "schedulingGates"] {
                m.remove(f);
            }
            for list in ["containers", "initContainers"] {
                if let Some(Value::Array(items)) = m.get_mut(list) {
                    for c in items.iter_mut().filter_map(Value::as_object_mut) {
                        c.remove("image");
                    }
                }
            }
        }
        s
    }
    if normalize(old.get("spec")) == normalize(new.get("spec")) {
        return Ok(());
    }
    Err(ApiError::invalid_object(
        Kind::Pod,
        name,
        &[Cause::forbidden(
            "spec",
            "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
        )],
    ))
}

fn apply_create_defaults(kind: Kind, obj: &mut Value) {
    match kind {
        Kind::Pod => {
            let qos = pod_qos(obj);
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                let defaults = [
                    ("restartPolicy", json!("Always")),
                    ("terminationGracePeriodSeconds", json!(30)),
                    ("dnsPolicy", json!("ClusterFirst")),
                    ("schedulerName", json!("default-scheduler")),
                    ("serviceAccountName", json!("default")),
                    ("enableServiceLinks", json!(true)),
                    ("securityContext", json!({})),
                ];
                for (k, v) in defaults {
                    spec.entry(k).or_insert(v);
                }
                for list in ["containers", "initContainers"] {
                    if let Some(Value::Array(items)) = spec.get_mut(list) {
                        for c in items.iter_mut().filter_map(Value::as_object_mut) {
                            let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
                            let tag_latest = !image.contains('@')
                                && image.rsplit('/').next().is_none_or(|last| {
                                    last.split_once(':').is_none_or(|(_, tag)| tag == "latest")
                                });
                            let pull = if tag_latest { "Always" } else { "IfNotPresent" };
                            c.entry("imagePullPolicy").or_insert(json!(pull));
                            c.entry("terminationMessagePath")
                                .or_insert(json!("/dev/termination-log"));
                            c.entry("terminationMessagePolicy").or_insert(json!("File"));
                            c.entry("resources").or_insert(json!({}));
                        }
                    }
                }
            }
            meta_mut(obj).insert("generation".into(), json!(1));
            obj_mut(obj).insert(
                "status".into(),
                json!({"phase": "Pending", "qosClass": qos}),
            );
        }
        Kind::Namespace => {
            let name = meta_str(obj, "name").to_string();
            let labels = meta_mut(obj)
                .entry("labels")
                .or_insert_with(|| Value::Object(Map::new()));
            obj_mut(labels).insert("kubernetes.io/metadata.name".into(), json!(name));
            obj_mut(obj).insert("status".into(), json!({"phase": "Active"}));
        }
        Kind::Node | Kind::Event | Kind::EventsV1Event => {}
    }
}

/// Upstream's QoS class: BestEffort without any requests/limits, Guaranteed when every
/// container's cpu and memory limits equal its requests, Burstable otherwise.
fn pod_qos(pod: &Value) -> &'static str {
    let mut any = false;
    let mut guaranteed = true;
    for list in ["/spec/containers", "/spec/initContainers"] {
        for c in pod
            .pointer(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let req = c.pointer("/resources/requests").and_then(Value::as_object);
            let lim = c.pointer("/resources/limits").and_then(Value::as_object);
            any |= req.is_some_and(|r| !r.is_empty()) || lim.is_some_and(|l| !l.is_empty());
            for res in ["cpu", "memory"] {
                let l = lim.and_then(|l| l.get(res));
                let r = req.and_then(|r| r.get(res)).or(l);
                if l.is_none() || l != r {
                    guaranteed = false;
                }
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

fn parse_rv(rv: &str) -> Result<u64, ApiError> {
    rv.parse::<u64>()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

type ResBody = UnsyncBoxBody<Bytes, Infallible>;

/// Accept loop. Connections are tasks in a JoinSet owned by this future, so aborting the server
/// task tears every connection (and watch stream) down with it.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    conns.spawn(async move {
                        let svc = service_fn(move |req| {
                            let shared = shared.clone();
                            async move { Ok::<_, Infallible>(handle(shared, req).await) }
                        });
                        // A client hanging up mid-request is not the server's problem.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
                // E.g. EMFILE: back off briefly and keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Decoded query parameters (last value wins, as Go's `url.Values.Get` would pick the first —
/// clients never repeat them).
struct Query(BTreeMap<String, String>);

impl Query {
    fn parse(raw: &str) -> Query {
        Query(
            form_urlencoded::parse(raw.as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }

    fn selectors(&self, kind: Kind) -> Result<Selectors, ApiError> {
        Ok(Selectors {
            labels: LabelSelector::parse(self.get("labelSelector").unwrap_or_default())?,
            fields: FieldSelector::parse(kind, self.get("fieldSelector").unwrap_or_default())?,
        })
    }

    fn write_opts(&self) -> Result<WriteOpts, ApiError> {
        let validation = match self.get("fieldValidation") {
            None | Some("") | Some("Warn") => FieldValidation::Warn,
            Some("Ignore") => FieldValidation::Ignore,
            Some("Strict") => FieldValidation::Strict,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "fieldValidation must be one of Ignore, Warn, Strict (got {other:?})"
                )))
            }
        };
        Ok(WriteOpts {
            dry_run: self.dry_run(),
            validation,
        })
    }

    fn dry_run(&self) -> bool {
        self.get("dryRun") == Some("All")
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<ResBody> {
    let (parts, body) = req.into_parts();
    let record = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        content_type: parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    let (injected, max_body) = {
        let mut s = shared.lock();
        s.requests.push(record.clone());
        (
            s.take_failure(&record.method, &record.path),
            s.opts.max_body_bytes,
        )
    };
    if let Some(err) = injected {
        return error_response(&err);
    }
    let bytes = match Limited::new(body, max_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return error_response(&ApiError::too_large(max_body))
        }
        Err(e) => {
            return error_response(&ApiError::bad_request(format!(
                "reading the request body: {e}"
            )))
        }
    };
    let query = Query::parse(&record.query);
    match dispatch(&shared, &parts.method, &record, &query, &bytes) {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    }
}

enum Route {
    Root,
    Version,
    Health,
    CoreVersions,
    GroupList,
    Group(&'static str),
    Resources(&'static str),
    Collection {
        kind: Kind,
        ns: Option<String>,
    },
    Object {
        kind: Kind,
        ns: Option<String>,
        name: String,
        sub: Sub,
    },
}

fn route(path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, rest): (&'static str, &[&str]) = match segs.as_slice() {
        [] => return Ok(Route::Root),
        ["version"] => return Ok(Route::Version),
        ["healthz" | "readyz" | "livez"] => return Ok(Route::Health),
        ["api"] => return Ok(Route::CoreVersions),
        ["api", "v1"] => return Ok(Route::Resources("")),
        ["apis"] => return Ok(Route::GroupList),
        ["apis", "events.k8s.io"] => return Ok(Route::Group("events.k8s.io")),
        ["apis", "events.k8s.io", "v1"] => return Ok(Route::Resources("events.k8s.io")),
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", "events.k8s.io", "v1", rest @ ..] => ("events.k8s.io", rest),
        _ => return Err(ApiError::no_such_path()),
    };
    let kind_of = |plural: &str| Kind::from_path(group, plural).ok_or_else(ApiError::no_such_path);
    let sub_of = |kind: Kind, sub: &str| match (kind, sub) {
        (k, "status") if k.has_status() => Ok(Sub::Status),
        (Kind::Pod, "binding") => Ok(Sub::Binding),
        _ => Err(ApiError::no_such_path()),
    };
    let owned = |s: &str| s.to_string();
    Ok(match rest {
        ["namespaces"] if group.is_empty() => Route::Collection {
            kind: Kind::Namespace,
            ns: None,
        },
        ["namespaces", name] if group.is_empty() => Route::Object {
            kind: Kind::Namespace,
            ns: None,
            name: owned(name),
            sub: Sub::Main,
        },
        ["namespaces", name, "status"] if group.is_empty() => Route::Object {
            kind: Kind::Namespace,
            ns: None,
            name: owned(name),
            sub: Sub::Status,
        },
        ["namespaces", ns, plural] => {
            let kind = kind_of(plural)?;
            if !kind.namespaced() {
                return Err(ApiError::no_such_path());
            }
            Route::Collection {
                kind,
                ns: Some(owned(ns)),
            }
        }
        ["namespaces", ns, plural, name, sub @ ..] if sub.len() <= 1 => {
            let kind = kind_of(plural)?;
            if !kind.namespaced() {
                return Err(ApiError::no_such_path());
            }
            let sub = match sub {
                [] => Sub::Main,
                [s, ..] => sub_of(kind, s)?,
            };
            Route::Object {
                kind,
                ns: Some(owned(ns)),
                name: owned(name),
                sub,
            }
        }
        [plural] => Route::Collection {
            kind: kind_of(plural)?,
            ns: None,
        },
        [plural, name, sub @ ..] if sub.len() <= 1 => {
            let kind = kind_of(plural)?;
            if kind.namespaced() {
                return Err(ApiError::no_such_path());
            }
            let sub = match sub {
                [] => Sub::Main,
                [s, ..] => sub_of(kind, s)?,
            };
            Route::Object {
                kind,
                ns: None,
                name: owned(name),
                sub,
            }
        }
        _ => return Err(ApiError::no_such_path()),
    })
}

fn dispatch(
    shared: &Arc<Shared>,
    method: &Method,
    req: &RecordedRequest,
    q: &Query,
    body: &Bytes,
) -> Result<Response<ResBody>, ApiError> {
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v, &[]));
    match route(&req.path)? {
        Route::Root => ok(
            json!({"paths": ["/api", "/api/v1", "/apis", "/apis/events.k8s.io", "/apis/events.k8s.io/v1", "/healthz", "/livez", "/readyz", "/version"]}),
        ),
        Route::Version => ok(version_info()),
        Route::Health => Ok(text_response(StatusCode::OK, "ok")),
        Route::CoreVersions => ok(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}],
        })),
        Route::GroupList => ok(json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [group_doc("events.k8s.io")],
        })),
        Route::Group(g) => ok(group_doc(g)),
        Route::Resources(g) => ok(resource_list(g)),
        Route::Collection { kind, ns } => {
            collection(shared, method, kind, ns.as_deref(), req, q, body)
        }
        Route::Object {
            kind,
            ns,
            name,
            sub,
        } => object(
            shared,
            method,
            kind,
            ns.as_deref(),
            &name,
            sub,
            req,
            q,
            body,
        ),
    }
}

fn collection(
    shared: &Arc<Shared>,
    method: &Method,
    kind: Kind,
    ns: Option<&str>,
    req: &RecordedRequest,
    q: &Query,
    body: &Bytes,
) -> Result<Response<ResBody>, ApiError> {
    match *method {
        Method::GET if q.flag("watch") => start_watch(shared, kind, ns, q),
        Method::GET => {
            let list = shared.lock().list(kind, ns, q)?;
            Ok(json_response(StatusCode::OK, &list, &[]))
        }
        Method::POST => {
            if kind.namespaced() && ns.is_none() {
                return Err(ApiError::method_not_allowed("POST"));
            }
            let obj = parse_body(body)?;
            let w = q.write_opts()?;
            let out = shared.write(|s| s.create(kind, ns, obj, &w))?;
            Ok(json_response(
                StatusCode::CREATED,
                &out.object,
                &out.warnings,
            ))
        }
        Method::DELETE => {
            let del = delete_opts(q, body)?;
            let dry_run = q.dry_run() || delete_body_dry_run(body);
            let items = shared.write(|s| -> Result<Vec<Value>, ApiError> {
                let sel = q.selectors(kind)?;
                let keys: Vec<Key> = s.matching(kind, ns, &sel).map(|(k, _)| k.clone()).collect();
                let mut items = Vec::new();
                for key in keys {
                    let out = s.delete(kind, key, &del, dry_run)?;
                    items.push(out.object);
                }
                Ok(items)
            })?;
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "kind": format!("{}List", kind.kind_name()),
                    "apiVersion": kind.api_version(),
                    "metadata": {"resourceVersion": shared.lock().rv.to_string()},
                    "items": items,
                }),
                &[],
            ))
        }
        _ => Err(ApiError::method_not_allowed(&req.method)),
    }
}

#[allow(clippy::too_many_arguments)]
fn object(
    shared: &Arc<Shared>,
    method: &Method,
    kind: Kind,
    ns: Option<&str>,
    name: &str,
    sub: Sub,
    req: &RecordedRequest,
    q: &Query,
    body: &Bytes,
) -> Result<Response<ResBody>, ApiError> {
    let key = Key::new(kind, ns, name);
    match (method.clone(), sub) {
        (Method::GET, Sub::Main | Sub::Status) => {
            let obj = shared
                .lock()
                .objects
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(kind, name))?;
            Ok(json_response(StatusCode::OK, &obj, &[]))
        }
        (Method::PUT, Sub::Main | Sub::Status) => {
            let obj = parse_body(body)?;
            let w = q.write_opts()?;
            let out = shared.write(|s| s.update(kind, key, obj, sub, &w))?;
            Ok(json_response(StatusCode::OK, &out.object, &out.warnings))
        }
        (Method::PATCH, Sub::Main | Sub::Status) => {
            let ct = req.content_type.clone().unwrap_or_default();
            let patch_kind = PatchKind::from_content_type(&ct)
                .ok_or_else(|| ApiError::unsupported_media_type(&ct))?;
            let w = q.write_opts()?;
            let fm = q.get("fieldManager");
            let out = shared.write(|s| s.patch(kind, key, patch_kind, body, sub, &w, fm))?;
            let code = if out.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(code, &out.object, &out.warnings))
        }
        (Method::DELETE, Sub::Main) => {
            let del = delete_opts(q, body)?;
            let dry_run = q.dry_run() || delete_body_dry_run(body);
            let out = shared.write(|s| s.delete(kind, key, &del, dry_run))?;
            let code = if out.removed || dry_run {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            Ok(json_response(code, &out.object, &[]))
        }
        (Method::POST, Sub::Binding) => {
            let binding = parse_body(body)?;
            let node = binding
                .pointer("/target/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            shared.write(|s| s.bind(key, &node, q.dry_run()))?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                &[],
            ))
        }
        _ => Err(ApiError::method_not_allowed(&req.method)),
    }
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "error decoding request body: {e} (the stand-in API server accepts JSON only)"
        ))
    })
}

/// `DeleteOptions` from the body (what kube sends) and the query (what kubectl sends).
fn delete_opts(q: &Query, body: &Bytes) -> Result<DeleteOpts, ApiError> {
    let mut del = DeleteOpts::default();
    if !body.is_empty() {
        let opts = parse_body(body)?;
        del.grace = opts.get("gracePeriodSeconds").and_then(Value::as_i64);
        del.uid = opts
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_string);
        del.resource_version = opts
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    if let Some(g) = q.get("gracePeriodSeconds") {
        del.grace = Some(
            g.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid gracePeriodSeconds {g:?}")))?,
        );
    }
    Ok(del)
}

fn delete_body_dry_run(body: &Bytes) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("dryRun").cloned())
        .and_then(|d| d.as_array().cloned())
        .is_some_and(|d| d.iter().any(|x| x == "All"))
}

fn json_response(code: StatusCode, body: &Value, warnings: &[String]) -> Response<ResBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)).boxed_unsync());
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for w in warnings {
        // `299 - "text"`, the RFC 7234 form kube-apiserver emits.
        if let Ok(v) = HeaderValue::from_str(&format!("299 - {w:?}")) {
            resp.headers_mut().append("Warning", v);
        }
    }
    resp
}

fn text_response(code: StatusCode, text: &'static str) -> Response<ResBody> {
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed_unsync());
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn error_response(err: &ApiError) -> Response<ResBody> {
    let code = StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(code, &err.to_status(), &[]);
    if matches!(err.code, 429 | 503) {
        // Lets kube's server-aware retry policy back off by the server's word.
        resp.headers_mut()
            .insert("Retry-After", HeaderValue::from_static("0"));
    }
    resp
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "37",
        "emulationMajor": "1",
        "emulationMinor": "37",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "36",
        "gitVersion": "v1.37.0-podmigrate-standin",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.25.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn group_doc(group: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": [gv.clone()],
        "preferredVersion": gv,
    })
}

fn resource_list(group: &str) -> Value {
    const ALL_VERBS: [&str; 8] = [
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ];
    let mut resources = Vec::new();
    for kind in Kind::ALL.into_iter().filter(|k| k.group() == group) {
        let singular = kind.kind_name().to_ascii_lowercase();
        resources.push(json!({
            "name": kind.plural(),
            "singularName": singular,
            "namespaced": kind.namespaced(),
            "kind": kind.kind_name(),
            "verbs": ALL_VERBS,
        }));
        if kind.has_status() {
            resources.push(json!({
                "name": format!("{}/status", kind.plural()),
                "singularName": "",
                "namespaced": kind.namespaced(),
                "kind": kind.kind_name(),
                "verbs": ["get", "patch", "update"],
            }));
        }
        if kind == Kind::Pod {
            resources.push(json!({
                "name": "pods/binding",
                "singularName": "",
                "namespaced": true,
                "kind": "Binding",
                "verbs": ["create"],
            }));
        }
    }
    let gv = if group.is_empty() {
        "v1".to_string()
    } else {
        format!("{group}/v1")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

// ---------------------------------------------------------------------------------------------
// WATCH
// ---------------------------------------------------------------------------------------------

/// The state of one watch response body, advanced chunk by chunk as the client reads.
struct WatchCursor {
    shared: Arc<Shared>,
    rx: watch::Receiver<u64>,
    kind: Kind,
    namespace: Option<String>,
    selectors: Selectors,
    /// Every change with `rv <= last_rv` has been considered.
    last_rv: u64,
    pending: VecDeque<Bytes>,
    deadline: Instant,
    bookmarks: bool,
    bookmark_interval: Duration,
    next_bookmark: Instant,
    done: bool,
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark_line(kind: Kind, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    watch_line(
        "BOOKMARK",
        &json!({"kind": kind.kind_name(), "apiVersion": kind.api_version(), "metadata": metadata}),
    )
}

fn start_watch(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: Option<&str>,
    q: &Query,
) -> Result<Response<ResBody>, ApiError> {
    let selectors = q.selectors(kind)?;
    let bookmarks = q.flag("allowWatchBookmarks");
    let send_initial = q.get("sendInitialEvents").map(|v| v == "true" || v == "1");
    if send_initial == Some(true) {
        let mut causes = Vec::new();
        if !bookmarks {
            causes.push(
                Cause::required("allowWatchBookmarks")
                    .with_message("allowWatchBookmarks must be true if sendInitialEvents is true"),
            );
        }
        if q.get("resourceVersionMatch") != Some("NotOlderThan") {
            causes.push(Cause::required("resourceVersionMatch").with_message(
                "resourceVersionMatch must be set to NotOlderThan if sendInitialEvents is provided",
            ));
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid("ListOptions", "meta.k8s.io", "", &causes));
        }
    }
    let rv_param = q.get("resourceVersion").unwrap_or_default();
    let from = match rv_param {
        "" | "0" => None,
        rv => Some(parse_rv(rv)?),
    };
    let timeout = q
        .get("timeoutSeconds")
        .map(|t| {
            t.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))
        })
        .transpose()?
        .filter(|t| *t > 0)
        .unwrap_or(1800);

    let mut rx = shared.notify.subscribe();
    rx.borrow_and_update();
    let store = shared.lock();
    let mut pending = VecDeque::new();
    let mut done = false;
    let last_rv = match from {
        Some(rv) if rv < store.compacted_rv => {
            let err = ApiError::expired(format!(
                "too old resource version: {rv} ({})",
                store.compacted_rv + 1
            ));
            pending.push_back(watch_line("ERROR", &err.to_status()));
            done = true;
            rv
        }
        Some(rv) => rv,
        None => {
            // Legacy semantics (initial ADDED burst) unless sendInitialEvents=false.
            if send_initial != Some(false) {
                for (_, obj) in store.matching(kind, ns, &selectors) {
                    pending.push_back(watch_line("ADDED", obj));
                }
            }
            if send_initial == Some(true) {
                pending.push_back(bookmark_line(kind, store.rv, true));
            }
            store.rv
        }
    };
    let interval = store.opts.bookmark_interval;
    drop(store);

    let now = Instant::now();
    let cursor = WatchCursor {
        shared: shared.clone(),
        rx,
        kind,
        namespace: ns.map(str::to_string),
        selectors,
        last_rv,
        pending,
        deadline: now + Duration::from_secs(timeout),
        bookmarks,
        bookmark_interval: interval,
        next_bookmark: now + interval,
        done,
    };
    let stream = futures::stream::unfold(cursor, next_chunk);
    let body = StreamBody::new(futures::StreamExt::map(stream, |b| {
        Ok::<_, Infallible>(Frame::data(b))
    }));
    let mut resp = Response::new(BodyExt::boxed_unsync(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

async fn next_chunk(mut c: WatchCursor) -> Option<(Bytes, WatchCursor)> {
    loop {
        if let Some(chunk) = c.pending.pop_front() {
            return Some((chunk, c));
        }
        if c.done {
            return None;
        }
        // Mark the current version seen *before* scanning, so a write racing the scan wakes us.
        c.rx.borrow_and_update();
        let shared = c.shared.clone();
        c.collect(&shared.lock());
        if !c.pending.is_empty() || c.done {
            continue;
        }
        let next_bookmark = c.next_bookmark;
        tokio::select! {
            changed = c.rx.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
            _ = tokio::time::sleep_until(c.deadline) => return None,
            _ = tokio::time::sleep_until(next_bookmark), if c.bookmarks => {
                c.pending.push_back(bookmark_line(c.kind, c.last_rv, false));
                c.next_bookmark = Instant::now() + c.bookmark_interval;
            }
        }
    }
}

impl WatchCursor {
    /// Turns history after `last_rv` into watch lines for this watch.
    fn collect(&mut self, store: &Store) {
        if self.last_rv < store.compacted_rv {
            let err = ApiError::expired(format!(
                "too old resource version: {} ({})",
                self.last_rv,
                store.compacted_rv + 1
            ));
            self.pending
                .push_back(watch_line("ERROR", &err.to_status()));
            self.done = true;
            return;
        }
        let start = store.history.partition_point(|c| c.rv <= self.last_rv);
        for ch in store.history.range(start..) {
            if ch.kind != self.kind
                || self
                    .namespace
                    .as_ref()
                    .is_some_and(|ns| *ns != ch.namespace)
            {
                continue;
            }
            let now_matches = self.selectors.matches(self.kind, &ch.object);
            let event = match ch.change {
                ChangeType::Added => now_matches.then_some("ADDED"),
                ChangeType::Deleted => now_matches.then_some("DELETED"),
                ChangeType::Modified => {
                    let was = ch
                        .old
                        .as_ref()
                        .is_some_and(|o| self.selectors.matches(self.kind, o));
                    match (was, now_matches) {
                        (true, true) => Some("MODIFIED"),
                        (false, true) => Some("ADDED"),
                        (true, false) => Some("DELETED"),
                        (false, false) => None,
                    }
                }
            };
            if let Some(event) = event {
                self.pending.push_back(watch_line(event, &ch.object));
            }
        }
        self.last_rv = self.last_rv.max(store.rv);
    }
}
