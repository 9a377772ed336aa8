//! What running jobs cost hosted nodes: N nodes (`mutual host`, `--per-process` to a
//! process), then `--jobs` jobs of `--job-seconds` submitted at once from 16 clients,
//! round-robin over the nodes, and run to completion. No node dies.
//!
//! It reports the CPU the job load took over and above the idle cluster's (the host
//! processes' user + system time from the first submission to the last success, less the
//! idle rate measured over `--idle-s` just before), per job; the QUIC connections the
//! nodes dialled and the sync messages they exchanged, per job; resident memory idle, at
//! its peak, at the end and `--after-s` later; false death judgements (every node is alive throughout); and how long the
//! submissions and the whole load took. E2 at 500 agents failed on this cost, not on idle
//! membership (`docs/experiments.md`), so changes to it are measured here first.
//!
//! `cargo run --release -p mutual-bench --bin load -- --nodes 100 --jobs 1000` writes
//! `bench/results/load.json`; `--label L` writes `load-L.json`, `--mutual PATH` measures
//! another build.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use mutual::client::{Client, metric};
use mutual::harness::{LocalNode, start_hosted_cluster};
use mutual_bench::{
    HostedArgs, host_pids, process_cpu_s, process_peak_rss_mib, process_rss_mib, sync_messages,
};
use mutual_core::{JobRequest, Resources};
use serde_json::json;

/// Clients submitting at once.
const SUBMIT_THREADS: usize = 16;
/// How often the driver asks the submitting nodes which jobs succeeded.
const POLL: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(about = "CPU, connections and memory that a load of jobs costs hosted nodes")]
struct Args {
    /// Nodes.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Nodes per `mutual host` process.
    #[arg(long, default_value_t = 100)]
    per_process: usize,
    /// Jobs submitted.
    #[arg(long, default_value_t = 1_000)]
    jobs: usize,
    /// How long each job sleeps.
    #[arg(long, default_value_t = 30.0)]
    job_seconds: f64,
    /// Job slots per node.
    #[arg(long, default_value_t = 20)]
    slots: u32,
    /// `--replicas` of every node (0: full replication).
    #[arg(long, default_value_t = 5)]
    replicas: u32,
    /// Seconds of idle cluster measured before the load, to subtract its rate.
    #[arg(long, default_value_t = 20)]
    idle_s: u64,
    /// Seconds the cluster is left idle after the load before its memory is read again
    /// (idle links close after 15 s, idle QUIC connections after 60 s).
    #[arg(long, default_value_t = 75)]
    after_s: u64,
    /// Give up on the load after this many seconds.
    #[arg(long, default_value_t = 900)]
    limit_s: u64,
    #[command(flatten)]
    hosted: HostedArgs,
}

/// The cluster's counters summed over its nodes.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    msgs: u64,
    dialled: u64,
    judged_dead: u64,
    /// Connections up now (dialled, and accepted), summed.
    open: u64,
}

fn counters(nodes: &[LocalNode]) -> Counters {
    let mut c = Counters::default();
    for text in nodes.iter().filter_map(|n| n.client().metrics().ok()) {
        c.msgs += sync_messages(&text);
        c.dialled += metric(&text, "mutual_connections_dialled_total");
        c.judged_dead += metric(&text, "mutual_members_judged_dead_total");
        c.open += metric(&text, "mutual_connections_dialled_open")
            + metric(&text, "mutual_connections_accepted_open");
    }
    c
}

fn cpu_s(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| process_cpu_s(*p)).sum()
}

fn sleeper(secs: f64) -> JobRequest {
    JobRequest {
        command: vec!["sleep".into(), format!("{secs}")],
        resources: Some(Resources {
            cpu_millis: 10,
            memory_bytes: 1 << 20,
            gpus: 0,
        }),
        ..JobRequest::default()
    }
}

/// Submits `jobs` round-robin over `clients` from [`SUBMIT_THREADS`] threads; returns
/// (node index, job id) of each.
fn submit(clients: &[Client], jobs: usize, req: &JobRequest) -> Result<Vec<(usize, String)>> {
    let threads = SUBMIT_THREADS.min(jobs.max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<Vec<(usize, String)>> {
                    (t..jobs)
                        .step_by(threads)
                        .map(|i| {
                            let node = i % clients.len();
                            Ok((node, clients[node].submit(req)?.id))
                        })
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(jobs);
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a submitter panicked"))??,
            );
        }
        Ok(all)
    })
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.nodes == 0 || a.jobs == 0 {
        bail!("--nodes and --jobs must be at least 1");
    }
    let bin = a.hosted.bin()?;
    let root = tempfile::Builder::new().prefix("mutual-load-").tempdir()?;
    let mut node_args: Vec<String> = vec!["--containers".into(), "off".into()];
    node_args.extend(["--slots".into(), a.slots.to_string()]);
    node_args.extend(["--replicas".into(), a.replicas.to_string()]);
    node_args.extend(a.hosted.node_arg.iter().cloned());
    let started = Instant::now();
    let nodes = start_hosted_cluster(&bin, root.path(), a.nodes, a.per_process, &node_args)
        .context("starting the cluster")?;
    let pids = host_pids(&nodes);
    let formed_s = started.elapsed().as_secs_f64();
    eprintln!("{} nodes all alive after {formed_s:.1} s", a.nodes);

    let (idle_cpu0, idle0) = (cpu_s(&pids), counters(&nodes));
    std::thread::sleep(Duration::from_secs(a.idle_s));
    let (cpu0, c0) = (cpu_s(&pids), counters(&nodes));
    let idle_cores = (cpu0 - idle_cpu0) / a.idle_s as f64;
    let rss_idle_mib: f64 = pids.iter().filter_map(|p| process_rss_mib(*p)).sum();
    eprintln!("idle: {idle_cores:.2} cores, {rss_idle_mib:.0} MiB");

    let clients: Vec<Client> = nodes.iter().map(|n| n.client()).collect();
    let began = Instant::now();
    let submitted = submit(&clients, a.jobs, &sleeper(a.job_seconds))?;
    let submit_s = began.elapsed().as_secs_f64();
    eprintln!(
        "submitted {} jobs in {submit_s:.1} s ({:.1} per second)",
        a.jobs,
        a.jobs as f64 / submit_s
    );
    let submitters: BTreeSet<usize> = submitted.iter().map(|(n, _)| *n).collect();
    let ids: BTreeSet<String> = submitted.into_iter().map(|(_, id)| id).collect();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut peak_rss_mib = 0.0_f64;
    let mut peak_open = 0;
    let deadline = began + Duration::from_secs(a.limit_s);
    while done.len() < ids.len() && Instant::now() < deadline {
        std::thread::sleep(POLL);
        for &n in &submitters {
            // A node that is slow to answer is asked again next round.
            if let Ok(list) = clients[n].jobs(Some("succeeded")) {
                done.extend(list.into_iter().map(|s| s.id).filter(|id| ids.contains(id)));
            }
        }
        let rss: f64 = pids.iter().filter_map(|p| process_rss_mib(*p)).sum();
        peak_rss_mib = peak_rss_mib.max(rss);
        let open = counters(&nodes).open;
        peak_open = peak_open.max(open);
        eprintln!(
            "{:>5.0} s: {} of {} succeeded, {rss:.0} MiB, {open} connections",
            began.elapsed().as_secs_f64(),
            done.len(),
            ids.len(),
        );
    }
    let load_s = began.elapsed().as_secs_f64();
    let (cpu1, c1) = (cpu_s(&pids), counters(&nodes));
    let rss_end_mib: f64 = pids.iter().filter_map(|p| process_rss_mib(*p)).sum();
    let hwm_mib: f64 = pids.iter().filter_map(|p| process_peak_rss_mib(*p)).sum();
    let load_cpu_s = (cpu1 - cpu0) - idle_cores * load_s;
    std::thread::sleep(Duration::from_secs(a.after_s));
    let rss_after_mib: f64 = pids.iter().filter_map(|p| process_rss_mib(*p)).sum();
    let open_after = counters(&nodes).open;
    eprintln!(
        "{rss_after_mib:.0} MiB and {open_after} connections after {} s idle",
        a.after_s
    );
    let jobs = a.jobs as f64;
    let row = json!({
        "nodes": a.nodes,
        "per_process": a.per_process,
        "replicas": a.replicas,
        "jobs": a.jobs,
        "job_seconds": a.job_seconds,
        "slots": a.slots,
        "completed": done.len(),
        "formed_s": formed_s,
        "idle_cores": idle_cores,
        "idle_dialled_per_node_s":
            (c0.dialled - idle0.dialled) as f64 / (a.nodes as f64 * a.idle_s as f64),
        "submit_s": submit_s,
        "load_s": load_s,
        "load_cores": (cpu1 - cpu0) / load_s,
        "cpu_ms_per_job_over_idle": load_cpu_s * 1_000.0 / jobs,
        "dialled_per_job": c1.dialled.saturating_sub(c0.dialled) as f64 / jobs,
        "sync_messages_per_job": c1.msgs.saturating_sub(c0.msgs) as f64 / jobs,
        "false_death_judgements": c1.judged_dead,
        "rss_idle_mib": rss_idle_mib,
        "peak_rss_mib": peak_rss_mib.max(rss_end_mib),
        "vm_hwm_mib": hwm_mib,
        "rss_end_mib": rss_end_mib,
        "rss_after_mib": rss_after_mib,
        "connections_idle": c0.open,
        "connections_peak": peak_open,
        "connections_after": open_after,
        "after_s": a.after_s,
    });
    eprintln!("{row}");
    a.hosted.write("load", &bin, json!({ "result": row }))?;
    if done.len() < ids.len() {
        bail!(
            "{} of {} jobs had not succeeded after {} s",
            ids.len() - done.len(),
            ids.len(),
            a.limit_s
        );
    }
    Ok(())
}
