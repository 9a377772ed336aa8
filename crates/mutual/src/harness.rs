//! Local clusters of real nodes, for the demo, the integration tests and the benchmarks:
//! each node its own `mutual node` process, killed with a real `SIGKILL`, or many nodes per
//! `mutual host` process (for hundreds of nodes on one machine), killed with
//! `POST /v1/debug/crash`. Every node has its own data directory, on loopback with
//! OS-chosen ports.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crate::client::Client;

/// How long a node may take to print its addresses.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How much longer than [`START_TIMEOUT`] a cluster gets, per node, until every node sees
/// every other alive: on two cores each join costs every member some work, so 200 nodes
/// take minutes to agree.
pub const ALIVE_TIMEOUT_PER_NODE: Duration = Duration::from_secs(1);
/// A hosted process's nodes get one more [`ALIVE_TIMEOUT_PER_NODE`] each to join per
/// this many nodes already running.
pub const HOSTED_JOIN_SLOWDOWN_NODES: usize = 100;

/// A `mutual host` process and the nodes it runs; stopped (SIGKILL) when dropped.
pub struct HostProcess {
    child: Option<Child>,
    /// Its process id.
    pub pid: u32,
    /// How many nodes it runs.
    pub nodes: usize,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One node: a process of its own, or one of a [`HostProcess`]'s nodes.
pub struct LocalNode {
    /// Its own process (None once killed or stopped, and for hosted nodes).
    pub child: Option<Child>,
    /// The `mutual host` process it runs in, if hosted.
    pub host: Option<Arc<HostProcess>>,
    /// A hosted node that was crashed.
    crashed: bool,
    /// Its data directory.
    pub dir: PathBuf,
    /// Its HTTP API URL.
    pub http: String,
    /// Its join ticket.
    pub ticket: String,
    /// Where its stderr goes.
    pub log: PathBuf,
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The process could not be started.
    #[error("cannot start {bin}: {source}")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It exited or said nothing in time.
    #[error("the node in {dir} did not start: {why}; see {log}")]
    NoStart {
        /// Its data directory.
        dir: String,
        /// What happened.
        why: String,
        /// Its log file.
        log: String,
    },
}

impl LocalNode {
    /// Starts `bin node --data-dir dir` on loopback, joining `join` if given, with `extra`
    /// flags, and waits until it prints its ticket and HTTP address.
    pub fn start(
        bin: &Path,
        dir: &Path,
        join: Option<&str>,
        extra: &[&str],
    ) -> Result<LocalNode, HarnessError> {
        let addresses = (None::<String>, None::<String>);
        let (mut child, log, rx) =
            spawn(bin, &["node"], dir, join, extra, addresses, |a, line| {
                if let Some(t) = line.strip_prefix("ticket: ") {
                    a.0 = Some(t.to_string());
                }
                if let Some(h) = line.strip_prefix("http: ") {
                    a.1 = Some(h.to_string());
                }
                a.0.is_none() || a.1.is_none()
            })?;
        match rx.recv_timeout(START_TIMEOUT) {
            Ok((Some(ticket), Some(http))) => Ok(LocalNode {
                child: Some(child),
                host: None,
                crashed: false,
                dir: dir.to_owned(),
                http,
                ticket,
                log,
            }),
            Ok(_) => {
                let status = child.wait().ok().map(|s| s.to_string()).unwrap_or_default();
                Err(no_start(dir, &log, format!("it exited ({status})")))
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(no_start(
                    dir,
                    &log,
                    "it printed no addresses in time".into(),
                ))
            }
        }
    }

    /// A client of its API.
    pub fn client(&self) -> Client {
        Client::new(&self.http, None)
    }

    /// Its node id (from its data directory's key), as the API prints it.
    pub fn id(&self) -> Option<String> {
        let key = std::fs::read(self.dir.join("node.key")).ok()?;
        let arr: [u8; 32] = key.as_slice().try_into().ok()?;
        Some(
            mutual_core::NodeId(*iroh::SecretKey::from_bytes(&arr).public().as_bytes()).to_string(),
        )
    }

    /// SIGKILL (a hosted node: `POST /v1/debug/crash`, as abrupt): no goodbye, no flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        } else if self.host.is_some() && !self.crashed {
            self.crashed = true;
            if let Err(e) = self.client().crash() {
                eprintln!("crashing the hosted node at {}: {e}", self.http);
            }
        }
    }

    /// True while the node runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some() || (self.host.is_some() && !self.crashed)
    }

    /// The id of the process it runs in, and how many nodes that process runs.
    pub fn process(&self) -> Option<(u32, usize)> {
        match (&self.child, &self.host) {
            (Some(c), _) => Some((c.id(), 1)),
            (None, Some(h)) => Some((h.pid, h.nodes)),
            (None, None) => None,
        }
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `n` nodes: the first founds the cluster, the others join it; waits until the
/// first sees all of them alive.
pub fn start_cluster(
    bin: &Path,
    root: &Path,
    n: usize,
    extra: &[&str],
) -> Result<Vec<LocalNode>, HarnessError> {
    start_cluster_with(bin, root, n, |_| {
        extra.iter().map(|a| a.to_string()).collect()
    })
}

/// [`start_cluster`] with each node's own extra arguments (`extra(i)` for node `i`).
pub fn start_cluster_with(
    bin: &Path,
    root: &Path,
    n: usize,
    extra: impl Fn(usize) -> Vec<String>,
) -> Result<Vec<LocalNode>, HarnessError> {
    let mut nodes: Vec<LocalNode> = Vec::with_capacity(n);
    for i in 0..n {
        let own = extra(i);
        let own: Vec<&str> = own.iter().map(String::as_str).collect();
        let ticket = nodes.first().map(|f| f.ticket.clone());
        nodes.push(LocalNode::start(
            bin,
            &root.join(format!("node{i}")),
            ticket.as_deref(),
            &own,
        )?);
    }
    wait_all_alive(&nodes)?;
    Ok(nodes)
}

/// Waits until every node sees all of `nodes` alive, for at most [`START_TIMEOUT`] plus
/// [`ALIVE_TIMEOUT_PER_NODE`] per node.
fn wait_all_alive(nodes: &[LocalNode]) -> Result<(), HarnessError> {
    let n = nodes.len();
    let deadline = Instant::now() + START_TIMEOUT + ALIVE_TIMEOUT_PER_NODE * n as u32;
    for node in nodes {
        loop {
            let alive = node
                .client()
                .nodes()
                .map(|l| l.iter().filter(|n| n.alive).count())
                .unwrap_or(0);
            if alive == n {
                break;
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NoStart {
                    dir: node.dir.display().to_string(),
                    why: format!("it sees {alive} of {n} nodes alive"),
                    log: node.log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Starts `n` nodes in `mutual host` processes of at most `per_process` nodes each (with
/// `--fault-injection`, so [`LocalNode::kill`] can crash one), all in one cluster; node
/// `i` lives in `root/host<k>/node<j>`. Waits until every node sees all of them alive.
pub fn start_hosted_cluster(
    bin: &Path,
    root: &Path,
    n: usize,
    per_process: usize,
    extra: &[String],
) -> Result<Vec<LocalNode>, HarnessError> {
    let per_process = per_process.max(1);
    let mut nodes: Vec<LocalNode> = Vec::with_capacity(n);
    for k in 0..n.div_ceil(per_process) {
        let count = per_process.min(n - k * per_process);
        let dir = root.join(format!("host{k}"));
        let join = nodes.first().map(|f| f.ticket.clone());
        let running = nodes.len();
        nodes.extend(start_host(
            bin,
            &dir,
            count,
            running,
            join.as_deref(),
            extra,
        )?);
    }
    wait_all_alive(&nodes)?;
    Ok(nodes)
}

/// Starts one `mutual host --nodes count` in `dir`, joining a cluster of `running` nodes,
/// and waits for every node's addresses.
fn start_host(
    bin: &Path,
    dir: &Path,
    count: usize,
    running: usize,
    join: Option<&str>,
    extra: &[String],
) -> Result<Vec<LocalNode>, HarnessError> {
    let mut extra = extra.to_vec();
    if !extra.iter().any(|a| a == "--fault-injection") {
        extra.push("--fault-injection".into());
    }
    let count_arg = count.to_string();
    let args = ["host", "--nodes", count_arg.as_str()];
    let found: Vec<(Option<String>, Option<String>)> = vec![(None, None); count];
    let (mut child, log, rx) = spawn(bin, &args, dir, join, &extra, found, |found, line| {
        if line.starts_with("hosting ") {
            return false;
        }
        // `node <i> ticket: …` and `node <i> http: …`.
        let Some((i, rest)) = line.strip_prefix("node ").and_then(|l| l.split_once(' ')) else {
            return true;
        };
        if let Some(slot) = i.parse::<usize>().ok().and_then(|i| found.get_mut(i)) {
            if let Some(t) = rest.strip_prefix("ticket: ") {
                slot.0 = Some(t.to_string());
            } else if let Some(h) = rest.strip_prefix("http: ") {
                slot.1 = Some(h.to_string());
            }
        }
        true
    })?;
    // A join costs every member a little, so joins slow down as the cluster grows: 100
    // nodes joining 400 took more than 160 s on two cores (E2 at 500, 2026-11-27).
    let per_node = ALIVE_TIMEOUT_PER_NODE * (1 + (running / HOSTED_JOIN_SLOWDOWN_NODES) as u32);
    let timeout = START_TIMEOUT + per_node * count as u32;
    let found = match rx.recv_timeout(timeout) {
        Ok(found) => found,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(no_start(
                dir,
                &log,
                "it printed no addresses in time".into(),
            ));
        }
    };
    if found.iter().any(|(t, h)| t.is_none() || h.is_none()) {
        let _ = child.kill();
        let status = child.wait().ok().map(|s| s.to_string()).unwrap_or_default();
        return Err(no_start(
            dir,
            &log,
            format!("it did not start every node ({status})"),
        ));
    }
    let host = Arc::new(HostProcess {
        pid: child.id(),
        child: Some(child),
        nodes: count,
        log: log.clone(),
    });
    Ok(found
        .into_iter()
        .enumerate()
        .filter_map(|(i, (t, h))| {
            Some(LocalNode {
                child: None,
                host: Some(host.clone()),
                crashed: false,
                dir: dir.join(format!("node{i}")),
                http: h?,
                ticket: t?,
                log: log.clone(),
            })
        })
        .collect())
}

fn no_start(dir: &Path, log: &Path, why: String) -> HarnessError {
    HarnessError::NoStart {
        dir: dir.display().to_string(),
        why,
        log: log.display().to_string(),
    }
}

/// Starts `bin <args> --data-dir dir` on loopback with OS-chosen ports, `extra` flags and
/// `--join` if given, its stderr appended to `<dir>.log`. A thread hands each stdout line
/// (trimmed) to `read` with `state` until `read` returns false or the output ends, sends
/// `state` on the returned channel, and keeps draining so the process never blocks on a
/// full pipe.
fn spawn<T: Send + 'static>(
    bin: &Path,
    args: &[&str],
    dir: &Path,
    join: Option<&str>,
    extra: &[impl AsRef<std::ffi::OsStr>],
    mut state: T,
    mut read: impl FnMut(&mut T, &str) -> bool + Send + 'static,
) -> Result<(Child, PathBuf, mpsc::Receiver<T>), HarnessError> {
    let _ = std::fs::create_dir_all(dir);
    let log = dir.with_extension("log");
    let spawn_err = |source| HarnessError::Spawn {
        bin: bin.to_owned(),
        source,
    };
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(spawn_err)?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .arg("--data-dir")
        .arg(dir)
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(extra)
        .env_remove("MUTUAL_JOIN")
        .env_remove("MUTUAL_API_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    if let Some(t) = join {
        cmd.args(["--join", t]);
    }
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(no_start(dir, &log, "no stdout".into()));
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) && read(&mut state, line.trim()) {
            line.clear();
        }
        let _ = tx.send(state);
        line.clear();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            line.clear();
        }
    });
    Ok((child, log, rx))
}
