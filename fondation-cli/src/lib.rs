//! The `fondation` command: people's client of a coordinator's `fondation.v1.Admin` API.
//!
//! Layout:
//! - [`args`]: the command line, with the connection settings the other binaries read;
//! - [`connection`]: dialing the coordinator (TLS, Admin token) and errors that say what to do;
//! - [`commands`]: one function per subcommand;
//! - [`follow`]: the live view of a job (a progress bar on a terminal, lines elsewhere), also used
//!   by the demo;
//! - [`output`]: tables that fit 80 columns, and JSON in the protobuf mapping grpcurl uses.

pub mod args;
pub mod commands;
pub mod connection;
pub mod follow;
pub mod output;

pub use args::Cli;
pub use connection::CliError;

/// Runs the command line `cli`.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let mut admin = connection::connect(&cli.connection).await?;
    commands::run(
        &mut admin,
        &cli.connection.coordinator,
        cli.command,
        cli.output,
    )
    .await
}
