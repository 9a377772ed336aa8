//! Many seeds of the simulator, for the foundation issue's safety and fault-tolerance
//! numbers: 200 seeds of 100 nodes × 1,000 jobs with the default faults, run twice to show
//! the output is byte-for-byte the same, and sweeps of harsher scenarios.
//!
//! ```text
//! cargo run --release -p mutual-bench --bin sim_seeds            # everything (~12 min on 2 cores)
//! cargo run --release -p mutual-bench --bin sim_seeds -- quick   # 20 seeds, smaller sweeps
//! ```
//!
//! Writes `bench/results/sim_seeds.json` (aggregates) and `bench/results/sim_seeds_default.jsonl`
//! (one summary per seed of the main run).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use mutual_bench::{command_line, machine, results_dir, today};
use mutual_sim::{SimConfig, Summary, run};
use serde_json::{Value, json};

/// Runs `seeds` of `base` on all cores; summaries in seed order.
fn sweep(base: &SimConfig, seeds: u64) -> Result<Vec<Summary>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Summary>>> = (0..seeds).map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k as u64 >= seeds {
                        break;
                    }
                    let summary = run(SimConfig {
                        seed: k as u64,
                        ..base.clone()
                    });
                    if let Ok(mut slot) = slots[k].lock() {
                        *slot = Some(summary);
                    }
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .ok()
                .flatten()
                .context("a simulation thread panicked")
        })
        .collect()
}

fn pct(mut v: Vec<u64>, p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[(((v.len() as f64) * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn aggregate(name: &str, base: &SimConfig, runs: &[Summary], wall_s: f64) -> Value {
    let jobs: usize = runs.iter().map(|r| r.jobs).sum();
    let succeeded: usize = runs.iter().map(|r| r.succeeded).sum();
    let executions: usize = runs.iter().map(|r| r.executions).sum();
    let dup_exec: usize = runs.iter().map(|r| r.duplicate_executions).sum();
    let failing: Vec<String> = runs
        .iter()
        .filter(|r| r.violations > 0)
        .map(|r| r.reproduce.clone())
        .collect();
    json!({
        "scenario": name,
        "config": base,
        "seeds": runs.len(),
        "wall_s": (wall_s * 10.0).round() / 10.0,
        "violations": runs.iter().map(|r| r.violations).sum::<usize>(),
        "failing_seeds": failing,
        "jobs": jobs,
        "success_rate": if jobs == 0 { 0.0 } else { succeeded as f64 / jobs as f64 },
        "failed_jobs": runs.iter().map(|r| r.failed).sum::<usize>(),
        "duplicate_results": runs.iter().map(|r| r.duplicate_results).sum::<usize>(),
        "duplicate_executions": dup_exec,
        "duplicate_executions_per_1000_jobs": if jobs == 0 { 0.0 } else { (dup_exec as f64 * 1000.0 / jobs as f64 * 10.0).round() / 10.0 },
        "duplicate_same_epoch": runs.iter().map(|r| r.duplicate_same_epoch).sum::<usize>(),
        "duplicate_after_success": runs.iter().map(|r| r.duplicate_after_success).sum::<usize>(),
        "jobs_with_two_valid_successes": runs.iter().map(|r| r.jobs_with_two_valid_successes).sum::<usize>(),
        "executions": executions,
        "takeovers": runs.iter().map(|r| r.takeovers).sum::<usize>(),
        "mttr_p50_ms_median_over_seeds": pct(runs.iter().map(|r| r.mttr_p50_ms).collect(), 0.5),
        "mttr_p95_ms_median_over_seeds": pct(runs.iter().map(|r| r.mttr_p95_ms).collect(), 0.5),
        "mttr_p95_ms_worst_seed": runs.iter().map(|r| r.mttr_p95_ms).max().unwrap_or(0),
        "mttr_max_ms": runs.iter().map(|r| r.mttr_max_ms).max().unwrap_or(0),
    })
}

fn main() -> Result<()> {
    let quick = std::env::args().nth(1).as_deref() == Some("quick");
    let d = SimConfig::default();
    let main_seeds = if quick { 20 } else { 200 };
    let side_seeds = if quick { 5 } else { 40 };

    let base = SimConfig {
        nodes: 100,
        jobs: 1_000,
        ..d.clone()
    };
    let t = Instant::now();
    let first = sweep(&base, main_seeds)?;
    let first_wall = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let second = sweep(&base, main_seeds)?;
    let second_wall = t.elapsed().as_secs_f64();
    let lines = |runs: &[Summary]| -> Result<String> {
        let mut s = String::new();
        for r in runs {
            s.push_str(&serde_json::to_string(r)?);
            s.push('\n');
        }
        Ok(s)
    };
    let a = lines(&first)?;
    let identical = a == lines(&second)?;
    eprintln!("default: {main_seeds} seeds twice, identical: {identical}");

    let mut scenarios = vec![aggregate(
        "100x1000 default faults",
        &base,
        &first,
        first_wall,
    )];
    let sides: Vec<(&str, SimConfig)> = vec![
        (
            "100x1000 10% killed only",
            SimConfig {
                restart_percent: 0.0,
                loss_percent: 0.0,
                dup_percent: 0.0,
                partitions: 0,
                ..base.clone()
            },
        ),
        (
            "100x1000 40% killed + default faults",
            SimConfig {
                kill_percent: 40.0,
                ..base.clone()
            },
        ),
        (
            "100x1000 60% killed + default faults",
            SimConfig {
                kill_percent: 60.0,
                ..base.clone()
            },
        ),
        (
            "50x500 five partitions up to 4 s",
            SimConfig {
                nodes: 50,
                jobs: 500,
                partitions: 5,
                partition_max_ms: 4_000,
                ..d.clone()
            },
        ),
        (
            "50x500 clocks skewed +-240 ms, 1000 ppm drift, 20% executions fail",
            SimConfig {
                nodes: 50,
                jobs: 500,
                skew_ms: 240,
                drift_ppm: 1_000,
                settle_ms: 40,
                fail_percent: 20.0,
                ..d.clone()
            },
        ),
        (
            "20x200 real automerge documents end to end",
            SimConfig {
                nodes: 20,
                jobs: 200,
                automerge: true,
                ..d.clone()
            },
        ),
    ];
    for (name, cfg) in sides {
        let t = Instant::now();
        let runs = sweep(&cfg, side_seeds)?;
        let wall = t.elapsed().as_secs_f64();
        eprintln!(
            "{name}: {} violations",
            runs.iter().map(|r| r.violations).sum::<usize>()
        );
        scenarios.push(aggregate(name, &cfg, &runs, wall));
    }

    let out = json!({
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "note": "Simulated time: MTTR is from a holder's kill to its job running on another node, in the simulator's milliseconds (failure detector: 100 ms probes, 500 ms timeout). Each scenario's seeds are 0..N.",
        "determinism": {
            "runs": 2,
            "seeds": main_seeds,
            "byte_identical": identical,
            "wall_s": [(first_wall * 10.0).round() / 10.0, (second_wall * 10.0).round() / 10.0],
        },
        "scenarios": scenarios,
    });
    std::fs::create_dir_all(results_dir())?;
    let suffix = if quick { "_quick" } else { "" };
    std::fs::write(
        results_dir().join(format!("sim_seeds{suffix}.json")),
        serde_json::to_string_pretty(&out)? + "\n",
    )?;
    std::fs::write(
        results_dir().join(format!("sim_seeds_default{suffix}.jsonl")),
        a,
    )?;
    anyhow::ensure!(identical, "two runs of the same seeds differed");
    Ok(())
}
