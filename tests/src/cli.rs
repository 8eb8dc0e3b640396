//! The `kubectl migrate` CLI as the suites run it: a run under way, what it printed, and its
//! summary line parsed.

use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A `kubectl migrate` under way (killed if dropped).
pub struct CliProcess {
    pub(crate) child: tokio::process::Child,
    pub(crate) started: Instant,
}

impl CliProcess {
    /// Waits for it (bounded: killed after `timeout`) and collects what it printed.
    pub async fn finish(self, timeout: Duration) -> Result<CliRun> {
        let output: Output = tokio::time::timeout(timeout, self.child.wait_with_output())
            .await
            .with_context(|| format!("kubectl migrate did not finish within {timeout:?}"))??;
        Ok(CliRun {
            success: output.status.success(),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed: self.started.elapsed(),
        })
    }
}

/// What `kubectl migrate` did.
#[derive(Debug, Clone)]
pub struct CliRun {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CliRun {
    /// The last non-empty line of stdout.
    pub fn last_line(&self) -> &str {
        self.stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
    }
}

/// `migrated default/counter node-a -> node-b in 3.2s (postcopy, frozen 0.45s, 1.2 MiB
/// archived, 200.0 MiB streamed)`, parsed: the total time, then how the memory moved, the
/// freeze, the archives' size and, in post-copy, the memory streamed after the clone resumed.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// `migrated` or `cloned`.
    pub verb: String,
    /// `namespace/name`.
    pub pod: String,
    pub from: String,
    pub to: String,
    pub total_seconds: f64,
    /// `postcopy` or `stop-and-copy`.
    pub transfer: String,
    pub frozen_seconds: f64,
    /// As printed, e.g. `1.2 MiB`.
    pub archived: String,
    /// Post-copy only, as printed.
    pub streamed: Option<String>,
}

/// Parses the CLI's last line; `None` unless it has exactly the documented shape.
pub fn parse_summary(line: &str) -> Option<Summary> {
    let (verb, rest) = line.split_once(' ')?;
    if verb != "migrated" && verb != "cloned" {
        return None;
    }
    let (head, details) = rest.split_once(" (")?;
    let details = details.strip_suffix(')')?;
    let words: Vec<&str> = head.split(' ').collect();
    // pod from -> to in Xs
    let [pod, from, "->", to, "in", total] = words.as_slice() else {
        return None;
    };
    if !pod.contains('/') {
        return None;
    }
    let total_seconds = total.strip_suffix('s')?.parse().ok()?;
    let parts: Vec<&str> = details.split(", ").collect();
    let (transfer, frozen, archived, streamed) = match parts.as_slice() {
        [transfer, frozen, archived] => (*transfer, *frozen, *archived, None),
        [transfer, frozen, archived, streamed] => (*transfer, *frozen, *archived, Some(*streamed)),
        _ => return None,
    };
    if transfer != "postcopy" && transfer != "stop-and-copy" {
        return None;
    }
    let frozen_seconds = frozen
        .strip_prefix("frozen ")?
        .strip_suffix('s')?
        .parse()
        .ok()?;
    Some(Summary {
        verb: verb.to_owned(),
        pod: (*pod).to_owned(),
        from: (*from).to_owned(),
        to: (*to).to_owned(),
        total_seconds,
        transfer: transfer.to_owned(),
        frozen_seconds,
        archived: bytes(archived.strip_suffix(" archived")?)?,
        streamed: match streamed {
            Some(s) => Some(bytes(s.strip_suffix(" streamed")?)?),
            None => None,
        },
    })
}

/// A byte count as the CLI prints it (`512 B`, `1.2 MiB`), checked.
fn bytes(amount: &str) -> Option<String> {
    let (number, unit) = amount.split_once(' ')?;
    let number = number.parse::<f64>().ok()?;
    (number.is_finite() && ["B", "KiB", "MiB", "GiB", "TiB"].contains(&unit))
        .then(|| amount.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_parse_only_in_the_documented_shape() {
        let s = parse_summary(
            "migrated default/counter node-a -> node-b in 3.2s (postcopy, frozen 0.45s, 1.2 MiB archived, 200.0 MiB streamed)",
        )
        .unwrap();
        assert_eq!(s.verb, "migrated");
        assert_eq!(s.pod, "default/counter");
        assert_eq!((s.from.as_str(), s.to.as_str()), ("node-a", "node-b"));
        assert_eq!(s.total_seconds, 3.2);
        assert_eq!(s.transfer, "postcopy");
        assert_eq!(s.frozen_seconds, 0.45);
        assert_eq!(s.archived, "1.2 MiB");
        assert_eq!(s.streamed.as_deref(), Some("200.0 MiB"));
        let small = parse_summary(
            "cloned default/x a -> b in 0.4s (stop-and-copy, frozen 0s, 512 B archived)",
        )
        .unwrap();
        assert_eq!((small.archived.as_str(), small.streamed), ("512 B", None));
        assert!(parse_summary("migrated default/counter node-a -> node-b").is_none());
        assert!(parse_summary(
            "moved default/c a -> b in 1s (stop-and-copy, frozen 1s, 1 B archived)"
        )
        .is_none());
        assert!(parse_summary(
            "migrated default/c a -> b in 1s (teleport, frozen 1s, 1 B archived)"
        )
        .is_none());
    }
}
