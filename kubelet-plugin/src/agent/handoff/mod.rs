//! Departures and arrivals: a pod deleted or evicted (`kubectl drain`) leaves a checkpoint,
//! and the pod its controller makes in its place restores it, wherever it is scheduled.
//!
//! The agent answers the node's shims on the handoff socket
//! ([`podmigrate_checkpoint::handoff`]):
//!
//! * [`depart`]: a container of a pod on this node is being stopped. If the pod departs (it
//!   is being deleted with a grace period, opted in, and its controller replaces it, see
//!   [`crate::controller::place`] and [`replaced`]), every container is frozen, checkpointed onto the share
//!   and stopped, within the pod's grace period; otherwise, or should that fail, the pod stops
//!   as Kubernetes would stop it (and the replacement starts fresh).
//! * [`arrive`]: a container of a pod on this node is being created. If the pod takes the place
//!   of a departed pod, it claims that departure's record and restores its checkpoint.
//! * [`release`]: the records of departures from this node, followed until the replacement
//!   runs (or nobody came), then removed with their archives.
//!
//! The record ([`record`]) is a Lease in the pod's namespace: it outlives the departed pod.

mod arrive;
mod depart;
pub mod record;
mod release;
mod replaced;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podmigrate_checkpoint::handoff::{self, Answer, Ask};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::ports::Cluster;
use super::watch::LiveAgent;
use k8s_openapi::api::core::v1::{Namespace, Pod};

pub use release::run as run_release;

/// How long a departure's record and archives wait for a replacement to claim them.
pub const RECORD_TTL: Duration = Duration::from_secs(10 * 60);
/// How long the answer to a departure is kept: kubelet may stop a container again.
const ANSWER_KEPT: Duration = Duration::from_secs(15 * 60);
/// The longest question line read.
const MAX_LINE: u64 = 4096;

/// A departure: when it began, and its answer once known.
type Departing = (Instant, watch::Receiver<Option<Answer>>);

/// The agent's side of the handoff: the socket's questions and the departures in flight.
pub struct Handoff {
    agent: Arc<LiveAgent>,
    /// Departures by pod uid.
    departures: Mutex<HashMap<String, Departing>>,
    /// The departures and the connections being answered.
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

fn proceed(why: impl Into<String>) -> Answer {
    Answer::Proceed { why: why.into() }
}

impl Handoff {
    pub fn new(agent: Arc<LiveAgent>, shutdown: CancellationToken) -> Arc<Handoff> {
        Arc::new(Handoff {
            agent,
            departures: Mutex::default(),
            tasks: TaskTracker::new(),
            shutdown,
        })
    }

    /// Whether a departure of the pod with uid `uid` runs in this agent now.
    fn departing(&self, uid: &str) -> bool {
        self.departures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .is_some_and(|(_, answer)| answer.borrow().is_none())
    }

    /// The pod a shim asks about (with uid `uid`) as the API server has it now, and its
    /// namespace (for the opt-in label); the answer to give when it cannot be read.
    async fn asked_about(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<(Pod, Option<Namespace>), Answer> {
        let cluster = &self.agent.cluster;
        let pod = match cluster.pod(namespace, name).await {
            Ok(Some(pod)) if pod.metadata.uid.as_deref() == Some(uid) => pod,
            Ok(_) => return Err(proceed(format!("pod {namespace}/{name} is gone"))),
            Err(e) => return Err(proceed(format!("reading pod {namespace}/{name}: {e}"))),
        };
        Ok((pod, cluster.namespace(namespace).await.ok().flatten()))
    }

    /// The answer to a Kill in pod `uid`: one departure per pod, however many of its containers
    /// ask, and the same answer to a later Kill. The departure runs on its own task, so a
    /// shim that stops waiting does not stop it halfway (with its containers frozen).
    async fn depart(self: &Arc<Self>, namespace: String, pod: String, uid: String) -> Answer {
        let mut answer = {
            let mut departures = self.departures.lock().unwrap_or_else(|p| p.into_inner());
            departures.retain(|_, (began, _)| began.elapsed() < ANSWER_KEPT);
            match departures.get(&uid) {
                Some((_, answer)) => answer.clone(),
                None => {
                    let (tell, answer) = watch::channel(None);
                    departures.insert(uid.clone(), (Instant::now(), answer.clone()));
                    let this = Arc::clone(self);
                    self.tasks.spawn(async move {
                        let answer = this.departure(&namespace, &pod, &uid).await;
                        let _ = tell.send(Some(answer));
                    });
                    answer
                }
            }
        };
        let answered = match answer.wait_for(Option::is_some).await {
            Ok(answer) => answer.clone().unwrap_or_else(|| proceed("no answer")),
            Err(_) => proceed("the departure ended without an answer"),
        };
        answered
    }

    async fn answer(self: &Arc<Self>, question: Ask) -> Answer {
        match question {
            Ask::Depart {
                namespace,
                pod,
                uid,
            } => self.depart(namespace, pod, uid).await,
            Ask::Arrive {
                namespace,
                pod,
                uid,
                container,
            } => self.arrival(&namespace, &pod, &uid, &container).await,
        }
    }

    async fn serve_connection(self: Arc<Self>, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE));
        if let Err(e) = reader.read_line(&mut line).await {
            debug!(error = %e, "reading a handoff question");
            return;
        }
        let answer = match handoff::parse_ask(&line) {
            Ok(question) => {
                debug!(?question, "handoff question");
                self.answer(question).await
            }
            Err(e) => {
                warn!(line = %line.trim_end(), error = %e, "not a handoff question");
                return;
            }
        };
        let mut reply = handoff::encode(&answer);
        reply.push('\n');
        if let Err(e) = write.write_all(reply.as_bytes()).await {
            warn!(?answer, error = %e, "the shim left before its answer");
        }
    }
}

/// Serves the handoff socket in `work_dir` until `shutdown`; then waits for the departures in
/// flight (each bounded by its pod's grace period: stopping halfway would leave a pod frozen).
pub async fn serve(handoff: Arc<Handoff>, work_dir: &std::path::Path) -> std::io::Result<()> {
    let path = handoff::socket_path(work_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    info!(socket = %path.display(), "answering the shims' handoff questions");
    loop {
        tokio::select! {
            _ = handoff.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let this = Arc::clone(&handoff);
                    handoff.tasks.spawn(this.serve_connection(stream));
                }
                Err(e) => warn!(error = %e, "accepting a handoff connection"),
            },
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
    handoff.tasks.close();
    handoff.tasks.wait().await;
    Ok(())
}
