//! `mutual-bench`: the proposal's experiments, one subcommand each: E1, E2, E3 and E5 on
//! real nodes (release `mutual node` processes on loopback, real job processes, faults by
//! SIGKILL, injected partitions and skewed clocks), E4 in the deterministic simulator. Each
//! writes `<out>/<experiment>.csv`, `<out>/<experiment>.png` and `<out>/<experiment>.json`
//! (metric names from `shared/experiments.md`, in snake case).
//!
//! `cargo build --release -p mutual -p mutual-bench && ./target/release/mutual-bench e1`
//! (every subcommand takes `--quick`: under five minutes on two cores).
//!
//! Modules: `e1` here, `kill` (E2 and E3 share one kill-and-measure run), `e4`, `e5`.

// The per-configuration summaries are one `json!` literal each, deeper than the default.
#![recursion_limit = "256"]

mod e4;
mod e5;
mod kill;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use mutual::client::Client;
use mutual::harness::LocalNode;
use mutual::types::JobStatus;
use mutual_bench::plot::{Chart, Series, csv, line_chart};
use mutual_bench::{command_line, machine, mutual_bin, results_dir, today};
use mutual_core::{JobRequest, Resources};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "mutual-bench",
    about = "Mutual Cloud's experiments (shared/experiments.md)"
)]
struct Cli {
    #[command(subcommand)]
    exp: Exp,
}

#[derive(Subcommand)]
enum Exp {
    /// E1, no single point of failure: an entry node takes every submission; it is
    /// SIGKILLed mid-run, the client fails over, submissions continue, and it comes back.
    E1(E1Args),
    /// E2, scalability: N agents (50 to 500), 10 × N jobs, 10 % of the agents SIGKILLed
    /// mid-run; success, duplicates, MTTR, scheduling wait, per-node messages and memory.
    E2(kill::E2Args),
    /// E3, fault tolerance: SIGKILL a fraction of the agents while jobs run; success,
    /// duplicates and MTTR per kill fraction.
    E3(kill::E3Args),
    /// E4, discovery at scale (simulated, 100 to 10,000 nodes): lookup latency and success,
    /// status reach and per-node message load, for full broadcast and the directory.
    E4(e4::E4Args),
    /// E5, partitions and clock skew: nodes with skewed clocks split in two halves while
    /// jobs run, then healed; duplicate results, lost jobs, time to converge.
    E5(e5::E5Args),
}

#[derive(clap::Args)]
struct E1Args {
    /// Scale timings by 0.1 (3 s jobs; under a minute on two cores).
    #[arg(long)]
    quick: bool,
    /// Scale every timing of the protocol by this factor [default: 1, or 0.1 with --quick].
    #[arg(long)]
    scale: Option<f64>,
    /// Agent nodes (besides the entry node).
    #[arg(long, default_value_t = 10)]
    agents: usize,
    /// Where the CSV, PNG and JSON go.
    #[arg(long, default_value_os_t = results_dir())]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().exp {
        Exp::E1(a) => e1(a),
        Exp::E2(a) => kill::e2(a),
        Exp::E3(a) => kill::e3(a),
        Exp::E4(a) => e4::run(a),
        Exp::E5(a) => e5::run(a),
    }
}

fn is_terminal(s: &JobStatus) -> bool {
    matches!(s.state.as_str(), "succeeded" | "failed" | "cancelled")
}

/// How long replicas get, after the run drains, to learn the last records before a
/// difference counts as a duplicate result.
const CONVERGE_GRACE: Duration = Duration::from_secs(30);

/// Jobs on which the live replicas do not all report one and the same accepted outcome
/// (duplicate results). A replica may lag by a few records when the run drains, so
/// differences are re-checked until none is left or [`CONVERGE_GRACE`] has passed; those
/// left are reported on stderr. Under full replication a node that lacks a job counts as
/// differing; under placement (`placed`) only the nodes that hold a job are compared.
fn duplicate_results<'a>(
    nodes: impl Iterator<Item = &'a LocalNode>,
    ids: &[String],
    placed: bool,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let clients: Vec<Client> = nodes.map(LocalNode::client).collect();
    let deadline = Instant::now() + CONVERGE_GRACE;
    loop {
        let views = clients
            .iter()
            .map(by_id)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut disagree = BTreeMap::new();
        for id in ids {
            let outcomes: std::collections::BTreeSet<_> = views
                .iter()
                .map(|v| v.get(id).map(JobStatus::outcome))
                .filter(|o| !placed || o.is_some())
                .collect();
            if outcomes.len() > 1 {
                disagree.insert(id.clone(), outcomes);
            }
        }
        if disagree.is_empty() || Instant::now() > deadline {
            for (id, outcomes) in &disagree {
                eprintln!("duplicate result: replicas report {outcomes:?} for job {id}");
            }
            return Ok(disagree.into_keys().collect());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Executions beyond the attempts each job needed: every execution appends a line to
/// `markers/<job>`.
fn duplicate_executions(
    markers: &Path,
    ids: &[String],
    done: &BTreeMap<String, JobStatus>,
) -> usize {
    ids.iter()
        .map(|id| {
            let lines = std::fs::read_to_string(markers.join(id))
                .map(|t| t.lines().count())
                .unwrap_or(0);
            lines.saturating_sub(done.get(id).map_or(1, |s| s.attempts.len().max(1)))
        })
        .sum()
}

/// Of [`duplicate_executions`], those of a job's first attempt (two nodes both starting
/// it when it was first scheduled), counted from the attempt numbers in the marker files:
/// executions of attempt 1 beyond one. The rest come with takeovers and retries.
fn duplicate_first_attempts(markers: &Path, ids: &[String]) -> usize {
    ids.iter()
        .map(|id| {
            std::fs::read_to_string(markers.join(id))
                .map(|t| t.lines().filter(|l| l.trim() == "1").count())
                .unwrap_or(0)
                .saturating_sub(1)
        })
        .sum()
}

/// A job that appends its attempt number to `markers/<job id>` (so executions can be
/// counted from the jobs' own side) and sleeps `secs`.
fn marker_job(markers: &Path, secs: f64) -> JobRequest {
    JobRequest {
        command: vec![
            "sh".into(),
            "-c".into(),
            format!(
                "echo \"$MUTUAL_ATTEMPT\" >> {}/\"$MUTUAL_JOB_ID\"; sleep {secs}",
                markers.display()
            ),
        ],
        resources: Some(Resources {
            cpu_millis: 100,
            memory_bytes: 16 << 20,
            gpus: 0,
        }),
        ..JobRequest::default()
    }
}

/// A deterministic shuffle (xorshift from `seed`): the same order for the same run.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    for i in (1..items.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        items.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

fn by_id(c: &Client) -> anyhow::Result<BTreeMap<String, JobStatus>> {
    Ok(c.jobs(None)?
        .into_iter()
        .map(|s| (s.id.clone(), s))
        .collect())
}

/// A client that tries the nodes in order and remembers the first that answers, as a
/// user with a list of members would.
struct FailoverClient {
    nodes: Vec<Client>,
    current: usize,
}

impl FailoverClient {
    /// Submits; returns the id and how long failing over took (0 if the first answered).
    fn submit(&mut self, req: &JobRequest) -> anyhow::Result<(String, Duration)> {
        let began = Instant::now();
        let mut failed = false;
        for k in 0..self.nodes.len() {
            let i = (self.current + k) % self.nodes.len();
            match self.nodes[i].submit(req) {
                Ok(st) => {
                    self.current = i;
                    let took = if failed {
                        began.elapsed()
                    } else {
                        Duration::ZERO
                    };
                    return Ok((st.id, took));
                }
                Err(mutual::client::ClientError::Unreachable { .. }) => failed = true,
                Err(e) => return Err(e.into()),
            }
        }
        bail!("no node accepted the submission")
    }
}

/// Seconds since the start; queued, running, succeeded; whether the entry node is up.
type Sample = (f64, [usize; 3], bool);

fn e1(a: E1Args) -> anyhow::Result<()> {
    let scale = a.scale.unwrap_or(if a.quick { 0.1 } else { 1.0 });
    let s = |secs: f64| Duration::from_secs_f64(secs * scale);
    let bin = mutual_bin()?;
    let root = tempfile::tempdir()?;
    let markers = root.path().join("markers");
    std::fs::create_dir_all(&markers)?;
    std::fs::create_dir_all(&a.out)?;

    // The entry node runs nothing (jobs need role=agent); it only takes requests.
    let base = ["--containers", "off", "--slots", "2"];
    let entry_dir = root.path().join("entry");
    let mut entry = LocalNode::start(&bin, &entry_dir, None, &base)?;
    let mut agents = Vec::new();
    for i in 0..a.agents {
        let mut args = base.to_vec();
        args.extend(["--label", "role=agent"]);
        agents.push(LocalNode::start(
            &bin,
            &root.path().join(format!("agent{i}")),
            Some(&entry.ticket),
            &args,
        )?);
    }
    let observer = agents[0].client();
    let deadline = Instant::now() + Duration::from_secs(60);
    while observer.nodes()?.iter().filter(|n| n.alive).count() < a.agents + 1 {
        if Instant::now() > deadline {
            bail!("the cluster did not form");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let job_s = 30.0 * scale;
    let req = JobRequest {
        labels: [("role".to_string(), "agent".to_string())].into(),
        ..marker_job(&markers, job_s)
    };
    let mut client = FailoverClient {
        nodes: std::iter::once(entry.client())
            .chain(agents.iter().map(LocalNode::client))
            .collect(),
        current: 0,
    };

    // Sample queued / running / succeeded as a live agent sees them.
    let ids: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::new()));
    let entry_up = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let sampler = {
        let (ids, samples, entry_up, stop, obs) = (
            ids.clone(),
            samples.clone(),
            entry_up.clone(),
            stop.clone(),
            agents[0].client(),
        );
        let period = Duration::from_secs_f64(scale.max(0.2));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(all) = by_id(&obs) {
                    let ids = ids.lock().map(|g| g.clone()).unwrap_or_default();
                    let mut n = [0usize; 3];
                    for id in &ids {
                        match all.get(id).map(|s| s.state.as_str()) {
                            Some("queued") | None => n[0] += 1,
                            Some("running") => n[1] += 1,
                            Some("succeeded") => n[2] += 1,
                            _ => {}
                        }
                    }
                    if let Ok(mut v) = samples.lock() {
                        v.push((
                            t0.elapsed().as_secs_f64(),
                            n,
                            entry_up.load(Ordering::Relaxed),
                        ));
                    }
                }
                std::thread::sleep(period);
            }
        })
    };
    let add = |id: String| {
        if let Ok(mut v) = ids.lock() {
            v.push(id);
        }
    };
    for _ in 0..50 {
        add(client.submit(&req)?.0);
    }
    let at = |secs: f64| {
        let t = s(secs);
        let now = t0.elapsed();
        if t > now {
            std::thread::sleep(t - now);
        }
    };
    at(75.0);
    entry.kill();
    entry_up.store(false, Ordering::Relaxed);
    let killed_at = t0.elapsed().as_secs_f64();
    let mut failover_ms: f64 = 0.0;
    let mut during_outage = 0;
    for k in 0..10 {
        at(80.0 + 2.0 * f64::from(k));
        let (id, took) = client.submit(&req)?;
        failover_ms = failover_ms.max(took.as_secs_f64() * 1000.0);
        during_outage += 1;
        add(id);
    }
    at(105.0);
    entry = LocalNode::start(&bin, &entry_dir, None, &base)?;
    let restarted_at = Instant::now();
    entry_up.store(true, Ordering::Relaxed);
    let back_at = t0.elapsed().as_secs_f64();
    // Caught up: it reports every job exactly as a live agent does at the same moment.
    let all_ids = ids.lock().map(|g| g.clone()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    let catch_up_ms = loop {
        if let (Ok(theirs), Ok(ours)) = (by_id(&entry.client()), by_id(&observer))
            && all_ids.iter().all(|id| {
                theirs.get(id).map(JobStatus::outcome) == ours.get(id).map(JobStatus::outcome)
            })
        {
            break Some(restarted_at.elapsed().as_millis() as u64);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    let deadline = Instant::now() + s(400.0).max(Duration::from_secs(120));
    let done = loop {
        let all = by_id(&observer)?;
        if all_ids
            .iter()
            .all(|id| all.get(id).is_some_and(is_terminal))
        {
            break all;
        }
        if Instant::now() > deadline {
            bail!("jobs did not all end");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // And it converges on the final outcome of every job.
    let deadline = Instant::now() + Duration::from_secs(60);
    let converged = loop {
        if let Ok(theirs) = by_id(&entry.client())
            && all_ids.iter().all(|id| {
                theirs.get(id).map(JobStatus::outcome) == done.get(id).map(JobStatus::outcome)
            })
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(s(2.0));
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();

    let disagree = duplicate_results(
        std::iter::once(&entry).chain(agents.iter()),
        &all_ids,
        false,
    )?;
    let succeeded = all_ids
        .iter()
        .filter(|id| done.get(*id).is_some_and(|s| s.state == "succeeded"))
        .count();
    let duplicate_executions = duplicate_executions(&markers, &all_ids, &done);

    let samples = samples.lock().map(|g| g.clone()).unwrap_or_default();
    let rows: Vec<Vec<String>> = samples
        .iter()
        .map(|(t, n, up)| {
            vec![
                format!("{t:.2}"),
                n[0].to_string(),
                n[1].to_string(),
                n[2].to_string(),
                u8::from(*up).to_string(),
            ]
        })
        .collect();
    csv(
        &a.out.join("e1.csv"),
        &["t_s", "queued", "running", "succeeded", "entry_up"],
        &rows,
    )?;
    let series = |k: usize, label: &str| Series {
        label: label.to_string(),
        points: samples.iter().map(|(t, n, _)| (*t, n[k] as f64)).collect(),
    };
    line_chart(
        &a.out.join("e1.png"),
        &Chart {
            title: &format!(
                "E1: entry node killed and restarted ({} agents, time scale {scale})",
                a.agents
            ),
            x: "seconds since the first submission",
            y: "jobs (as a live agent sees them)",
            series: vec![
                series(0, "queued"),
                series(1, "running"),
                series(2, "succeeded"),
            ],
            shade: Some((killed_at, back_at, "entry node down")),
        },
    )?;
    let out = json!({
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "scale": scale,
        "agents": a.agents,
        "jobs": all_ids.len(),
        "job_seconds": job_s,
        "success_rate": succeeded as f64 / all_ids.len() as f64,
        "duplicate_results": disagree.len(),
        "duplicate_executions": duplicate_executions,
        "submissions_during_outage": 10,
        "submissions_during_outage_accepted": during_outage,
        "client_failover_max_ms": failover_ms.round(),
        "restarted_node_converged": converged,
        "restarted_node_catch_up_ms": catch_up_ms,
        "entry_killed_at_s": killed_at,
        "entry_restarted_at_s": back_at,
        "pass": succeeded == all_ids.len() && disagree.is_empty() && during_outage == 10 && converged,
    });
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    write(&a.out.join("e1.json"), &text)?;
    drop(entry);
    drop(agents);
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, format!("{text}\n")).with_context(|| format!("writing {}", path.display()))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn pct(v: &[f64], p: f64) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (!s.is_empty()).then(|| s[((s.len() - 1) as f64 * p).round() as usize])
}
