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

/// `migrated default/counter node-a -> node-b in 3.2s (frozen 1.05s, 1.2 MiB moved)`, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// `migrated` or `cloned`.
    pub verb: String,
    /// `namespace/name`.
    pub pod: String,
    pub from: String,
    pub to: String,
    pub total_seconds: f64,
    pub frozen_seconds: f64,
    /// As printed, e.g. `1.2 MiB`.
    pub moved: String,
}

/// Parses the CLI's last line; `None` unless it has exactly the documented shape.
pub fn parse_summary(line: &str) -> Option<Summary> {
    let (verb, rest) = line.split_once(' ')?;
    if verb != "migrated" && verb != "cloned" {
        return None;
    }
    let words: Vec<&str> = rest.split(' ').collect();
    // pod from -> to in Xs (frozen Ys, N UNIT moved)
    if words.len() != 11 && words.len() != 10 {
        return None;
    }
    let (pod, from, arrow, to, word_in) = (words[0], words[1], words[2], words[3], words[4]);
    if arrow != "->" || word_in != "in" || !pod.contains('/') {
        return None;
    }
    let total_seconds = words[5].strip_suffix('s')?.parse().ok()?;
    let frozen_seconds = words[6]
        .strip_prefix("(frozen")
        .filter(|s| s.is_empty())
        .and(words[7].strip_suffix("s,"))?
        .parse()
        .ok()?;
    let moved_words = &words[8..];
    let (last, amount) = moved_words.split_last()?;
    if *last != "moved)" || amount.is_empty() || amount.len() > 2 {
        return None;
    }
    let moved = amount.join(" ");
    let number = amount[0].parse::<f64>().ok()?;
    if !number.is_finite()
        || (amount.len() == 2 && !["B", "KiB", "MiB", "GiB", "TiB"].contains(&amount[1]))
    {
        return None;
    }
    Some(Summary {
        verb: verb.to_owned(),
        pod: pod.to_owned(),
        from: from.to_owned(),
        to: to.to_owned(),
        total_seconds,
        frozen_seconds,
        moved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_parse_only_in_the_documented_shape() {
        let s = parse_summary(
            "migrated default/counter node-a -> node-b in 3.2s (frozen 1.05s, 1.2 MiB moved)",
        )
        .unwrap();
        assert_eq!(s.verb, "migrated");
        assert_eq!(s.pod, "default/counter");
        assert_eq!((s.from.as_str(), s.to.as_str()), ("node-a", "node-b"));
        assert_eq!(s.total_seconds, 3.2);
        assert_eq!(s.frozen_seconds, 1.05);
        assert_eq!(s.moved, "1.2 MiB");
        let small = parse_summary("cloned default/x a -> b in 0.4s (frozen 0s, 512 B moved)");
        assert_eq!(small.unwrap().moved, "512 B");
        assert!(parse_summary("migrated default/counter node-a -> node-b").is_none());
        assert!(parse_summary("moved default/c a -> b in 1s (frozen 1s, 1 B moved)").is_none());
    }
}
