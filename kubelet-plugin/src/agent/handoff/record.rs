//! A departure's record: a coordination.k8s.io Lease in the departed pod's namespace, named
//! [`DEPARTURE_LEASE_PREFIX`] and the pod's uid. It outlives the pod (a StatefulSet makes the
//! replacement only once the pod is gone), is found by the replacement's agent by its labels
//! (the controller's uid and the pod's [`Place`]), and is claimed by the replacement through
//! `spec.holderIdentity`, an update that fails on a conflict, so two replacements of one
//! ReplicaSet template never take the same checkpoint.
//!
//! | what | where |
//! |---|---|
//! | where it stands | annotation [`DEPARTURE`] ([`Departure`]), with [`REASON`] once failed |
//! | the departed pod and its containers | annotations [`DEPARTED_POD`], [`DEPARTED_CONTAINERS`] |
//! | who takes it | `spec.holderIdentity`: the replacement pod's name |
//! | when it last changed | `spec.renewTime` |
//! | whose agent owns it | label [`DEPARTED_FROM_LABEL`]: the node the pod left |

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use podmigrate_vocabulary::{
    Departure, CONTROLLER_UID_LABEL, DEPARTED_CONTAINERS, DEPARTED_FROM_LABEL, DEPARTED_POD,
    DEPARTURE, DEPARTURE_LEASE_PREFIX, IDENTITY_LABEL, REASON,
};
use serde_json::json;

use crate::controller::Place;

/// The record of the departure of the pod with uid `uid`.
pub fn name(uid: &str) -> String {
    format!("{DEPARTURE_LEASE_PREFIX}{uid}")
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// A departure as its record says.
#[derive(Debug, Clone)]
pub struct Record {
    pub lease: Lease,
}

impl Record {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.lease
            .metadata
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }
    pub fn state(&self) -> Option<Departure> {
        self.annotation(DEPARTURE).and_then(Departure::parse)
    }
    pub fn reason(&self) -> &str {
        self.annotation(REASON).unwrap_or("no reason was recorded")
    }
    pub fn departed_pod(&self) -> &str {
        self.annotation(DEPARTED_POD).unwrap_or_default()
    }
    pub fn containers(&self) -> Vec<String> {
        self.annotation(DEPARTED_CONTAINERS)
            .unwrap_or_default()
            .split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect()
    }
    /// The departed pod's uid.
    pub fn departure(&self) -> &str {
        self.lease
            .metadata
            .name
            .as_deref()
            .and_then(|n| n.strip_prefix(DEPARTURE_LEASE_PREFIX))
            .unwrap_or_default()
    }
    /// The Leases of the record's namespace, and the record's name.
    fn api(&self, client: &kube::Client) -> (Api<Lease>, &str) {
        let metadata = &self.lease.metadata;
        let namespace = metadata.namespace.as_deref().unwrap_or_default();
        (
            Api::namespaced(client.clone(), namespace),
            metadata.name.as_deref().unwrap_or_default(),
        )
    }
    pub fn holder(&self) -> Option<&str> {
        self.lease
            .spec
            .as_ref()?
            .holder_identity
            .as_deref()
            .filter(|h| !h.is_empty())
    }
    /// Seconds since the record was made, and since it last changed.
    pub fn ages(&self) -> (i64, i64) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let created = self
            .lease
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(now);
        let changed = self
            .lease
            .spec
            .as_ref()
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0)
            .unwrap_or(created);
        (
            now.duration_since(created).as_secs(),
            now.duration_since(changed).as_secs(),
        )
    }
}

/// Opens the record of `pod`'s departure from `node`, in [`Departure::Checkpointing`]. A
/// record left by an earlier attempt for the same pod is replaced.
pub async fn open(
    client: &kube::Client,
    pod: &Pod,
    place: &Place,
    node: &str,
    containers: &[String],
) -> Result<(), kube::Error> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name(uid)),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (CONTROLLER_UID_LABEL.to_string(), place.owner.uid.clone()),
                (IDENTITY_LABEL.to_string(), place.label.clone()),
                (DEPARTED_FROM_LABEL.to_string(), node.to_string()),
            ])),
            annotations: Some(BTreeMap::from([
                (
                    DEPARTURE.to_string(),
                    Departure::Checkpointing.as_str().to_string(),
                ),
                (
                    DEPARTED_POD.to_string(),
                    pod.metadata.name.clone().unwrap_or_default(),
                ),
                (DEPARTED_CONTAINERS.to_string(), containers.join(",")),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            renew_time: Some(now()),
            ..LeaseSpec::default()
        }),
    };
    match api.create(&PostParams::default(), &lease).await {
        Err(kube::Error::Api(e)) if e.code == 409 => {
            api.delete(&name(uid), &DeleteParams::default()).await?;
            api.create(&PostParams::default(), &lease).await.map(drop)
        }
        other => other.map(drop),
    }
}

/// Records where the departure of the pod with uid `uid` stands now.
pub async fn set(
    client: &kube::Client,
    namespace: &str,
    uid: &str,
    state: Departure,
    reason: Option<&str>,
) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let patch = json!({
        "metadata": {"annotations": {DEPARTURE: state.as_str(), REASON: reason}},
        "spec": {"renewTime": now()},
    });
    api.patch(&name(uid), &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map(drop)
}

/// The departures of pods in `place` (their controller's, of the same identity).
pub async fn in_place(
    client: &kube::Client,
    namespace: &str,
    place: &Place,
) -> Result<Vec<Record>, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let selector = format!(
        "{CONTROLLER_UID_LABEL}={},{IDENTITY_LABEL}={}",
        place.owner.uid, place.label
    );
    let mut records: Vec<Record> = api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .map(|lease| Record { lease })
        .collect();
    records.sort_by(|a, b| {
        a.lease
            .metadata
            .creation_timestamp
            .cmp(&b.lease.metadata.creation_timestamp)
    });
    Ok(records)
}

/// Claims `record` for the pod `holder`: `Ok(None)` when another claimed it first (or it
/// changed since it was read).
pub async fn claim(
    client: &kube::Client,
    record: &Record,
    holder: &str,
) -> Result<Option<Record>, kube::Error> {
    let (api, name) = record.api(client);
    let mut lease = record.lease.clone();
    let spec = lease.spec.get_or_insert_default();
    spec.holder_identity = Some(holder.to_string());
    spec.acquire_time = Some(now());
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(lease) => Ok(Some(Record { lease })),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes the record; one already gone is no error.
pub async fn remove(client: &kube::Client, record: &Record) -> Result<(), kube::Error> {
    let (api, name) = record.api(client);
    match api.delete(name, &DeleteParams::default()).await {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other.map(drop),
    }
}
