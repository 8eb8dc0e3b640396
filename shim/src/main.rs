//! `containerd-shim-migrate-v2`: thin entry point; everything lives in the library.

use std::process::ExitCode;

use anyhow::Context;

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, no backtrace: containerd quotes the output of a failed `start` verbatim
            // in its own error.
            eprintln!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> anyhow::Result<()> {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    containerd_shim_migrate::run(&args).context(containerd_shim_migrate::BINARY_NAME)
}
