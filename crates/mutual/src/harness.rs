//! Local clusters of real `mutual node` processes, for the demo, the integration tests and
//! the benchmarks: each node is its own OS process with its own data directory, on
//! loopback with OS-chosen ports, killed with a real `SIGKILL`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::client::Client;

/// How long a node may take to print its addresses.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One node process.
pub struct LocalNode {
    /// The process (None once killed or stopped).
    pub child: Option<Child>,
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
        let _ = std::fs::create_dir_all(dir);
        let log = dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| HarnessError::Spawn {
                bin: bin.to_owned(),
                source,
            })?;
        let mut cmd = Command::new(bin);
        cmd.arg("node")
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
        let mut child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            bin: bin.to_owned(),
            source,
        })?;
        let no_start = |why: String| HarnessError::NoStart {
            dir: dir.display().to_string(),
            why,
            log: log.display().to_string(),
        };
        let Some(stdout) = child.stdout.take() else {
            return Err(no_start("no stdout".into()));
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let mut ticket = None;
            let mut http = None;
            while ticket.is_none() || http.is_none() {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if let Some(t) = line.trim().strip_prefix("ticket: ") {
                    ticket = Some(t.to_string());
                }
                if let Some(h) = line.trim().strip_prefix("http: ") {
                    http = Some(h.to_string());
                }
            }
            let _ = tx.send((ticket, http));
            // Keep draining so the node never blocks on a full pipe.
            let mut sink = String::new();
            while r.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok((Some(ticket), Some(http))) => Ok(LocalNode {
                child: Some(child),
                dir: dir.to_owned(),
                http,
                ticket,
                log,
            }),
            Ok(_) => {
                let status = child.wait().ok().map(|s| s.to_string()).unwrap_or_default();
                Err(no_start(format!("it exited ({status})")))
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(no_start("it printed no addresses in time".into()))
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

    /// SIGKILL: no goodbye, no flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
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
    let deadline = Instant::now() + START_TIMEOUT;
    for node in &nodes {
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
    Ok(nodes)
}
