//! `podmigrate`: parses the command line and hands it to the library.

use std::process::ExitCode;

use clap::Parser;
use podmigrate_kubelet_plugin::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging(cli.log_format);
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, naming what failed and where: the whole context chain, flattened.
            let message = format!("{err:#}").replace('\n', " ");
            eprintln!("podmigrate: error: {message}");
            ExitCode::from(1)
        }
    }
}
