//! `fondation`: submit, follow and inspect jobs and agents of a Fondation coordinator.

use std::process::ExitCode;

use clap::Parser as _;
use fondation_cli::Cli;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match fondation_cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
