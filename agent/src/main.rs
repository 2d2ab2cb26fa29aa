//! `deis-backup-agent`: runs on every CoreOS host (fleet global unit) and serves the agent gRPC
//! service defined in `proto/`.

use clap::Parser;

/// deis-backup agent: streams the Deis database dump and store archive to the coordinator.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Address to serve gRPC on (defaults to $COREOS_PRIVATE_IPV4).
    #[arg(long, env = "DEIS_BACKUP_AGENT_LISTEN")]
    listen: Option<String>,
    /// etcd v2 endpoints, comma-separated.
    #[arg(long, env = "ETCDCTL_PEERS", default_value = "http://127.0.0.1:4001")]
    etcd: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    eprintln!("deis-backup-agent: serving is not available in this build ({args:?})");
    std::process::ExitCode::FAILURE
}
