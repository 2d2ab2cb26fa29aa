//! Several hosts, one shared store: the product on the three-host cluster `hosts`
//! (`tests/cluster/up --hosts 3`): every host with its own address (127.0.K.I), its own Docker
//! engine (an agent sees only its host's containers), its own ceph-fuse mount of one CephFS as
//! /var/lib/deis/store, the database on host 1 and store-gateways on hosts 1 and 2.
//!
//! Invariants: the tests take turns on the cluster ([`ThreeHosts::lock`], and the `three-hosts`
//! group in `.config/nextest.toml`): they stop agents, cut a host's network and stop a gateway,
//! and each puts back what it broke (the next `lock` brings the cluster up again whatever is
//! left). Every test writes into its own repository; restores go to a fresh three-host target.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::snapshot::{
    deis_backup, ok, repo_dir, s3_client, snapshot_id, spawn_deis_backup, stderr,
};
use super::support::{self, AgentContainer, Target, ThreeHosts, psql_on, unique};

/// Files the cluster's store writer appends to while the tests run.
const LIVE: [&str; 2] = ["logs/deis-controller.log", "logs/myapp.log"];
const SHARED_PART: &str = "store/shared/var-lib-deis-store.tar.zst";

/// The test's turn on the cluster, and an agent on each of its hosts (with their token). Bind
/// all three: they go in reverse order, the agents before the turn.
fn three_hosts() -> (ThreeHosts, Vec<AgentContainer>, PathBuf) {
    let c = ThreeHosts::lock();
    let agents = c
        .hosts
        .agents("hosts", c.etcd_endpoints(), c.database_container());
    let token = agents[0].token_file.clone();
    (c, agents, token)
}

fn specs(agents: &[AgentContainer]) -> String {
    agents
        .iter()
        .map(AgentContainer::spec)
        .collect::<Vec<_>>()
        .join(",")
}

fn snapshot(c: &ThreeHosts, token: &Path, repo: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "snapshot",
        "--etcd",
        c.etcd_endpoints(),
        "-r",
        repo.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    deis_backup(token, &args)
}

/// Every entry of a store tree, the live logs' growing content left out (owner and mode kept).
fn comparable_tree(root: &Path) -> Vec<(std::path::PathBuf, String)> {
    support::tree(root)
        .into_iter()
        .map(|(p, mut e)| {
            if LIVE.iter().any(|l| p == Path::new(l)) {
                e.sha = None;
                e.mtime = 0;
            }
            let e = format!("{e:?}");
            (p, e)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_archive_the_shared_store_once_dump_on_the_database_host_spread_over_both_gateways_and_restore_through_one_agent()
 {
    let (c, _agents, token) = three_hosts();
    let etcd = c.etcd_endpoints();

    // `agents`: each host's address, its store on the one CephFS, the database on host 1 only.
    let listed = ok(
        &deis_backup(&token, &["agents", "--json", "--etcd", etcd]),
        "agents",
    );
    let listed = listed["agents"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    let identity = listed[0]["store_paths"][0]["fs_identity"].as_str().unwrap();
    assert!(identity.starts_with("shared:cephfs:"), "{identity}");
    for (i, a) in listed.iter().enumerate() {
        assert_eq!(a["host"], format!("hosts-h{}", i + 1));
        assert_eq!(
            a["address"],
            format!("{}:4195", c.hosts.addresses[i]),
            "registered with its host's own address"
        );
        assert_eq!(a["store_paths"][0]["fs_type"], "fuse.ceph-fuse");
        assert_eq!(a["store_paths"][0]["shared"], true);
        assert_eq!(
            a["store_paths"][0]["fs_identity"], identity,
            "one filesystem seen alike from every host"
        );
        assert_eq!(
            a["database_running"],
            i == 0,
            "only host 1 runs deis-database"
        );
    }
    // The rest of the platform is spread over hosts 2 and 3, each seen by its own host's agent.
    let platform: Vec<Value> = listed
        .iter()
        .map(|a| a["platform_containers"].clone())
        .collect();
    assert_eq!(
        platform,
        [
            serde_json::json!(["deis-database"]),
            serde_json::json!(["deis-builder", "deis-registry"]),
            serde_json::json!(["deis-controller", "deis-logger"]),
        ],
        "each agent sees only its own host's containers"
    );
    let table = deis_backup(&token, &["agents", "--etcd", etcd]);
    let table = String::from_utf8_lossy(&table.stdout);
    for (i, address) in c.hosts.addresses.iter().enumerate() {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("hosts-h{} ", i + 1)))
            .unwrap_or_else(|| panic!("no row for host {}: {table}", i + 1));
        assert!(line.contains(address) && line.contains(identity), "{line}");
        let db = if i == 0 {
            "running here"
        } else {
            "not on this host"
        };
        assert!(line.contains(db), "{line}");
    }

    // Snapshot: one archive of the shared store, the dump from the database host, both gateways.
    let (_dir, repo) = repo_dir("hosts-snap");
    let taken = ok(&snapshot(&c, &token, &repo, &["--json"]), "snapshot");
    let id = snapshot_id(&taken);
    let m = &taken["manifest"];
    let stores: Vec<&String> = m["parts"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("store/"))
        .collect();
    assert_eq!(stores, [SHARED_PART], "the shared store is archived once");
    let info = &m["part-info"][SHARED_PART];
    assert_eq!(info["host"], "hosts-h1");
    assert_eq!(info["also-on"], serde_json::json!(["hosts-h2", "hosts-h3"]));
    assert_eq!(
        m["part-info"]["database/pg_dumpall.sql.zst"]["host"], "hosts-h1",
        "the dump comes from the host that runs deis-database"
    );
    assert_eq!(m["labels"]["cluster.hosts"], "hosts-h1,hosts-h2,hosts-h3");
    let gateways = taken["gateways"].as_array().unwrap();
    let endpoints: Vec<&str> = gateways
        .iter()
        .map(|g| g["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(endpoints, c.hosts.gateways, "{gateways:?}");
    for g in gateways {
        assert!(
            g["requests"].as_u64().unwrap() > 2,
            "requests spread: {gateways:?}"
        );
    }
    // The summary names both gateways with their counts.
    let again = snapshot(&c, &token, &repo, &[]);
    let summary = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{}", stderr(&again));
    for g in &c.hosts.gateways {
        assert!(
            summary.contains(&format!("gateway {g}: ")),
            "{g} missing from the summary:\n{summary}"
        );
    }

    // Restore onto a fresh three-host cluster whose database is not started yet (as after
    // `deisctl stop platform`): the store through one agent, seen alike from every host.
    let mut target = Target::up_with(
        &unique("h3t"),
        &[
            "--hosts",
            "3",
            "--no-database",
            "--database-flavour",
            "wal-e",
        ],
    );
    let th = target.hosts();
    let database = "deis-database";
    let tagents = th.agents(&target.name, target.etcd_endpoints(), database);
    {
        let etcd = target.etcd();
        let key = async |k: &str| etcd.get(k).await.unwrap().unwrap();
        // Deis' registry makes its bucket; db_wal is the restore's (and then the database's).
        let s3 = s3_client(
            &key("/deis/store/gateway/accessKey").await,
            &key("/deis/store/gateway/secretKey").await,
        );
        s3.create_bucket().bucket("registry").send().await.unwrap();
    }
    let spec = specs(&tagents);
    let restore = |extra: &[&str]| {
        let mut args = vec![
            "restore",
            &id,
            "--json",
            "--etcd",
            target.etcd_endpoints(),
            "--agent",
            &spec,
            "-r",
            repo.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        deis_backup(&token, &args)
    };
    // A platform component left running on host 2 of the target stops the restore before any
    // write: the preflight asks every host.
    let standin = |args: &[&str]| {
        support::succeed(
            Command::new("docker")
                .args(["-H", &th.dockers[1]])
                .args(args),
        );
    };
    standin(&[
        "run",
        "-d",
        "--name",
        "deis-registry",
        "--network",
        "none",
        "deis-backup/platform-standin:local",
        "sleep",
        "600",
    ]);
    let refused = restore(&[]);
    standin(&["rm", "-f", "deis-registry"]);
    assert_eq!(refused.status.code(), Some(5), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains(&format!("deis-registry runs on {}-h2", target.name)),
        "{}",
        stderr(&refused)
    );
    assert!(
        support::tree(&th.stores[0]).is_empty(),
        "nothing was written"
    );
    let restored = ok(&restore(&[]), "restore onto three hosts");
    let steps: Vec<&Value> = restored["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["what"] == "store")
        .collect();
    assert_eq!(steps.len(), 1, "restored once: {steps:?}");
    assert_eq!(
        steps[0]["target"],
        format!("/var/lib/deis/store on {}-h1", target.name)
    );
    let detail = steps[0]["detail"].as_str().unwrap();
    assert!(
        detail.ends_with(&format!(
            "the same tree seen from {0}-h2, {0}-h3",
            target.name
        )),
        "{detail}"
    );
    let want = comparable_tree(&c.hosts.stores[0]);
    for (i, store) in th.stores.iter().enumerate() {
        assert_eq!(
            comparable_tree(store),
            want,
            "the tree seen from target host {}",
            i + 1
        );
    }

    // The database, started the Deis way on host 1, recovers by itself from the restored db_wal.
    let count = "SELECT count(*) FROM api_app";
    let source_apps = psql_on(&c.hosts.dockers[0], c.database_container(), "deis", count).unwrap();
    target.start_database();
    assert_eq!(
        psql_on(&th.dockers[0], database, "deis", count).unwrap(),
        source_apps
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_a_host_that_only_saw_the_shared_store_may_be_down_the_database_host_may_not() {
    let (c, agents, token) = three_hosts();
    let (_dir, repo) = repo_dir("hosts-down");
    ok(
        &snapshot(&c, &token, &repo, &["--json"]),
        "the first snapshot",
    );

    // Host 3's agent stopped (it deregisters): the shared store comes through host 1.
    support::succeed(
        agents[2]
            .docker()
            .args(["stop", "-t", "10", &agents[2].container()]),
    );
    let taken = ok(
        &snapshot(&c, &token, &repo, &["--json"]),
        "snapshot without host 3",
    );
    let m = &taken["manifest"];
    let warnings = m["warnings"].as_array().expect("warnings in the manifest");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = warnings[0].as_str().unwrap();
    assert!(
        w.starts_with("host hosts-h3 did not take part")
            && w.contains("the shared filesystem, archived through hosts-h1"),
        "{w}"
    );
    assert_eq!(m["labels"]["cluster.hosts"], "hosts-h1,hosts-h2");
    assert_eq!(m["labels"]["cluster.hosts-absent"], "hosts-h3");
    let shown = deis_backup(
        &token,
        &["show", &snapshot_id(&taken), "-r", repo.to_str().unwrap()],
    );
    assert!(String::from_utf8_lossy(&shown.stdout).contains("warning: host hosts-h3"));

    // Host 1, the database host, cut off (its agent frozen: registered, silent): no snapshot.
    support::succeed(agents[0].docker().args(["pause", &agents[0].container()]));
    let refused = snapshot(&c, &token, &repo, &[]);
    let _ = agents[0]
        .docker()
        .args(["unpause", &agents[0].container()])
        .output();
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let e = stderr(&refused);
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    assert!(
        e.contains("host hosts-h1 is not taking part (agent hosts-h1")
            && e.contains("did not answer")
            && e.contains("it held the database")
            && e.contains("--forget-host hosts-h1"),
        "{e}"
    );
    let listed = ok(
        &deis_backup(&token, &["list", "--json", "-r", repo.to_str().unwrap()]),
        "list",
    );
    assert_eq!(
        listed["snapshots"].as_array().unwrap().len(),
        2,
        "nothing complete was added: {listed}"
    );
}

/// Drops every packet host `address`'s agent sends on a connection once it has sent 1 MB: the
/// host's network cut mid-stream (no reset, no answer). Removed on drop.
struct CutAfterOneMegabyte {
    rule: Vec<String>,
}

impl CutAfterOneMegabyte {
    fn new(address: &str) -> Self {
        let rule: Vec<String> = [
            "OUTPUT",
            "-s",
            address,
            "-p",
            "tcp",
            "--sport",
            "4195",
            "-m",
            "connbytes",
            "--connbytes",
            "1000000:",
            "--connbytes-dir",
            "reply",
            "--connbytes-mode",
            "bytes",
            "-j",
            "DROP",
        ]
        .map(str::to_owned)
        .to_vec();
        support::succeed(Command::new("iptables").arg("-I").args(&rule));
        CutAfterOneMegabyte { rule }
    }
}

impl Drop for CutAfterOneMegabyte {
    fn drop(&mut self) {
        let _ = Command::new("iptables").arg("-D").args(&self.rule).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_an_agent_cut_off_mid_stream_ends_the_snapshot_with_a_clear_error_and_nothing_complete()
 {
    let (c, _agents, token) = three_hosts();
    let (_dir, repo) = repo_dir("hosts-cut");
    // Host 1 streams the dump and the store archive: both more than 1 MB.
    let cut = CutAfterOneMegabyte::new(&c.hosts.addresses[0]);
    let started = Instant::now();
    let out = snapshot(&c, &token, &repo, &[]);
    drop(cut);
    eprintln!(
        "the cut was noticed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    assert!(
        e.contains("agent hosts-h1 (")
            && e.contains("the connection to the agent failed or was cut"),
        "{e}"
    );
    let listed = ok(
        &deis_backup(&token, &["list", "--json", "-r", repo.to_str().unwrap()]),
        "list",
    );
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 0, "{listed}");
    assert_eq!(
        listed["incomplete"].as_array().unwrap().len(),
        1,
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_a_gateway_stopped_mid_mirror_the_snapshot_completes_through_the_other() {
    let (c, _agents, token) = three_hosts();
    let (_dir, repo) = repo_dir("hosts-gw");
    // 4 MiB/s over about 25 MiB of objects, two requests at a time: the mirror runs for seconds
    // and sends requests after the gateway dies (hard, as with its host): those fail on it once,
    // then go to the other.
    let repo_arg = repo.display().to_string();
    let metrics = repo.with_extension("prom");
    let metrics_arg = metrics.display().to_string();
    let child = spawn_deis_backup(
        &token,
        &[
            "snapshot",
            "--json",
            "--etcd",
            c.etcd_endpoints(),
            "--bandwidth-limit",
            "4MiB",
            "--gateway-concurrency",
            "2",
            "--metrics-file",
            &metrics_arg,
            "-r",
            &repo_arg,
        ],
    );
    std::thread::sleep(Duration::from_millis(2500));
    let rgw = c.daemon_pid("hosts-h2-rgw");
    assert!(
        Command::new("kill")
            .args(["-KILL", &rgw.to_string()])
            .status()
            .unwrap()
            .success(),
        "the second gateway is stopped"
    );
    let out = child.wait_with_output().unwrap();
    c.repair();
    let taken = ok(&out, "snapshot with a gateway stopped mid-mirror");
    let gateways = taken["gateways"].as_array().unwrap();
    let second = gateways
        .iter()
        .find(|g| g["endpoint"] == c.hosts.gateways[1])
        .unwrap();
    assert!(
        second["requests"].as_u64().unwrap() > 0 && second["failures"].as_u64().unwrap() > 0,
        "the second gateway served, then failed: {gateways:?}"
    );
    // Every object listed was downloaded and checked.
    for (bucket, s) in taken["buckets"].as_object().unwrap() {
        assert_eq!(s["objects"], s["downloaded_objects"], "{bucket}: {s}");
    }
    // The metrics file carries the same per-gateway figures, for alerting.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let series = format!(
        "deis_backup_snapshot_gateway_requests{{endpoint=\"{}\",outcome=\"failed\"}} ",
        c.hosts.gateways[1]
    );
    let failed: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap();
    assert!((failed - second["failures"].as_f64().unwrap()).abs() < 0.5);
}
