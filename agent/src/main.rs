//! `deis-backup-agent`: runs on every CoreOS host (fleet global unit) and serves the agent gRPC
//! service. The binary is thin: parse flags, merge the config file, serve until SIGTERM/SIGINT.
//!
//! Exit codes: 0 after a clean shutdown, 1 on any error (printed as one line plus guidance).

use std::process::ExitCode;

use clap::Parser;
use deis_backup_agent::{Cli, Error};

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}

fn run(cli: Cli) -> Result<(), Error> {
    let config = cli.into_config()?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| Error::Config {
        what: format!("cannot start the async runtime: {e}"),
    })?;
    rt.block_on(deis_backup_agent::serve(config, shutdown_signal()))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deis-backup-agent: {e}\n  hint: {}", e.guidance());
            ExitCode::FAILURE
        }
    }
}
