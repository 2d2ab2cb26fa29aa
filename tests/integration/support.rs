//! Test support: the local cluster, started once by `tests/cluster/up` or reused when it runs.
//!
//! Invariants: tests never tear the cluster down; they create what they mutate under their own names
//! (buckets, directories, containers) and leave the seeded data as it was. Endpoints come from the
//! `KEY=value` lines `up` prints, secrets from etcd, exactly as the product reads them.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The running local cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    env: HashMap<String, String>,
}

impl Cluster {
    /// The cluster every test uses: brought up (or reused) once per test process.
    pub fn get() -> &'static Cluster {
        static CLUSTER: OnceLock<Cluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            let up = repo_root().join("tests/cluster/up");
            let out = Command::new(&up)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", up.display()));
            assert!(
                out.status.success(),
                "{} failed:\n{}",
                up.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let env = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect();
            Cluster { env }
        })
    }

    /// One of the values `up` printed (CLUSTER_DIR, ETCD_ENDPOINTS, GATEWAY_ENDPOINT, STORE_DIR, ...).
    pub fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("tests/cluster/up printed no {key}"))
    }

    pub fn dir(&self) -> PathBuf {
        PathBuf::from(self.var("CLUSTER_DIR"))
    }

    pub fn etcd_endpoints(&self) -> &str {
        self.var("ETCD_ENDPOINTS")
    }

    pub fn etcd(&self) -> deis_backup_etcd::Client {
        deis_backup_etcd::Client::from_list(self.etcd_endpoints()).expect("etcd endpoints from up")
    }

    pub fn gateway_endpoint(&self) -> &str {
        self.var("GATEWAY_ENDPOINT")
    }

    pub fn store_dir(&self) -> PathBuf {
        PathBuf::from(self.var("STORE_DIR"))
    }

    pub fn database_container(&self) -> &str {
        self.var("DATABASE_CONTAINER")
    }

    /// The seed manifest of the gateway buckets (`$CLUSTER_DIR/seed/gateway-<size>.json`).
    pub fn gateway_seed(&self) -> serde_json::Value {
        let p = self
            .dir()
            .join(format!("seed/gateway-{}.json", self.var("CLUSTER_SIZE")));
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).expect("seed manifest is JSON")
    }

    /// Gateway keys as Deis publishes them: `/deis/store/gateway/{accessKey,secretKey}`.
    pub async fn gateway_keys(&self) -> (String, String) {
        let etcd = self.etcd();
        let access = etcd.get("/deis/store/gateway/accessKey").await.unwrap();
        let secret = etcd.get("/deis/store/gateway/secretKey").await.unwrap();
        (
            access.expect("accessKey published"),
            secret.expect("secretKey published"),
        )
    }

    /// An aws-sdk-s3 client for the gateway (SigV4, path style), with the keys from etcd.
    pub async fn s3(&self) -> aws_sdk_s3::Client {
        let (access, secret) = self.gateway_keys().await;
        let creds = aws_sdk_s3::config::Credentials::new(access, secret, None, None, "etcd");
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(self.gateway_endpoint())
            .force_path_style(true)
            .credentials_provider(creds)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }
}

/// The repository's top directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// A workspace binary (`deis-backup`, `deis-backup-agent`), built by the test command before the
/// tests run (`cargo build --workspace --bins`).
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from);
    let p = target.join("debug").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests (scripts/test does)",
        p.display()
    );
    p
}

/// Runs one of the cluster scripts and parses its `KEY=value` lines.
fn run_script(script: &str, args: &[&str]) -> HashMap<String, String> {
    let path = repo_root().join("tests/cluster").join(script);
    let out = Command::new(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{} {} failed:\n{}",
        path.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The hosts of a multi-host cluster (`tests/cluster/target up NAME --hosts N`), as its env lines
/// name them with `prefix` (TARGET_ or HOSTS_): address, Docker engine and store mount of each.
#[derive(Debug, Clone)]
pub struct Hosts {
    pub addresses: Vec<String>,
    pub dockers: Vec<String>,
    pub stores: Vec<PathBuf>,
    pub gateways: Vec<String>,
}

impl Hosts {
    fn from_env(env: &HashMap<String, String>, prefix: &str) -> Hosts {
        let list = |k: &str| -> Vec<String> {
            env.get(&format!("{prefix}{k}"))
                .unwrap_or_else(|| panic!("no {prefix}{k}"))
                .split(',')
                .map(str::to_owned)
                .collect()
        };
        Hosts {
            addresses: list("HOST_ADDRESSES"),
            dockers: list("HOST_DOCKERS"),
            stores: list("HOST_STORE_DIRS")
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            gateways: list("GATEWAY_ENDPOINTS"),
        }
    }

    /// Starts an agent on every host, named `<name>-h<I>`, each in its host's Docker engine on
    /// its address (port 4195, as Deis'), watching `database_container`.
    pub fn agents(&self, name: &str, etcd: &str, database_container: &str) -> Vec<AgentContainer> {
        (0..self.addresses.len())
            .map(|i| {
                AgentContainer::up_on(
                    &format!("{name}-h{}", i + 1),
                    etcd,
                    &self.stores[i],
                    database_container,
                    &self.addresses[i],
                    &self.dockers[i],
                )
            })
            .collect()
    }
}

/// The three-host cluster `hosts` (`tests/cluster/up --hosts 3`): seeded, live, its database on
/// host 1 and gateways on hosts 1 and 2. Tests that use it hold [`ThreeHosts::lock`] for their
/// whole run: they stop agents and gateways, so they take turns.
#[derive(Debug)]
pub struct ThreeHosts {
    env: HashMap<String, String>,
    pub hosts: Hosts,
    _lock: fs::File,
}

impl ThreeHosts {
    /// Brings the cluster up (or reuses it) and waits for the test's turn.
    pub fn lock() -> ThreeHosts {
        Cluster::get();
        let dir = PathBuf::from(Cluster::get().var("CLUSTER_DIR"));
        let lock = fs::File::create(dir.join("hosts-tests.lock")).expect("the tests' lock file");
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .expect("the three-host cluster's turn");
        let env = run_script("up", &["--hosts", "3"]);
        let hosts = Hosts::from_env(&env, "HOSTS_");
        ThreeHosts {
            env,
            hosts,
            _lock: lock,
        }
    }

    pub fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("tests/cluster/up --hosts 3 printed no {key}"))
    }

    pub fn etcd_endpoints(&self) -> &str {
        self.var("HOSTS_ETCD_ENDPOINTS")
    }

    pub fn database_container(&self) -> &str {
        self.var("HOSTS_DATABASE_CONTAINER")
    }

    /// The PID file of a daemon of this cluster (`hosts-h2-rgw`, ...).
    pub fn daemon_pid(&self, daemon: &str) -> i32 {
        let f = PathBuf::from(self.var("CLUSTER_DIR"))
            .join("run")
            .join(format!("{daemon}.pid"));
        fs::read_to_string(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
            .trim()
            .parse()
            .unwrap()
    }

    /// Brings back whatever a test stopped (gateways, mounts, engines): `up --hosts 3` again.
    pub fn repair(&self) {
        let env = run_script("up", &["--hosts", "3"]);
        assert_eq!(env, self.env, "the same cluster, repaired");
    }
}

/// A fresh, empty Deis cluster to restore onto (`tests/cluster/target`): its own etcd with new
/// gateway keys (a radosgw tenant, so its `db_wal` and `registry` are its own and start absent), an
/// empty store directory and an empty database container. Torn down on drop.
#[derive(Debug)]
pub struct Target {
    pub name: String,
    env: HashMap<String, String>,
}

impl Target {
    pub fn up(name: &str) -> Target {
        Self::up_with(name, &[])
    }

    /// `tests/cluster/target up NAME ARGS…` (`--no-database`, `--database-flavour wal-e`).
    pub fn up_with(name: &str, args: &[&str]) -> Target {
        Cluster::get();
        let mut all = vec!["up", name];
        all.extend_from_slice(args);
        let env = run_script("target", &all);
        Target {
            name: name.to_owned(),
            env,
        }
    }

    /// Starts the database of a target brought up with `--no-database`, as `deisctl start
    /// platform` does after a restore, and waits until it accepts writes.
    pub fn start_database(&mut self) {
        self.env = run_script("target", &["database", &self.name]);
    }

    pub fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("tests/cluster/target printed no {key}"))
    }

    pub fn etcd_endpoints(&self) -> &str {
        self.var("TARGET_ETCD_ENDPOINTS")
    }

    pub fn etcd(&self) -> deis_backup_etcd::Client {
        deis_backup_etcd::Client::from_list(self.etcd_endpoints()).expect("target etcd endpoints")
    }

    pub fn store_dir(&self) -> PathBuf {
        PathBuf::from(self.var("TARGET_STORE_DIR"))
    }

    pub fn database_container(&self) -> &str {
        self.var("TARGET_DATABASE_CONTAINER")
    }

    /// The hosts of a target brought up with `--hosts N`.
    pub fn hosts(&self) -> Hosts {
        Hosts::from_env(&self.env, "TARGET_")
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let path = repo_root().join("tests/cluster/target");
        let _ = Command::new(path).args(["down", &self.name]).output();
    }
}

/// A deis-backup-agent running as its container image (`tests/cluster/agent`), the store directory
/// mounted at /var/lib/deis/store as on a CoreOS host. Removed on drop.
#[derive(Debug)]
pub struct AgentContainer {
    pub name: String,
    pub token_file: PathBuf,
    /// `HOST_ID@host:port`, as `--agent` takes it.
    spec: String,
    /// The Docker engine it runs in (`unix://...`), when not the machine's.
    docker: Option<String>,
}

impl AgentContainer {
    pub fn up(name: &str, etcd: &str, store: &Path, database_container: &str) -> AgentContainer {
        let port = free_port().to_string();
        Self::start(name, etcd, store, database_container, &port, None)
    }

    /// An agent on one host of a multi-host cluster: in that host's Docker engine (`docker`),
    /// serving and registering `address`:4195.
    pub fn up_on(
        name: &str,
        etcd: &str,
        store: &Path,
        database_container: &str,
        address: &str,
        docker: &str,
    ) -> AgentContainer {
        Self::start(
            name,
            etcd,
            store,
            database_container,
            "4195",
            Some((address, docker)),
        )
    }

    /// `tests/cluster/agent up`, on the machine's engine and loopback address or on `host`'s
    /// (address, engine).
    fn start(
        name: &str,
        etcd: &str,
        store: &Path,
        database_container: &str,
        port: &str,
        host: Option<(&str, &str)>,
    ) -> AgentContainer {
        let store = store.display().to_string();
        let mut args = vec![
            "up",
            name,
            "--etcd",
            etcd,
            "--store",
            &store,
            "--port",
            port,
            "--database-container",
            database_container,
        ];
        if let Some((address, docker)) = host {
            args.extend(["--address", address, "--docker-host", docker]);
        }
        let env = run_script("agent", &args);
        AgentContainer {
            name: name.to_owned(),
            spec: format!("{name}@{}", env["AGENT_ADDRESS"]),
            token_file: PathBuf::from(&env["AGENT_TOKEN_FILE"]),
            docker: host.map(|(_, d)| d.to_owned()),
        }
    }

    /// The docker CLI for the engine it runs in.
    pub fn docker(&self) -> Command {
        let mut c = Command::new("docker");
        if let Some(d) = &self.docker {
            c.args(["-H", d]);
        }
        c
    }

    /// How `--agent` names it: `HOST_ID@host:port`.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// The container's name on the Docker engine.
    pub fn container(&self) -> String {
        format!("deis-backup-agent-{}", self.name)
    }
}

impl Drop for AgentContainer {
    fn drop(&mut self) {
        let path = repo_root().join("tests/cluster/agent");
        let mut c = Command::new(path);
        c.args(["down", &self.name]);
        if let Some(d) = &self.docker {
            c.args(["--docker-host", d]);
        }
        let _ = c.output();
    }
}

/// A cluster PKI made with the coordinator's own `pki` code, in a temporary directory: the CA and
/// the coordinator's certificate, plus one agent certificate per host id asked for.
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        use deis_backup_coordinator::pki::{self, Subject};
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path()).unwrap();
        pki::issue(dir.path(), &Subject::Coordinator, None).unwrap();
        Pki { dir }
    }

    /// The test process's shared PKI.
    pub fn shared() -> &'static Pki {
        static P: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
        P.get_or_init(Pki::new)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The certificate and key of the agent with this host id, issued on first use.
    pub fn agent(&self, host_id: &str) -> (PathBuf, PathBuf) {
        use deis_backup_coordinator::pki::{self, Subject};
        static ISSUING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = ISSUING.lock().unwrap();
        let cert = self.file(&format!("agent-{host_id}.pem"));
        if !cert.exists() {
            pki::issue(self.dir(), &Subject::Agent(host_id.to_owned()), None).unwrap();
        }
        (cert, self.file(&format!("agent-{host_id}.key")))
    }

    /// The TLS settings of a client that is the coordinator, talking to the agent `host_id`.
    pub fn coordinator_tls(&self, host_id: &str) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let _ = rustls::crypto::ring::default_provider().install_default();
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                fs::read(self.file("ca.pem")).unwrap(),
            ))
            .domain_name(deis_backup_proto::identity::agent_name(host_id).unwrap())
            .identity(Identity::from_pem(
                fs::read(self.file("coordinator.pem")).unwrap(),
                fs::read(self.file("coordinator.key")).unwrap(),
            ))
    }
}

/// Sets the coordinator's TLS files on a `deis-backup` command: those of the PKI directory
/// `tests/cluster/agent` keeps beside the token file (`$D/secrets/pki`).
pub fn coordinator_tls_env(c: &mut Command, token_file: &Path) {
    let pki = token_file
        .parent()
        .expect("the token's directory")
        .join("pki");
    c.env("DEIS_BACKUP_TLS_CA", pki.join("ca.pem"))
        .env("DEIS_BACKUP_TLS_CERT", pki.join("coordinator.pem"))
        .env("DEIS_BACKUP_TLS_KEY", pki.join("coordinator.key"));
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// What the round trip compares of one path.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub link: Option<PathBuf>,
    pub sha: Option<Vec<u8>>,
    /// The other paths of the same inode (hard links), relative.
    pub same_inode: Vec<PathBuf>,
}

/// Every entry under `root`, by relative path. The root itself is left out: a restore keeps the
/// target's own owner and mode, and moving entries in changes its mtime.
pub fn tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_file() {
            "file"
        } else {
            "special"
        };
        if ft.is_file() && md.nlink() > 1 {
            inodes
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(rel.clone());
        }
        out.insert(
            rel,
            Entry {
                kind,
                mode: md.permissions().mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: md.mtime(),
                link: ft.is_symlink().then(|| fs::read_link(&p).unwrap()),
                sha: ft
                    .is_file()
                    .then(|| Sha256::digest(fs::read(&p).unwrap()).to_vec()),
                same_inode: Vec::new(),
            },
        );
    }
    out.remove(Path::new(""));
    for group in inodes.values() {
        for p in group {
            let mut others: Vec<PathBuf> = group.iter().filter(|o| *o != p).cloned().collect();
            others.sort();
            out.get_mut(p).unwrap().same_inode = others;
        }
    }
    out
}

/// A dump without the lines that differ between two runs (comments, psql restrict keys).
pub fn comparable_dump(dump: &str) -> Vec<&str> {
    dump.lines()
        .filter(|l| {
            !l.starts_with("--") && !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict")
        })
        .collect()
}

/// `sql` run by `psql` in `container` as postgres on database `db`: its unaligned, tuples-only
/// output (trimmed), or its error output when it failed.
pub fn psql(container: &str, db: &str, sql: &str) -> Result<String, String> {
    psql_on("unix:///var/run/docker.sock", container, db, sql)
}

/// [`psql`] in a container of the Docker engine at `docker` (a host of a multi-host cluster).
pub fn psql_on(docker: &str, container: &str, db: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("docker")
        .args([
            "-H",
            docker,
            "exec",
            "-u",
            "postgres",
            container,
            "psql",
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
            "-c",
            sql,
        ])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    } else {
        Err(format!(
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The bytes of `bucket/key`.
pub async fn object_bytes(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    s3.get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("get {bucket}/{key}: {e:?}"))
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes()
        .to_vec()
}

/// Runs `c` to completion; its output, once it succeeded (else the test fails with its stderr).
pub fn succeed(c: &mut Command) -> std::process::Output {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `pg_dumpall` run in `container` as postgres, as the Deis docs run it.
pub fn pg_dumpall(container: &str) -> String {
    let out =
        succeed(Command::new("docker").args(["exec", "-u", "postgres", container, "pg_dumpall"]));
    String::from_utf8(out.stdout).unwrap()
}
