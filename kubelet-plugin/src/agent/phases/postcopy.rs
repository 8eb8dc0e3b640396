//! PostCopy: the clone runs while the memory its archives left out streams in from the frozen
//! source, which holds every page until the clone has them all. The source's shim records each
//! container's stream on the share ([`podmigrate_checkpoint::share::PagesRecord`]); this step
//! follows those records:
//!
//! * every stream complete: the source is retired, and the migration is Running;
//! * a stream failed, or the clone's container stopped (the clone's shim stops it when its
//!   memory can no longer arrive), or no byte moved for the progress timeout: the clone cannot
//!   finish, so it is deleted, and the source, which still holds every page, is thawed;
//! * otherwise the bytes moved so far go to [`PAGES`], and the step looks again shortly.

use std::time::Duration;

use podmigrate_checkpoint::share::PagesState;
use podmigrate_vocabulary::{PAGES, PROGRESS};
use serde_json::json;
use tracing::warn;

use crate::agent::machine::{progress, unix_millis, Agent, AgentError, Ending, Migration, Next};
use crate::agent::phases::restore::clone_failure;
use crate::agent::ports::{Cluster, Runtime, Share};
use crate::pod::{annotation, pod_name};

/// How often the page stream records are read.
const POLL: Duration = Duration::from_secs(1);

impl<C: Cluster, R: Runtime, S: Share> Agent<C, R, S> {
    pub(in crate::agent) async fn postcopy_step(&self, m: &Migration) -> Result<Next, AgentError> {
        let (mut moved, mut total, mut complete) = (0u64, 0u64, 0usize);
        for name in &m.names {
            let record = match self
                .share
                .pages_record(&m.namespace, &m.source_name, name, &m.uid)
            {
                Ok(Some(record)) => record,
                Ok(None) => continue,
                Err(e) => {
                    warn!(clone = %pod_name(&m.clone), container = %name, error = %e, "reading the page stream record");
                    continue;
                }
            };
            match record.state {
                PagesState::Complete => complete += 1,
                PagesState::Failed => {
                    let reason = format!(
                        "the page stream of container {name} failed: {}",
                        record.reason
                    );
                    return self.lose_clone(m, reason).await;
                }
                PagesState::Streaming => {}
            }
            moved += record.moved_bytes;
            total += record.total_bytes;
        }
        if complete == m.names.len() {
            // The last figures, as the summary reports them.
            self.annotate(&m.clone, json!({ PAGES: format!("{moved}/{total}") }))
                .await?;
            self.retire_source(m).await?;
            return self.finish(m, Ending::Running).await;
        }
        if let Some(reason) = clone_failure(&m.clone) {
            return self.lose_clone(m, reason).await;
        }
        let now = unix_millis();
        let mark = moved.to_string();
        let pages = format!("{moved}/{total}");
        let since = match progress(&m.clone) {
            Some((since, old)) if old == mark => since,
            _ => now,
        };
        if since == now || annotation(&m.clone, PAGES) != Some(pages.as_str()) {
            self.annotate(
                &m.clone,
                json!({ PAGES: pages, PROGRESS: format!("{since}:{mark}") }),
            )
            .await?;
        }
        let stalled = Duration::from_millis(now.saturating_sub(since));
        if stalled > m.budget.progress {
            let reason = format!(
                "no page moved for {} (progress timeout)",
                humantime::format_duration(Duration::from_secs(stalled.as_secs()))
            );
            return self.lose_clone(m, reason).await;
        }
        Ok(Next::After(POLL))
    }

    /// The clone cannot get its memory: the source, which still holds every page, is thawed,
    /// the migration is recorded as rolled back, and then the clone goes (its shim stopped it
    /// already, or will once the stream breaks; a restart could only start afresh).
    async fn lose_clone(&self, m: &Migration, reason: String) -> Result<Next, AgentError> {
        let reason = format!("post-copy: {reason}; the clone was deleted");
        let next = self.roll_back(m, Ending::RolledBack(reason)).await?;
        let clone = m.clone.metadata.name.as_deref().unwrap_or_default();
        if let Err(e) = self.cluster.delete(&m.namespace, clone).await {
            warn!(clone = %pod_name(&m.clone), error = %e, "deleting a clone that cannot get its memory");
        }
        Ok(next)
    }
}
