//! Replica memory per job: what holding finished jobs costs a node, with the default
//! budget of live job documents and with every document live (the behaviour before
//! `--live-docs`).
//!
//! For each budget, two real `mutual node` processes on loopback: A runs the jobs, B holds
//! a replica. B's resident memory (VmRSS) is read once the cluster is idle, then `--jobs`
//! jobs of `true` are submitted through A and, once B reports every one succeeded and the
//! nodes are idle again, read a second time. The difference per job is what a replica
//! pays to hold a finished job.
//!
//! `cargo run --release -p mutual-bench --bin doc_memory` writes
//! `bench/results/doc-memory.json`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use mutual::client::{Client, metric};
use mutual::harness::start_cluster;
use mutual_bench::{command_line, machine, mutual_bin, process_rss_mib, results_dir, today};
use mutual_core::JobRequest;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Replica memory per finished job, by live-document budget")]
struct Args {
    /// Jobs submitted per budget.
    #[arg(long, default_value_t = 5_000)]
    jobs: usize,
    /// Budgets of live documents to compare (`--live-docs` of both nodes).
    #[arg(long, value_delimiter = ',', default_value = "512,1000000")]
    live_docs: Vec<usize>,
    /// Where `doc-memory.json` goes.
    #[arg(long, default_value_os_t = results_dir())]
    out: PathBuf,
}

/// How long the nodes get to go idle before memory is read.
const SETTLE: Duration = Duration::from_secs(5);
/// How long all jobs get to finish on the replica.
const FINISH_TIMEOUT: Duration = Duration::from_secs(600);

fn succeeded(c: &Client) -> u64 {
    c.metrics()
        .map(|m| metric(&m, "mutual_jobs{state=\"succeeded\"}"))
        .unwrap_or(0)
}

fn run(jobs: usize, live_docs: usize) -> Result<serde_json::Value> {
    let bin = mutual_bin()?;
    let dir = tempfile::tempdir()?;
    let budget = live_docs.to_string();
    let flags = [
        "--slots",
        "20",
        "--live-docs",
        &budget,
        "--containers",
        "off",
    ];
    let nodes = start_cluster(&bin, dir.path(), 2, &flags)?;
    let (a, b) = (nodes[0].client(), nodes[1].client());
    let pid = nodes[1].process().context("replica pid")?.0;
    std::thread::sleep(SETTLE);
    let before = process_rss_mib(pid).context("replica memory")?;
    let job = JobRequest {
        command: vec!["true".into()],
        ..JobRequest::default()
    };
    let started = Instant::now();
    for i in 0..jobs {
        a.submit(&job)
            .with_context(|| format!("submitting job {i}"))?;
    }
    while succeeded(&b) < jobs as u64 {
        if started.elapsed() > FINISH_TIMEOUT {
            bail!(
                "only {} of {jobs} jobs succeeded on the replica",
                succeeded(&b)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let run_s = started.elapsed().as_secs_f64();
    std::thread::sleep(SETTLE);
    let after = process_rss_mib(pid).context("replica memory")?;
    let m = b.metrics()?;
    let per_job_kib = (after - before) * 1024.0 / jobs as f64;
    eprintln!(
        "--live-docs {live_docs}: replica {before:.1} -> {after:.1} MiB, {per_job_kib:.1} KiB per job ({run_s:.0} s)"
    );
    Ok(json!({
        "live_docs": live_docs,
        "jobs": jobs,
        "replica_rss_idle_mib": before,
        "replica_rss_after_mib": after,
        "replica_kib_per_job": per_job_kib,
        "docs_live": metric(&m, "mutual_docs_live"),
        "doc_evictions": metric(&m, "mutual_doc_evictions"),
        "doc_loads": metric(&m, "mutual_doc_loads"),
        "run_s": run_s,
    }))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut rows = Vec::new();
    for &budget in &args.live_docs {
        rows.push(run(args.jobs, budget)?);
    }
    let out = json!({
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "what": "resident memory a replica gains per finished job it holds, by --live-docs",
        "results": rows,
    });
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("doc-memory.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
    println!("{}", path.display());
    Ok(())
}
