//! Live-log latency: a line written by a running job → printed by `mutual logs -f`.
//!
//! Three real nodes; a job prints its wall clock (ns) every 20 ms; `mutual logs -f` runs
//! against a node that is not the job's agent, and each line's latency is the time it was
//! read minus the time it carries (one machine, one clock).
//!
//! `cargo build --release -p mutual && cargo run --release -p mutual-bench --bin logs`

use std::io::{BufRead, BufReader};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use mutual::harness::start_cluster;
use mutual_bench::{command_line, machine, mutual_bin, results_dir, today};
use mutual_core::{JobRequest, Resources};
use serde_json::json;

const LINES: usize = 300;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn main() -> anyhow::Result<()> {
    let bin = mutual_bin()?;
    let root = tempfile::tempdir()?;
    let nodes = start_cluster(&bin, root.path(), 3, &["--containers", "off"])?;
    let c = nodes[0].client();
    let script = format!("for i in $(seq 1 {LINES}); do date +%s%N; sleep 0.02; done");
    let id = c
        .submit(&JobRequest {
            command: vec!["sh".into(), "-c".into(), script],
            resources: Some(Resources {
                cpu_millis: 100,
                memory_bytes: 16 << 20,
                gpus: 0,
            }),
            ..JobRequest::default()
        })?
        .id;
    let holder = loop {
        let s = c.job(&id)?;
        if s.state == "running"
            && let Some(n) = s.node
        {
            break n;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let asked = nodes
        .iter()
        .find(|n| n.id().as_deref() != Some(holder.as_str()))
        .context("a node that is not the agent")?;
    let mut child = std::process::Command::new(&bin)
        .args(["logs", &id, "--follow", "--node", &asked.http])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut lat_ms: Vec<f64> = Vec::new();
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line?;
        let Ok(ts) = line.trim().parse::<u128>() else {
            continue;
        };
        lat_ms.push(now_ns().saturating_sub(ts) as f64 / 1e6);
    }
    child.wait()?;
    lat_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| lat_ms[((lat_ms.len() - 1) as f64 * p).round() as usize];
    if lat_ms.is_empty() {
        bail!("no line arrived");
    }
    let out = json!({
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "lines": lat_ms.len(),
        "log_line_latency_p50_ms": pct(0.5),
        "log_line_latency_p99_ms": pct(0.99),
        "log_line_latency_max_ms": pct(1.0),
        "note": "3 nodes, loopback, a job printing its clock every 20 ms, `mutual logs -f` against a node that is not the agent; the agent polls the log file every 20 ms",
    });
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    std::fs::write(results_dir().join("logs.json"), format!("{text}\n"))?;
    Ok(())
}
