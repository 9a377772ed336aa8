//! E5, partitions and clock skew (ours; the proposal has none): real nodes whose clocks
//! are skewed by up to ±S (`mutual node --clock-skew`), split into two halves while jobs
//! run (`POST /v1/debug/partition` on every node), then healed.
//!
//! Both halves keep accepting and running jobs; each judges the other dead and takes over
//! its running jobs, so work runs twice (duplicate executions are the price of staying
//! available). What must hold: after the heal, every node accepts one and the same result
//! per job (duplicate results 0) and no job is lost.
//!
//! **Time to converge** is from the heal until every node's view holds everything both
//! halves knew at the heal: for every job either half knew, at least as many attempts as
//! the furthest half, and an end wherever a half had one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use mutual::client::metric;
use mutual::harness::{LocalNode, start_cluster_with};
use mutual::types::JobStatus;
use mutual_bench::plot::{Chart, Series, csv, line_chart};
use mutual_bench::{command_line, machine, mutual_bin, results_dir, today};
use serde_json::json;

use super::{
    by_id, duplicate_executions, duplicate_results, is_terminal, marker_job, shuffle, write,
};

#[derive(clap::Args)]
pub struct E5Args {
    /// A small run: 10 nodes, 4 jobs each, a 5 s split.
    #[arg(long)]
    quick: bool,
    /// Nodes [default: 20, or 10 with --quick].
    #[arg(long)]
    nodes: Option<usize>,
    /// Jobs per node submitted before the split [default: 6, or 4 with --quick].
    #[arg(long)]
    jobs_per_node: Option<usize>,
    /// Seconds each job sleeps.
    #[arg(long, default_value_t = 4.0)]
    job_seconds: f64,
    /// Largest clock errors to run, one configuration each: node clocks are spread evenly
    /// over ±this many ms [default: 250 (the experiment) and 400 (beyond the nodes' 500 ms
    /// drift bound), or 250 with --quick].
    #[arg(long, value_delimiter = ',')]
    skew_ms: Vec<u64>,
    /// Seconds the cluster stays split [default: 10, or 5 with --quick].
    #[arg(long)]
    split_seconds: Option<f64>,
    /// The nodes' `--max-clock-drift` (records stamped further ahead are refused until the
    /// clock catches up) [default: the node's own default, 500ms].
    #[arg(long)]
    max_clock_drift: Option<String>,
    /// Where the CSV, PNG and JSON go.
    #[arg(long, default_value_os_t = results_dir())]
    out: PathBuf,
}

/// Whether `theirs` holds everything in `known` (the two halves' views at the heal).
fn dominates(
    theirs: &BTreeMap<String, JobStatus>,
    known: &BTreeMap<String, (usize, bool)>,
) -> bool {
    known.iter().all(|(id, (attempts, ended))| {
        theirs
            .get(id)
            .is_some_and(|s| s.attempts.len() >= *attempts && (!ended || is_terminal(s)))
    })
}

/// Seconds since the start; [running, succeeded] as a node of half A and of half B see them.
type Sample = (f64, [usize; 2], [usize; 2]);

pub fn run(a: E5Args) -> anyhow::Result<()> {
    let skews = if a.skew_ms.is_empty() {
        if a.quick { vec![250] } else { vec![250, 400] }
    } else {
        a.skew_ms.clone()
    };
    std::fs::create_dir_all(&a.out)?;
    let mut configurations = Vec::new();
    let mut rows = Vec::new();
    for (k, &skew) in skews.iter().enumerate() {
        let png = if k == 0 {
            a.out.join("e5.png")
        } else {
            a.out.join(format!("e5-skew{skew}.png"))
        };
        let (summary, samples) = run_one(&a, skew, &png)?;
        eprintln!("skew ±{skew} ms: {summary}");
        configurations.push(summary);
        rows.extend(samples);
    }
    csv(
        &a.out.join("e5.csv"),
        &[
            "skew_ms",
            "t_s",
            "running_seen_in_a",
            "succeeded_seen_in_a",
            "running_seen_in_b",
            "succeeded_seen_in_b",
        ],
        &rows,
    )?;
    let out = json!({
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "configurations": configurations,
        "note": "time_to_converge: from the heal until every node holds everything both halves knew at the heal (per node; max and median over nodes, each node polled with one job-list call per ~20 ms round)",
    });
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    write(&a.out.join("e5.json"), &text)
}

/// One configuration: returns its summary and its samples as CSV rows.
fn run_one(
    a: &E5Args,
    skew_ms: u64,
    png: &Path,
) -> anyhow::Result<(serde_json::Value, Vec<Vec<String>>)> {
    let n = a.nodes.unwrap_or(if a.quick { 10 } else { 20 }).max(2);
    let per = a.jobs_per_node.unwrap_or(if a.quick { 4 } else { 6 });
    let split_s = a.split_seconds.unwrap_or(if a.quick { 5.0 } else { 10.0 });
    let bin = mutual_bin()?;
    let root = tempfile::tempdir()?;
    let markers = root.path().join("markers");
    std::fs::create_dir_all(&markers)?;

    // Clocks spread evenly over ±skew, in shuffled order so each half gets fast and slow ones.
    let s = skew_ms as f64;
    let mut skews: Vec<i64> = (0..n)
        .map(|i| (-s + 2.0 * s * i as f64 / (n - 1) as f64).round() as i64)
        .collect();
    shuffle(&mut skews, 5);
    let nodes = start_cluster_with(&bin, root.path(), n, |i| {
        let mut args: Vec<String> = ["--containers", "off", "--slots", "2", "--fault-injection"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(format!("--clock-skew={}ms", skews[i]));
        if let Some(d) = &a.max_clock_drift {
            args.push(format!("--max-clock-drift={d}"));
        }
        args
    })?;
    let half: [Vec<usize>; 2] = [(0..n / 2).collect(), (n / 2..n).collect()];
    let node_ids: Vec<String> = nodes.iter().filter_map(LocalNode::id).collect();
    if node_ids.len() != n {
        bail!("a node did not report its id");
    }
    let req = marker_job(&markers, a.job_seconds);

    let ids: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let sampler = {
        let (ids, samples, stop) = (ids.clone(), samples.clone(), stop.clone());
        let (oa, ob) = (nodes[half[0][0]].client(), nodes[half[1][0]].client());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let count = |c: &mutual::client::Client| -> [usize; 2] {
                    let all = by_id(c).unwrap_or_default();
                    let ids = ids.lock().map(|g| g.clone()).unwrap_or_default();
                    let is = |id: &String, st: &str| all.get(id).is_some_and(|s| s.state == st);
                    [
                        ids.iter().filter(|id| is(id, "running")).count(),
                        ids.iter().filter(|id| is(id, "succeeded")).count(),
                    ]
                };
                let (ca, cb) = (count(&oa), count(&ob));
                if let Ok(mut v) = samples.lock() {
                    v.push((t0.elapsed().as_secs_f64(), ca, cb));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let add = |id: String| {
        if let Ok(mut v) = ids.lock() {
            v.push(id);
        }
    };
    for i in 0..n * per {
        add(nodes[i % n].client().submit(&req)?.id);
    }
    // Split once the first wave runs.
    let deadline = Instant::now() + Duration::from_secs(120);
    while nodes[0].client().jobs(Some("running"))?.len() < n {
        if Instant::now() > deadline {
            bail!("jobs did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let split_at = t0.elapsed().as_secs_f64();
    for (side, other) in [(0, 1), (1, 0)] {
        let block: Vec<String> = half[other].iter().map(|&i| node_ids[i].clone()).collect();
        for &i in &half[side] {
            nodes[i].client().partition(&block)?;
        }
    }
    // Both halves keep taking work: one job per node, submitted mid-split.
    let mut during = [0usize; 2];
    std::thread::sleep(Duration::from_secs_f64(split_s / 2.0));
    for (side, members) in half.iter().enumerate() {
        for &i in members {
            if let Ok(st) = nodes[i].client().submit(&req) {
                add(st.id);
                during[side] += 1;
            }
        }
    }
    let until = Duration::from_secs_f64(split_at + split_s);
    if let Some(rest) = until.checked_sub(t0.elapsed()) {
        std::thread::sleep(rest);
    }
    // What each half knew at the heal.
    let mut known: BTreeMap<String, (usize, bool)> = BTreeMap::new();
    for members in &half {
        for (id, st) in by_id(&nodes[members[0]].client())? {
            let e = known.entry(id).or_insert((0, false));
            e.0 = e.0.max(st.attempts.len());
            e.1 |= is_terminal(&st);
        }
    }
    for node in &nodes {
        node.client().partition(&[])?;
    }
    let healed = Instant::now();
    let heal_at = t0.elapsed().as_secs_f64();
    let mut caught_up: Vec<Option<u64>> = vec![None; n];
    let deadline = Instant::now() + Duration::from_secs(120);
    while caught_up.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, node) in nodes.iter().enumerate() {
            if caught_up[i].is_none() && by_id(&node.client()).is_ok_and(|v| dominates(&v, &known))
            {
                caught_up[i] = Some(healed.elapsed().as_millis() as u64);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let converge_ms = caught_up.iter().copied().collect::<Option<Vec<u64>>>();

    let all_ids = ids.lock().map(|g| g.clone()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(600);
    let done = loop {
        let all = by_id(&nodes[0].client())?;
        if all_ids
            .iter()
            .all(|id| all.get(id).is_some_and(is_terminal))
            || Instant::now() > deadline
        {
            break all;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();

    let succeeded = all_ids
        .iter()
        .filter(|id| done.get(*id).is_some_and(|s| s.state == "succeeded"))
        .count();
    let disagree = duplicate_results(nodes.iter(), &all_ids, false)?;
    let dup_exec = duplicate_executions(&markers, &all_ids, &done);
    let mut clock_rejections = 0;
    for node in &nodes {
        clock_rejections += metric(&node.client().metrics()?, "mutual_clock_rejections");
    }
    let samples = samples.lock().map(|g| g.clone()).unwrap_or_default();
    let rows: Vec<Vec<String>> = samples
        .iter()
        .map(|(t, ca, cb)| {
            vec![
                skew_ms.to_string(),
                format!("{t:.2}"),
                ca[0].to_string(),
                ca[1].to_string(),
                cb[0].to_string(),
                cb[1].to_string(),
            ]
        })
        .collect();
    let series = |label: &str, f: fn(&Sample) -> usize| Series {
        label: label.to_string(),
        points: samples.iter().map(|x| (x.0, f(x) as f64)).collect(),
    };
    line_chart(
        png,
        &Chart {
            title: &format!(
                "E5: {n} nodes, clocks within ±{skew_ms} ms, split in two for {split_s} s"
            ),
            x: "seconds since the first submission",
            y: "jobs",
            series: vec![
                series("succeeded, as half A sees them", |x| x.1[1]),
                series("succeeded, as half B sees them", |x| x.2[1]),
                series("running, as half A sees them", |x| x.1[0]),
                series("running, as half B sees them", |x| x.2[0]),
            ],
            shade: Some((split_at, heal_at, "partitioned")),
        },
    )?;
    let lost = all_ids.len() - succeeded;
    let out = json!({
        "skew_ms": skew_ms,
        "nodes": n,
        "clock_skews_ms": skews,
        "max_clock_drift": a.max_clock_drift.clone().unwrap_or_else(|| "500ms (node default)".into()),
        "jobs": all_ids.len(),
        "job_seconds": a.job_seconds,
        "split_seconds": split_s,
        "split_at_s": split_at,
        "heal_at_s": heal_at,
        "submissions_during_split_accepted": {"half_a": during[0], "half_b": during[1], "offered": n},
        "success_rate": succeeded as f64 / all_ids.len().max(1) as f64,
        "jobs_lost": lost,
        "duplicate_results": disagree.len(),
        "duplicate_executions": dup_exec,
        "time_to_converge_ms": converge_ms.as_ref().and_then(|v| v.iter().max().copied()),
        "time_to_converge_p50_ms": converge_ms.as_ref().map(|v| {
            let mut v = v.clone();
            v.sort_unstable();
            v[v.len() / 2]
        }),
        "clock_rejections": clock_rejections,
        "pass": lost == 0 && disagree.is_empty() && converge_ms.is_some(),
    });
    Ok((out, rows))
}
