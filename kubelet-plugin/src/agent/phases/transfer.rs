//! Transferring: every archive is committed on the share. Their commit records (written by the
//! source's shim) give the clone its digests and byte count; in clone mode the source is thawed
//! here. Then the clone's shim, already waiting, restores.

use kube::runtime::events::EventType;
use podmigrate_vocabulary::{Mode, Phase, ARCHIVE_BYTES, ARCHIVE_DIGEST, PHASE, PROGRESS};
use serde_json::json;

use crate::agent::machine::{unix_millis, Agent, AgentError, Ending, Migration, Next};
use crate::agent::phases::restore::status_mark;
use crate::agent::ports::{Cluster, Runtime, Share};

impl<C: Cluster, R: Runtime, S: Share> Agent<C, R, S> {
    pub(in crate::agent) async fn transfer_step(&self, m: &Migration) -> Result<Next, AgentError> {
        let mut digests = Vec::new();
        let mut bytes = 0u64;
        for name in &m.names {
            let record = match self
                .share
                .commit_record(&m.namespace, &m.source_name, name, &m.uid)
            {
                Ok(Some(record)) => record,
                Ok(None) => {
                    let reason = format!(
                        "the archive of container {name} has no commit record for clone {}",
                        m.uid
                    );
                    return self.roll_back(m, Ending::RolledBack(reason)).await;
                }
                Err(e) => {
                    let reason =
                        format!("the commit of container {name}'s archive is unreadable: {e}");
                    return self.roll_back(m, Ending::RolledBack(reason)).await;
                }
            };
            digests.push(format!("{name}={}", record.manifest_sha256));
            bytes += record.archive_bytes;
        }
        self.metrics.record_bytes(bytes);
        let clone = self
            .annotate(
                &m.clone,
                json!({
                    PHASE: Phase::Restoring.as_str(),
                    ARCHIVE_DIGEST: digests.join(","),
                    ARCHIVE_BYTES: bytes.to_string(),
                    PROGRESS: format!("{}:{}", unix_millis(), status_mark(&m.clone)),
                }),
            )
            .await?;
        let note = format!(
            "{} archive(s) committed to the share, {bytes} bytes",
            m.names.len()
        );
        self.cluster
            .event(
                &clone,
                crate::agent::machine::event(
                    EventType::Normal,
                    "Checkpointed",
                    "Checkpoint",
                    &note,
                ),
            )
            .await;
        if m.mode == Mode::Clone {
            self.thaw(&m.containers).await;
        }
        Ok(Next::After(m.budget.progress))
    }
}
