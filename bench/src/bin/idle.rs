//! What idle nodes cost: N hosted nodes (`mutual host`, `--per-process` to a process) that
//! run no job, measured once every node sees all of them alive and they had `--settle-s`
//! to quiet down.
//!
//! Over a `--window-s` window it reads, per node: CPU (the host processes' user + system
//! time over N), sync messages and bytes (each node's `/metrics`, sent + received), UDP
//! datagrams the machine received (`/proc/net/snmp`, loopback carries only this run),
//! context switches (every thread of the host processes) and resident memory. An idle
//! node's cost decides how many nodes one machine holds: E2 at 500 agents needs it small.
//!
//! `cargo run --release -p mutual-bench --bin idle -- --nodes 100,200` writes
//! `bench/results/idle.json`; `--mutual PATH --label before` measures another build. A
//! cluster that does not form (a node cannot join in time) is reported as such, with how
//! long it tried; one that forms also reports the CPU its forming took and the false death
//! judgements (every node is alive throughout, so every judgement is false).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use mutual::client::metric;
use mutual::harness::{LocalNode, start_hosted_cluster};
use mutual_bench::{
    HostedArgs, host_pids, proc_number, process_cpu_s, process_rss_mib, sync_messages,
};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "CPU, traffic and memory of idle hosted nodes, by cluster size")]
struct Args {
    /// Cluster sizes to measure, one after the other.
    #[arg(long, value_delimiter = ',', default_value = "50,100,200")]
    nodes: Vec<usize>,
    /// Nodes per `mutual host` process.
    #[arg(long, default_value_t = 100)]
    per_process: usize,
    /// Seconds to wait after every node sees all alive, before measuring.
    #[arg(long, default_value_t = 15)]
    settle_s: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 30)]
    window_s: u64,
    #[command(flatten)]
    hosted: HostedArgs,
}

/// One reading of everything the window compares.
struct Reading {
    cpu_s: f64,
    msgs: u64,
    bytes: u64,
    udp_in: u64,
    ctx_switches: u64,
}

/// `Udp: InDatagrams` of `/proc/net/snmp`.
fn udp_in_datagrams() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp")?;
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next(), udp.next());
    let (names, values) = names
        .zip(values)
        .context("no Udp lines in /proc/net/snmp")?;
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InDatagrams")
        .and_then(|(_, v)| v.parse().ok())
        .context("no Udp InDatagrams in /proc/net/snmp")
}

/// Voluntary and involuntary context switches of every thread of `pid`.
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut sum = 0.0;
    for task in tasks.flatten() {
        let status = task.path().join("status");
        let status = status.to_string_lossy();
        for key in ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"] {
            sum += proc_number(&status, key).unwrap_or(0.0);
        }
    }
    sum as u64
}

fn read(nodes: &[LocalNode], pids: &[u32]) -> Result<Reading> {
    let (mut msgs, mut bytes) = (0, 0);
    for n in nodes {
        let text = n.client().metrics().context("reading a node's /metrics")?;
        msgs += sync_messages(&text);
        bytes +=
            metric(&text, "mutual_sync_bytes_sent") + metric(&text, "mutual_sync_bytes_received");
    }
    Ok(Reading {
        cpu_s: pids.iter().filter_map(|p| process_cpu_s(*p)).sum(),
        msgs,
        bytes,
        udp_in: udp_in_datagrams()?,
        ctx_switches: pids.iter().map(|p| context_switches(*p)).sum(),
    })
}

fn measure(bin: &Path, a: &Args, n: usize) -> Result<Value> {
    let root = tempfile::Builder::new().prefix("mutual-idle-").tempdir()?;
    let started = std::time::Instant::now();
    let nodes = match start_hosted_cluster(bin, root.path(), n, a.per_process, &a.hosted.node_arg) {
        Ok(nodes) => nodes,
        Err(e) => {
            // A cluster that cannot form is a result too: say how far it got.
            let error = format!("{:#}", anyhow::Error::from(e));
            eprintln!("{n} nodes did not form: {error}");
            return Ok(json!({
                "n": n,
                "per_process": a.per_process,
                "formed": false,
                "after_s": started.elapsed().as_secs_f64(),
                "error": error,
            }));
        }
    };
    let start_s = started.elapsed().as_secs_f64();
    let pids = host_pids(&nodes);
    let start_cpu_s: f64 = pids.iter().filter_map(|p| process_cpu_s(*p)).sum();
    eprintln!("{n} nodes all alive after {start_s:.1} s ({start_cpu_s:.1} s of CPU)");
    std::thread::sleep(Duration::from_secs(a.settle_s));
    let before = read(&nodes, &pids)?;
    std::thread::sleep(Duration::from_secs(a.window_s));
    let after = read(&nodes, &pids)?;
    let per_node_s = (n as f64) * a.window_s as f64;
    let rss_mib: f64 = pids.iter().filter_map(|p| process_rss_mib(*p)).sum();
    let alive_seen = nodes[0]
        .client()
        .nodes()
        .map(|l| l.iter().filter(|s| s.alive).count())
        .unwrap_or(0);
    let judged_dead: f64 = nodes
        .iter()
        .filter_map(|n| n.client().metrics().ok())
        .map(|t| metric(&t, "mutual_members_judged_dead_total") as f64)
        .sum();
    let row = json!({
        "n": n,
        "per_process": a.per_process,
        "formed": true,
        "start_s": start_s,
        "start_cpu_s": start_cpu_s,
        "false_death_judgements": judged_dead,
        "cpu_cores_per_node": (after.cpu_s - before.cpu_s) / per_node_s,
        "cpu_cores_total": (after.cpu_s - before.cpu_s) / a.window_s as f64,
        "msgs_per_node_s": after.msgs.saturating_sub(before.msgs) as f64 / per_node_s,
        "bytes_per_node_s": after.bytes.saturating_sub(before.bytes) as f64 / per_node_s,
        "udp_datagrams_in_per_node_s": after.udp_in.saturating_sub(before.udp_in) as f64 / per_node_s,
        "context_switches_per_node_s":
            after.ctx_switches.saturating_sub(before.ctx_switches) as f64 / per_node_s,
        "rss_mib_per_node": rss_mib / n as f64,
        "alive_seen_by_node0_at_end": alive_seen,
    });
    eprintln!("{row}");
    Ok(row)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let bin = a.hosted.bin()?;
    let mut rows = Vec::new();
    for &n in &a.nodes {
        rows.push(measure(&bin, &a, n)?);
    }
    let results = json!({
        "settle_s": a.settle_s,
        "window_s": a.window_s,
        "sizes": rows,
    });
    a.hosted.write("idle", &bin, results)
}
