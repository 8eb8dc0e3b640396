//! CRIU: version detection and `criu check`.
//!
//! runc drives CRIU itself (over `criu swrk`), so podmigrate only talks to the `criu` binary
//! directly to find out whether the node can checkpoint at all: which version it has and whether
//! `criu check` passes on this kernel.

use std::path::Path;
use std::process::Command;

use crate::runc::tail_lines;

/// The CRIU binary looked up on `PATH` when no explicit path is configured.
pub const DEFAULT_CRIU: &str = "criu";

/// How many trailing lines of a failing command's stderr an error keeps.
const STDERR_TAIL_LINES: usize = 20;

/// A failure to run or understand the `criu` binary.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// The binary could not be started at all (not installed, not executable, ...).
    #[error("`{command}` could not be started: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// The command ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr_tail}")]
    Failed {
        command: String,
        status: String,
        /// The last lines of its stderr (or stdout, when stderr was empty).
        stderr_tail: String,
    },
    /// `criu --version` succeeded but printed nothing that looks like `Version: X.Y[.Z]`.
    #[error("`{command}` printed no `Version:` line: {output:?}")]
    UnparsableVersion { command: String, output: String },
}

/// Runs `criu --version` and returns the version, e.g. `"4.1.1"`.
pub fn version(criu: impl AsRef<Path>) -> Result<String, CriuError> {
    let criu = criu.as_ref();
    let command = format!("{} --version", criu.display());
    let stdout = run(criu, &["--version"], &command)?;
    parse_version(&stdout).ok_or(CriuError::UnparsableVersion {
        command,
        output: stdout,
    })
}

/// Runs `criu check`; `Ok` when the kernel and CRIU support checkpoint/restore.
///
/// Returns what CRIU printed (normally `Looks good.`), for logging.
pub fn check(criu: impl AsRef<Path>) -> Result<String, CriuError> {
    let criu = criu.as_ref();
    let command = format!("{} check", criu.display());
    let mut cmd = Command::new(criu);
    cmd.arg("check");
    let output = cmd.output().map_err(|source| CriuError::Spawn {
        command: command.clone(),
        source,
    })?;
    // `criu check` prints its verdict ("Looks good.") on stderr on some versions, stdout on others.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(failed(command, &output));
    }
    let mut said = stdout.trim().to_owned();
    if said.is_empty() {
        said = tail_lines(&stderr, 1);
    }
    Ok(said)
}

/// Parses `criu --version` output: the first `Version: X.Y[.Z]` line.
///
/// ```
/// use podmigrate_checkpoint::criu::parse_version;
/// assert_eq!(parse_version("Version: 4.1.1\n").as_deref(), Some("4.1.1"));
/// ```
pub fn parse_version(output: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("Version:")?;
        let version = rest.split_whitespace().next()?;
        version
            .split('.')
            .next()
            .is_some_and(|major| !major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()))
            .then(|| version.to_owned())
    })
}

/// The numeric `(major, minor, sublevel)` of a CRIU version string such as `"4.1.1"` or `"3.17"`.
pub fn version_triple(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().map_or(Some(0), |p| p.parse().ok())?;
    let sublevel = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, sublevel))
}

/// Why images made by CRIU `made_by` cannot be restored by CRIU `local`, if they cannot.
///
/// CRIU reads images from its own and older versions; a newer CRIU may write what an older one
/// misreads. An unknown version on either side is not held against the archive.
pub fn restore_refusal(made_by: &str, local: &str) -> Option<String> {
    let (theirs, ours) = (version_triple(made_by)?, version_triple(local)?);
    (theirs > ours).then(|| {
        format!("the checkpoint was made by CRIU {made_by}, newer than this node's CRIU {local}")
    })
}

fn run(criu: &Path, args: &[&str], command: &str) -> Result<String, CriuError> {
    let output = Command::new(criu)
        .args(args)
        .output()
        .map_err(|source| CriuError::Spawn {
            command: command.to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(failed(command.to_owned(), &output));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn failed(command: String, output: &std::process::Output) -> CriuError {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = if stderr.trim().is_empty() {
        String::from_utf8_lossy(&output.stdout).into_owned()
    } else {
        stderr.into_owned()
    };
    CriuError::Failed {
        command,
        status: output.status.to_string(),
        stderr_tail: tail_lines(&text, STDERR_TAIL_LINES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_from_a_newer_criu_are_refused() {
        assert!(restore_refusal("4.2", "4.1.1").unwrap().contains("newer"));
        assert_eq!(restore_refusal("4.1.1", "4.1.1"), None);
        assert_eq!(restore_refusal("3.17", "4.1.1"), None);
        assert_eq!(restore_refusal("", "4.1.1"), None);
    }

    #[test]
    fn parses_release_version() {
        assert_eq!(parse_version("Version: 4.1.1\n").as_deref(), Some("4.1.1"));
    }

    #[test]
    fn parses_version_with_git_id() {
        let out = "Version: 3.17.1\nGitID: v3.17.1-12-gabcdef\n";
        assert_eq!(parse_version(out).as_deref(), Some("3.17.1"));
    }

    #[test]
    fn parses_two_part_version_after_noise() {
        let out = "Warn: something odd\n  Version: 4.0 \n";
        assert_eq!(parse_version(out).as_deref(), Some("4.0"));
    }

    #[test]
    fn rejects_output_without_version() {
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("criu: command not found\n"), None);
        assert_eq!(parse_version("Version: \n"), None);
        assert_eq!(parse_version("Version: unknown\n"), None);
    }

    #[test]
    fn splits_version_triples() {
        assert_eq!(version_triple("4.1.1"), Some((4, 1, 1)));
        assert_eq!(version_triple("3.17"), Some((3, 17, 0)));
        assert_eq!(version_triple("4"), Some((4, 0, 0)));
        assert_eq!(version_triple("4.1-rc1"), Some((4, 1, 0)));
        assert_eq!(version_triple("x.1"), None);
    }

    #[test]
    fn missing_binary_is_a_spawn_error() {
        let err = version("/nonexistent/criu").unwrap_err();
        assert!(matches!(err, CriuError::Spawn { .. }), "{err}");
        assert!(
            err.to_string().contains("/nonexistent/criu --version"),
            "{err}"
        );
    }
}
