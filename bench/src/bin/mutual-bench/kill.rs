//! E2 (scalability) and E3 (fault tolerance): N agents, 10 × N jobs, a fraction of the
//! agents SIGKILLed once the first wave runs. E2 varies N at 10 % killed; E3 varies the
//! fraction at one N. One run measures both experiments' metrics:
//!
//! - success rate, duplicate results (replicas that disagree on an accepted result),
//!   duplicate executions (from marker files the jobs write, against the attempts needed);
//! - MTTR: for every job whose holder was killed while it ran, the HLC of the takeover's
//!   start record minus the wall clock at the kill; recovery after detection: the same
//!   start minus the first expiry of the dead holder's epoch (the first node that judged it
//!   dead and acted);
//! - scheduling wait: the first attempt's start minus the moment the submit call returned;
//! - per-node control messages per second (sent + received, from each survivor's
//!   `/metrics`, over the run) and per-node peak memory (VmHWM of each survivor; a hosted
//!   node counts its share of its process's).
//!
//! Every takeover is also written on its own (`<experiment>-takeovers.csv`): who held the
//! job, how many of the holder's ring predecessors died with it, which node first judged
//! it dead and how far along the ring that node sat, and MTTR's three parts. That is what
//! tells a detection tail from runs of dead watchers, a starved judge or a late claim.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use mutual::client::{Client, metric};
use mutual::types::JobStatus;
use mutual_bench::plot::{Chart, Series, csv, line_chart};
use mutual_bench::{
    bucket_diff, command_line, histogram_buckets, histogram_quantile, machine, mutual_bin,
    process_cpu_s, process_peak_rss_mib, results_dir, sum_buckets, sync_messages, today,
};
use serde_json::{Value, json};

use super::{
    by_id, duplicate_executions, duplicate_first_attempts, duplicate_results, is_terminal,
    marker_job, now_ms, pct, shuffle, write,
};

/// What E2 and E3 share.
#[derive(clap::Args)]
pub struct RunArgs {
    /// A small run, under five minutes on two cores: 5 jobs per agent, 3 s jobs, one
    /// repetition (E2: 10 and 20 agents; E3: 20 agents, 10 % and 40 % killed).
    #[arg(long)]
    quick: bool,
    /// Jobs per agent [default: 10, or 5 with --quick].
    #[arg(long)]
    jobs_per_agent: Option<usize>,
    /// Repetitions per configuration [default: 4, or 1 with --quick].
    #[arg(long)]
    reps: Option<usize>,
    /// Execution slots per agent: 20 lets the survivors of a 40 % kill hold every job at
    /// once (10 per agent), so MTTR measures recovery, not waiting for capacity.
    #[arg(long, default_value_t = 20)]
    slots: u32,
    /// Seconds each job sleeps [default: 30, or 3 with --quick]. At full size the
    /// submissions alone take minutes on two cores, so jobs must outlast them for the
    /// victims to hold running jobs when they are killed.
    #[arg(long)]
    job_seconds: Option<f64>,
    /// Seconds after the last submission to kill [default: half the job length: mid-run,
    /// as `shared/experiments.md` says]. 0 kills as soon as every job is submitted and N
    /// run, while the submissions are still being replicated (every run before
    /// 2026-11-28 did that): MTTR then includes a busy cluster's delays.
    #[arg(long)]
    kill_after: Option<f64>,
    /// Nodes per OS process. 1 (the default) runs every agent as its own `mutual node`,
    /// killed with SIGKILL; more runs them in `mutual host` processes, each node on its own
    /// thread and runtime, killed with `POST /v1/debug/crash` (as abrupt: no goodbye, no
    /// flush). Hundreds of agents fit on one machine only this way.
    #[arg(long, default_value_t = 1)]
    per_process: usize,
    /// Run the agents with `--replicas K`: each job's document on its K XOR-closest
    /// nodes and the nodes involved in it instead of on every node (0: full replication,
    /// the default). The run then reads the jobs from every node, merged, since no node
    /// holds them all.
    #[arg(long, default_value_t = 0)]
    replicas: usize,
    /// An extra argument for every `mutual node` (repeatable), e.g.
    /// `--node-arg=--probe-interval=100ms` to trade detection speed for probe CPU.
    #[arg(long, allow_hyphen_values = true)]
    node_arg: Vec<String>,
    /// Where the CSV, PNG and JSON go.
    #[arg(long, default_value_os_t = results_dir())]
    out: PathBuf,
    /// Keep every run's node directories (data and `<node>.log`) under this directory,
    /// one `<experiment>-n<agents>-k<kill %>-r<rep>` per run, instead of deleting them:
    /// the nodes' logs say when each judged whom dead.
    #[arg(long)]
    keep: Option<PathBuf>,
}

impl RunArgs {
    fn jobs_per_agent(&self) -> usize {
        self.jobs_per_agent
            .unwrap_or(if self.quick { 5 } else { 10 })
    }

    fn reps(&self) -> usize {
        self.reps.unwrap_or(if self.quick { 1 } else { 4 })
    }

    fn job_seconds(&self) -> f64 {
        self.job_seconds
            .unwrap_or(if self.quick { 3.0 } else { 30.0 })
    }

    fn kill_after(&self) -> Duration {
        Duration::from_secs_f64(
            self.kill_after
                .unwrap_or(self.job_seconds() / 2.0)
                .clamp(0.0, 86_400.0),
        )
    }
}

#[derive(clap::Args)]
pub struct E3Args {
    /// Agents [default: 100, or 20 with --quick].
    #[arg(long)]
    agents: Option<usize>,
    /// Kill fractions in percent [default: 10,20,40,60, or 10,40 with --quick].
    #[arg(long, value_delimiter = ',')]
    kill: Vec<u32>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
pub struct E2Args {
    /// Cluster sizes [default: 50,100,200,500, or 10,20 with --quick].
    #[arg(long, value_delimiter = ',')]
    agents: Vec<usize>,
    /// Percent of the agents SIGKILLed mid-run.
    #[arg(long, default_value_t = 10)]
    kill: u32,
    #[command(flatten)]
    run: RunArgs,
}

/// The nodes' histogram of pushed control records' stamp-to-arrival delays.
const ARRIVAL: &str = "mutual_record_arrival_delay_milliseconds";
/// The nodes' histogram of the wait from writing records to pushing them.
const WRITE_PUSH: &str = "mutual_write_to_push_milliseconds";
/// The nodes' histogram of the failure timeout in force at each death judgement.
const SILENCE: &str = "mutual_detection_silence_milliseconds";

/// The nodes' delay histograms, summed over `/metrics` texts (cumulative buckets).
struct DelayHistograms {
    arrival: Vec<(f64, u64)>,
    write_push: Vec<(f64, u64)>,
    silence: Vec<(f64, u64)>,
}

impl DelayHistograms {
    fn sum(texts: &[String]) -> DelayHistograms {
        let of = |name| sum_buckets(texts.iter().map(|m| histogram_buckets(m, name)));
        DelayHistograms {
            arrival: of(ARRIVAL),
            write_push: of(WRITE_PUSH),
            silence: of(SILENCE),
        }
    }
}

/// Clients submitting at once.
const SUBMIT_THREADS: usize = 16;

/// Where a run reads the jobs' states: one node under full replication (it holds them
/// all); under placement every node, merged.
enum Observer {
    One(Client),
    All(Vec<Client>),
}

impl Observer {
    /// Every job the observed nodes hold; where several hold one, the furthest along
    /// (ended, then the most attempts, then running).
    fn jobs(&self) -> anyhow::Result<BTreeMap<String, JobStatus>> {
        let clients = match self {
            Observer::One(c) => return by_id(c),
            Observer::All(cs) => cs,
        };
        let progress = |s: &JobStatus| (is_terminal(s), s.attempts.len(), s.state == "running");
        let mut out: BTreeMap<String, JobStatus> = BTreeMap::new();
        // Killed nodes do not answer: what they held is on the other holders.
        for list in clients.iter().filter_map(|c| c.jobs(None).ok()) {
            for s in list {
                match out.get(&s.id) {
                    Some(have) if progress(have) >= progress(&s) => {}
                    _ => {
                        out.insert(s.id.clone(), s);
                    }
                }
            }
        }
        Ok(out)
    }

    /// How long to wait between looks: asking every node costs each of them a request.
    fn poll(&self) -> Duration {
        match self {
            Observer::One(_) => Duration::from_millis(50),
            Observer::All(_) => Duration::from_secs(1),
        }
    }
}

/// One job whose holder was killed while it ran, and how it was taken over. Nodes are
/// the bench's agent numbers (0 is the observer).
struct Takeover {
    job: String,
    holder: Option<usize>,
    /// Killed nodes right before the holder on the ring (ids sorted): watchers that died
    /// with it, which the detector's lookahead must see past.
    dead_before: usize,
    /// The node whose expiry of the holder's epoch came first (its first judge).
    expired_by: Option<usize>,
    /// Live nodes between that judge and the holder on the ring (0: its nearest live
    /// predecessor, a watcher of it).
    judge_hops: Option<usize>,
    taker: Option<usize>,
    mttr_ms: f64,
    /// The takeover's start minus the first expiry of the dead holder's epoch.
    recovery_after_detection_ms: Option<f64>,
    /// MTTR's parts: the kill to that expiry (detection), the expiry to the takeover's
    /// claim (its spread plus the rendezvous delay), the claim to the start (the settle
    /// window).
    detection_ms: Option<f64>,
    claim_after_detection_ms: Option<f64>,
    start_after_claim_ms: f64,
}

/// One run's figures.
struct Run {
    agents: usize,
    per_process: usize,
    /// `--replicas` (0: full replication).
    replicas: usize,
    slots: u32,
    node_args: Vec<String>,
    kill_pct: u32,
    /// Seconds from the last submission to the kill, at least.
    kill_after_s: f64,
    rep: usize,
    jobs: usize,
    killed: usize,
    success_rate: f64,
    duplicate_results: usize,
    duplicate_executions: usize,
    /// Of those, executions of a first attempt beyond one (initial scheduling).
    duplicate_first_attempts: usize,
    /// Each survivor's settle window and rendezvous step at the end of the run (ms).
    settle_window_ms: Vec<f64>,
    rank_step_ms: Vec<f64>,
    /// From the kill to the end, summed over the survivors (cumulative buckets): delays
    /// from another node stamping a claim, start or expiry to its arrival by push, and
    /// from a node writing records to pushing them (its log's sync).
    arrival_after_kill: Vec<(f64, u64)>,
    write_push_after_kill: Vec<(f64, u64)>,
    /// The failure timeout in force at each judgement after the kill (it adapts to probe
    /// round trips), summed over the survivors.
    silence_after_kill: Vec<(f64, u64)>,
    sched_wait_ms: Vec<f64>,
    msgs_per_node_s: Vec<f64>,
    /// Each surviving node's share of its process's CPU time over the run, in cores.
    cpu_cores_per_node: Vec<f64>,
    peak_rss_mib: Vec<f64>,
    drain_s: f64,
    /// Death judgements the survivors' detectors made, summed (a killed node is judged by
    /// one or two of its watchers; more means live nodes were judged dead).
    members_judged_dead: u64,
    /// Members the survivors believed dead and then heard from, summed: each a death
    /// judgement (made or told) taken back.
    members_revived: u64,
    /// Probe periods and judgement deadlines the survivors came to late (starved),
    /// summed.
    late_probe_ticks: u64,
    late_judgement_deadlines: u64,
    /// Every job whose holder was killed while it ran, taken over: MTTR and its parts.
    takeovers: Vec<Takeover>,
}

impl Run {
    /// One figure of every takeover that has it.
    fn per_takeover(&self, f: fn(&Takeover) -> Option<f64>) -> Vec<f64> {
        self.takeovers.iter().filter_map(f).collect()
    }
}

fn mttr(t: &Takeover) -> Option<f64> {
    Some(t.mttr_ms)
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

const CSV_HEADER: [&str; 34] = [
    "n",
    "slots",
    "kill_pct",
    "rep",
    "jobs",
    "killed",
    "success_rate",
    "duplicate_results",
    "duplicate_executions",
    "taken_over",
    "mttr_p50_ms",
    "mttr_p95_ms",
    "mttr_max_ms",
    "recovery_after_detection_p95_ms",
    "scheduling_wait_p50_ms",
    "scheduling_wait_p99_ms",
    "per_node_msgs_per_s_mean",
    "per_node_msgs_per_s_max",
    "per_node_peak_rss_mib_mean",
    "per_node_cpu_cores_mean",
    "drain_s",
    "nodes_per_process",
    "replicas",
    "members_judged_dead",
    "members_revived",
    "detection_p95_ms",
    "claim_after_detection_p95_ms",
    "start_after_claim_p95_ms",
    "settle_window_ms_mean",
    "rank_step_ms_mean",
    "record_arrival_after_kill_p99_ms",
    "write_to_push_after_kill_p99_ms",
    "kill_after_s",
    "duplicate_executions_first_attempt",
];

fn csv_row(r: &Run) -> Vec<String> {
    let p = |v: &[f64], q| pct(v, q).map_or(String::new(), |v| format!("{v:.0}"));
    let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.1}"));
    let mttr_ms = r.per_takeover(mttr);
    vec![
        r.agents.to_string(),
        r.slots.to_string(),
        r.kill_pct.to_string(),
        r.rep.to_string(),
        r.jobs.to_string(),
        r.killed.to_string(),
        format!("{:.4}", r.success_rate),
        r.duplicate_results.to_string(),
        r.duplicate_executions.to_string(),
        mttr_ms.len().to_string(),
        p(&mttr_ms, 0.5),
        p(&mttr_ms, 0.95),
        p(&mttr_ms, 1.0),
        p(&r.per_takeover(|t| t.recovery_after_detection_ms), 0.95),
        p(&r.sched_wait_ms, 0.5),
        p(&r.sched_wait_ms, 0.99),
        f(mean(&r.msgs_per_node_s)),
        f(pct(&r.msgs_per_node_s, 1.0)),
        f(mean(&r.peak_rss_mib)),
        mean(&r.cpu_cores_per_node).map_or(String::new(), |v| format!("{v:.4}")),
        format!("{:.1}", r.drain_s),
        r.per_process.to_string(),
        r.replicas.to_string(),
        r.members_judged_dead.to_string(),
        r.members_revived.to_string(),
        p(&r.per_takeover(|t| t.detection_ms), 0.95),
        p(&r.per_takeover(|t| t.claim_after_detection_ms), 0.95),
        p(&r.per_takeover(|t| Some(t.start_after_claim_ms)), 0.95),
        f(mean(&r.settle_window_ms)),
        f(mean(&r.rank_step_ms)),
        f(histogram_quantile(&r.arrival_after_kill, 0.99)),
        f(histogram_quantile(&r.write_push_after_kill, 0.99)),
        format!("{:.1}", r.kill_after_s),
        r.duplicate_first_attempts.to_string(),
    ]
}

/// One configuration's summary: every repetition's samples pooled.
fn summarize(rs: &[&Run]) -> Value {
    let pool = |f: fn(&Run) -> &Vec<f64>| -> Vec<f64> {
        rs.iter().flat_map(|r| f(r).iter().copied()).collect()
    };
    let taken = |f: fn(&Takeover) -> Option<f64>| -> Vec<f64> {
        rs.iter().flat_map(|r| r.per_takeover(f)).collect()
    };
    let (mttr, recovery, wait) = (
        taken(mttr),
        taken(|t| t.recovery_after_detection_ms),
        pool(|r| &r.sched_wait_ms),
    );
    let (msgs, rss) = (pool(|r| &r.msgs_per_node_s), pool(|r| &r.peak_rss_mib));
    let cpu = pool(|r| &r.cpu_cores_per_node);
    let (detection, claim, start) = (
        taken(|t| t.detection_ms),
        taken(|t| t.claim_after_detection_ms),
        taken(|t| Some(t.start_after_claim_ms)),
    );
    let (settle, step) = (pool(|r| &r.settle_window_ms), pool(|r| &r.rank_step_ms));
    let arrival = sum_buckets(rs.iter().map(|r| r.arrival_after_kill.clone()));
    let write_push = sum_buckets(rs.iter().map(|r| r.write_push_after_kill.clone()));
    let silence = sum_buckets(rs.iter().map(|r| r.silence_after_kill.clone()));
    let hq = |h: &[(f64, u64)], q| histogram_quantile(h, q);
    let jobs: usize = rs.iter().map(|r| r.jobs).sum();
    let ok: f64 = rs.iter().map(|r| r.success_rate * r.jobs as f64).sum();
    json!({
        "n": rs.first().map(|r| r.agents),
        "slots_per_agent": rs.first().map(|r| r.slots),
        "nodes_per_process": rs.first().map(|r| r.per_process),
        "replicas": rs.first().map(|r| r.replicas),
        "kill_pct": rs.first().map(|r| r.kill_pct),
        "kill_after_s": rs.first().map(|r| r.kill_after_s),
        "jobs": jobs / rs.len().max(1),
        "repetitions": rs.len(),
        "success_rate": ok / jobs.max(1) as f64,
        "duplicate_results": rs.iter().map(|r| r.duplicate_results).sum::<usize>(),
        "duplicate_executions": rs.iter().map(|r| r.duplicate_executions).sum::<usize>(),
        "duplicate_executions_first_attempt": rs.iter().map(|r| r.duplicate_first_attempts).sum::<usize>(),
        "jobs_taken_over": mttr.len(),
        "mttr_p50_ms": pct(&mttr, 0.5),
        "mttr_p95_ms": pct(&mttr, 0.95),
        "mttr_max_ms": pct(&mttr, 1.0),
        "recovery_after_detection_p50_ms": pct(&recovery, 0.5),
        "recovery_after_detection_p95_ms": pct(&recovery, 0.95),
        "detection_p50_ms": pct(&detection, 0.5),
        "detection_p95_ms": pct(&detection, 0.95),
        "claim_after_detection_p50_ms": pct(&claim, 0.5),
        "claim_after_detection_p95_ms": pct(&claim, 0.95),
        "start_after_claim_p50_ms": pct(&start, 0.5),
        "start_after_claim_p95_ms": pct(&start, 0.95),
        "settle_window_ms_mean": mean(&settle),
        "record_arrival_after_kill_p50_ms": hq(&arrival, 0.5),
        "record_arrival_after_kill_p99_ms": hq(&arrival, 0.99),
        "write_to_push_after_kill_p50_ms": hq(&write_push, 0.5),
        "write_to_push_after_kill_p99_ms": hq(&write_push, 0.99),
        "failure_timeout_after_kill_max_ms": hq(&silence, 1.0),
        "rank_step_ms_mean": mean(&step),
        "scheduling_wait_p50_ms": pct(&wait, 0.5),
        "scheduling_wait_p99_ms": pct(&wait, 0.99),
        "per_node_msgs_per_s_mean": mean(&msgs),
        "per_node_msgs_per_s_max": pct(&msgs, 1.0),
        "per_node_peak_rss_mib_mean": mean(&rss),
        "per_node_peak_rss_mib_max": pct(&rss, 1.0),
        "per_node_cpu_cores_mean": mean(&cpu),
        "drain_s_mean": mean(&rs.iter().map(|r| r.drain_s).collect::<Vec<_>>()),
        "members_judged_dead": rs.iter().map(|r| r.members_judged_dead).sum::<u64>(),
        "members_revived": rs.iter().map(|r| r.members_revived).sum::<u64>(),
        "late_probe_ticks": rs.iter().map(|r| r.late_probe_ticks).sum::<u64>(),
        "late_judgement_deadlines": rs.iter().map(|r| r.late_judgement_deadlines).sum::<u64>(),
        "node_args": rs.first().map(|r| r.node_args.clone()),
    })
}

/// Runs every (agents, kill %) pair `reps` times; writes `<name>.csv` and returns the
/// per-pair summaries.
fn runs(name: &str, pairs: &[(usize, u32)], a: &RunArgs) -> anyhow::Result<Vec<Value>> {
    let (out, per) = (&a.out, a.jobs_per_agent());
    let bin = mutual_bin()?;
    std::fs::create_dir_all(out)?;
    let mut all = Vec::new();
    let mut summaries = Vec::new();
    for &(agents, kill) in pairs {
        let mut these = Vec::new();
        for rep in 0..a.reps() {
            let r = run(&bin, agents, per * agents, kill, rep, name, a)?;
            eprintln!(
                "{name}: {agents} agents, kill {kill}% rep {rep}: success {:.3}, duplicate results {}, duplicate executions {}, MTTR p95 {:?} ms",
                r.success_rate,
                r.duplicate_results,
                r.duplicate_executions,
                pct(&r.per_takeover(mttr), 0.95)
            );
            these.push(r);
        }
        summaries.push(summarize(&these.iter().collect::<Vec<_>>()));
        all.extend(these);
    }
    let rows: Vec<Vec<String>> = all.iter().map(csv_row).collect();
    csv(&out.join(format!("{name}.csv")), &CSV_HEADER, &rows)?;
    let rows: Vec<Vec<String>> = all.iter().flat_map(takeover_rows).collect();
    csv(
        &out.join(format!("{name}-takeovers.csv")),
        &TAKEOVER_HEADER,
        &rows,
    )?;
    Ok(summaries)
}

fn points(summaries: &[Value], x: &str, y: &str) -> Vec<(f64, f64)> {
    summaries
        .iter()
        .filter_map(|f| Some((f[x].as_f64()?, f[y].as_f64()?)))
        .collect()
}

fn finish(name: &str, out: &Path, extra: Value, summaries: Vec<Value>) -> anyhow::Result<()> {
    let mut doc = json!({
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "configurations": summaries,
        "note": "MTTR = HLC ms of the takeover's start record minus the wall clock at SIGKILL, for every job whose holder was killed while it ran; recovery after detection = the same start minus the first expiry of the dead holder's epoch",
    });
    if let (Some(d), Some(e)) = (doc.as_object_mut(), extra.as_object()) {
        d.extend(e.clone());
    }
    let text = serde_json::to_string_pretty(&doc)?;
    println!("{text}");
    write(&out.join(format!("{name}.json")), &text)
}

pub fn e3(a: E3Args) -> anyhow::Result<()> {
    let agents = a.agents.unwrap_or(if a.run.quick { 20 } else { 100 });
    let per = a.run.jobs_per_agent();
    let kills = match (a.kill.is_empty(), a.run.quick) {
        (false, _) => a.kill.clone(),
        (true, true) => vec![10, 40],
        (true, false) => vec![10, 20, 40, 60],
    };
    let pairs: Vec<(usize, u32)> = kills.iter().map(|&k| (agents, k)).collect();
    let summaries = runs("e3", &pairs, &a.run)?;
    let series = |key: &str, label: &str| Series {
        label: label.into(),
        points: points(&summaries, "kill_pct", key),
    };
    line_chart(
        &a.run.out.join("e3.png"),
        &Chart {
            title: &format!(
                "E3: MTTR vs agents killed ({agents} agents, {} jobs)",
                per * agents
            ),
            x: "agents SIGKILLed (%)",
            y: "ms from the kill to the job running again",
            series: vec![
                series("mttr_p50_ms", "MTTR p50"),
                series("mttr_p95_ms", "MTTR p95"),
                series("mttr_max_ms", "MTTR max"),
                series(
                    "recovery_after_detection_p95_ms",
                    "recovery after detection p95",
                ),
            ],
            shade: None,
        },
    )?;
    finish(
        "e3",
        &a.run.out,
        json!({"agents": agents, "jobs_per_agent": per, "job_seconds": a.run.job_seconds()}),
        summaries,
    )
}

pub fn e2(a: E2Args) -> anyhow::Result<()> {
    let sizes = match (a.agents.is_empty(), a.run.quick) {
        (false, _) => a.agents.clone(),
        (true, true) => vec![10, 20],
        (true, false) => vec![50, 100, 200, 500],
    };
    let per = a.run.jobs_per_agent();
    let pairs: Vec<(usize, u32)> = sizes.iter().map(|&n| (n, a.kill)).collect();
    let summaries = runs("e2", &pairs, &a.run)?;
    let series = |key: &str, label: &str| Series {
        label: label.into(),
        points: points(&summaries, "n", key),
    };
    line_chart(
        &a.run.out.join("e2.png"),
        &Chart {
            title: &format!(
                "E2: success and duplicates vs N ({} % of agents killed)",
                a.kill
            ),
            x: "agents (N)",
            y: "rate / count",
            series: vec![
                series("success_rate", "success rate"),
                series("duplicate_results", "duplicate results"),
            ],
            shade: None,
        },
    )?;
    line_chart(
        &a.run.out.join("e2-mttr.png"),
        &Chart {
            title: &format!("E2: MTTR and scheduling wait vs N ({} % killed)", a.kill),
            x: "agents (N)",
            y: "ms",
            series: vec![
                series("mttr_p95_ms", "MTTR p95"),
                series(
                    "recovery_after_detection_p95_ms",
                    "recovery after detection p95",
                ),
                series("scheduling_wait_p99_ms", "scheduling wait p99"),
            ],
            shade: None,
        },
    )?;
    finish(
        "e2",
        &a.run.out,
        json!({"kill_pct": a.kill, "jobs_per_agent": per, "job_seconds": a.run.job_seconds()}),
        summaries,
    )
}

/// One run: start `agents` nodes, submit `jobs`, kill `kill_pct` % once the first wave
/// runs, wait for every job to end, and measure.
fn run(
    bin: &Path,
    agents: usize,
    jobs: usize,
    kill_pct: u32,
    rep: usize,
    name: &str,
    a: &RunArgs,
) -> anyhow::Result<Run> {
    let (slots, job_seconds) = (a.slots, a.job_seconds());
    let root = match &a.keep {
        Some(keep) => {
            let dir = keep.join(format!("{name}-n{agents}-k{kill_pct}-r{rep}"));
            if dir.exists() {
                bail!(
                    "{} exists: --keep does not overwrite a kept run",
                    dir.display()
                );
            }
            std::fs::create_dir_all(&dir)?;
            RunDir::Kept(dir)
        }
        None => RunDir::Temp(tempfile::tempdir()?),
    };
    let markers = root.path().join("markers");
    std::fs::create_dir_all(&markers)?;
    let mut node_args: Vec<String> = vec!["--containers".into(), "off".into()];
    node_args.extend(["--slots".into(), slots.to_string()]);
    if a.replicas > 0 {
        node_args.extend(["--replicas".into(), a.replicas.to_string()]);
    }
    node_args.extend(a.node_arg.iter().cloned());
    let mut nodes = if a.per_process > 1 {
        mutual::harness::start_hosted_cluster(bin, root.path(), agents, a.per_process, &node_args)?
    } else {
        mutual::harness::start_cluster_with(bin, root.path(), agents, |_| node_args.clone())?
    };
    let msgs = |n: &mutual::harness::LocalNode| -> Option<u64> {
        Some(sync_messages(&n.client().metrics().ok()?))
    };
    // A hosted node's share of its process's CPU time.
    let node_cpu_s = |n: &mutual::harness::LocalNode| -> Option<f64> {
        let (pid, shared) = n.process()?;
        Some(process_cpu_s(pid)? / shared as f64)
    };
    let msgs_at_start: Vec<Option<u64>> = nodes.iter().map(msgs).collect();
    let cpu_at_start: Vec<Option<f64>> = nodes.iter().map(node_cpu_s).collect();
    let req = marker_job(&markers, job_seconds);
    let began = Instant::now();
    // Round-robin over the agents, from several clients at once, as many users would: one
    // at a time, a submit waits for its node's disk and its node's turn on the CPU, and
    // at 500 hosted agents that made submitting 5,000 jobs take half an hour.
    let clients: Vec<Client> = nodes.iter().map(|n| n.client()).collect();
    let threads = SUBMIT_THREADS.min(jobs.max(1));
    let submitted: Vec<(usize, String, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (clients, req) = (&clients, &req);
                s.spawn(move || -> anyhow::Result<Vec<(usize, String, u64)>> {
                    (t..jobs)
                        .step_by(threads)
                        .map(|i| {
                            let id = clients[i % agents].submit(req)?.id;
                            Ok((i, id, now_ms()))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a submitting thread panicked"))?
            })
            .collect::<anyhow::Result<Vec<Vec<_>>>>()
            .map(|v| v.into_iter().flatten().collect())
    })?;
    let mut submitted = submitted;
    submitted.sort();
    let ids: Vec<String> = submitted.iter().map(|(_, id, _)| id.clone()).collect();
    let submitted_ms: BTreeMap<String, u64> =
        submitted.into_iter().map(|(_, id, at)| (id, at)).collect();
    // Kill mid-run (`--kill-after` past the last submission), once at least one job per
    // agent runs: the victims hold running jobs.
    let kill_not_before = Instant::now() + a.kill_after();
    let observer = if a.replicas > 0 {
        Observer::All(nodes.iter().map(|n| n.client()).collect())
    } else {
        Observer::One(nodes[0].client())
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let running: BTreeMap<String, String> = loop {
        let running: BTreeMap<String, String> = observer
            .jobs()?
            .into_values()
            .filter(|s| s.state == "running")
            .filter_map(|s| Some((s.id.clone(), s.node?)))
            .collect();
        if running.len() >= agents.min(jobs) && Instant::now() >= kill_not_before {
            break running;
        }
        if Instant::now() > deadline {
            bail!("jobs did not start");
        }
        std::thread::sleep(observer.poll());
    };
    let killed = (agents * kill_pct as usize).div_ceil(100);
    // Deterministic per (fraction, repetition); node 0 observes and survives.
    let mut order: Vec<usize> = (1..agents).collect();
    shuffle(&mut order, (u64::from(kill_pct) << 32) ^ rep as u64);
    let victims: Vec<usize> = order.into_iter().take(killed).collect();
    let victim_ids: Vec<String> = victims.iter().filter_map(|i| nodes[*i].id()).collect();
    let ring = Ring::new(&nodes.iter().map(|n| n.id()).collect::<Vec<_>>(), &victims);
    // The survivors' delay histograms before the kill, to count only what follows: one
    // scrape per survivor, which the kill waits for.
    let before: Vec<String> = nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| !victims.contains(i) && n.is_running())
        .filter_map(|(_, n)| n.client().metrics().ok())
        .collect();
    let delays_before = DelayHistograms::sum(&before);
    let t_kill = now_ms();
    eprintln!(
        "{name}: {agents} agents, kill {kill_pct}% rep {rep}: killing agents {victims:?} at {t_kill} ms (Unix)"
    );
    // All at once: a hosted node's crash is an HTTP call.
    std::thread::scope(|s| {
        for (i, n) in nodes.iter_mut().enumerate() {
            if victims.contains(&i) {
                s.spawn(move || n.kill());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    let done = loop {
        let all = observer.jobs()?;
        if ids.iter().all(|id| all.get(id).is_some_and(is_terminal)) || Instant::now() > deadline {
            break all;
        }
        std::thread::sleep(observer.poll().max(Duration::from_millis(200)));
    };
    let drain_s = began.elapsed().as_secs_f64();
    // Say why each job that did not succeed did not: its furthest-along status, and
    // whether its attempts ran on killed agents.
    for id in ids
        .iter()
        .filter(|id| done.get(*id).is_none_or(|s| s.state != "succeeded"))
    {
        match done.get(id) {
            None => eprintln!("job {id}: no live node holds it"),
            Some(s) => {
                let attempts: Vec<String> = s
                    .attempts
                    .iter()
                    .map(|a| {
                        let killed = if victim_ids.contains(&a.node) {
                            " (killed)"
                        } else {
                            ""
                        };
                        let expired = a.expired.as_deref().unwrap_or("open");
                        format!("{} on {:.8}{killed}: {expired}", a.epoch, a.node)
                    })
                    .collect();
                eprintln!(
                    "job {id}: {} after {} s; attempts [{}]",
                    s.state,
                    drain_s as u64,
                    attempts.join(", ")
                );
            }
        }
    }
    let succeeded = ids
        .iter()
        .filter(|id| done.get(*id).is_some_and(|s| s.state == "succeeded"))
        .count();
    let mut takeovers = Vec::new();
    let since = |later: u64, earlier: u64| later.saturating_sub(earlier) as f64;
    for (id, holder) in &running {
        if !victim_ids.contains(holder) {
            continue;
        }
        let Some(s) = done.get(id) else { continue };
        let held = s.attempts.iter().find(|a| &a.node == holder);
        let judged = held.and_then(|a| a.expired_at_ms);
        let Some((claimed, start, taker)) = s
            .attempts
            .iter()
            .filter(|a| &a.node != holder)
            .filter_map(|a| Some((a.claimed_at_ms, a.started_at_ms?, &a.node)))
            .find(|(_, t, _)| *t >= t_kill)
        else {
            continue;
        };
        let holder_at = ring.agent(holder);
        let judge_at = held.and_then(|a| ring.agent(a.expired_by.as_deref()?));
        takeovers.push(Takeover {
            job: id.clone(),
            holder: holder_at,
            dead_before: holder_at.map_or(0, |h| ring.dead_before(h)),
            expired_by: judge_at,
            judge_hops: holder_at
                .zip(judge_at)
                .and_then(|(h, j)| ring.live_between(j, h)),
            taker: ring.agent(taker),
            mttr_ms: since(start, t_kill),
            recovery_after_detection_ms: judged.map(|j| since(start, j)),
            detection_ms: judged.map(|j| since(j, t_kill)),
            claim_after_detection_ms: judged.map(|j| since(claimed, j)),
            start_after_claim_ms: since(start, claimed),
        });
    }
    let sched_wait_ms: Vec<f64> = ids
        .iter()
        .filter_map(|id| {
            let first = done.get(id)?.attempts.first()?.started_at_ms?;
            Some(first.saturating_sub(*submitted_ms.get(id)?) as f64)
        })
        .collect();
    let (mut msgs_per_node_s, mut peak_rss_mib) = (Vec::new(), Vec::new());
    let secs = began.elapsed().as_secs_f64().max(1e-3);
    let mut cpu_cores_per_node = Vec::new();
    let (mut members_judged_dead, mut members_revived) = (0, 0);
    let (mut late_probe_ticks, mut late_judgement_deadlines) = (0, 0);
    let (mut settle_window_ms, mut rank_step_ms) = (Vec::new(), Vec::new());
    let mut after: Vec<String> = Vec::new();
    for ((n, at_start), cpu_then) in nodes.iter().zip(&msgs_at_start).zip(&cpu_at_start) {
        if !n.is_running() {
            continue;
        }
        let metrics = n.client().metrics().ok();
        if let (Some(m), Some(then)) = (&metrics, at_start) {
            msgs_per_node_s.push(sync_messages(m).saturating_sub(*then) as f64 / secs);
        }
        if let Some(m) = &metrics {
            members_judged_dead += metric(m, "mutual_members_judged_dead");
            members_revived += metric(m, "mutual_members_revived");
            late_probe_ticks += metric(m, "mutual_late_probe_ticks");
            late_judgement_deadlines += metric(m, "mutual_late_judgement_deadlines");
            settle_window_ms.push(metric(m, "mutual_settle_window_milliseconds") as f64);
            rank_step_ms.push(metric(m, "mutual_rank_step_milliseconds") as f64);
        }
        after.extend(metrics);
        if let (Some(now), Some(then)) = (node_cpu_s(n), cpu_then) {
            cpu_cores_per_node.push((now - then).max(0.0) / secs);
        }
        // A hosted node's share of its process's peak.
        if let Some(rss) = n
            .process()
            .and_then(|(pid, shared)| Some(process_peak_rss_mib(pid)? / shared as f64))
        {
            peak_rss_mib.push(rss);
        }
    }
    let delays_after = DelayHistograms::sum(&after);
    let arrival_after_kill = bucket_diff(&delays_before.arrival, &delays_after.arrival);
    let write_push_after_kill = bucket_diff(&delays_before.write_push, &delays_after.write_push);
    let silence_after_kill = bucket_diff(&delays_before.silence, &delays_after.silence);
    let disagree = duplicate_results(
        nodes.iter().filter(|n| n.is_running()),
        &ids,
        a.replicas > 0,
    )?;
    let duplicate_executions = duplicate_executions(&markers, &ids, &done);
    let duplicate_first_attempts = duplicate_first_attempts(&markers, &ids);
    drop(nodes.drain(..));
    Ok(Run {
        agents,
        per_process: a.per_process,
        replicas: a.replicas,
        slots,
        node_args: a.node_arg.clone(),
        kill_pct,
        kill_after_s: a.kill_after().as_secs_f64(),
        rep,
        jobs,
        killed,
        success_rate: succeeded as f64 / jobs as f64,
        duplicate_results: disagree.len(),
        duplicate_executions,
        duplicate_first_attempts,
        settle_window_ms,
        rank_step_ms,
        arrival_after_kill,
        write_push_after_kill,
        silence_after_kill,
        sched_wait_ms,
        msgs_per_node_s,
        cpu_cores_per_node,
        peak_rss_mib,
        drain_s,
        members_judged_dead,
        members_revived,
        late_probe_ticks,
        late_judgement_deadlines,
        takeovers,
    })
}

/// Where a run's nodes live: a temporary directory, or one `--keep` names.
enum RunDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl RunDir {
    fn path(&self) -> &Path {
        match self {
            RunDir::Temp(t) => t.path(),
            RunDir::Kept(p) => p,
        }
    }
}

/// The membership ring as the detectors order it (node ids sorted), with which agents
/// were killed, to place each takeover on it.
struct Ring {
    /// Agent numbers in ring order.
    order: Vec<usize>,
    /// Ring position of each agent number (`usize::MAX` if its id is unknown).
    at: Vec<usize>,
    ids: BTreeMap<String, usize>,
    dead: Vec<bool>,
}

impl Ring {
    fn new(ids: &[Option<String>], victims: &[usize]) -> Ring {
        let mut known: Vec<(&String, usize)> = ids
            .iter()
            .enumerate()
            .filter_map(|(i, id)| Some((id.as_ref()?, i)))
            .collect();
        known.sort();
        let order: Vec<usize> = known.iter().map(|(_, i)| *i).collect();
        let mut at = vec![usize::MAX; ids.len()];
        for (pos, &i) in order.iter().enumerate() {
            at[i] = pos;
        }
        Ring {
            ids: known.into_iter().map(|(id, i)| (id.clone(), i)).collect(),
            dead: (0..ids.len()).map(|i| victims.contains(&i)).collect(),
            order,
            at,
        }
    }

    fn agent(&self, id: &str) -> Option<usize> {
        self.ids.get(id).copied()
    }

    /// The agent `k` places before `agent` on the ring.
    fn before(&self, agent: usize, k: usize) -> Option<usize> {
        let n = self.order.len();
        let pos = *self.at.get(agent).filter(|p| **p < n)?;
        Some(self.order[(pos + n - k % n) % n])
    }

    /// Killed agents right before `agent` on the ring.
    fn dead_before(&self, agent: usize) -> usize {
        (1..self.order.len())
            .take_while(|&k| self.before(agent, k).is_some_and(|b| self.dead[b]))
            .count()
    }

    /// Live agents strictly between `from` and `to`, walking the ring forward from
    /// `from`; `None` if `from` is not before `to` within one turn.
    fn live_between(&self, from: usize, to: usize) -> Option<usize> {
        let mut live = 0;
        for k in 1..self.order.len() {
            let b = self.before(to, k)?;
            if b == from {
                return Some(live);
            }
            live += usize::from(!self.dead[b]);
        }
        None
    }
}

const TAKEOVER_HEADER: [&str; 13] = [
    "n",
    "kill_pct",
    "rep",
    "job",
    "holder",
    "dead_before_holder",
    "first_judge",
    "judge_hops",
    "taker",
    "mttr_ms",
    "detection_ms",
    "claim_after_detection_ms",
    "start_after_claim_ms",
];

fn takeover_rows(r: &Run) -> impl Iterator<Item = Vec<String>> + '_ {
    let opt = |v: Option<usize>| v.map_or(String::new(), |v| v.to_string());
    let ms = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.0}"));
    r.takeovers.iter().map(move |t| {
        vec![
            r.agents.to_string(),
            r.kill_pct.to_string(),
            r.rep.to_string(),
            t.job.clone(),
            opt(t.holder),
            t.dead_before.to_string(),
            opt(t.expired_by),
            opt(t.judge_hops),
            opt(t.taker),
            format!("{:.0}", t.mttr_ms),
            ms(t.detection_ms),
            ms(t.claim_after_detection_ms),
            format!("{:.0}", t.start_after_claim_ms),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Agents 0..6 whose ids sort as 3, 0, 5, 1, 4, 2 on the ring; 0, 5 and 4 killed.
    fn ring() -> Ring {
        let ids = ["b", "d", "f", "a", "e", "c"].map(|s| Some(s.to_string()));
        Ring::new(&ids, &[0, 5, 4])
    }

    #[test]
    fn a_holder_is_placed_after_the_killed_nodes_before_it() {
        let r = ring();
        assert_eq!(r.agent("c"), Some(5));
        assert_eq!(r.dead_before(1), 2, "0 and 5 come right before 1");
        assert_eq!(r.dead_before(5), 1, "0 before 5, then live 3");
        assert_eq!(r.dead_before(3), 0, "the ring wraps: 2 before 3 is alive");
        assert_eq!(r.dead_before(2), 1);
    }

    #[test]
    fn judge_hops_count_only_live_nodes_between() {
        let r = ring();
        assert_eq!(r.live_between(3, 1), Some(0), "only killed nodes between");
        assert_eq!(r.live_between(2, 1), Some(1), "3 lies between, alive");
        assert_eq!(r.live_between(1, 2), Some(0), "4 is dead");
        assert_eq!(r.live_between(1, 1), None, "not within one turn");
    }
}
