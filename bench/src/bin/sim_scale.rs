//! Simulator speed and memory at growing sizes, and the fault-tolerance numbers of the
//! foundation issue, each run in its own child process so that its peak memory is its own.
//!
//! ```text
//! cargo run --release -p mutual-bench --bin sim_scale            # all sizes
//! cargo run --release -p mutual-bench --bin sim_scale -- quick   # 100 x 1,000 only
//! ```
//!
//! Writes `bench/results/sim_scale.json`. Runs whose estimated memory (bytes per replicated
//! job measured on the largest run that fitted, times nodes × jobs) exceeds what the machine
//! has available are not started; the estimate is recorded instead.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mutual_bench::{command_line, machine, mem_available_bytes, peak_rss_mib, results_dir, today};
use mutual_sim::{SimConfig, run};
use serde_json::{Value, json};

struct Case {
    name: &'static str,
    config: SimConfig,
}

fn cases(quick: bool) -> Vec<Case> {
    let d = SimConfig::default();
    let mut v = vec![
        Case {
            name: "100x1000 default faults (10% killed, 5% restarted, loss, dup, skew, 2 partitions)",
            config: SimConfig {
                nodes: 100,
                jobs: 1_000,
                ..d.clone()
            },
        },
        Case {
            name: "100x1000 10% killed only",
            config: SimConfig {
                nodes: 100,
                jobs: 1_000,
                restart_percent: 0.0,
                loss_percent: 0.0,
                dup_percent: 0.0,
                partitions: 0,
                ..d.clone()
            },
        },
    ];
    if !quick {
        v.push(Case {
            name: "1000x2000 default faults",
            config: SimConfig {
                nodes: 1_000,
                jobs: 2_000,
                ..d.clone()
            },
        });
        v.push(Case {
            name: "1000x10000 default faults",
            config: SimConfig {
                nodes: 1_000,
                jobs: 10_000,
                submit_window_ms: 30_000,
                fault_ms: 35_000,
                ..d.clone()
            },
        });
        v.push(Case {
            name: "10000x10000 default faults",
            config: SimConfig {
                nodes: 10_000,
                jobs: 10_000,
                submit_window_ms: 30_000,
                fault_ms: 35_000,
                ..d
            },
        });
    }
    v
}

/// Child mode: run one config (JSON on argv) and print the summary with wall time and memory.
fn child(config_json: &str) -> Result<()> {
    let cfg: SimConfig = serde_json::from_str(config_json)?;
    let t = Instant::now();
    let summary = run(cfg);
    let wall = t.elapsed().as_secs_f64();
    let out = json!({ "summary": summary, "wall_s": (wall * 100.0).round() / 100.0, "peak_rss_mib": peak_rss_mib().round() });
    println!("{out}");
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        return child(args.get(1).context("--child needs a config")?);
    }
    let quick = args.first().map(String::as_str) == Some("quick");
    let seeds: u64 = if quick { 3 } else { 1 };
    let exe = std::env::current_exe()?;
    let mut rows: Vec<Value> = Vec::new();
    let mut bytes_per_replica: Option<f64> = None;
    for case in cases(quick) {
        let replicas = (case.config.nodes * case.config.jobs) as f64;
        if let Some(bpr) = bytes_per_replica {
            let estimate = bpr * replicas;
            let available = mem_available_bytes() as f64 * 0.8;
            if estimate > available {
                let row = json!({
                    "case": case.name,
                    "nodes": case.config.nodes,
                    "jobs": case.config.jobs,
                    "skipped": format!(
                        "estimated peak memory {:.1} GiB ({:.0} bytes per replicated job x {} nodes x {} jobs) exceeds 80% of the {:.1} GiB available",
                        estimate / f64::from(1u32 << 30), bpr, case.config.nodes, case.config.jobs, available / 0.8 / f64::from(1u32 << 30)
                    ),
                });
                eprintln!("{row}");
                rows.push(row);
                continue;
            }
        }
        for seed in 0..seeds {
            let cfg = SimConfig {
                seed,
                ..case.config.clone()
            };
            let out = Command::new(&exe)
                .arg("--child")
                .arg(serde_json::to_string(&cfg)?)
                .output()?;
            if !out.status.success() {
                bail!(
                    "{} seed {seed} failed: {}",
                    case.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let mut v: Value = serde_json::from_slice(&out.stdout)?;
            let rss = v["peak_rss_mib"].as_f64().unwrap_or(0.0);
            if case.config.nodes >= 1_000 {
                bytes_per_replica = Some(rss * 1_048_576.0 / replicas);
            }
            v["case"] = json!(case.name);
            eprintln!(
                "{} seed {seed}: wall {} s, peak {} MiB, violations {}",
                case.name, v["wall_s"], v["peak_rss_mib"], v["summary"]["violations"]
            );
            rows.push(v);
        }
    }
    let out = json!({
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "note": "Wall time and peak RSS of one simulation process, release build, one thread. Sizes are nodes x jobs; every node holds a replica of every job (full replication).",
        "runs": rows,
    });
    let name = if quick {
        "sim_scale_quick.json"
    } else {
        "sim_scale.json"
    };
    std::fs::create_dir_all(results_dir())?;
    std::fs::write(
        results_dir().join(name),
        serde_json::to_string_pretty(&out)? + "\n",
    )?;
    Ok(())
}
