//! Real clusters: `mutual node` processes on loopback with OS-chosen ports, talking over
//! iroh, killed with SIGKILL. Every test asserts outcomes the user sees through the API.
//!
//! The tests take a lock so that only one cluster runs at a time: they share two cores,
//! and a starved node is (correctly) judged dead, which would make timings meaningless.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mutual::client::{Client, ClientError, metric};
use mutual::harness::{LocalNode, start_cluster};
use mutual::types::JobStatus;
use mutual_core::{JobRequest, Resources};
use mutual_tests::mutual_bin;

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn sh(script: &str) -> JobRequest {
    JobRequest {
        command: vec!["sh".into(), "-c".into(), script.into()],
        resources: Some(Resources {
            cpu_millis: 100,
            memory_bytes: 16 << 20,
            gpus: 0,
        }),
        ..JobRequest::default()
    }
}

/// A scratch directory for one test; kept (and printed) when `MUTUAL_TEST_KEEP` is set,
/// to read the nodes' logs after a failure.
fn scratch() -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new()
        .prefix("mutual-test-")
        .tempdir()
        .expect("tempdir");
    if std::env::var_os("MUTUAL_TEST_KEEP").is_some() {
        eprintln!("keeping {}", dir.path().display());
        dir.disable_cleanup(true);
    }
    dir
}

/// One test's cluster: the lock, its scratch directory, the binary, and `n` nodes.
fn cluster(
    n: usize,
    extra: &[&str],
) -> (
    std::sync::MutexGuard<'static, ()>,
    tempfile::TempDir,
    std::path::PathBuf,
    Vec<LocalNode>,
) {
    let guard = lock();
    let dir = scratch();
    let bin = mutual_bin();
    let nodes = start_cluster(&bin, dir.path(), n, extra).expect("cluster");
    (guard, dir, bin, nodes)
}

fn is_terminal(s: &JobStatus) -> bool {
    matches!(s.state.as_str(), "succeeded" | "failed" | "cancelled")
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` after `secs`.
fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_all_terminal(c: &Client, ids: &[String], secs: u64) -> BTreeMap<String, JobStatus> {
    eventually(secs, "every job ends", || {
        let all = c.jobs(None).ok()?;
        let by_id: BTreeMap<String, JobStatus> =
            all.into_iter().map(|s| (s.id.clone(), s)).collect();
        ids.iter()
            .all(|id| by_id.get(id).is_some_and(is_terminal))
            .then_some(by_id)
    })
}

/// Waits until the node behind `c` reports exactly `done`'s accepted result for every job;
/// on timeout, says which job differs and how.
fn agree(c: &Client, ids: &[String], done: &BTreeMap<String, JobStatus>, who: &str) {
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let theirs: BTreeMap<String, JobStatus> = match c.jobs(None) {
            Ok(l) => l.into_iter().map(|s| (s.id.clone(), s)).collect(),
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        match ids
            .iter()
            .find(|id| theirs.get(*id).map(JobStatus::outcome) != Some(done[*id].outcome()))
        {
            None => return,
            Some(id) => {
                last = format!(
                    "job {id}: {:?} there, {:?} expected",
                    theirs.get(id),
                    done[id]
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{who} does not agree after 30 s: {last}");
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Submits a job that writes its pid to `pid_file` and sleeps a minute; returns the job id
/// and, once it started, its pid.
fn submit_sleeper(c: &Client, pid_file: &Path) -> (String, i32) {
    let script = format!("echo $$ > {}; exec sleep 60", pid_file.display());
    let id = c.submit(&sh(&script)).expect("submit").id;
    let pid = eventually(20, "the job starts", || read_pid(pid_file));
    (id, pid)
}

#[test]
fn five_nodes_lose_two_and_no_job_is_lost_or_accepted_twice() {
    // Eight live documents for 120 jobs: every node saves documents and loads them back
    // all through the run, the kills, the takeovers and the restart.
    let flags = ["--slots", "4", "--live-docs", "8"];
    let (_g, _dir, bin, mut nodes) = cluster(5, &flags);
    let a = nodes[0].client();
    let b = nodes[1].client();
    let mut ids = Vec::new();
    for i in 0..100 {
        let mut job = sh("sleep 0.4");
        job.name = Some(format!("batch-{i:03}"));
        ids.push(a.submit(&job).expect("submit through A").id);
    }
    // Kill A (the node the jobs were submitted to) and one other node while jobs run.
    eventually(20, "jobs are running", || {
        let running = b.jobs(Some("running")).ok()?;
        (running.len() >= 4).then_some(())
    });
    nodes[0].kill();
    nodes[3].kill();
    // Keep submitting through B.
    for i in 0..20 {
        let mut job = sh("sleep 0.2");
        job.name = Some(format!("after-{i:02}"));
        ids.push(b.submit(&job).expect("submit through B").id);
    }
    let done = wait_all_terminal(&b, &ids, 120);
    for id in &ids {
        let s = &done[id];
        assert_eq!(s.state, "succeeded", "job {id}: {s:?}");
        assert_eq!(s.exit_code, Some(0));
    }
    // Every survivor reports the same accepted result for every job.
    let survivors = [1usize, 2, 4];
    for &i in &survivors {
        let c = nodes[i].client();
        agree(&c, &ids, &done, "a survivor");
        let metrics = c.metrics().expect("metrics");
        assert!(metric(&metrics, "mutual_doc_evictions") > 0, "{metrics}");
        assert!(metric(&metrics, "mutual_doc_loads") > 0, "{metrics}");
        assert!(metric(&metrics, "mutual_docs_live") <= 8, "{metrics}");
    }
    // Restart A from its data directory (no --join: it remembers its peers); it converges.
    let restarted = LocalNode::start(&bin, &nodes[0].dir.clone(), None, &flags).expect("restart A");
    let c = restarted.client();
    agree(&c, &ids, &done, "the restarted node");
    let alive = c.nodes().expect("nodes").iter().filter(|n| n.alive).count();
    assert!(alive >= 4, "the restarted node sees {alive} live nodes");
}

#[test]
fn a_node_with_the_wrong_secret_cannot_join() {
    let (_g, dir, bin, nodes) = cluster(2, &[]);
    let a = nodes[0].client();
    let id = a.submit(&sh("true")).expect("submit").id;
    let mut ticket: mutual::ticket::Ticket = nodes[0].ticket.parse().expect("ticket");
    ticket.secret.0[0] ^= 1;
    let out = std::process::Command::new(&bin)
        .args(["node", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--join-timeout", "10s", "--join", &ticket.to_string()])
        .arg("--data-dir")
        .arg(dir.path().join("intruder"))
        .output()
        .expect("run intruder");
    assert!(!out.status.success(), "the intruder started");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused"), "stderr: {err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ticket:"));
    // It learned nothing: its data directory holds no job.
    let wal = dir.path().join("intruder/jobs/wal.log");
    assert!(
        std::fs::read(&wal).map_or(true, |b| b.is_empty()),
        "the intruder stored jobs"
    );
    // The cluster does not list it, and counted the refusal.
    let listed = a.nodes().expect("nodes");
    assert_eq!(listed.len(), 2, "{listed:?}");
    let metrics = a.metrics().expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mutual_connections_refused_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(a.job(&id).is_ok());
}

#[test]
fn a_node_of_an_older_protocol_version_is_refused_with_the_reason() {
    // An older `mutual` dials with the previous node-protocol ALPN: it must be told why it
    // cannot join (the refusal's close code and reason, which it logs), not time out.
    let (_g, _dir, _bin, nodes) = cluster(1, &[]);
    let ticket: mutual::ticket::Ticket = nodes[0].ticket.parse().expect("ticket");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let closed = rt.block_on(async {
        let ep = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
            .relay_mode(iroh::RelayMode::Disabled)
            .bind()
            .await
            .expect("endpoint");
        let key = iroh::PublicKey::from_bytes(&ticket.endpoint).expect("key");
        let addr = mutual::net::endpoint_addr(key, &ticket.addrs);
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            ep.connect(addr, mutual::wire::OLD_ALPNS[0]),
        )
        .await
        .expect("connect in time")
        .expect("the handshake succeeds: the old version is still offered");
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("closed in time");
        ep.close().await;
        reason
    });
    let iroh::endpoint::ConnectionError::ApplicationClosed(c) = closed else {
        panic!("not refused by the node: {closed:?}");
    };
    assert_eq!(
        c.error_code,
        iroh::endpoint::VarInt::from_u32(mutual::net::REFUSED)
    );
    let reason = String::from_utf8_lossy(&c.reason);
    assert!(
        reason.contains("mutual/node/1") && reason.contains("same mutual version"),
        "{reason}"
    );
    let metrics = nodes[0].client().metrics().expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mutual_connections_refused_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[test]
fn a_dial_to_an_older_protocol_version_fails_with_an_error_that_says_protocol() {
    // The other direction: a node of this version dials an older one, which does not offer
    // `wire::ALPN`. The link tells the user only if the handshake error mentions the
    // protocol (`net.rs`); this pins that iroh's error does.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let err = rt.block_on(async {
        let bind = |alpns: Vec<Vec<u8>>| async move {
            iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
                .relay_mode(iroh::RelayMode::Disabled)
                .alpns(alpns)
                .bind()
                .await
                .expect("endpoint")
        };
        let old = bind(vec![mutual::wire::OLD_ALPNS[0].to_vec()]).await;
        let new = bind(Vec::new()).await;
        let server = old.clone();
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let _ = incoming.await;
            }
        });
        let addrs: Vec<std::net::SocketAddr> = old.bound_sockets();
        let addrs: Vec<std::net::SocketAddr> = addrs
            .into_iter()
            .map(|a| (std::net::Ipv4Addr::LOCALHOST, a.port()).into())
            .collect();
        let addr = mutual::net::endpoint_addr(old.id(), &addrs);
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            new.connect(addr, mutual::wire::ALPN),
        )
        .await
        .expect("fails in time");
        new.close().await;
        old.close().await;
        got.err().map(|e| e.to_string())
    });
    let err = err.expect("the handshake must fail");
    assert!(err.contains("protocol"), "{err}");
}

#[test]
fn cancel_and_timeout_kill_the_process() {
    let (_g, dir, _, nodes) = cluster(2, &[]);
    let c = nodes[0].client();
    let (id, pid) = submit_sleeper(&c, &dir.path().join("cancel.pid"));
    assert!(pid_alive(pid));
    let r = nodes[1]
        .client()
        .cancel(&id)
        .expect("cancel through the other node");
    assert_eq!(r.outcome, "cancelled");
    eventually(10, "the cancelled process is killed", || {
        (!pid_alive(pid)).then_some(())
    });
    let s = eventually(10, "cancelled everywhere", || {
        let s = c.job(&id).ok()?;
        (s.state == "cancelled").then_some(s)
    });
    assert_eq!(s.state, "cancelled");
    // Cancelling again is not an error and changes nothing.
    assert_eq!(c.cancel(&id).expect("cancel").outcome, "already_cancelled");

    let pid_file = dir.path().join("timeout.pid");
    let mut job = sh(&format!("echo $$ > {}; exec sleep 60", pid_file.display()));
    job.timeout_ms = Some(1_000);
    job.max_attempts = Some(1);
    let id = c.submit(&job).expect("submit").id;
    let pid = eventually(20, "the job starts", || read_pid(&pid_file));
    let started = Instant::now();
    eventually(15, "the timed-out process is killed", || {
        (!pid_alive(pid)).then_some(())
    });
    assert!(started.elapsed() < Duration::from_secs(15));
    let s = eventually(10, "the job fails", || {
        let s = c.job(&id).ok()?;
        is_terminal(&s).then_some(s)
    });
    assert_eq!(s.state, "failed", "{s:?}");
    assert!(s.attempts.iter().any(|a| a.timed_out), "{s:?}");
}

#[test]
fn a_stale_holder_is_fenced_and_its_result_is_not_accepted() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let (_g, dir, _, nodes) = cluster(3, &[]);
    let pids = dir.path().join("pids");
    std::fs::create_dir_all(&pids).expect("mkdir");
    // Attempt 1 runs long; a takeover (attempt 2) finishes at once.
    let script = format!(
        "echo $$ > {}/$MUTUAL_ATTEMPT; if [ \"$MUTUAL_ATTEMPT\" = 1 ]; then exec sleep 60; fi; exit 0",
        pids.display()
    );
    let c = nodes[0].client();
    let id = c.submit(&sh(&script)).expect("submit").id;
    let first = eventually(20, "attempt 1 starts", || {
        let s = c.job(&id).ok()?;
        (s.state == "running").then_some(s)
    });
    let holder = first.node.clone().expect("holder");
    let stale = nodes
        .iter()
        .find(|n| n.id().as_deref() == Some(holder.as_str()))
        .expect("holder is one of ours");
    let witness = nodes
        .iter()
        .find(|n| n.id().as_deref() != Some(holder.as_str()))
        .expect("another node")
        .client();
    let exec_pid = eventually(10, "attempt 1's pid", || read_pid(&pids.join("1")));
    let node_pid = Pid::from_raw(stale.child.as_ref().expect("running").id() as i32);
    // Freeze the holder (its job keeps running in its own process group) until the others
    // judge it dead and take the job over.
    kill(node_pid, Signal::SIGSTOP).expect("SIGSTOP");
    let done = eventually(30, "the job is taken over and succeeds", || {
        let s = witness.job(&id).ok()?;
        (s.state == "succeeded").then_some(s)
    });
    kill(node_pid, Signal::SIGCONT).expect("SIGCONT");
    assert!(done.attempt >= 2, "{done:?}");
    assert_ne!(done.node.as_deref(), Some(holder.as_str()));
    // Brought back, the stale holder learns it was fenced and kills its execution.
    assert!(
        pid_alive(exec_pid),
        "attempt 1 ended before the holder came back"
    );
    eventually(15, "the stale execution is killed", || {
        (!pid_alive(exec_pid)).then_some(())
    });
    // Its result is not the accepted one, on any node, the stale one included.
    std::thread::sleep(Duration::from_millis(500));
    for n in &nodes {
        let s = eventually(10, "every node reports the takeover's result", || {
            let s = n.client().job(&id).ok()?;
            (s.outcome() == done.outcome()).then_some(s)
        });
        assert_eq!(s.exit_code, Some(0));
        assert_ne!(s.node.as_deref(), Some(holder.as_str()));
    }
}

#[test]
fn bad_api_input_gets_clear_errors_and_loses_nothing() {
    let (_g, _dir, _, nodes) = cluster(1, &[]);
    let c = nodes[0].client();
    let keep = c.submit(&sh("true")).expect("submit").id;
    let status = |r: Result<JobStatus, mutual::client::ClientError>| match r {
        Err(e) => (e.status(), e.to_string()),
        Ok(s) => panic!("accepted bad input: {s:?}"),
    };
    let (s, m) = status(c.submit_raw(b"{not json"));
    assert_eq!(s, Some(400), "{m}");
    let (s, m) = status(c.submit_raw(br#"{"command":["true"],"colour":"blue"}"#));
    assert_eq!(s, Some(400));
    assert!(m.contains("colour"), "{m}");
    let (s, m) = status(c.submit_raw(br#"{"command":[]}"#));
    assert_eq!(s, Some(400));
    assert!(m.contains("command"), "{m}");
    let (s, _) = status(c.submit_raw(&vec![b' '; 300 * 1024]));
    assert_eq!(s, Some(413));
    let (s, m) = status(c.submit_raw(
        br#"{"command":["true"],"resources":{"cpu_millis":1000,"memory_bytes":1024,"gpus":8}}"#,
    ));
    assert_eq!(s, Some(422), "{m}");
    let (s, _) = status(
        c.submit_raw(br#"{"command":["true"],"resources":{"cpu_millis":0,"memory_bytes":1024}}"#),
    );
    assert_eq!(s, Some(400));
    let (s, _) = status(c.job("00000000000000000000000000000000"));
    assert_eq!(s, Some(404));
    let (s, _) = status(c.job("not-a-job"));
    assert_eq!(s, Some(400));
    let e = c
        .cancel("00000000000000000000000000000000")
        .expect_err("unknown job");
    assert_eq!(e.status(), Some(404));
    let e = c.jobs(Some("sleeping")).expect_err("bad state");
    assert_eq!(e.status(), Some(400));
    // Nothing was lost or added, and the node still works.
    let jobs = c.jobs(None).expect("jobs");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id, keep);
    let id = c.submit(&sh("true")).expect("submit after bad input").id;
    eventually(20, "a good job still runs", || {
        (c.job(&id).ok()?.state == "succeeded").then_some(())
    });
}

#[test]
fn the_api_token_is_required_when_set() {
    let _g = lock();
    let dir = scratch();
    let bin = mutual_bin();
    let node = LocalNode::start(
        &bin,
        &dir.path().join("n"),
        None,
        &["--api-token", "s3cret"],
    )
    .expect("node");
    let anon = Client::new(&node.http, None);
    assert_eq!(anon.jobs(None).expect_err("no token").status(), Some(401));
    let wrong = Client::new(&node.http, Some("nope".into()));
    assert_eq!(wrong.nodes().expect_err("wrong token").status(), Some(401));
    let ok = Client::new(&node.http, Some("s3cret".into()));
    assert!(ok.jobs(None).expect("with token").is_empty());
}

#[test]
fn a_killed_node_leaves_no_orphaned_execution() {
    let (_g, dir, _, mut nodes) = cluster(2, &[]);
    let c = nodes[0].client();
    let (id, pid) = submit_sleeper(&c, &dir.path().join("orphan.pid"));
    let holder = eventually(10, "the job runs", || c.job(&id).ok()?.node);
    let victim = nodes
        .iter()
        .position(|n| n.id().as_deref() == Some(holder.as_str()))
        .expect("holder is one of ours");
    nodes[victim].kill();
    eventually(10, "the dead node's execution is gone", || {
        (!pid_alive(pid)).then_some(())
    });
}

// ---- containers (Docker) ----------------------------------------------------------------

/// The image the container tests run, built from this machine's own binaries when missing
/// (`fixtures/docker/build-test-image.sh`; the machines cannot pull images).
const TEST_IMAGE: &str = "mutual-test:1";

/// Whether the container tests run: only with `MUTUAL_DOCKER_TESTS=1` (set by `.ci/run`),
/// and then Docker must answer and the test image must build, or the test fails loudly.
fn docker_tests() -> bool {
    if std::env::var("MUTUAL_DOCKER_TESTS").as_deref() != Ok("1") {
        eprintln!("skipping: set MUTUAL_DOCKER_TESTS=1 to run the container tests");
        return false;
    }
    let present = std::process::Command::new("docker")
        .args(["image", "inspect", TEST_IMAGE])
        .output()
        .expect("MUTUAL_DOCKER_TESTS=1 but the docker CLI cannot run");
    if !present.status.success() {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/docker/build-test-image.sh");
        let built = std::process::Command::new(&script)
            .arg(TEST_IMAGE)
            .output()
            .expect("running build-test-image.sh");
        assert!(
            built.status.success(),
            "MUTUAL_DOCKER_TESTS=1 but the test image cannot be built: {}",
            String::from_utf8_lossy(&built.stderr)
        );
    }
    true
}

fn in_container(script: &str, memory: u64) -> JobRequest {
    JobRequest {
        image: Some(TEST_IMAGE.into()),
        max_attempts: Some(1),
        resources: Some(Resources {
            cpu_millis: 500,
            memory_bytes: memory,
            gpus: 0,
        }),
        ..sh(script)
    }
}

/// The log file of a job's accepted attempt, on the node that ran it.
fn log_of(nodes: &[LocalNode], s: &JobStatus, stream: &str) -> String {
    let node = nodes
        .iter()
        .find(|n| n.id().as_deref() == s.node.as_deref())
        .expect("the node that ran the job");
    let path = node
        .dir
        .join("logs")
        .join(&s.id)
        .join(format!("{}.{stream}", s.attempt));
    std::fs::read_to_string(&path).unwrap_or_default()
}

/// Containers of one job still known to Docker.
fn containers_of(job: &str) -> usize {
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=io.mutual.job={job}"),
        ])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn container_jobs_run_under_docker_limits_and_are_removed() {
    if !docker_tests() {
        return;
    }
    let (_g, _dir, _bin, nodes) = cluster(2, &["--slots", "2", "--containers", "on"]);
    let c = nodes[0].client();
    let hello = c
        .submit(&in_container(
            "echo in-container; echo to-stderr >&2",
            64 << 20,
        ))
        .expect("submit")
        .id;
    // 128 MiB in one buffer: more than a 32 MiB limit allows, well within 512 MiB.
    let grab = "dd if=/dev/zero of=/dev/null bs=128M count=1";
    let over = c.submit(&in_container(grab, 32 << 20)).expect("submit").id;
    let under = c.submit(&in_container(grab, 512 << 20)).expect("submit").id;
    let missing = c
        .submit(&JobRequest {
            image: Some("mutual-no-such-image:0".into()),
            ..in_container("true", 64 << 20)
        })
        .expect("submit")
        .id;
    // Long enough (64 MiB copied 64 times) for Docker's stats to be sampled.
    let busy = c
        .submit(&in_container(
            // Busy for at least 3 s however fast the machine: Docker's stats must
            // sample it (with a fixed count an idle machine finished in 1.7 s, unsampled).
            "sleep 3 & t=$!; while kill -0 $t 2>/dev/null; do dd if=/dev/zero of=/dev/null bs=64M count=16; done",
            256 << 20,
        ))
        .expect("submit")
        .id;
    let ids = vec![
        hello.clone(),
        over.clone(),
        under.clone(),
        missing.clone(),
        busy.clone(),
    ];
    let done = wait_all_terminal(&c, &ids, 90);

    let s = &done[&hello];
    assert_eq!(
        (s.state.as_str(), s.exit_code),
        ("succeeded", Some(0)),
        "{s:?}"
    );
    assert_eq!(log_of(&nodes, s, "stdout"), "in-container\n");
    assert_eq!(log_of(&nodes, s, "stderr"), "to-stderr\n");

    let s = &done[&over];
    assert_eq!(s.state, "failed", "the memory limit must kill it: {s:?}");
    assert_eq!(s.exit_code, Some(137), "killed by the OOM killer: {s:?}");
    let s = &done[&under];
    assert_eq!(
        (s.state.as_str(), s.exit_code),
        ("succeeded", Some(0)),
        "{s:?}"
    );

    let s = &done[&busy];
    assert_eq!(s.state, "succeeded", "{s:?}");
    let m = s.attempts[0].metrics.expect("metrics");
    assert!(m.memory_peak_bytes >= 64 << 20, "a 64 MiB buffer: {m:?}");
    assert!(m.cpu_avg_millis > 0 && m.wall_ms > 0, "{m:?}");

    let s = &done[&missing];
    assert_eq!(
        (s.state.as_str(), s.exit_code),
        ("failed", Some(125)),
        "{s:?}"
    );
    let err = log_of(&nodes, s, "stderr");
    assert!(err.contains("is not on this node"), "stderr: {err:?}");

    for id in &ids {
        eventually(10, "the container is removed", || {
            (containers_of(id) == 0).then_some(())
        });
    }
}

#[test]
fn a_cancelled_container_is_killed_and_container_jobs_need_a_container_node() {
    if !docker_tests() {
        return;
    }
    let (_g, _dir, _bin, nodes) = cluster(2, &["--containers", "on"]);
    let c = nodes[0].client();
    let id = c
        .submit(&in_container("sleep 60", 64 << 20))
        .expect("submit")
        .id;
    eventually(30, "the container job runs", || {
        (c.job(&id).ok()?.state == "running").then_some(())
    });
    let t = Instant::now();
    c.cancel(&id).expect("cancel");
    eventually(10, "the cancelled container is gone", || {
        (containers_of(&id) == 0).then_some(())
    });
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(c.job(&id).expect("status").state, "cancelled");
    drop((c, nodes, _g));

    // Without a node that runs containers, a container job is refused at once (422).
    let (_g, _dir, _bin, nodes) = cluster(1, &["--containers", "off"]);
    let e = nodes[0]
        .client()
        .submit(&in_container("true", 64 << 20))
        .expect_err("no node runs containers");
    assert!(e.to_string().contains("runs containers"), "{e}");
}

#[test]
fn gpu_jobs_go_to_a_node_with_free_gpus_and_get_distinct_devices() {
    // No GPU here: one node declares two (`--gpus 2`), the other has none.
    let (_g, dir, bin, mut nodes) = cluster(1, &["--slots", "4", "--gpus", "2"]);
    let ticket = nodes[0].ticket.clone();
    nodes.push(
        LocalNode::start(
            &bin,
            &dir.path().join("plain"),
            Some(&ticket),
            &["--slots", "4"],
        )
        .expect("second node"),
    );
    let gpu_node = nodes[0].id();
    let c = nodes[1].client();
    let gpu_job = |gpus: u32| JobRequest {
        resources: Some(Resources {
            cpu_millis: 100,
            memory_bytes: 16 << 20,
            gpus,
        }),
        ..sh("echo \"$CUDA_VISIBLE_DEVICES\"; sleep 1")
    };
    let ids: Vec<String> = (0..3)
        .map(|_| c.submit(&gpu_job(1)).expect("submit").id)
        .collect();
    let done = wait_all_terminal(&c, &ids, 60);
    let mut devices = Vec::new();
    for id in &ids {
        let s = &done[id];
        assert_eq!(s.state, "succeeded", "{s:?}");
        assert_eq!(s.node, gpu_node, "only the GPU node may run it");
        devices.push(log_of(&nodes, s, "stdout").trim().to_string());
    }
    devices.sort();
    assert!(
        devices.iter().all(|d| d == "0" || d == "1"),
        "each job sees exactly one device: {devices:?}"
    );
    // Three 1 s jobs on two devices: two ran together on distinct devices.
    assert!(
        devices.contains(&"0".into()) && devices.contains(&"1".into()),
        "{devices:?}"
    );
    let e = c.submit(&gpu_job(3)).expect_err("no node has three GPUs");
    assert!(e.to_string().contains("3 GPUs"), "{e}");
}

#[test]
fn each_attempt_reports_what_it_used() {
    let (_g, _dir, _bin, nodes) = cluster(1, &["--slots", "2"]);
    let c = nodes[0].client();
    // A busy shell loop (CPU), and 4 GiB copied through a 4 MiB buffer (I/O, memory),
    // which takes long enough for the 250 ms memory sampling to see the buffer.
    let busy = c
        .submit(&sh("i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"))
        .expect("submit")
        .id;
    let copy = c
        .submit(&JobRequest {
            command: ["dd", "if=/dev/zero", "of=/dev/null", "bs=4M", "count=1024"]
                .map(String::from)
                .to_vec(),
            ..sh("")
        })
        .expect("submit")
        .id;
    let done = wait_all_terminal(&c, &[busy.clone(), copy.clone()], 60);
    let used = |id: &str| {
        let s = &done[id];
        assert_eq!(s.state, "succeeded", "{s:?}");
        s.attempts[0].metrics.expect("metrics with the result")
    };
    let m = used(&busy);
    assert!(m.wall_ms > 0, "{m:?}");
    assert!(m.cpu_avg_millis >= 100, "a busy loop uses a CPU: {m:?}");
    let m = used(&copy);
    assert!(m.bytes_in >= 4 << 30, "dd read 4 GiB: {m:?}");
    assert!(m.bytes_out >= 4 << 30, "dd wrote 4 GiB: {m:?}");
    assert!(m.memory_peak_bytes >= 4 << 20, "a 4 MiB buffer: {m:?}");
}

#[test]
fn a_killed_nodes_containers_are_removed_and_its_container_job_taken_over() {
    if !docker_tests() {
        return;
    }
    let (_g, _dir, _bin, mut nodes) = cluster(2, &["--containers", "on"]);
    let c = nodes[0].client();
    let id = c
        .submit(&in_container("sleep 60", 64 << 20))
        .expect("submit")
        .id;
    let holder = eventually(30, "the container job runs", || {
        let s = c.job(&id).ok()?;
        (s.state == "running").then_some(s.node?)
    });
    let k = nodes
        .iter()
        .position(|n| n.id().as_deref() == Some(holder.as_str()))
        .expect("holder");
    nodes[k].kill();
    let other = nodes[1 - k].client();
    // The dead node's container goes at once (its reaper), and the survivor runs the job.
    let s = eventually(30, "the survivor takes the job over", || {
        let s = other.job(&id).ok()?;
        (s.state == "running" && s.attempt == 2).then_some(s)
    });
    assert_ne!(s.node.as_deref(), Some(holder.as_str()));
    eventually(10, "only the survivor's container is left", || {
        (containers_of(&id) == 1).then_some(())
    });
    other.cancel(&id).expect("cancel");
    eventually(10, "no container is left", || {
        (containers_of(&id) == 0).then_some(())
    });
}

// ---- live logs -----------------------------------------------------------------------------

/// Waits until `id` runs; returns the node running it.
fn running_on(c: &Client, id: &str) -> String {
    eventually(20, "the job runs", || {
        let s = c.job(id).ok()?;
        (s.state == "running").then_some(s.node?)
    })
}

/// Starts `mutual logs ID --follow` against the node at `http`, stdout and stderr piped.
fn follow_logs(bin: &Path, id: &str, http: &str) -> std::process::Child {
    std::process::Command::new(bin)
        .args(["logs", id, "--follow", "--node", http])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mutual logs")
}

#[test]
fn logs_follow_a_running_job_and_survive_the_death_of_the_node_first_asked() {
    use std::io::{BufRead, BufReader};
    let (_g, _dir, bin, mut nodes) = cluster(3, &["--slots", "2"]);
    let c = nodes[0].client();
    let script = "for i in $(seq 1 40); do echo line-$i; echo err-$i >&2; sleep 0.05; done";
    let id = c.submit(&sh(script)).expect("submit").id;
    let holder = running_on(&c, &id);
    // Ask a node that is not the agent, then kill it mid-stream.
    let k = nodes
        .iter()
        .position(|n| n.id().as_deref() != Some(holder.as_str()))
        .expect("another node");
    let mut child = follow_logs(&bin, &id, &nodes[k].http);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    assert_eq!(first, "line-1");
    let other = nodes[(k + 1) % 3].client();
    assert_eq!(
        other.job(&id).expect("status").state,
        "running",
        "the first line arrived while the job ran"
    );
    nodes[k].kill();
    let mut got = vec![first];
    got.extend(lines.map(|l| l.expect("utf-8")));
    let want: Vec<String> = (1..=40).map(|i| format!("line-{i}")).collect();
    assert_eq!(got, want, "every line once, in order");
    let status = child.wait().expect("wait");
    assert!(
        status.success(),
        "mutual logs -f ends with the job: {status:?}"
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(
        err.contains("err-1\n") && err.contains("err-40\n"),
        "stderr: {err}"
    );
}

#[test]
fn a_log_token_for_one_job_does_not_open_another() {
    let (_g, _dir, _bin, nodes) = cluster(1, &[]);
    let c = nodes[0].client();
    let a = c.submit(&sh("echo secret-a")).expect("submit").id;
    let b = c.submit(&sh("echo secret-b")).expect("submit").id;
    wait_all_terminal(&c, &[a.clone(), b.clone()], 30);
    let ra = c.logs(&a).expect("logs of a");
    let ws = ra
        .agent
        .expect("the agent is reachable")
        .replace("http://", "ws://");
    let open = |job: &str, token: &str| {
        tungstenite::connect(format!(
            "{ws}/v1/jobs/{job}/logs/stream?token={token}&attempt=1"
        ))
    };
    // Its own token opens a's logs…
    let (mut s, _) = open(&a, &ra.token).expect("a's token opens a");
    let msg = s.read().expect("a message");
    assert!(msg.into_data().ends_with(b"secret-a\n"));
    // …but not b's, and a forged one opens nothing.
    match open(&b, &ra.token) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("a's token must not open b's logs: {other:?}"),
    }
    match open(&a, "99999999999999.00") {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("a forged token opens nothing: {other:?}"),
    }
}

// ---- data plane -----------------------------------------------------------------------

/// Runs the CLI; returns stdout, panicking with stderr when it fails.
fn cli(bin: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(bin)
        .args(args)
        .env_remove("MUTUAL_NODE")
        .env_remove("MUTUAL_API_TOKEN")
        .output()
        .expect("run mutual");
    assert!(
        out.status.success(),
        "mutual {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `dir`, as (relative path, bytes).
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("under root");
                out.insert(rel.display().to_string(), std::fs::read(&p).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Whether any file under `dir` contains `needle`.
fn any_file_contains(dir: &Path, needle: &[u8]) -> bool {
    tree(dir)
        .values()
        .any(|b| b.windows(needle.len()).any(|w| w == needle))
}

#[test]
fn inputs_round_trip_encrypted_to_outputs_with_the_uploading_node_dead() {
    let (_g, dir, bin, mut nodes) = cluster(3, &[]);
    let input = dir.path().join("dataset");
    std::fs::create_dir_all(input.join("nested")).expect("mkdir");
    let marker = b"PLAINTEXT-MARKER-7f3c";
    let mut big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    big.extend_from_slice(marker);
    std::fs::write(input.join("big.bin"), &big).expect("write");
    std::fs::write(input.join("nested/notes.txt"), b"hello\n").expect("write");
    // The only node that may run it is busy: the job waits while the uploading node dies.
    let late = mutual::harness::LocalNode::start(
        &bin,
        &dir.path().join("late"),
        Some(&nodes[1].ticket),
        &["--label", "zone=late", "--slots", "1"],
    )
    .expect("late node");
    let c = nodes[1].client();
    eventually(20, "four members", || {
        (c.nodes().ok()?.iter().filter(|n| n.alive).count() == 4).then_some(())
    });
    let mut busy = sh("exec sleep 60");
    busy.labels.insert("zone".into(), "late".into());
    let busy = c.submit(&busy).expect("submit").id;
    eventually(20, "the late node is busy", || {
        (c.job(&busy).ok()?.state == "running").then_some(())
    });
    let script = "cp -r \"$MUTUAL_INPUT_DIR/dataset\" \"$MUTUAL_OUTPUT_DIR/\" && echo copied";
    let id = cli(
        &bin,
        &[
            "submit",
            "--node",
            &nodes[0].http,
            "--input",
            &input.display().to_string(),
            "--label",
            "zone=late",
            "--",
            "sh",
            "-c",
            script,
        ],
    )
    .trim()
    .to_string();
    let st = nodes[1].client().job(&id).expect("status");
    assert_eq!(st.inputs.len(), 1);
    assert!(
        st.inputs[0].holders.len() >= 2,
        "copied before the submit returned: {:?}",
        st.inputs[0].holders
    );
    assert_eq!(
        st.inputs[0].key.len(),
        mutual::seal::WRAPPED_KEY_HEX,
        "only the wrapped key is stored"
    );
    for n in &nodes {
        assert!(
            !any_file_contains(&n.dir, marker),
            "{} holds plaintext of the input",
            n.dir.display()
        );
    }
    nodes[0].kill();
    c.cancel(&busy).expect("cancel");
    let done = eventually(60, "the job ends", || c.job(&id).ok().filter(is_terminal));
    assert_eq!(done.state, "succeeded", "{done:?}");
    assert_eq!(done.node, late.id(), "the late node ran it");
    let out = dir.path().join("out");
    cli(
        &bin,
        &[
            "get",
            &id,
            "-o",
            &out.display().to_string(),
            "--node",
            &nodes[2].http,
        ],
    );
    assert_eq!(tree(&out.join("dataset")), tree(&input), "byte-identical");
    // A job that ended without outputs says so.
    let none = c.submit(&sh("true")).expect("submit").id;
    eventually(30, "it ends", || c.job(&none).ok().filter(is_terminal));
    let err = c.outputs(&none).expect_err("no outputs");
    assert_eq!(err.status(), Some(409), "{err}");
}

#[test]
fn a_tampered_blob_is_rejected_and_the_job_never_sees_it() {
    use std::io::Write;
    let (_g, dir, _bin, nodes) = cluster(2, &[]);
    let c = nodes[0].client();
    let key = mutual::seal::BlobKey::generate();
    let mut sealed = mutual::seal::Sealer::new(Vec::new(), &key).expect("sealer");
    let mut tar = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar);
        let mut h = tar::Header::new_gnu();
        h.set_size(6);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "victim.txt", &b"hello\n"[..])
            .expect("tar");
        b.finish().expect("tar");
    }
    sealed.write_all(&tar).expect("seal");
    let mut bytes = sealed.finish().expect("seal");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    let stored = c.put_blob(std::io::Cursor::new(bytes)).expect("upload");
    let marker = dir.path().join("ran");
    let mut req = sh(&format!("touch {}", marker.display()));
    req.inputs = vec![mutual_core::BlobRef {
        cid: stored.cid,
        key: key.to_hex(),
        bytes: stored.bytes,
        holders: stored.holders,
    }];
    let id = c.submit(&req).expect("submit").id;
    let done = eventually(60, "the job ends", || c.job(&id).ok().filter(is_terminal));
    assert_eq!(done.state, "failed", "{done:?}");
    assert_eq!(done.exit_code, Some(mutual::exec::EXIT_CANNOT_START));
    assert!(!marker.exists(), "the command never ran on tampered input");
    let err = log_of(&nodes, &done, "stderr");
    assert!(
        err.contains("input 0") && err.to_lowercase().contains("tamper"),
        "stderr: {err}"
    );
}

#[test]
fn a_counting_job_resumes_from_its_checkpoint_after_its_holder_is_killed() {
    let (_g, _dir, bin, mut nodes) = cluster(3, &[]);
    let c = nodes[0].client();
    let script = r#"n=0; c="$MUTUAL_CHECKPOINT_DIR/n"
[ -f "$c" ] && n=$(cat "$c"); echo "start $n"
while [ "$n" -lt 60 ]; do n=$((n+1)); echo "$n" > "$c.tmp"; mv "$c.tmp" "$c"; sleep 0.1; done
echo "$n" > "$MUTUAL_OUTPUT_DIR/final"; echo "done $n""#;
    let mut req = sh(script);
    req.checkpoint_interval_ms = Some(300);
    let id = c.submit(&req).expect("submit").id;
    let holder = eventually(30, "three checkpoints recorded", || {
        let s = c.job(&id).ok()?;
        let a = s.attempts.first()?;
        (a.checkpoints >= 3).then(|| a.node.clone())
    });
    let k = nodes
        .iter()
        .position(|n| n.id().as_deref() == Some(holder.as_str()))
        .expect("holder");
    nodes[k].kill();
    let other = nodes[(k + 1) % 3].client();
    let done = eventually(60, "the job ends", || {
        other.job(&id).ok().filter(is_terminal)
    });
    assert_eq!(done.state, "succeeded", "{done:?}");
    assert_eq!(done.attempt, 2, "taken over once");
    let (first, second) = (&done.attempts[0], &done.attempts[1]);
    assert_eq!(first.expired.as_deref(), Some("holder_dead"), "{done:?}");
    let judged = first
        .expired_at_ms
        .expect("when the holder was judged dead");
    assert!(
        first.claimed_at_ms < judged && judged <= second.claimed_at_ms,
        "{done:?}"
    );
    let judge = first.expired_by.as_deref().expect("who judged it dead");
    assert!(
        judge != holder && nodes.iter().any(|n| n.id().as_deref() == Some(judge)),
        "judged by a live member, not the dead holder: {done:?}"
    );
    let logs = cli(&bin, &["logs", &id, "--node", &nodes[(k + 1) % 3].http]);
    let start: u32 = logs
        .lines()
        .find_map(|l| l.strip_prefix("start "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a start line");
    assert!(
        start >= 3,
        "resumed from a checkpoint, not from zero: {logs}"
    );
    assert!(logs.contains("done 60"), "{logs}");
    // The agent of attempt 2 dies too: its stored log still reads from the last node.
    let agent = done.node.clone().expect("node");
    let j = nodes
        .iter()
        .position(|n| n.id().as_deref() == Some(agent.as_str()))
        .expect("agent");
    nodes[j].kill();
    let last = nodes.iter().find(|n| n.is_running()).expect("a live node");
    let again = cli(&bin, &["logs", &id, "--node", &last.http]);
    assert_eq!(again, logs, "the stored log, from the surviving copy");
}

#[test]
fn a_lost_checkpoint_costs_progress_not_the_job() {
    let (_g, dir, bin, mut nodes) = cluster(2, &[]);
    let a = nodes[0].client();
    // A job that never writes to its checkpoint directory records no checkpoint.
    let mut idle = sh("sleep 1");
    idle.checkpoint_interval_ms = Some(100);
    let idle = a.submit(&idle).expect("submit").id;
    // The first attempt checkpoints once and holds; a later one reports what it found.
    let script = r#"c="$MUTUAL_CHECKPOINT_DIR/n"
if [ "$MUTUAL_ATTEMPT" = 1 ]; then echo 5 > "$c.tmp"; mv "$c.tmp" "$c"; exec sleep 60; fi
echo "start $(cat "$c" 2>/dev/null || echo 0)""#;
    let mut req = sh(script);
    req.checkpoint_interval_ms = Some(100);
    let id = a.submit(&req).expect("submit").id;
    eventually(30, "a checkpoint recorded", || {
        let s = a.job(&id).ok()?;
        (s.attempts.first()?.checkpoints >= 1).then_some(())
    });
    let s = eventually(30, "the idle job ends", || {
        a.job(&idle).ok().filter(is_terminal)
    });
    assert_eq!(s.state, "succeeded", "{s:?}");
    assert_eq!(
        s.attempts[0].checkpoints, 0,
        "an empty directory is no checkpoint"
    );
    // Its only copies are on the two first nodes. A third joins, then both die.
    let late = LocalNode::start(&bin, &dir.path().join("node2"), Some(&nodes[0].ticket), &[])
        .expect("third node");
    let c = late.client();
    eventually(30, "the third node knows the checkpoint", || {
        let s = c.job(&id).ok()?;
        (s.attempts.first()?.checkpoints >= 1).then_some(())
    });
    nodes[0].kill();
    nodes[1].kill();
    let done = eventually(60, "the job ends", || c.job(&id).ok().filter(is_terminal));
    assert_eq!(done.state, "succeeded", "{done:?}");
    assert_eq!(done.attempt, 2, "{done:?}");
    let logs = cli(&bin, &["logs", &id, "--node", &late.http]);
    assert_eq!(
        logs.trim(),
        "start 0",
        "started over from an empty directory"
    );
}

#[test]
fn logs_follow_across_the_death_of_the_agent() {
    use std::io::{BufRead, BufReader};
    let (_g, _dir, bin, mut nodes) = cluster(3, &[]);
    let c = nodes[0].client();
    let script = "for i in $(seq 1 30); do echo line-$i; sleep 0.1; done";
    let id = c.submit(&sh(script)).expect("submit").id;
    let holder = running_on(&c, &id);
    let k = nodes
        .iter()
        .position(|n| n.id().as_deref() == Some(holder.as_str()))
        .expect("holder");
    let ask = (k + 1) % 3;
    let mut child = follow_logs(&bin, &id, &nodes[ask].http);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("utf-8"), "line-1");
    nodes[k].kill();
    let rest: Vec<String> = lines.map(|l| l.expect("utf-8")).collect();
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    assert_eq!(
        rest.last().map(String::as_str),
        Some("line-30"),
        "followed to the end of attempt 2"
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(
        err.contains("--- attempt 2"),
        "the takeover is marked: {err}"
    );
}

#[test]
fn a_container_job_reads_its_inputs_and_leaves_outputs_through_its_mounts() {
    if !docker_tests() {
        return;
    }
    let (_g, dir, bin, nodes) = cluster(2, &["--containers", "on"]);
    let input = dir.path().join("words.txt");
    std::fs::write(&input, b"alpha\nbeta\n").expect("write");
    let c = nodes[0].client();
    let mut req = in_container(
        "wc -l < \"$MUTUAL_INPUT_DIR/words.txt\" > \"$MUTUAL_OUTPUT_DIR/count\" && \
         ! touch \"$MUTUAL_INPUT_DIR/x\" 2>/dev/null",
        64 << 20,
    );
    req.inputs = vec![
        mutual::transfer::upload(&c, &input, &indicatif::ProgressBar::hidden()).expect("upload"),
    ];
    let id = c.submit(&req).expect("submit").id;
    let done = eventually(60, "the job ends", || c.job(&id).ok().filter(is_terminal));
    assert_eq!(
        done.state,
        "succeeded",
        "inputs are read-only: {done:?} {}",
        log_of(&nodes, &done, "stderr")
    );
    let out = dir.path().join("out");
    cli(
        &bin,
        &[
            "get",
            &id,
            "-o",
            &out.display().to_string(),
            "--node",
            &nodes[1].http,
        ],
    );
    assert_eq!(
        std::fs::read_to_string(out.join("count"))
            .expect("count")
            .trim(),
        "2"
    );
}

/// Cuts the cluster into `halves` (node indices): every node ignores the other half.
fn split(nodes: &[LocalNode], halves: [&[usize]; 2]) {
    for (side, other) in [(halves[0], halves[1]), (halves[1], halves[0])] {
        let block: Vec<String> = other.iter().filter_map(|i| nodes[*i].id()).collect();
        for &i in side {
            assert_eq!(
                nodes[i].client().partition(&block).expect("partition"),
                block
            );
        }
    }
}

#[test]
fn a_partition_runs_jobs_on_both_sides_and_heals_to_one_accepted_result_each() {
    let (_g, _dir, _bin, nodes) = cluster(4, &["--slots", "2", "--fault-injection"]);
    let ids: Vec<String> = nodes.iter().filter_map(LocalNode::id).collect();
    // A job running on each side when the network splits.
    let mut jobs: Vec<String> = nodes
        .iter()
        .map(|n| n.client().submit(&sh("sleep 3")).expect("submit").id)
        .collect();
    eventually(20, "the jobs run", || {
        let running = nodes[0].client().jobs(Some("running")).ok()?;
        (running.len() == 4).then_some(())
    });
    split(&nodes, [&[0, 1], &[2, 3]]);
    // Each side judges the other dead, and both sides keep accepting and running jobs.
    eventually(20, "each side sees the other as dead", || {
        [0usize, 3]
            .iter()
            .all(|&i| {
                nodes[i]
                    .client()
                    .nodes()
                    .is_ok_and(|l| l.iter().filter(|n| n.alive).count() == 2)
            })
            .then_some(())
    });
    let a = nodes[0]
        .client()
        .submit(&sh("sleep 0.2"))
        .expect("submit in half A")
        .id;
    let b = nodes[3]
        .client()
        .submit(&sh("sleep 0.2"))
        .expect("submit in half B")
        .id;
    wait_all_terminal(&nodes[0].client(), std::slice::from_ref(&a), 30);
    wait_all_terminal(&nodes[3].client(), std::slice::from_ref(&b), 30);
    // Half A has not heard of half B's job.
    assert!(
        nodes[0].client().job(&b).is_err(),
        "a job crossed the partition"
    );
    // Heal; every node learns every job and agrees on one accepted result per job.
    for n in &nodes {
        n.client().partition(&[]).expect("heal");
    }
    jobs.extend([a, b]);
    let done = wait_all_terminal(&nodes[0].client(), &jobs, 60);
    for id in &jobs {
        assert_eq!(done[id].state, "succeeded", "job {id}: {:?}", done[id]);
    }
    for n in &nodes {
        agree(&n.client(), &jobs, &done, "a node after the heal");
        eventually(20, "everyone is alive again", || {
            let alive = n.client().nodes().ok()?.iter().filter(|s| s.alive).count();
            (alive == ids.len()).then_some(())
        });
    }
}

#[test]
fn fault_injection_is_refused_unless_the_node_was_started_with_it() {
    let (_g, _dir, _bin, nodes) = cluster(2, &[]);
    let other = nodes[1].id().expect("id");
    match nodes[0].client().partition(&[other]) {
        Err(ClientError::Api { status: 403, body }) => {
            assert!(body.error.message.contains("--fault-injection"), "{body:?}");
        }
        r => panic!("expected 403, got {r:?}"),
    }
    match nodes[0].client().crash() {
        Err(ClientError::Api { status: 403, body }) => {
            assert!(body.error.message.contains("--fault-injection"), "{body:?}");
        }
        r => panic!("expected 403, got {r:?}"),
    }
    assert!(
        nodes[0].client().nodes().is_ok(),
        "a refused crash killed the node"
    );
}

#[test]
fn a_crashed_hosted_node_dies_alone_and_its_job_is_taken_over() {
    let _g = lock();
    let dir = scratch();
    let bin = mutual_bin();
    let extra: Vec<String> = ["--containers", "off", "--slots", "2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // Four nodes in two `mutual host` processes.
    let mut nodes = mutual::harness::start_hosted_cluster(&bin, dir.path(), 4, 2, &extra)
        .expect("hosted cluster");
    let ids: Vec<String> = nodes.iter().map(|n| n.id().expect("id")).collect();
    assert_eq!(
        ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
        4,
        "every hosted node has its own key"
    );
    let c = nodes[0].client();
    let (id, pid) = submit_sleeper(&c, &dir.path().join("hosted.pid"));
    let holder = eventually(10, "the job runs", || c.job(&id).ok()?.node);
    let victim = ids
        .iter()
        .position(|i| *i == holder)
        .expect("holder is ours");
    let observer = (victim + 1) % 4;
    let mate = nodes
        .iter()
        .enumerate()
        .position(|(i, n)| {
            i != victim
                && n.host.as_ref().map(|h| h.pid) == nodes[victim].host.as_ref().map(|h| h.pid)
        })
        .expect("the victim shares its process");
    nodes[victim].kill();
    assert!(!nodes[victim].is_running());
    let o = nodes[observer].client();
    // Its execution dies with it, the others judge it dead, and the job runs elsewhere.
    eventually(10, "the crashed node's execution is gone", || {
        (!pid_alive(pid)).then_some(())
    });
    eventually(10, "the crashed node's API is gone", || {
        nodes[victim].client().nodes().is_err().then_some(())
    });
    eventually(20, "the others judge it dead", || {
        let list = o.nodes().ok()?;
        list.iter()
            .any(|n| n.id == holder && !n.alive)
            .then_some(())
    });
    let s = eventually(30, "the job is taken over", || {
        let s = o.job(&id).ok()?;
        (s.state == "running" && s.node.as_deref() != Some(holder.as_str())).then_some(s)
    });
    assert!(s.attempts.len() >= 2, "{s:?}");
    // The node that shared its process still serves.
    assert!(
        nodes[mate].client().nodes().is_ok(),
        "the crash took its process mate"
    );
    o.cancel(&id).expect("cancel");
}

/// Every live node's list of the jobs it holds, by job.
fn listings(nodes: &[LocalNode]) -> BTreeMap<String, Vec<JobStatus>> {
    let mut out: BTreeMap<String, Vec<JobStatus>> = BTreeMap::new();
    for n in nodes.iter().filter(|n| n.is_running()) {
        for s in n.client().jobs(None).unwrap_or_default() {
            out.entry(s.id.clone()).or_default().push(s);
        }
    }
    out
}

#[test]
fn placed_jobs_live_on_few_nodes_agree_and_survive_their_runner() {
    const K: usize = 2;
    let (_g, dir, bin, mut nodes) = cluster(6, &["--replicas", "2", "--slots", "2"]);
    let ids: Vec<String> = (0..20)
        .map(|i| {
            let c = nodes[i % nodes.len()].client();
            c.submit(&sh("sleep 0.3")).expect("submit").id
        })
        .collect();
    let all = eventually(60, "every job ends on at least K nodes", || {
        let all = listings(&nodes);
        ids.iter()
            .all(|id| {
                all.get(id)
                    .is_some_and(|l| l.len() >= K && l.iter().all(is_terminal))
            })
            .then_some(all)
    });
    // Placed, not everywhere: a job's document is on its K replicas, its submitter and
    // its runner, at most 4 of the 6 nodes.
    for id in &ids {
        let held = all[id].len();
        assert!((K..=K + 2).contains(&held), "job {id} on {held} nodes");
        let outcomes: std::collections::BTreeSet<_> = all[id].iter().map(|s| s.outcome()).collect();
        assert_eq!(outcomes.len(), 1, "holders disagree on {id}: {:?}", all[id]);
        assert_eq!(all[id][0].state, "succeeded", "{:?}", all[id][0]);
    }
    // A node that does not hold a job says so, and names the nodes that do.
    let id = &ids[0];
    let holder_urls: Vec<String> = nodes
        .iter()
        .filter(|n| n.client().job(id).is_ok())
        .map(|n| n.http.clone())
        .collect();
    let stranger = nodes
        .iter()
        .find(|n| n.client().job(id).is_err())
        .expect("some node does not hold the job");
    let err = stranger.client().job(id).expect_err("not held there");
    assert_eq!(err.status(), Some(404), "{err}");
    let text = err.to_string();
    assert!(text.contains("--replicas 2"), "{text}");
    assert!(
        holder_urls
            .iter()
            .any(|u| text.contains(u.trim_start_matches("http://"))),
        "{text} names none of {holder_urls:?}"
    );
    // A job whose runner dies is taken over by another node that holds it.
    let (sleeper, pid) = submit_sleeper(&nodes[0].client(), &dir.path().join("placed.pid"));
    let runner = eventually(10, "the sleeper's runner is known", || {
        listings(&nodes)
            .get(&sleeper)?
            .iter()
            .find_map(|s| s.node.clone())
    });
    let victim = nodes
        .iter()
        .position(|n| n.id().as_deref() == Some(runner.as_str()))
        .expect("the runner is one of ours");
    nodes[victim].kill();
    eventually(10, "the killed runner's execution is gone", || {
        (!pid_alive(pid)).then_some(())
    });
    let taken = eventually(30, "the sleeper is taken over", || {
        listings(&nodes).get(&sleeper)?.iter().find_map(|s| {
            (s.state == "running" && s.node.as_deref() != Some(runner.as_str())).then(|| s.clone())
        })
    });
    assert!(taken.attempts.len() >= 2, "{taken:?}");
    let holder = nodes
        .iter()
        .filter(|n| n.is_running())
        .find(|n| n.client().job(&sleeper).is_ok())
        .expect("a live node holds the sleeper");
    holder.client().cancel(&sleeper).expect("cancel");
    // Every member must use the same setting: a node with another is refused, and says why.
    let out = std::process::Command::new(&bin)
        .args(["node", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--replicas", "3", "--join-timeout", "10s"])
        .args(["--join", &holder.ticket])
        .arg("--data-dir")
        .arg(dir.path().join("other-replicas"))
        .output()
        .expect("run the mismatched node");
    assert!(!out.status.success(), "a node with --replicas 3 joined");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--replicas 2"), "stderr: {err}");
}

#[test]
fn a_placed_submission_is_acknowledged_once_another_holder_has_it() {
    let (_g, _dir, _bin, nodes) = cluster(3, &["--replicas", "2", "--fault-injection"]);
    let a = nodes[0].client();
    // Acknowledged (201, no warning) only once another node holds the job: with two
    // replicas among three nodes, at least one holder is not the submitter.
    let confirmed = a.submit(&sh("true")).expect("submit");
    assert_eq!(confirmed.warning, None, "{confirmed:?}");
    let elsewhere = nodes[1..]
        .iter()
        .filter(|n| n.client().job(&confirmed.id).is_ok())
        .count();
    assert!(
        elsewhere >= 1,
        "acknowledged while no other node held the job"
    );
    let metrics = a.metrics().expect("metrics");
    assert_eq!(
        metric(&metrics, "mutual_submit_confirm_milliseconds_count"),
        1,
        "{metrics}"
    );
    // Cut off from every other member, the submitter answers at once, warning that the
    // job is held by it alone (HTTP 202), and counts it.
    split(&nodes, [&[0], &[1, 2]]);
    eventually(30, "the cut-off node believes the others dead", || {
        let alive = a.nodes().ok()?.iter().filter(|n| n.alive).count();
        (alive == 1).then_some(())
    });
    let lonely = a.submit(&sh("true")).expect("submit while cut off");
    let warning = lonely.warning.clone().expect("a warning");
    assert!(
        warning.contains("no other member") && warning.contains("losing this node"),
        "{warning}"
    );
    assert_eq!(
        metric(&a.metrics().expect("metrics"), "mutual_submits_unconfirmed"),
        1
    );
    assert!(
        nodes[1..]
            .iter()
            .all(|n| n.client().job(&lonely.id).is_err()),
        "the far side got the job through the partition"
    );
    // The job stands: once the partition heals it reaches its holders and runs.
    for n in &nodes {
        n.client().partition(&[]).expect("heal");
    }
    eventually(
        60,
        "the job submitted while cut off succeeds elsewhere too",
        || {
            nodes[1..]
                .iter()
                .filter_map(|n| n.client().job(&lonely.id).ok())
                .any(|s| s.state == "succeeded")
                .then_some(())
        },
    );
}

#[test]
fn two_nodes_that_talk_both_ways_share_one_connection() {
    // Probes and acks, pushes and answers go both ways between members. Each direction
    // used to dial a connection of its own: two per pair, twice the handshakes and the
    // memory (`bench/results/conn-memory.json`). A link now sends on its peer's
    // connection when one is up.
    let (_g, _dir, _bin, nodes) = cluster(2, &["--slots", "2"]);
    let c = nodes[0].client();
    let ids: Vec<String> = (0..4)
        .map(|_| c.submit(&sh("true")).expect("submit").id)
        .collect();
    wait_all_terminal(&c, &ids, 30);
    let dialled = |what: &str| -> u64 {
        nodes
            .iter()
            .map(|n| metric(&n.client().metrics().expect("metrics"), what))
            .sum()
    };
    assert_eq!(
        dialled("mutual_connections_dialled_open"),
        1,
        "one connection between the two nodes"
    );
    assert_eq!(
        dialled("mutual_connections_dialled"),
        1,
        "neither node dialled the other a second time"
    );
}

/// A node that was down when another died learns the death from membership anti-entropy,
/// not only from the death broadcast it missed: the member lists carry who is believed
/// dead. The victim is chosen outside the restarted node's probe window, so that node
/// would never judge it itself, and it restarts after the judges stopped repeating their
/// broadcasts.
#[test]
fn a_node_that_missed_a_death_learns_it_from_membership_anti_entropy() {
    let (_g, _dir, bin, mut nodes) = cluster(8, &[]);
    let ids: Vec<String> = nodes.iter().map(|n| n.id().expect("id")).collect();
    let mut ring: Vec<usize> = (0..ids.len()).collect();
    ring.sort_by(|a, b| ids[*a].cmp(&ids[*b]));
    let late = 7;
    let at = ring.iter().position(|i| *i == late).expect("on the ring");
    // The restarted node believes everyone alive and probes the first
    // WATCHERS + LOOKAHEAD = 4 after it; the victim lies beyond them.
    let victim = (5..ring.len())
        .map(|k| ring[(at + k) % ring.len()])
        .find(|v| *v != 0)
        .expect("a victim beyond the window other than node 0");
    let c = nodes[0].client();
    let dead_at = |c: &Client, id: &str| {
        c.nodes()
            .ok()?
            .into_iter()
            .find(|n| n.id == id)
            .map(|n| !n.alive)
    };
    nodes[late].kill();
    eventually(30, "the late node judged dead", || {
        dead_at(&c, &ids[late]).filter(|d| *d)
    });
    nodes[victim].kill();
    eventually(30, "the victim judged dead", || {
        dead_at(&c, &ids[victim]).filter(|d| *d)
    });
    // The judges repeat the broadcast for 14 failure timeouts (7 s at 500 ms).
    std::thread::sleep(Duration::from_secs(10));
    let dir = nodes[late].dir.clone();
    let back =
        LocalNode::start(&bin, &dir, Some(&nodes[0].ticket), &[]).expect("restart the late node");
    let b = back.client();
    eventually(
        30,
        "the restarted node is alive again for the others",
        || dead_at(&c, &ids[late]).filter(|d| !*d),
    );
    eventually(
        30,
        "the restarted node learns of the death it missed",
        || dead_at(&b, &ids[victim]).filter(|d| *d),
    );
}
