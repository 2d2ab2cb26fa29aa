//! `deis-backup`: the coordinator CLI.

use clap::{Parser, Subcommand};

/// deis-backup: cluster-wide backup and restore for Deis v1 platforms.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// etcd v2 endpoints, comma-separated.
    #[arg(
        long,
        global = true,
        env = "ETCDCTL_PEERS",
        default_value = "http://127.0.0.1:4001"
    )]
    etcd: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the agents registered in etcd.
    Agents,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Agents => {
            let etcd = deis_backup_etcd::Client::from_list(&cli.etcd)?;
            let dir = deis_backup_proto::registration::AGENTS_DIR;
            let node = etcd.get_node(dir, true).await?;
            for leaf in node.iter().flat_map(|n| n.leaves()) {
                println!("{}\t{}", leaf.name(), leaf.value.as_deref().unwrap_or(""));
            }
        }
    }
    Ok(())
}
