//! `mutual-sim`: run the deterministic simulator from the command line.
//!
//! Exit codes: 0 no violation; 1 at least one violation (the reproduce command is printed
//! on stderr); 2 bad flags.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use mutual_sim::{SimConfig, Summary, run};

/// Deterministic simulation of a Mutual Cloud cluster: N claim engines over a simulated
/// network with latency, loss, duplication, reordering, partitions, crash-restart, kills
/// and clock skew and drift. A safety phase with faults (invariant checkers after every
/// step) is followed by a liveness phase without faults in which every job must finish and
/// all live replicas must converge. The same flags and seed give the same output, byte for
/// byte.
#[derive(Debug, Parser)]
#[command(
    name = "mutual-sim",
    version,
    after_help = "EXAMPLES:\n  mutual-sim --nodes 100 --jobs 1000 --seed 7 --json\n  mutual-sim --seeds 0..200 --kill-percent 10\n\nEXIT CODES: 0 no violation, 1 violations found (reproduce command on stderr), 2 bad flags.\n\nDEBUGGING (stderr only; the summary does not change):\n  MUTUAL_SIM_DEBUG=1            print the records of every job that did not succeed\n  MUTUAL_SIM_TRACE=<id prefix>  trace one node's membership (judgements, beliefs, crash)"
)]
struct Args {
    /// Number of nodes.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Number of jobs.
    #[arg(long, default_value_t = 1_000)]
    jobs: usize,
    /// Seed of a single run.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// A range of seeds, `A..B` (B excluded); runs use all cores, output stays in seed order.
    #[arg(long)]
    seeds: Option<String>,
    /// Percent of nodes SIGKILLed for good during the safety phase.
    #[arg(long)]
    kill_percent: Option<f64>,
    /// Kill those nodes all at one moment (as `mutual-bench e2|e3` does), not each at
    /// its own.
    #[arg(long)]
    kill_together: bool,
    /// Percent of nodes that crash and restart from their durable state.
    #[arg(long)]
    restart_percent: Option<f64>,
    /// Percent of messages lost during the safety phase.
    #[arg(long)]
    loss_percent: Option<f64>,
    /// Percent of messages duplicated during the safety phase.
    #[arg(long)]
    dup_percent: Option<f64>,
    /// Smallest one-way latency (ms).
    #[arg(long)]
    latency_min_ms: Option<u64>,
    /// Largest one-way latency (ms); messages reorder within the range.
    #[arg(long)]
    latency_max_ms: Option<u64>,
    /// Clock offsets drawn from ±this (ms).
    #[arg(long)]
    skew_ms: Option<u64>,
    /// Clock rate errors drawn from ±this (parts per million).
    #[arg(long)]
    drift_ppm: Option<u64>,
    /// Partition episodes during the safety phase.
    #[arg(long)]
    partitions: Option<u32>,
    /// Longest partition (ms).
    #[arg(long)]
    partition_max_ms: Option<u64>,
    /// Executions per node.
    #[arg(long)]
    slots: Option<u32>,
    /// Shortest job (ms).
    #[arg(long)]
    job_min_ms: Option<u64>,
    /// Longest job (ms).
    #[arg(long)]
    job_max_ms: Option<u64>,
    /// Percent of executions that exit non-zero.
    #[arg(long)]
    fail_percent: Option<f64>,
    /// Jobs are submitted over this window (ms).
    #[arg(long)]
    submit_window_ms: Option<u64>,
    /// End of the safety phase (ms).
    #[arg(long)]
    fault_ms: Option<u64>,
    /// Limit on the liveness phase (ms).
    #[arg(long)]
    liveness_limit_ms: Option<u64>,
    /// Failure-detector probe period (ms).
    #[arg(long)]
    probe_interval_ms: Option<u64>,
    /// Failure-detector timeout (ms).
    #[arg(long)]
    fd_timeout_ms: Option<u64>,
    /// Anti-entropy period (ms).
    #[arg(long)]
    ae_interval_ms: Option<u64>,
    /// Settle window W (ms).
    #[arg(long)]
    settle_ms: Option<u64>,
    /// Rendezvous step (ms).
    #[arg(long)]
    rank_step_ms: Option<u64>,
    /// HLC drift bound (ms).
    #[arg(long)]
    max_drift_ms: Option<u64>,
    /// Replicate real automerge documents end to end instead of typed records (much
    /// slower; for small clusters).
    #[arg(long)]
    automerge: bool,
    /// Place each job on its K XOR-closest live nodes and the nodes that wrote to it, as
    /// `mutual node --replicas K` does (0: every node holds every job).
    #[arg(long, default_value_t = 0)]
    replicas: usize,
    /// Deliberately break the protocol to show the checkers catch it: `rogue-results` makes
    /// fenced holders write results anyway (expect violations and exit code 1).
    #[arg(long, value_parser = ["rogue-results"])]
    buggify: Option<String>,
    /// Print the summary as JSON (one object per seed, one per line).
    #[arg(long)]
    json: bool,
    /// Also print wall time, events per second and peak memory on stderr (not deterministic).
    #[arg(long)]
    timing: bool,
}

impl Args {
    fn config(&self, seed: u64) -> SimConfig {
        let d = SimConfig::default();
        SimConfig {
            nodes: self.nodes,
            jobs: self.jobs,
            seed,
            kill_percent: self.kill_percent.unwrap_or(d.kill_percent),
            kill_together: self.kill_together,
            restart_percent: self.restart_percent.unwrap_or(d.restart_percent),
            loss_percent: self.loss_percent.unwrap_or(d.loss_percent),
            dup_percent: self.dup_percent.unwrap_or(d.dup_percent),
            latency_min_ms: self.latency_min_ms.unwrap_or(d.latency_min_ms),
            latency_max_ms: self.latency_max_ms.unwrap_or(d.latency_max_ms),
            skew_ms: self.skew_ms.unwrap_or(d.skew_ms),
            drift_ppm: self.drift_ppm.unwrap_or(d.drift_ppm),
            partitions: self.partitions.unwrap_or(d.partitions),
            partition_max_ms: self.partition_max_ms.unwrap_or(d.partition_max_ms),
            slots: self.slots.unwrap_or(d.slots),
            job_min_ms: self.job_min_ms.unwrap_or(d.job_min_ms),
            job_max_ms: self.job_max_ms.unwrap_or(d.job_max_ms),
            fail_percent: self.fail_percent.unwrap_or(d.fail_percent),
            submit_window_ms: self.submit_window_ms.unwrap_or(d.submit_window_ms),
            fault_ms: self.fault_ms.unwrap_or(d.fault_ms),
            liveness_limit_ms: self.liveness_limit_ms.unwrap_or(d.liveness_limit_ms),
            probe_interval_ms: self.probe_interval_ms.unwrap_or(d.probe_interval_ms),
            fd_timeout_ms: self.fd_timeout_ms.unwrap_or(d.fd_timeout_ms),
            ae_interval_ms: self.ae_interval_ms.unwrap_or(d.ae_interval_ms),
            settle_ms: self.settle_ms.unwrap_or(d.settle_ms),
            rank_step_ms: self.rank_step_ms.unwrap_or(d.rank_step_ms),
            max_drift_ms: self.max_drift_ms.unwrap_or(d.max_drift_ms),
            automerge: self.automerge,
            replicas: self.replicas,
            buggify: self
                .buggify
                .as_ref()
                .map(|_| mutual_sim::Buggify::RogueResults),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        if self.latency_min_ms.unwrap_or(1) > self.latency_max_ms.unwrap_or(u64::MAX) {
            bail!("--latency-min-ms must not exceed --latency-max-ms");
        }
        for (name, v) in [
            ("--kill-percent", self.kill_percent),
            ("--restart-percent", self.restart_percent),
            ("--loss-percent", self.loss_percent),
            ("--dup-percent", self.dup_percent),
            ("--fail-percent", self.fail_percent),
        ] {
            if let Some(p) = v
                && !(0.0..=100.0).contains(&p)
            {
                bail!("{name} must be within 0..=100, got {p}");
            }
        }
        if self.max_drift_ms.is_some_and(|d| d > 3_600_000) {
            bail!("--max-drift-ms must be at most 3600000 (one hour)");
        }
        if self.probe_interval_ms == Some(0) || self.ae_interval_ms == Some(0) {
            bail!("periods must be at least 1 ms");
        }
        Ok(())
    }
}

fn parse_range(s: &str) -> Result<std::ops::Range<u64>> {
    let (a, b) = s
        .split_once("..")
        .context("--seeds takes A..B, e.g. 0..200")?;
    let a: u64 = a.trim().parse().context("--seeds: bad start")?;
    let b: u64 = b.trim().parse().context("--seeds: bad end")?;
    if b <= a {
        bail!("--seeds: empty range {a}..{b}");
    }
    Ok(a..b)
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn print(summary: &Summary, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(summary)?)?;
    } else {
        writeln!(
            out,
            "seed {:>6}  nodes {}  jobs {}  violations {}  succeeded {}  failed {}  duplicate_results {}  duplicate_executions {}  takeovers {}  mttr_p50_ms {}  mttr_p95_ms {}  sim_time_ms {}",
            summary.seed,
            summary.nodes,
            summary.jobs,
            summary.violations,
            summary.succeeded,
            summary.failed,
            summary.duplicate_results,
            summary.duplicate_executions,
            summary.takeovers,
            summary.mttr_p50_ms,
            summary.mttr_p95_ms,
            summary.sim_time_ms
        )?;
        for v in &summary.violation_details {
            writeln!(out, "  violation: {v}")?;
        }
    }
    Ok(())
}

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    match real_main(args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("mutual-sim: {e:#}");
            std::process::exit(2);
        }
    }
}

fn real_main(args: Args) -> Result<bool> {
    args.validate()?;
    let seeds: Vec<u64> = match (&args.seeds, args.seed) {
        (Some(r), _) => parse_range(r)?.collect(),
        (None, s) => vec![s.unwrap_or(0)],
    };
    let started = Instant::now();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(seeds.len())
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Summary>>> =
        seeds.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&seed) = seeds.get(k) else { break };
                    let summary = run(args.config(seed));
                    if let Ok(mut slot) = results[k].lock() {
                        *slot = Some(summary);
                    }
                }
            });
        }
    });
    let mut ok = true;
    let mut total_violations = 0usize;
    for slot in results {
        let summary = slot
            .into_inner()
            .ok()
            .flatten()
            .context("a simulation thread panicked")?;
        print(&summary, args.json)?;
        if summary.violations > 0 {
            ok = false;
            total_violations += summary.violations;
            eprintln!(
                "seed {} FAILED with {} violation(s); reproduce with:\n  {}",
                summary.seed, summary.violations, summary.reproduce
            );
        }
    }
    if seeds.len() > 1 {
        eprintln!("{} seeds, {} violations", seeds.len(), total_violations);
    }
    if args.timing {
        eprintln!(
            "wall_s {:.2}  threads {}  peak_rss_mib {:.0}",
            started.elapsed().as_secs_f64(),
            threads,
            peak_rss_mib().unwrap_or(f64::NAN)
        );
    }
    Ok(ok)
}
