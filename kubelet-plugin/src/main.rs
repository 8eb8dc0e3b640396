//! `podmigrate`: parses the command line and hands it to the library.

use std::process::ExitCode;

use clap::Parser;
use podmigrate_kubelet_plugin::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse_from(cli::arguments(std::env::args_os()));
    let daemon = matches!(cli.command, cli::Command::Agent(_));
    cli::init_logging(cli.log_format, daemon);
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("podmigrate: error: {}", cli::one_line(&err));
            ExitCode::from(1)
        }
    }
}
