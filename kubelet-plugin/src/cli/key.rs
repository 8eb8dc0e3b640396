//! `podmigrate key` and the `--key-file` option: the cluster's archive key on a node.
//!
//! Every node of a cluster shares one key, kept in a Kubernetes Secret. The agent's DaemonSet
//! runs `podmigrate key install` in an init container to copy it, checked and mode 0600, to the
//! host path the shim reads (`PODMIGRATE_KEY_FILE` in containerd's environment).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use podmigrate_checkpoint::archive::ArchiveKey;

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The cluster's archive key: 32 random bytes, raw or base64, in a file other users cannot
    /// read. With it, pack seals the archive (encrypts and authenticates it), and unpack, verify
    /// and inspect accept only archives sealed with it; without it, they refuse sealed ones.
    #[arg(long, env = "PODMIGRATE_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

impl KeyArgs {
    pub fn load(&self) -> anyhow::Result<Option<Arc<ArchiveKey>>> {
        Ok(match &self.key_file {
            Some(path) => Some(Arc::new(ArchiveKey::load(path)?)),
            None => None,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Copy a key file (as mounted from the Secret) to where this node's shim reads it:
    /// checked, written raw with mode 0600, replaced atomically.
    Install(InstallArgs),
    /// Print a key file's id: it tells keys apart without revealing them.
    Id {
        /// The key file.
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The key file to copy (e.g. the Secret's volume).
    #[arg(long)]
    pub from: PathBuf,
    /// Where to write it (the host path in the shim's PODMIGRATE_KEY_FILE).
    #[arg(long)]
    pub to: PathBuf,
    /// When --from does not exist (an optional Secret that is absent), remove --to instead of
    /// failing, so the node holds no stale key.
    #[arg(long)]
    pub optional: bool,
}

pub fn run(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Install(args) => install(args),
        KeyCommand::Id { file } => {
            println!("{}", ArchiveKey::load(&file)?.id());
            Ok(())
        }
    }
}

fn install(args: InstallArgs) -> anyhow::Result<()> {
    if args.optional && !args.from.exists() {
        match std::fs::remove_file(&args.to) {
            Ok(()) => println!(
                "no key at {}: removed {}; this node seals no archives",
                args.from.display(),
                args.to.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!(
                "no key at {}: this node seals no archives",
                args.from.display()
            ),
            Err(e) => {
                return Err(e).with_context(|| format!("removing {}", args.to.display()));
            }
        }
        return Ok(());
    }
    let key = ArchiveKey::load(&args.from)?;
    key.install(&args.to)?;
    println!(
        "installed archive key {} at {}",
        key.id(),
        args.to.display()
    );
    Ok(())
}
