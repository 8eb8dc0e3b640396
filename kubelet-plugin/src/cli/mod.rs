//! Command-line interface.

mod agent;
pub mod apply;
mod archive;
mod cancel;
pub mod clone_pod;
mod gc;
mod key;
mod migrate;
mod status;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "podmigrate",
    version,
    about = "Move a running, stateful Kubernetes pod to another node with CRIU"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PODMIGRATE_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pack a checkpoint directory into an archive, committed atomically.
    Pack(Box<archive::PackArgs>),
    /// Verify and extract an archive into a new or empty directory.
    Unpack(archive::UnpackArgs),
    /// Check every entry of an archive against its manifest, without extracting.
    Verify(archive::VerifyArgs),
    /// Show an archive's manifest and sizes, like `checkpointctl show`.
    Inspect(archive::InspectArgs),
    /// Manage the cluster's archive key (install it on a node, show its id).
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Move a running pod to another node (`kubectl migrate` runs this).
    Migrate(migrate::MigrateArgs),
    /// Stop a migration in any phase before its source is deleted; the source runs on.
    Cancel(cancel::CancelArgs),
    /// Create Pods from a manifest, moving `spec.clonePod` into the clone annotation.
    Apply(apply::ApplyArgs),
    /// List migrations in flight and recent results.
    Status(status::StatusArgs),
    /// Run the node agent (as the DaemonSet does).
    Agent(Box<agent::AgentArgs>),
    /// Remove old archives and work directories, never one a migration in flight uses.
    Gc(gc::GcArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    if !matches!(cli.command, Command::Agent(_)) {
        end_quietly_when_reader_leaves();
    }
    match cli.command {
        Command::Pack(args) => archive::pack(*args),
        Command::Unpack(args) => archive::unpack(args),
        Command::Verify(args) => archive::verify(args),
        Command::Inspect(args) => archive::inspect(args),
        Command::Key(command) => key::run(command),
        Command::Migrate(args) => migrate::run(args),
        Command::Cancel(args) => cancel::run(args),
        Command::Apply(args) => apply::run(args),
        Command::Status(args) => status::run(args),
        Command::Agent(args) => agent::run(*args),
        Command::Gc(args) => gc::run(args),
    }
}

/// A report piped into `head` or `grep -q` ends the command when the reader leaves, as other
/// Unix tools do, instead of Rust's panic on a broken pipe. The agent keeps SIGPIPE ignored: a
/// peer closing a connection must not kill it.
fn end_quietly_when_reader_leaves() {
    // SAFETY: restores the default disposition before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// What `kubectl migrate WORD ...` runs as a command of its own rather than as the migration of
/// a pod named WORD (a pod of that name moves with `kubectl migrate migrate WORD --to ...`).
const PLUGIN_COMMANDS: [&str; 7] = [
    "migrate", "cancel", "apply", "status", "help", "--help", "-h",
];

/// The command line, with `migrate` put first when we run as `kubectl-migrate` and the first
/// word is not one of [`PLUGIN_COMMANDS`]: kubectl runs a plugin by that name for
/// `kubectl migrate ...`, passing only what follows the word.
pub fn arguments(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = args.into_iter().collect();
    let invoked_as = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned());
    let first = args.get(1).map(|a| a.to_string_lossy().into_owned());
    let a_command = first.is_some_and(|w| PLUGIN_COMMANDS.contains(&w.as_str()));
    if invoked_as.as_deref() == Some("kubectl-migrate") && !a_command {
        args.insert(1, "migrate".into());
    }
    args
}

/// An error and its causes on one line, `what: why: deeper cause`. Library errors already
/// quote their cause in their own message; a cause is appended only if it is not there yet.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string().replace('\n', " ");
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Logs go to stderr: quiet by default for interactive commands, each step for the agent (a
/// daemon whose log is the record of what it did); `RUST_LOG` overrides.
pub fn init_logging(format: LogFormat, daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn kubectl_plugin_name_means_migrate() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            super::arguments(args(&[
                "/usr/local/bin/kubectl-migrate",
                "counter",
                "--to",
                "b"
            ])),
            args(&[
                "/usr/local/bin/kubectl-migrate",
                "migrate",
                "counter",
                "--to",
                "b"
            ])
        );
        assert_eq!(
            super::arguments(args(&["podmigrate", "status"])),
            args(&["podmigrate", "status"])
        );
        for words in [
            &["kubectl-migrate", "apply", "-f", "clone.yaml"][..],
            &["kubectl-migrate", "status"],
            &["kubectl-migrate", "migrate", "apply", "--to", "b"],
        ] {
            assert_eq!(super::arguments(args(words)), args(words), "{words:?}");
        }
    }

    #[test]
    fn causes_already_quoted_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = anyhow::Error::new(io)
            .context("opening /x.zip: No such file")
            .context("verify");
        assert_eq!(one_line(&err), "verify: opening /x.zip: No such file");
        let err = anyhow::anyhow!("disk full").context("pack");
        assert_eq!(one_line(&err), "pack: disk full");
    }
}
