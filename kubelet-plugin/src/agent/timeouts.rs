//! How long a migration may take: a completion timeout that scales with the source's memory,
//! and a progress timeout, as KubeVirt bounds its live migrations. Both are set per node (agent
//! flags) and may be overridden per pod by annotations on the clone.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use podmigrate_vocabulary::{COMPLETION_TIMEOUT_PER_GIB, PROGRESS_TIMEOUT};

use crate::pod::annotation;

const GIB: u64 = 1 << 30;

/// The node's defaults (agent `--completion-timeout-per-gib`, `--progress-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Per GiB of the source's memory, counted as at least 1 GiB (KubeVirt: 800 s).
    pub completion_per_gib: Duration,
    /// Longest stretch with no progress (KubeVirt: 150 s).
    pub progress: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            completion_per_gib: Duration::from_secs(800),
            progress: Duration::from_secs(150),
        }
    }
}

/// One migration's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub completion: Duration,
    pub progress: Duration,
    /// How the completion timeout was reached, for the reason a timeout gives.
    pub why: String,
}

/// The budget of the migration to `clone` of a source holding `memory_bytes`. An annotation
/// that is not a duration is refused with one line naming it.
pub fn budget(defaults: &Timeouts, clone: &Pod, memory_bytes: u64) -> Result<Budget, String> {
    let read = |key: &str, default: Duration| -> Result<(Duration, bool), String> {
        match annotation(clone, key) {
            None => Ok((default, false)),
            Some(value) => match humantime::parse_duration(value.trim()) {
                Ok(d) if !d.is_zero() => Ok((d, true)),
                _ => Err(format!(
                    "annotation {key}={value:?} is not a positive duration (e.g. 800s, 15m)"
                )),
            },
        }
    };
    let (per_gib, per_gib_set) = read(COMPLETION_TIMEOUT_PER_GIB, defaults.completion_per_gib)?;
    let (progress, _) = read(PROGRESS_TIMEOUT, defaults.progress)?;
    let gib = (memory_bytes as f64 / GIB as f64).max(1.0);
    let completion = per_gib.mul_f64(gib);
    let setting = if per_gib_set {
        format!("annotation {COMPLETION_TIMEOUT_PER_GIB}")
    } else {
        "agent --completion-timeout-per-gib".to_string()
    };
    Ok(Budget {
        completion,
        progress,
        why: format!(
            "{gib:.2} GiB of memory at {} per GiB ({setting})",
            humantime::format_duration(per_gib)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clone(annotations: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"annotations": annotations}}))
            .unwrap()
    }

    #[test]
    fn the_completion_timeout_scales_with_memory_from_one_gib() {
        let defaults = Timeouts::default();
        let small = budget(&defaults, &clone(serde_json::json!({})), 10 << 20).unwrap();
        assert_eq!(small.completion, Duration::from_secs(800));
        assert_eq!(small.progress, Duration::from_secs(150));
        let big = budget(&defaults, &clone(serde_json::json!({})), 4 * GIB).unwrap();
        assert_eq!(big.completion, Duration::from_secs(3200));
        assert!(
            big.why.contains("4.00 GiB") && big.why.contains("--completion-timeout-per-gib"),
            "{}",
            big.why
        );
    }

    #[test]
    fn annotations_override_the_node_and_bad_ones_are_refused_by_name() {
        let defaults = Timeouts::default();
        let pod = clone(serde_json::json!({
            COMPLETION_TIMEOUT_PER_GIB: "30s", PROGRESS_TIMEOUT: "5s"
        }));
        let b = budget(&defaults, &pod, 2 * GIB).unwrap();
        assert_eq!(b.completion, Duration::from_secs(60));
        assert_eq!(b.progress, Duration::from_secs(5));
        assert!(b.why.contains(COMPLETION_TIMEOUT_PER_GIB));
        for bad in ["soon", "0s", "-5s"] {
            let err = budget(
                &defaults,
                &clone(serde_json::json!({PROGRESS_TIMEOUT: bad})),
                0,
            )
            .unwrap_err();
            assert!(
                err.contains(PROGRESS_TIMEOUT) && !err.contains('\n'),
                "{err}"
            );
        }
    }
}
