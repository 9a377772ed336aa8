//! Real clusters on this machine: scheduling wait, MTTR, throughput, idle memory, and 100
//! nodes at once. Every node is a `mutual node` process (release build) on loopback; the
//! timings come from the nodes' own records (the HLC of each Start record) and the
//! client's wall clock, which is the same clock on one machine.
//!
//! Run: `cargo build --release -p mutual && cargo run --release -p mutual-bench --bin cluster`
//! (`-- --quick` for a smaller run). Writes `bench/results/cluster.json`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use mutual::client::Client;
use mutual::harness::{LocalNode, start_cluster};
use mutual_bench::{command_line, machine, mutual_bin, results_dir, today};
use mutual_core::{JobRequest, Resources};
use serde_json::json;

/// Jobs submitted, one at a time, to the big cluster.
const BIG_JOBS: usize = 100;
/// How long the big cluster sits idle while false death judgements are counted.
const IDLE_SECONDS: u64 = 20;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn job(cmd: &[&str]) -> JobRequest {
    JobRequest {
        command: cmd.iter().map(|s| s.to_string()).collect(),
        resources: Some(Resources {
            cpu_millis: 10,
            memory_bytes: 1 << 20,
            gpus: 0,
        }),
        ..JobRequest::default()
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn wait_done(
    c: &Client,
    ids: &[String],
    secs: u64,
) -> anyhow::Result<BTreeMap<String, mutual::types::JobStatus>> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let all: BTreeMap<_, _> = c
            .jobs(None)?
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        if ids.iter().all(|i| {
            all.get(i)
                .is_some_and(|s| matches!(s.state.as_str(), "succeeded" | "failed" | "cancelled"))
        }) {
            return Ok(all);
        }
        if Instant::now() > deadline {
            bail!("jobs did not finish in {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn judged_dead_total(nodes: &[LocalNode]) -> u64 {
    nodes
        .iter()
        .filter(|n| n.is_running())
        .filter_map(|n| n.client().metrics().ok())
        .map(|m| mutual::client::metric(&m, "mutual_members_judged_dead"))
        .sum()
}

/// Submit → process start, one job at a time, round-robin over the nodes.
fn scheduling_wait(nodes: &[LocalNode], n: usize) -> anyhow::Result<serde_json::Value> {
    let mut ids = Vec::new();
    let mut returned = Vec::new();
    for i in 0..n {
        let c = nodes[i % nodes.len()].client();
        let st = c.submit(&job(&["true"]))?;
        returned.push(now_ms());
        ids.push(st.id);
        std::thread::sleep(Duration::from_millis(20));
    }
    let done = wait_done(&nodes[0].client(), &ids, 60)?;
    let mut waits: Vec<f64> = ids
        .iter()
        .zip(&returned)
        .filter_map(|(id, r)| {
            let s = done[id].attempts.first()?.started_at_ms?;
            Some(s as f64 - *r as f64)
        })
        .collect();
    let dup: usize = done.values().filter(|s| s.attempts.len() > 1).count();
    Ok(json!({
        "jobs": n,
        "scheduling_wait_p50_ms": pct(&mut waits, 0.5),
        "scheduling_wait_p99_ms": pct(&mut waits, 0.99),
        "scheduling_wait_max_ms": pct(&mut waits, 1.0),
        "jobs_with_more_than_one_attempt": dup,
        "note": "wait = HLC ms of the Start record minus the client's clock when submit returned; negative means the job started before the HTTP answer arrived",
    }))
}

/// Kill the node running the most jobs; MTTR = new attempt's start − kill.
fn mttr(
    nodes: &mut [LocalNode],
    rounds: usize,
    jobs_per_round: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut samples = Vec::new();
    let mut detection = Vec::new();
    for round in 0..rounds {
        let live: Vec<usize> = (0..nodes.len())
            .filter(|i| nodes[*i].is_running())
            .collect();
        let obs = nodes[live[0]].client();
        let ids: Vec<String> = (0..jobs_per_round)
            .map(|_| obs.submit(&job(&["sleep", "20"])).map(|s| s.id))
            .collect::<Result<_, _>>()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let running = loop {
            let r: Vec<_> = obs
                .jobs(Some("running"))?
                .into_iter()
                .filter(|s| ids.contains(&s.id))
                .collect();
            if r.len() == ids.len() {
                break r;
            }
            if Instant::now() > deadline {
                bail!("round {round}: jobs did not all start");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut per_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for s in &running {
            per_node
                .entry(s.node.clone().unwrap_or_default())
                .or_default()
                .push(s.id.clone());
        }
        let obs_id = nodes[live[0]].id();
        let (victim_id, victim_jobs) = per_node
            .into_iter()
            .filter(|(n, _)| Some(n) != obs_id.as_ref())
            .max_by_key(|(_, j)| j.len())
            .context("no victim")?;
        let victim = live
            .iter()
            .copied()
            .find(|i| nodes[*i].id().as_deref() == Some(victim_id.as_str()))
            .context("victim not ours")?;
        let t_kill = now_ms();
        nodes[victim].kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all: BTreeMap<_, _> = obs
                .jobs(None)?
                .into_iter()
                .map(|s| (s.id.clone(), s))
                .collect();
            let restarted: Vec<u64> = victim_jobs
                .iter()
                .filter_map(|j| {
                    all.get(j)?
                        .attempts
                        .iter()
                        .filter(|a| a.node != victim_id)
                        .filter_map(|a| a.started_at_ms)
                        .find(|s| *s >= t_kill)
                })
                .collect();
            if restarted.len() == victim_jobs.len() {
                samples.extend(restarted.iter().map(|s| (*s - t_kill) as f64));
                break;
            }
            if Instant::now() > deadline {
                bail!("round {round}: takeover incomplete");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        detection.push(judged_dead_total(nodes) as f64);
        for id in &ids {
            let _ = obs.cancel(id);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let n = samples.len();
    Ok(json!({
        "kills": rounds,
        "jobs_taken_over": n,
        "mttr_p50_ms": pct(&mut samples, 0.5),
        "mttr_p95_ms": pct(&mut samples, 0.95),
        "mttr_max_ms": pct(&mut samples, 1.0),
        "note": "MTTR = HLC ms of the takeover's Start record minus the wall clock at SIGKILL",
    }))
}

/// As many trivial jobs as possible, from four client threads over all nodes.
fn throughput(nodes: &[LocalNode], total: usize) -> anyhow::Result<serde_json::Value> {
    let urls: Vec<String> = nodes
        .iter()
        .filter(|n| n.is_running())
        .map(|n| n.http.clone())
        .collect();
    let threads = 4;
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let urls = urls.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<String>> {
                let mut ids = Vec::new();
                for i in (t..total).step_by(threads) {
                    let c = Client::new(&urls[i % urls.len()], None);
                    ids.push(c.submit(&job(&["true"]))?.id);
                }
                Ok(ids)
            })
        })
        .collect();
    let mut ids = Vec::new();
    for h in handles {
        ids.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
        );
    }
    let submitted_s = start.elapsed().as_secs_f64();
    let done = wait_done(&Client::new(&urls[0], None), &ids, 600)?;
    let elapsed = start.elapsed().as_secs_f64();
    let ok = ids.iter().filter(|i| done[*i].state == "succeeded").count();
    let executions: usize = ids.iter().map(|i| done[i].attempts.len()).sum();
    Ok(json!({
        "jobs": total,
        "succeeded": ok,
        "executions": executions,
        "submit_seconds": submitted_s,
        "all_done_seconds": elapsed,
        "throughput_jobs_per_s": total as f64 / elapsed,
        "submit_rate_jobs_per_s": total as f64 / submitted_s,
    }))
}

fn rss_of(nodes: &[LocalNode]) -> Vec<f64> {
    nodes
        .iter()
        .filter_map(|n| n.child.as_ref().and_then(|c| rss_kib(c.id())))
        .map(|k| k as f64 / 1024.0)
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--big-only N`: only the many-nodes part, with N nodes (for diagnosis).
    let big_only: Option<usize> = args
        .iter()
        .position(|a| a == "--big-only")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok());
    let bin = mutual_bin()?;
    if let Some(n) = big_only {
        let root = tempfile::tempdir()?;
        let v = big_cluster(&bin, &root.path().join("big"), n)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let root = tempfile::tempdir()?;
    let mut out = serde_json::Map::new();
    out.insert("command".into(), json!(command_line()));
    out.insert("date".into(), json!(today()));
    out.insert("machine".into(), serde_json::to_value(machine())?);

    eprintln!("10 nodes: idle memory");
    let mut nodes = start_cluster(&bin, &root.path().join("ten"), 10, &["--slots", "8"])?;
    std::thread::sleep(Duration::from_secs(3));
    let mut rss = rss_of(&nodes);
    out.insert(
        "idle_rss_mib_10_nodes".into(),
        json!({"median": pct(&mut rss, 0.5), "max": pct(&mut rss, 1.0)}),
    );
    eprintln!("10 nodes: scheduling wait");
    out.insert(
        "scheduling_wait_10_nodes".into(),
        scheduling_wait(&nodes, if quick { 50 } else { 300 })?,
    );
    eprintln!("10 nodes: throughput");
    out.insert(
        "throughput_10_nodes".into(),
        throughput(&nodes, if quick { 300 } else { 2000 })?,
    );
    eprintln!("10 nodes: MTTR");
    let before = judged_dead_total(&nodes);
    out.insert(
        "mttr_10_nodes".into(),
        mttr(&mut nodes, if quick { 1 } else { 3 }, 20)?,
    );
    let _ = before;
    drop(nodes);

    let big = if quick { 30 } else { 100 };
    eprintln!("{big} nodes on one machine");
    let t = Instant::now();
    match big_cluster(&bin, &root.path().join("hundred"), big) {
        Ok(v) => out.insert(format!("cluster_of_{big}_nodes"), v),
        Err(e) => out.insert(
            format!("cluster_of_{big}_nodes"),
            json!({"error": format!("{e:#}"), "after_seconds": t.elapsed().as_secs_f64()}),
        ),
    };
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    let name = if quick {
        "cluster_quick.json"
    } else {
        "cluster.json"
    };
    write(&results_dir().join(name), &text)?;
    Ok(())
}

fn big_cluster(bin: &Path, root: &Path, big: usize) -> anyhow::Result<serde_json::Value> {
    let t = Instant::now();
    let nodes = start_cluster(bin, root, big, &["--slots", "2"])?;
    let formed = t.elapsed().as_secs_f64();
    let judged_forming = judged_dead_total(&nodes);
    std::thread::sleep(Duration::from_secs(IDLE_SECONDS));
    let judged_idle = judged_dead_total(&nodes) - judged_forming;
    let mut rss = rss_of(&nodes);
    let c = nodes[big / 2].client();
    let t_jobs = Instant::now();
    let ids: Vec<String> = (0..BIG_JOBS)
        .map(|_| c.submit(&job(&["true"])).map(|s| s.id))
        .collect::<Result<_, _>>()?;
    let submit_s = t_jobs.elapsed().as_secs_f64();
    let outcome = match wait_done(&c, &ids, 120) {
        Ok(done) => json!({
            "succeeded": ids.iter().filter(|i| done[*i].state == "succeeded").count(),
            "all_done_seconds": t_jobs.elapsed().as_secs_f64(),
        }),
        Err(e) => {
            let seen = c.jobs(Some("succeeded")).map(|l| l.len()).unwrap_or(0);
            json!({"error": format!("{e:#}"), "succeeded_when_given_up": seen})
        }
    };
    Ok(json!({
        "submit_seconds": submit_s,
        "jobs_outcome": outcome,
        "formed_seconds": formed,
        "idle_rss_mib_median": pct(&mut rss, 0.5),
        "idle_rss_mib_max": pct(&mut rss, 1.0),
        "jobs": ids.len(),
        "death_judgements_while_forming": judged_forming,
        "death_judgements_in_idle_seconds": {"seconds": IDLE_SECONDS, "judgements": judged_idle},
        "death_judgements_while_running_jobs": judged_dead_total(&nodes) - judged_forming - judged_idle,
    }))
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, format!("{text}\n")).with_context(|| format!("writing {}", path.display()))
}
