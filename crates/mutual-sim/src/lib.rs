//! # mutual-sim: a deterministic simulator for Mutual Cloud
//!
//! N real [`Engine`]s (the same code `mutual node` runs) over a simulated network, in one
//! thread, driven by one seeded RNG: the TigerBeetle VOPR / FoundationDB approach. Every
//! fault is derived from the seed, so a seed reproduces a run byte for byte.
//!
//! What is simulated, and how:
//!
//! - **Network**: per-message latency drawn from a range (so messages reorder), loss,
//!   duplication, and partitions that split the nodes in two groups for a while.
//! - **Clocks**: each node's local clock has a fixed offset (skew) and a rate error (drift);
//!   the engines see only local time. Timers are converted back to global time.
//! - **Crashes**: killed nodes stop for good (each at its own moment, or all at one with
//!   `kill_together`, as `mutual-bench e2|e3` kills); crashed nodes restart later from
//!   their durable state (their replica), losing their executions, timers and membership
//!   view.
//! - **Failure detection**: each node probes the `WATCHERS` ring successors it believes
//!   alive, and the `LOOKAHEAD` after them ([`mutual_core::membership::Detector`], shared
//!   with `mutual node`); silence past the timeout makes it
//!   [`Event::Suspect`] the node and tell everyone. A node told it is dead refutes it.
//! - **Replication**: every record written is pushed to every node; periodic anti-entropy
//!   compares per-job fingerprints with a random peer and exchanges the differing jobs,
//!   paced as `mutual node` paces it ([`mutual_core::anti_entropy`]: jobs that just
//!   changed wait out the settle window, for the pushes in flight).
//!   Full replication is what the product does up to about a thousand nodes; it is also
//!   what dominates the cost of large runs (see `bench/results/`). With `--replicas k`
//!   records go only to each job's holders, as `mutual node --replicas k` sends them
//!   (see [`SimConfig::replicas`]), and the end-of-run checks compare the nodes that hold
//!   each job.
//!
//! A run has a **safety phase** with faults, in which the invariant checkers of
//! [`mutual_core::invariants`] run after every step on the node and job that changed, and
//! a **liveness phase** without faults, in which every job must reach a terminal state and
//! all live replicas must converge. Then the cross-replica checkers run on every job.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use mutual_core::anti_entropy::{FarQueue, Pacer, far_partners};
use mutual_core::derive::derive_state;
use mutual_core::doc_cache::DocCache;
use mutual_core::engine::{Command, Engine, EngineConfig, Event, StopReason, Timer};
use mutual_core::invariants::{self, Invariant, Violation};
use mutual_core::membership::{Detector, DownRepeats};
use mutual_core::submit::{CONFIRM_REPLY, SubmitWaits};
use mutual_core::view::{ExecMetrics, Outcome, Record};
use mutual_core::{FencingToken, JobId, JobRequest, JobState, JobView, NodeId, Resources};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

pub mod e4;
pub mod e4_placement;

/// Local clocks start here (ms), so that skewed clocks never go below zero.
const CLOCK_BASE_MS: u64 = 1_000_000_000;
/// Most violations kept in detail (all are counted).
const MAX_VIOLATIONS_KEPT: usize = 20;
/// Anti-entropy rounds a restarted node waits for a caught-up peer before going active.
const PASSIVE_FALLBACK_ROUNDS: u32 = 3;
/// Nodes believed dead near a node on the ring are re-probed about once per this many ticks.
const REPROBE_EVERY_TICKS: u32 = 5;
/// Live job documents per simulated node in `--automerge` mode: far below the product's
/// budget, so that documents are saved and loaded back all through a run.
const SIM_LIVE_DOCS: usize = 8;

/// Everything that shapes a run. Every field is a flag of `mutual-sim`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// Number of jobs submitted.
    pub jobs: usize,
    /// The seed every random choice derives from.
    pub seed: u64,
    /// Percent of nodes killed for good during the safety phase.
    pub kill_percent: f64,
    /// Kill them all at one moment (drawn from the seed), as `mutual-bench e2|e3` does,
    /// instead of each at its own: dead ring neighbours then die together.
    pub kill_together: bool,
    /// Percent of nodes that crash and restart during the safety phase.
    pub restart_percent: f64,
    /// Percent of messages lost during the safety phase.
    pub loss_percent: f64,
    /// Percent of messages delivered twice during the safety phase.
    pub dup_percent: f64,
    /// Smallest one-way latency.
    pub latency_min_ms: u64,
    /// Largest one-way latency.
    pub latency_max_ms: u64,
    /// Clock offsets are drawn from ±skew.
    pub skew_ms: u64,
    /// Clock rate errors are drawn from ±drift (parts per million).
    pub drift_ppm: u64,
    /// Number of partition episodes during the safety phase.
    pub partitions: u32,
    /// Longest partition episode.
    pub partition_max_ms: u64,
    /// Executions per node.
    pub slots: u32,
    /// Shortest job.
    pub job_min_ms: u64,
    /// Longest job.
    pub job_max_ms: u64,
    /// Percent of executions that exit non-zero.
    pub fail_percent: f64,
    /// Jobs are submitted uniformly over this window.
    pub submit_window_ms: u64,
    /// End of the safety phase (faults stop, partitions heal, crashed nodes restart).
    pub fault_ms: u64,
    /// The liveness phase fails if it has not finished after this long.
    pub liveness_limit_ms: u64,
    /// Failure detector probe period.
    pub probe_interval_ms: u64,
    /// Silence after which a watched node is judged dead.
    pub fd_timeout_ms: u64,
    /// Anti-entropy period.
    pub ae_interval_ms: u64,
    /// Settle window W.
    pub settle_ms: u64,
    /// Rendezvous step.
    pub rank_step_ms: u64,
    /// Drift bound of the HLCs.
    pub max_drift_ms: u64,
    /// Replicate real automerge documents end to end (pushes carry automerge changes,
    /// anti-entropy carries saved documents, crashes keep the documents) instead of typed
    /// records. About 100x slower: for small clusters.
    pub automerge: bool,
    /// 0: every record goes to every node (full replication). `k` > 0: as `mutual node
    /// --replicas k` does, each job's records go to its `k` XOR-closest live nodes in the
    /// writer's view and the nodes that wrote to it; holders relay a writer's record once
    /// and answer a writer whose record set differs; the live ring's changes hand the job
    /// off to new replicas; anti-entropy compares only jobs both sides should hold.
    pub replicas: usize,
    /// Deliberately break the protocol, to show the checkers catch it.
    pub buggify: Option<Buggify>,
}

/// Deliberate protocol violations, to show that the simulator's checkers catch them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Buggify {
    /// A holder told to stop because it was fenced writes a successful result anyway, with
    /// a `seen` set that hides the claims that fenced it (a lying, fenced writer).
    RogueResults,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 100,
            jobs: 1_000,
            seed: 0,
            kill_percent: 10.0,
            kill_together: false,
            restart_percent: 5.0,
            loss_percent: 1.0,
            dup_percent: 1.0,
            latency_min_ms: 1,
            latency_max_ms: 10,
            skew_ms: 50,
            drift_ppm: 200,
            partitions: 2,
            partition_max_ms: 2_000,
            slots: 4,
            job_min_ms: 200,
            job_max_ms: 3_000,
            fail_percent: 0.0,
            submit_window_ms: 10_000,
            fault_ms: 15_000,
            liveness_limit_ms: 120_000,
            probe_interval_ms: 100,
            fd_timeout_ms: 500,
            ae_interval_ms: 1_000,
            settle_ms: 30,
            rank_step_ms: 2,
            max_drift_ms: 500,
            automerge: false,
            replicas: 0,
            buggify: None,
        }
    }
}

impl SimConfig {
    /// The flags that reproduce this run.
    pub fn repro_command(&self) -> String {
        let d = SimConfig::default();
        let mut s = format!(
            "mutual-sim --nodes {} --jobs {} --seed {}",
            self.nodes, self.jobs, self.seed
        );
        macro_rules! flag {
            ($f:ident, $name:literal) => {
                if self.$f != d.$f {
                    s.push_str(&format!(concat!(" --", $name, " {}"), self.$f));
                }
            };
        }
        flag!(kill_percent, "kill-percent");
        if self.kill_together {
            s.push_str(" --kill-together");
        }
        flag!(restart_percent, "restart-percent");
        flag!(loss_percent, "loss-percent");
        flag!(dup_percent, "dup-percent");
        flag!(latency_min_ms, "latency-min-ms");
        flag!(latency_max_ms, "latency-max-ms");
        flag!(skew_ms, "skew-ms");
        flag!(drift_ppm, "drift-ppm");
        flag!(partitions, "partitions");
        flag!(partition_max_ms, "partition-max-ms");
        flag!(slots, "slots");
        flag!(job_min_ms, "job-min-ms");
        flag!(job_max_ms, "job-max-ms");
        flag!(fail_percent, "fail-percent");
        flag!(submit_window_ms, "submit-window-ms");
        flag!(fault_ms, "fault-ms");
        flag!(liveness_limit_ms, "liveness-limit-ms");
        flag!(probe_interval_ms, "probe-interval-ms");
        flag!(fd_timeout_ms, "fd-timeout-ms");
        flag!(ae_interval_ms, "ae-interval-ms");
        flag!(settle_ms, "settle-ms");
        flag!(rank_step_ms, "rank-step-ms");
        flag!(max_drift_ms, "max-drift-ms");
        if self.automerge {
            s.push_str(" --automerge");
        }
        flag!(replicas, "replicas");
        if let Some(Buggify::RogueResults) = self.buggify {
            s.push_str(" --buggify rogue-results");
        }
        s
    }
}

/// What a run measured. Deterministic: the same config gives the same summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The run's seed.
    pub seed: u64,
    /// Nodes.
    pub nodes: usize,
    /// Jobs submitted.
    pub jobs: usize,
    /// Invariant violations found (0 is the only acceptable value).
    pub violations: usize,
    /// The first violations, in detail.
    pub violation_details: Vec<String>,
    /// Jobs that succeeded.
    pub succeeded: usize,
    /// Jobs that failed.
    pub failed: usize,
    /// Jobs that were cancelled.
    pub cancelled: usize,
    /// Jobs whose live replicas disagree on the accepted result after convergence.
    pub duplicate_results: usize,
    /// Executions started beyond one per attempt the job needed.
    pub duplicate_executions: usize,
    /// Of those: a second start in an epoch that already had one.
    pub duplicate_same_epoch: usize,
    /// Of those: starts of epochs after the accepted one (re-runs after a success).
    pub duplicate_after_success: usize,
    /// Jobs with more than one counted successful result (both executions finished
    /// validly; replicas still agree on one accepted result).
    pub jobs_with_two_valid_successes: usize,
    /// Executions started in all.
    pub executions: usize,
    /// Executions a node stopped because it learned it lost.
    pub fenced_stops: u64,
    /// Epochs expired (holders judged dead, failures, give-ups).
    pub expiries: u64,
    /// Claims that lost in the settle window.
    pub settle_losses: u64,
    /// Remote records refused by the drift bound.
    pub clock_rejections: u64,
    /// Nodes killed for good.
    pub killed_nodes: usize,
    /// Node crash-restarts.
    pub restarts: usize,
    /// Jobs whose holder was killed or crashed while running them.
    pub takeovers: usize,
    /// Under placement: submissions answered unconfirmed (HTTP 202 in `mutual node`):
    /// after waiting the whole wait for a holder's confirmation, or at once by a node
    /// that reaches no other member.
    pub unconfirmed_submits: usize,
    /// Under placement: jobs no client was promised (never confirmed, and their submitter
    /// crashed or warned the client) that no live node holds at the end. Not a violation:
    /// the client saw its request fail or was warned.
    pub unpromised_lost: usize,
    /// Under placement: the longest a submission waited for its first confirmation
    /// (simulated ms).
    pub submit_confirm_max_ms: u64,
    /// Median time from a holder's kill to its job running on another node (simulated).
    pub mttr_p50_ms: u64,
    /// 95th percentile of the same.
    pub mttr_p95_ms: u64,
    /// Largest of the same.
    pub mttr_max_ms: u64,
    /// Messages sent.
    pub messages: u64,
    /// Messages sent per node per simulated second (all kinds).
    pub messages_per_node_per_s: f64,
    /// Failure-detection messages (probes and acks) per node per simulated second.
    pub probe_messages_per_node_per_s: f64,
    /// Events processed.
    pub events: u64,
    /// Simulated time at the end of the run.
    pub sim_time_ms: u64,
    /// Simulated time at which the liveness phase finished (all terminal, converged).
    pub liveness_done_ms: Option<u64>,
    /// The command that reproduces the run.
    pub reproduce: String,
}

/// What replicates one job's state between nodes.
#[derive(Debug, Clone)]
enum Payload {
    /// Typed records (the fast mode).
    Records(Rc<Vec<Record>>),
    /// Automerge changes or a saved document (`--automerge`).
    Doc(Rc<Vec<u8>>),
}

#[derive(Debug, Clone)]
enum Msg {
    Records {
        job: JobId,
        payload: Payload,
    },
    /// Under placement: records sent straight to a job's holders (`wire::Msg::Changes`).
    Placed {
        job: JobId,
        payload: Payload,
        /// The sender's fingerprint of the job once the payload was in it.
        fingerprint: u64,
        /// `wire::Msg::Changes::reply`: 2 from the writer (relay once, answer if the sets
        /// differ), 1 on an answer (answer back if they still differ), 0 otherwise.
        reply: u8,
        /// `wire::Msg::Changes::sent`: with `reply` 2, the holders the writer sent to.
        sent: Rc<Vec<u32>>,
    },
    Probe,
    Ack,
    /// The node was judged dead as of this version of its info (`wire::Bcast::Down`).
    Down(u32, u64),
    /// The node's newer info: its refutation, or its restart (`wire::Bcast::Info`).
    Up(u32, u64),
    /// The receiver is believed dead as of this version (`wire::Msg::Judged`).
    Judged(u64),
    /// Membership anti-entropy (`wire::Msg::Members`, as far as deaths go): the sender's
    /// dead, each as of a version, and the newer versions it knows of the receiver's
    /// dead (refutations it missed); `reply` asks for the receiver's in return.
    Members {
        dead: Rc<Vec<(u32, u64)>>,
        refuted: Vec<(u32, u64)>,
        reply: bool,
    },
    AeDigest {
        digest: Rc<Vec<(JobId, u64)>>,
        /// The sender is restarting: recently changed jobs are sent too.
        catching_up: bool,
    },
    AeReply {
        jobs: Vec<(JobId, Payload)>,
        caught_up: bool,
        digest: Option<Rc<Vec<(JobId, u64)>>>,
    },
    AePush {
        jobs: Vec<(JobId, Payload)>,
    },
    /// `wire::Msg::Held`: the sender holds the job (a submission's confirmation).
    Held(JobId),
}

#[derive(Debug, Clone)]
enum Ev {
    Deliver {
        to: u32,
        from: u32,
        msg: Msg,
    },
    Fanout {
        from: u32,
        to: Vec<u32>,
        msg: Msg,
    },
    Timer {
        node: u32,
        inc: u32,
        timer: Timer,
    },
    ExecDone {
        node: u32,
        inc: u32,
        job: JobId,
        token: FencingToken,
        exec_id: u64,
        killed: bool,
    },
    ProbeTick {
        node: u32,
        inc: u32,
    },
    /// A watched node's silence reaches the timeout between probe periods.
    JudgeDue {
        node: u32,
        inc: u32,
    },
    AeTick {
        node: u32,
        inc: u32,
    },
    Submit {
        n: usize,
    },
    Crash {
        node: u32,
        restart_after_ms: Option<u64>,
    },
    Restart {
        node: u32,
    },
    PartitionStart {
        until_ms: u64,
    },
    PartitionEnd,
    FaultsEnd,
    CheckTick,
}

struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        Reverse((self.at, self.seq)).cmp(&Reverse((o.at, o.seq)))
    }
}

struct RunningExec {
    exec_id: u64,
    token: FencingToken,
    running: bool,
}

struct SimNode {
    id: NodeId,
    engine: Option<Engine>,
    durable: Vec<JobView>,
    inc: u32,
    offset_ms: i64,
    drift_ppm: i64,
    /// The node's failure detector (its beliefs about the others).
    det: Detector,
    /// The version of its own info: bumped by a refutation and by a restart.
    version: u64,
    /// The newest version of each other node's info it has heard of (0 if none).
    seen: HashMap<u32, u64>,
    /// The version each node it believes dead was judged dead at.
    dead_at: HashMap<u32, u64>,
    passive_rounds: u32,
    /// Which differing jobs anti-entropy sends now, as in `mutual node`.
    ae_pacer: Pacer,
    /// Under placement: the held job whose holders the next anti-entropy round asks.
    ae_cursor: usize,
    /// Jobs whose document it cannot read yet (`anti_entropy::FarQueue`).
    far: FarQueue,
    /// Its judgements to broadcast again (`membership::DownRepeats`).
    downs: DownRepeats<u32>,
    /// Under placement: its submissions waiting for a holder's confirmation
    /// (`mutual_core::submit`). Lost in a crash, with the clients' connections.
    submits: SubmitWaits,
    execs: HashMap<JobId, RunningExec>,
    killed: bool,
    group: u8,
    /// `--automerge`: the node's job documents (durable: they survive a crash), with a
    /// small live budget so that eviction and loading back run all the time.
    docs: DocCache,
}

struct JobInfo {
    id: Option<JobId>,
    /// The node it was submitted to.
    submitter: u32,
    /// The client was told the job is held by another node too: at once under full
    /// replication, on a holder's confirmation under placement.
    confirmed: bool,
    /// Its submitter crashed before a confirmation (the client saw its request fail) or
    /// after answering it unconfirmed (the client was warned): a job the client was never
    /// promised, which may be lost without breaking an invariant.
    unpromised: bool,
    duration_ms: u64,
    kill_ms: Option<u64>,
    killed_holder: Option<u32>,
    starts: Vec<(FencingToken, u32)>,
}

/// A named scenario from `fixtures/sim/scenarios.json`.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// The configuration (the seed is set per run).
    pub config: SimConfig,
}

/// Why a scenario file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Not JSON, or a field of the wrong type or unknown.
    #[error("scenario file: {0}")]
    Json(#[from] serde_json::Error),
    /// The file's shape is wrong.
    #[error("scenario file: {0}")]
    Shape(String),
}

/// Reads a scenario file (`{"scenarios": [{"name": ..., <SimConfig fields>}, ...]}`).
/// Unknown fields are refused, so a misspelt knob cannot silently fall back to a default.
pub fn load_scenarios(text: &str) -> Result<Vec<Scenario>, ScenarioError> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    let list = v
        .get("scenarios")
        .and_then(|s| s.as_array())
        .ok_or_else(|| {
            ScenarioError::Shape("expected an object with a \"scenarios\" array".into())
        })?;
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let mut obj = item
                .as_object()
                .cloned()
                .ok_or_else(|| ScenarioError::Shape(format!("scenarios[{i}] is not an object")))?;
            let name = obj
                .remove("name")
                .and_then(|n| n.as_str().map(str::to_string))
                .ok_or_else(|| ScenarioError::Shape(format!("scenarios[{i}] has no \"name\"")))?;
            let config: SimConfig = serde_json::from_value(serde_json::Value::Object(obj))
                .map_err(|e| ScenarioError::Shape(format!("scenario {name}: {e}")))?;
            Ok(Scenario { name, config })
        })
        .collect()
}

/// One simulation run.
pub struct Sim {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    nodes: Vec<SimNode>,
    ring: std::sync::Arc<[NodeId]>,
    index: HashMap<NodeId, u32>,
    jobs: Vec<JobInfo>,
    job_index: HashMap<JobId, usize>,
    prev_rank: Vec<Vec<u8>>,
    fenced_writes: invariants::FencedWrites,
    violations: Vec<Violation>,
    violation_count: usize,
    faults: bool,
    partitioned: bool,
    exec_seq: u64,
    mttr_ms: Vec<u64>,
    takeovers: usize,
    restarts: usize,
    killed: usize,
    /// Longest wait of a submission for its first confirmation.
    submit_confirm_max_ms: u64,
    /// Submissions answered unconfirmed (see [`Summary::unconfirmed_submits`]).
    unconfirmed_submits: usize,
    messages: u64,
    probe_messages: u64,
    events: u64,
    liveness_done_ms: Option<u64>,
    finished: bool,
    dead_stats: mutual_core::engine::EngineStats,
    trace_prefix: Option<String>,
}

impl Sim {
    /// Builds a run from its config (nothing happens until [`Sim::run`]).
    pub fn new(cfg: SimConfig) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let n = cfg.nodes.max(1);
        let mut ring: Vec<NodeId> = (0..n as u64).map(NodeId::from_index).collect();
        ring.sort();
        let ring: std::sync::Arc<[NodeId]> = ring.into();
        let index: HashMap<NodeId, u32> = ring
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, i as u32))
            .collect();
        let skew = cfg.skew_ms as i64;
        let drift = cfg.drift_ppm as i64;
        let nodes = ring
            .iter()
            .enumerate()
            .map(|(pos, &id)| SimNode {
                id,
                engine: None,
                durable: Vec::new(),
                inc: 0,
                offset_ms: if skew > 0 {
                    rng.random_range(-skew..=skew)
                } else {
                    0
                },
                drift_ppm: if drift > 0 {
                    rng.random_range(-drift..=drift)
                } else {
                    0
                },
                det: Detector::new(pos, ring.clone(), cfg.fd_timeout_ms, 0),
                version: 0,
                seen: HashMap::new(),
                dead_at: HashMap::new(),
                passive_rounds: 0,
                ae_pacer: Pacer::new(cfg.settle_ms),
                ae_cursor: 0,
                far: FarQueue::default(),
                submits: SubmitWaits::default(),
                downs: DownRepeats::default(),
                execs: HashMap::new(),
                killed: false,
                group: 0,
                docs: DocCache::new(id, SIM_LIVE_DOCS),
            })
            .collect();
        let jobs = (0..cfg.jobs)
            .map(|_| JobInfo {
                id: None,
                submitter: 0,
                confirmed: false,
                unpromised: false,
                duration_ms: rng.random_range(cfg.job_min_ms..=cfg.job_max_ms.max(cfg.job_min_ms)),
                kill_ms: None,
                killed_holder: None,
                starts: Vec::new(),
            })
            .collect();
        Sim {
            prev_rank: vec![vec![0u8; cfg.jobs]; n],
            cfg,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            ring,
            index,
            jobs,
            job_index: HashMap::new(),
            fenced_writes: BTreeSet::new(),
            violations: Vec::new(),
            violation_count: 0,
            faults: true,
            partitioned: false,
            exec_seq: 0,
            mttr_ms: Vec::new(),
            takeovers: 0,
            restarts: 0,
            killed: 0,
            submit_confirm_max_ms: 0,
            unconfirmed_submits: 0,
            messages: 0,
            probe_messages: 0,
            events: 0,
            liveness_done_ms: None,
            finished: false,
            dead_stats: mutual_core::engine::EngineStats::default(),
            trace_prefix: std::env::var("MUTUAL_SIM_TRACE").ok(),
        }
    }

    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            settle_ms: self.cfg.settle_ms,
            rank_step_ms: self.cfg.rank_step_ms,
            slots: self.cfg.slots,
            capacity: Resources {
                cpu_millis: 1_000 * self.cfg.slots,
                memory_bytes: u64::from(self.cfg.slots) << 30,
                gpus: 0,
            },
            max_drift_ms: self.cfg.max_drift_ms,
            sweep_interval_ms: 1_000,
            dead_holder_grace_ms: 3 * self.cfg.fd_timeout_ms.max(1),
            ..EngineConfig::default()
        }
    }

    fn local(&self, node: u32, global_ms: u64) -> u64 {
        let n = &self.nodes[node as usize];
        let g = global_ms as i64;
        (CLOCK_BASE_MS as i64 + g + n.offset_ms + g * n.drift_ppm / 1_000_000) as u64
    }

    fn global(&self, node: u32, local_ms: u64) -> u64 {
        let n = &self.nodes[node as usize];
        let x = local_ms as i128 - CLOCK_BASE_MS as i128 - n.offset_ms as i128;
        let g = (x * 1_000_000).div_euclid(1_000_000 + n.drift_ppm as i128) + 1;
        (g.max(self.now as i128)) as u64
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn violate(&mut self, mut v: Violation, node: Option<u32>) {
        self.violation_count += 1;
        if self.violations.len() < MAX_VIOLATIONS_KEPT {
            v.detail = format!(
                "t={}ms node={:?}: {}",
                self.now,
                node.map(|n| self.nodes[n as usize].id),
                v.detail
            );
            self.violations.push(v);
        }
    }

    /// Decides the fate of one message: the arrival times of its copies (none if lost or
    /// cut by the partition, two if duplicated).
    fn route(&mut self, from: u32, to: u32, probe: bool) -> [Option<u64>; 2] {
        self.messages += 1;
        if probe {
            self.probe_messages += 1;
        }
        if self.faults {
            if self.cfg.loss_percent > 0.0
                && self
                    .rng
                    .random_bool((self.cfg.loss_percent / 100.0).min(1.0))
            {
                return [None, None];
            }
            if self.partitioned && self.nodes[from as usize].group != self.nodes[to as usize].group
            {
                return [None, None];
            }
        }
        let (lo, hi) = (
            self.cfg.latency_min_ms,
            self.cfg.latency_max_ms.max(self.cfg.latency_min_ms),
        );
        let first = self.now + self.rng.random_range(lo..=hi);
        let dup = (self.faults
            && self.cfg.dup_percent > 0.0
            && self
                .rng
                .random_bool((self.cfg.dup_percent / 100.0).min(1.0)))
        .then(|| self.now + self.rng.random_range(lo..=hi * 2));
        [Some(first), dup]
    }

    fn send(&mut self, from: u32, to: u32, msg: Msg) {
        let probe = matches!(msg, Msg::Probe | Msg::Ack | Msg::Judged(_));
        for at in self.route(from, to, probe).into_iter().flatten() {
            self.schedule(
                at,
                Ev::Deliver {
                    to,
                    from,
                    msg: msg.clone(),
                },
            );
        }
    }

    /// Sends `msg` to every other node. Deliveries arriving in the same millisecond share
    /// one queue entry: with a thousand nodes, one entry per recipient made the event
    /// queue the bottleneck.
    fn broadcast(&mut self, from: u32, msg: Msg) {
        let mut buckets: std::collections::BTreeMap<u64, Vec<u32>> =
            std::collections::BTreeMap::new();
        for to in 0..self.nodes.len() as u32 {
            if to != from {
                for at in self.route(from, to, false).into_iter().flatten() {
                    buckets.entry(at).or_default().push(to);
                }
            }
        }
        for (at, to) in buckets {
            self.schedule(
                at,
                Ev::Fanout {
                    from,
                    to,
                    msg: msg.clone(),
                },
            );
        }
    }

    /// Runs the whole simulation and returns its summary.
    pub fn run(mut self) -> Summary {
        let cfg = self.cfg.clone();
        let n = self.nodes.len() as u32;
        for i in 0..n {
            self.boot(i, None);
        }
        for j in 0..cfg.jobs {
            let at = if cfg.jobs > 1 {
                cfg.submit_window_ms * j as u64 / (cfg.jobs as u64 - 1).max(1)
            } else {
                0
            };
            self.schedule(at + 1, Ev::Submit { n: j });
        }
        // Faults, all drawn from the seed.
        let fault_ms = cfg.fault_ms.max(1);
        let mut order: Vec<u32> = (0..n).collect();
        for i in (1..order.len()).rev() {
            let j = self.rng.random_range(0..=i);
            order.swap(i, j);
        }
        let kills = ((cfg.kill_percent / 100.0) * f64::from(n)).round() as usize;
        let restarts = ((cfg.restart_percent / 100.0) * f64::from(n)).round() as usize;
        let kills = kills.min(order.len().saturating_sub(1));
        let restarts = restarts.min(order.len().saturating_sub(1 + kills));
        // Drawn only when asked for, so that runs without it keep their draws.
        let together = cfg
            .kill_together
            .then(|| self.rng.random_range(fault_ms / 10..fault_ms));
        for &node in &order[..kills] {
            let at = self.rng.random_range(fault_ms / 10..fault_ms);
            let at = together.unwrap_or(at);
            self.schedule(
                at,
                Ev::Crash {
                    node,
                    restart_after_ms: None,
                },
            );
        }
        for &node in &order[kills..kills + restarts] {
            let at = self.rng.random_range(fault_ms / 10..fault_ms);
            let down = self.rng.random_range(100..3_000u64);
            self.schedule(
                at,
                Ev::Crash {
                    node,
                    restart_after_ms: Some(down),
                },
            );
        }
        for _ in 0..cfg.partitions {
            let at = self.rng.random_range(fault_ms / 10..fault_ms);
            let len = self.rng.random_range(100..=cfg.partition_max_ms.max(101));
            self.schedule(
                at,
                Ev::PartitionStart {
                    until_ms: (at + len).min(fault_ms),
                },
            );
        }
        self.schedule(fault_ms, Ev::FaultsEnd);
        self.schedule(1_000, Ev::CheckTick);

        let deadline = fault_ms + cfg.liveness_limit_ms;
        while let Some(s) = self.queue.pop() {
            if s.at > deadline || self.finished {
                break;
            }
            self.now = s.at;
            self.events += 1;
            self.dispatch(s.ev);
        }
        self.finish()
    }

    fn boot(&mut self, i: u32, views: Option<Vec<JobView>>) {
        let cfg = self.engine_config();
        let local = self.local(i, self.now);
        let id = self.nodes[i as usize].id;
        let (mut engine, cmds) = match views {
            None => (Engine::new(id, cfg, local), Vec::new()),
            Some(v) => Engine::restart(id, cfg, v, local),
        };
        let claimants = self.claimants(i);
        // The first handle() also returns what Engine::new queued (its sweep timer).
        let more = engine.handle(local, claimants).unwrap_or_default();
        let node = &mut self.nodes[i as usize];
        node.engine = Some(engine);
        node.passive_rounds = 0;
        node.ae_pacer.clear();
        node.far.clear();
        node.downs.clear();
        let inc = node.inc;
        self.exec_cmds(i, cmds);
        self.exec_cmds(i, more);
        let jitter = self.rng.random_range(0..self.cfg.probe_interval_ms.max(1));
        self.schedule(self.now + jitter, Ev::ProbeTick { node: i, inc });
        let jitter = self.rng.random_range(0..self.cfg.ae_interval_ms.max(1));
        let first_ae = if self.nodes[i as usize]
            .engine
            .as_ref()
            .is_some_and(|e| e.is_passive())
        {
            0
        } else {
            jitter
        };
        self.schedule(self.now + first_ae, Ev::AeTick { node: i, inc });
    }

    fn up(&self, i: u32) -> bool {
        self.nodes[i as usize].engine.is_some()
    }

    /// Hands an event to node `i`'s engine, executes its commands, checks the invariants.
    fn feed(&mut self, i: u32, event: Event, job: Option<JobId>) {
        let local = self.local(i, self.now);
        let Some(engine) = self.nodes[i as usize].engine.as_mut() else {
            return;
        };
        let cmds = match engine.handle(local, event) {
            Ok(c) => c,
            Err(_) => return,
        };
        self.exec_cmds(i, cmds);
        if let Some(job) = job {
            self.check_step(i, job);
        }
    }

    fn exec_cmds(&mut self, i: u32, cmds: Vec<Command>) {
        let mut touched: Vec<JobId> = Vec::new();
        for c in cmds {
            match c {
                Command::Write { job, record } => {
                    if let Record::Result { epoch, node, rec } = &record {
                        let token = FencingToken {
                            epoch: *epoch,
                            hlc: rec.claim_hlc,
                            node: *node,
                        };
                        self.log_fenced_write(i, job, token, None);
                    }
                    if let Record::Checkpoint {
                        epoch,
                        node,
                        rec,
                        seq,
                    } = &record
                    {
                        let token = FencingToken {
                            epoch: *epoch,
                            hlc: rec.claim_hlc,
                            node: *node,
                        };
                        self.log_fenced_write(i, job, token, Some(*seq));
                    }
                    let payload = self.encode_write(i, job, record);
                    self.nodes[i as usize].ae_pacer.changed(job, self.now);
                    if self.cfg.replicas > 0 {
                        self.push(i, job, payload, None);
                    } else {
                        self.broadcast(i, Msg::Records { job, payload });
                    }
                    touched.push(job);
                }
                Command::Start { job, token, .. } => {
                    self.exec_seq += 1;
                    let exec_id = self.exec_seq;
                    let Some(&jx) = self.job_index.get(&job) else {
                        continue;
                    };
                    let info = &mut self.jobs[jx];
                    info.starts.push((token, i));
                    if let (Some(k), Some(h)) = (info.kill_ms, info.killed_holder)
                        && h != i
                    {
                        self.mttr_ms.push(self.now - k);
                        info.kill_ms = None;
                        info.killed_holder = None;
                    }
                    let dur = info.duration_ms;
                    self.nodes[i as usize].execs.insert(
                        job,
                        RunningExec {
                            exec_id,
                            token,
                            running: true,
                        },
                    );
                    self.schedule_exec_done(i, self.now + dur, job, token, exec_id, false);
                }
                Command::Stop { job, token, reason } => {
                    if self.cfg.buggify == Some(Buggify::RogueResults)
                        && reason == StopReason::Fenced
                    {
                        self.rogue_result(i, job, token);
                    }
                    self.exec_seq += 1;
                    let exec_id = self.exec_seq;
                    if let Some(x) = self.nodes[i as usize].execs.get_mut(&job)
                        && x.token == token
                    {
                        x.exec_id = exec_id;
                        x.running = false;
                        // Fenced, cancelled or timed out: the process is killed either way.
                        self.schedule_exec_done(i, self.now + 1, job, token, exec_id, true);
                    }
                }
                Command::SetTimer { at_ms, timer } => {
                    let inc = self.nodes[i as usize].inc;
                    let at = self.global(i, at_ms);
                    self.schedule(
                        at,
                        Ev::Timer {
                            node: i,
                            inc,
                            timer,
                        },
                    );
                }
            }
        }
        touched.sort();
        touched.dedup();
        for job in touched {
            self.check_step(i, job);
        }
    }

    /// The end of execution `exec_id` on node `i` (its current incarnation) at `at`; it is
    /// ignored if the execution was replaced (stopped) or the node crashed meanwhile.
    fn schedule_exec_done(
        &mut self,
        i: u32,
        at: u64,
        job: JobId,
        token: FencingToken,
        exec_id: u64,
        killed: bool,
    ) {
        let inc = self.nodes[i as usize].inc;
        self.schedule(
            at,
            Ev::ExecDone {
                node: i,
                inc,
                job,
                token,
                exec_id,
                killed,
            },
        );
    }

    /// `--buggify rogue-results`: write the result a fenced holder must never write.
    fn rogue_result(&mut self, i: u32, job: JobId, token: FencingToken) {
        let hlc = mutual_core::Hlc::from_millis(self.local(i, self.now));
        let rec = mutual_core::view::ResultRec {
            claim_hlc: token.hlc,
            outcome: Outcome {
                exit_code: 0,
                timed_out: false,
            },
            outputs: None,
            logs: None,
            metrics: ExecMetrics::default(),
            hlc,
            seen: [token].into_iter().collect(),
        };
        let record = Record::Result {
            epoch: token.epoch,
            node: token.node,
            rec: std::sync::Arc::new(rec),
        };
        self.fenced_writes.insert((token, None));
        let payload = self.encode_write(i, job, record);
        self.broadcast(i, Msg::Records { job, payload });
    }

    /// Turns a record this node wrote into what goes on the wire: the record itself, or in
    /// `--automerge` mode the automerge change it made to the node's document.
    fn encode_write(&mut self, i: u32, job: JobId, record: Record) -> Payload {
        if !self.cfg.automerge {
            return Payload::Records(Rc::new(vec![record]));
        }
        let me = self.nodes[i as usize].id;
        let docs = &mut self.nodes[i as usize].docs;
        let result = match &record {
            Record::Spec(spec) => mutual_core::doc::JobDoc::create(spec, me)
                .map(|d| docs.insert(job, d).last_change()),
            _ => docs
                .get_or_empty(job)
                .and_then(|d| d.write(&record).map(|()| d.last_change())),
        };
        let bytes = match result {
            Ok(change) => change.unwrap_or_default(),
            Err(e) => {
                self.doc_violation(i, job, format!("document write failed: {e}"));
                Vec::new()
            }
        };
        Payload::Doc(Rc::new(bytes))
    }

    /// `--automerge`: node `i` could not use `job`'s document, so its replica and its
    /// document may part ways.
    fn doc_violation(&mut self, i: u32, job: JobId, detail: String) {
        let v = Violation {
            invariant: Invariant::Convergence,
            job: Some(job),
            detail,
        };
        self.violate(v, Some(i));
    }

    /// Applies a payload from a peer to node `to`: records go to the engine directly; automerge
    /// bytes are merged into the node's document, and the records the engine lacks go on.
    fn receive(&mut self, to: u32, job: JobId, payload: Payload) {
        let records: Vec<Record> = match payload {
            Payload::Records(r) => (*r).clone(),
            Payload::Doc(bytes) => {
                let doc = self.nodes[to as usize].docs.get_or_empty(job);
                let doc = match doc {
                    Ok(doc) => doc,
                    Err(e) => {
                        let detail = format!("saved document does not load back: {e}");
                        self.doc_violation(to, job, detail);
                        return;
                    }
                };
                let before = doc.heads();
                if let Err(e) = doc.apply(&bytes) {
                    self.doc_violation(to, job, format!("peer document refused: {e}"));
                    return;
                }
                let node = &mut self.nodes[to as usize];
                let known = node.engine.as_ref().and_then(|e| e.view(&job));
                let Ok(Some(doc)) = node.docs.get_mut(&job) else {
                    return;
                };
                // As `mutual node` does: once the spec is known, decode only what changed.
                let new = if known.is_some_and(|k| k.spec.is_some()) {
                    doc.records_since(&before)
                } else {
                    // Before the creator's first change arrives the document does not decode:
                    // ask the job's holders for it once quiet (as `mutual node` does).
                    let Ok(view) = doc.view() else {
                        if self.cfg.replicas > 0 {
                            self.nodes[to as usize].far.add(job, self.now);
                        }
                        return;
                    };
                    Ok(view.records().collect())
                };
                match new {
                    Ok(new) => new
                        .into_iter()
                        .filter(|r| !known.is_some_and(|k| k.contains(r)))
                        .collect(),
                    Err(e) => {
                        self.doc_violation(to, job, format!("new records undecodable: {e}"));
                        return;
                    }
                }
            }
        };
        let node = &mut self.nodes[to as usize];
        let known = node.engine.as_ref().and_then(|e| e.view(&job));
        if records
            .iter()
            .any(|r| !known.is_some_and(|k| k.contains(r)))
        {
            node.ae_pacer.changed(job, self.now);
        }
        if !records.is_empty() {
            let learnt = known.is_none_or(|k| k.spec.is_none());
            self.merge(to, job, records);
            // As `mutual node` does: a document that became readable needs no more asks.
            if learnt && self.cfg.replicas > 0 {
                self.nodes[to as usize].far.readable(&job);
            }
        }
    }

    fn log_fenced_write(&mut self, i: u32, job: JobId, token: FencingToken, seq: Option<u64>) {
        let fenced = self.nodes[i as usize]
            .engine
            .as_ref()
            .and_then(|e| e.view(&job))
            .is_some_and(|v| v.fences(&token));
        if fenced {
            self.fenced_writes.insert((token, seq));
        }
    }

    /// The per-step checkers on one node's replica of one job.
    fn check_step(&mut self, i: u32, job: JobId) {
        let Some(&jx) = self.job_index.get(&job) else {
            return;
        };
        let Some(engine) = self.nodes[i as usize].engine.as_ref() else {
            return;
        };
        let Some(view) = engine.view(&job) else {
            return;
        };
        if view.spec.is_none() {
            return;
        }
        let derived = derive_state(view);
        let mut found: Vec<Violation> = Vec::new();
        if engine.state(&job) != Some(derived.state) {
            found.push(Violation {
                invariant: Invariant::Convergence,
                job: Some(job),
                detail: format!(
                    "engine reports {:?}, records derive {:?}",
                    engine.state(&job),
                    derived.state
                ),
            });
        }
        if let Err(v) = invariants::check_one_winner(&[(view, &derived)]) {
            found.push(v);
        }
        if let Err(v) = invariants::check_monotone_tokens(view, &derived) {
            found.push(v);
        }
        if let Err(v) = invariants::check_fencing(view, &derived, &self.fenced_writes) {
            found.push(v);
        }
        let running: Vec<FencingToken> = self.nodes[i as usize]
            .execs
            .get(&job)
            .filter(|x| x.running)
            .map(|x| x.token)
            .into_iter()
            .collect();
        if let Err(v) = invariants::check_holder_stops(view, running) {
            found.push(v);
        }
        let prev = self.prev_rank[i as usize][jx];
        let rank = invariants::terminal_rank(&derived.state);
        if let Err(v) = invariants::check_terminal_rank(job, prev, &derived.state) {
            found.push(v);
        }
        self.prev_rank[i as usize][jx] = prev.max(rank);
        for v in found {
            self.violate(v, Some(i));
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { to, from, msg } => self.deliver(to, from, msg),
            Ev::Fanout { from, to, msg } => {
                for t in to {
                    self.deliver(t, from, msg.clone());
                }
            }
            Ev::Timer { node, inc, timer } => {
                if self.up(node) && self.nodes[node as usize].inc == inc {
                    let job = match timer {
                        Timer::Claim { job, .. }
                        | Timer::Settle { job, .. }
                        | Timer::Timeout { job, .. } => Some(job),
                        Timer::Sweep => None,
                    };
                    self.feed(node, Event::Timer(timer), job);
                }
            }
            Ev::ExecDone {
                node,
                inc,
                job,
                token,
                exec_id,
                killed,
            } => {
                if !self.up(node) || self.nodes[node as usize].inc != inc {
                    return;
                }
                let valid = self.nodes[node as usize]
                    .execs
                    .get(&job)
                    .is_some_and(|x| x.exec_id == exec_id);
                if !valid {
                    return;
                }
                self.nodes[node as usize].execs.remove(&job);
                let exit_code = if killed {
                    137
                } else if self.cfg.fail_percent > 0.0
                    && self
                        .rng
                        .random_bool((self.cfg.fail_percent / 100.0).min(1.0))
                {
                    1
                } else {
                    0
                };
                let dur = self
                    .job_index
                    .get(&job)
                    .map_or(0, |&jx| self.jobs[jx].duration_ms);
                let event = Event::ExecutionFinished {
                    job,
                    token,
                    outcome: Outcome {
                        exit_code,
                        timed_out: false,
                    },
                    metrics: ExecMetrics {
                        wall_ms: dur,
                        ..ExecMetrics::default()
                    },
                    outputs: None,
                    logs: None,
                };
                self.feed(node, event, Some(job));
            }
            Ev::ProbeTick { node, inc } => self.probe_tick(node, inc),
            Ev::JudgeDue { node, inc } => self.judge_due_event(node, inc),
            Ev::AeTick { node, inc } => self.ae_tick(node, inc),
            Ev::Submit { n } => self.submit(n),
            Ev::Crash {
                node,
                restart_after_ms,
            } => self.crash(node, restart_after_ms),
            Ev::Restart { node } => {
                if self.up(node) || self.nodes[node as usize].killed {
                    return;
                }
                self.restarts += 1;
                let mut views = std::mem::take(&mut self.nodes[node as usize].durable);
                if self.cfg.automerge {
                    // The durable state is the documents: rebuild the replica from them.
                    let docs = &mut self.nodes[node as usize].docs;
                    let ids: Vec<JobId> = docs.ids().copied().collect();
                    views = ids
                        .iter()
                        .filter_map(|id| docs.get_mut(id).ok().flatten()?.view().ok())
                        .collect();
                }
                let det = Detector::new(
                    node as usize,
                    self.ring.clone(),
                    self.cfg.fd_timeout_ms,
                    self.now,
                );
                let n = &mut self.nodes[node as usize];
                n.det = det;
                n.dead_at.clear();
                n.version += 1;
                let version = n.version;
                self.boot(node, Some(views));
                self.broadcast(node, Msg::Up(node, version));
            }
            Ev::PartitionStart { until_ms } => {
                if !self.faults || self.partitioned {
                    return;
                }
                self.partitioned = true;
                for i in 0..self.nodes.len() {
                    self.nodes[i].group = u8::from(self.rng.random_bool(0.5));
                }
                self.schedule(until_ms.max(self.now + 1), Ev::PartitionEnd);
            }
            Ev::PartitionEnd => self.partitioned = false,
            Ev::FaultsEnd => {
                self.faults = false;
                self.partitioned = false;
            }
            Ev::CheckTick => {
                if !self.faults && self.all_done() {
                    self.liveness_done_ms = Some(self.now);
                    self.finished = true;
                    return;
                }
                self.schedule(self.now + 1_000, Ev::CheckTick);
            }
        }
    }

    fn submit(&mut self, n: usize) {
        let live: Vec<u32> = (0..self.nodes.len() as u32)
            .filter(|&i| self.up(i))
            .collect();
        if live.is_empty() {
            self.schedule(self.now + 100, Ev::Submit { n });
            return;
        }
        let i = live[self.rng.random_range(0..live.len())];
        let local = self.local(i, self.now);
        let req = JobRequest {
            command: vec!["sim-job".into(), n.to_string()],
            ..JobRequest::default()
        };
        let Some(engine) = self.nodes[i as usize].engine.as_mut() else {
            return;
        };
        match engine.submit(local, req) {
            Ok((id, cmds)) => {
                self.jobs[n].id = Some(id);
                self.jobs[n].submitter = i;
                self.job_index.insert(id, n);
                // As `mutual node` does: under placement the submission waits for a
                // holder's confirmation, registered before the push that asks for it.
                // A node that reaches no other member, or waits on the most submissions
                // it may, answers at once, unconfirmed.
                let alone = self.nodes.len() > 1 && self.nodes[i as usize].det.alive_count() <= 1;
                let needs = self.cfg.replicas > 0 && (alone || !self.holders(i, &id).is_empty());
                let waits = needs && !alone && self.nodes[i as usize].submits.add(id, self.now);
                self.jobs[n].confirmed = !needs;
                self.jobs[n].unpromised = needs && !waits;
                if needs && !waits {
                    self.unconfirmed_submits += 1;
                }
                self.exec_cmds(i, cmds);
                self.check_step(i, id);
            }
            Err(e) => self.violate(
                Violation {
                    invariant: Invariant::NoLostJob,
                    job: None,
                    detail: format!("submit refused: {e}"),
                },
                Some(i),
            ),
        }
    }

    fn crash(&mut self, node: u32, restart_after_ms: Option<u64>) {
        if !self.faults || !self.up(node) {
            return;
        }
        self.trace(node, &format!("crash, restart after {restart_after_ms:?}"));
        let sn = &mut self.nodes[node as usize];
        let Some(engine) = sn.engine.take() else {
            return;
        };
        let st = engine.stats();
        sn.durable = engine.into_views().collect();
        self.dead_stats.fenced_stops += st.fenced_stops;
        self.dead_stats.expiries += st.expiries;
        self.dead_stats.settle_losses += st.settle_losses;
        self.dead_stats.clock_rejections += st.clock_rejections;
        let sn = &mut self.nodes[node as usize];
        sn.inc += 1;
        // Clients waiting on its submissions see their requests fail.
        if !sn.submits.is_empty() {
            sn.submits = SubmitWaits::default();
            for info in &mut self.jobs {
                if info.id.is_some() && info.submitter == node && !info.confirmed {
                    info.unpromised = true;
                }
            }
        }
        let sn = &mut self.nodes[node as usize];
        let execs: Vec<(JobId, bool)> = sn.execs.drain().map(|(j, x)| (j, x.running)).collect();
        for (job, running) in execs {
            if running && let Some(&jx) = self.job_index.get(&job) {
                let info = &mut self.jobs[jx];
                if info.kill_ms.is_none() {
                    info.kill_ms = Some(self.now);
                    info.killed_holder = Some(node);
                    self.takeovers += 1;
                }
            }
        }
        match restart_after_ms {
            Some(d) => self.schedule(self.now + d, Ev::Restart { node }),
            None => {
                self.nodes[node as usize].killed = true;
                self.nodes[node as usize].durable.clear();
                let id = self.nodes[node as usize].id;
                self.nodes[node as usize].docs = DocCache::new(id, SIM_LIVE_DOCS);
                self.killed += 1;
            }
        }
    }

    fn probe_tick(&mut self, i: u32, inc: u32) {
        if !self.up(i) || self.nodes[i as usize].inc != inc {
            return;
        }
        let (tick, _) = self.judge_due(i);
        for t in tick.probe {
            self.send(i, t as u32, Msg::Probe);
        }
        self.arm_judgement(i, inc);
        // As `mutual node` does: repeat the judgements that still hold.
        let node = &mut self.nodes[i as usize];
        let det = &node.det;
        let again = node.downs.due(self.now, self.cfg.fd_timeout_ms, |t| {
            !det.is_alive(*t as usize)
        });
        for t in again {
            let at = self.dead_at(i, t);
            self.broadcast(i, Msg::Down(t, at));
        }
        self.submit_tick(i);
        // Every few ticks, probe the nodes believed dead between this node and its last
        // live target: a false suspicion whose refutation was lost (e.g. in a partition)
        // must not last for ever.
        if self.rng.random_ratio(1, REPROBE_EVERY_TICKS) {
            for k in self.nodes[i as usize].det.reprobe() {
                self.send(i, k as u32, Msg::Probe);
            }
        }
        self.schedule(
            self.now + self.cfg.probe_interval_ms,
            Ev::ProbeTick { node: i, inc },
        );
    }

    /// As `mutual node` does: judge until no one is judged (each round marks at least one
    /// node dead). Returns the last round and whether anyone was judged.
    fn judge_due(&mut self, i: u32) -> (mutual_core::membership::Tick, bool) {
        let mut tick = self.nodes[i as usize].det.tick(self.now);
        let mut any = false;
        for _ in 0..self.nodes.len() {
            if tick.judged.is_empty() {
                break;
            }
            any = true;
            for t in std::mem::take(&mut tick.judged) {
                self.judge(i, t as u32);
            }
            tick = self.nodes[i as usize].det.tick(self.now);
        }
        (tick, any)
    }

    /// As `mutual node` does: when a watched node's deadline comes before the next probe
    /// period, judge then.
    fn arm_judgement(&mut self, i: u32, inc: u32) {
        if let Some(at) = self.nodes[i as usize].det.next_judgement_ms()
            && at < self.now + self.cfg.probe_interval_ms
        {
            self.schedule(at.max(self.now), Ev::JudgeDue { node: i, inc });
        }
    }

    fn judge_due_event(&mut self, i: u32, inc: u32) {
        if !self.up(i) || self.nodes[i as usize].inc != inc {
            return;
        }
        let (tick, any) = self.judge_due(i);
        if any {
            for t in tick.probe {
                self.send(i, t as u32, Msg::Probe);
            }
            self.arm_judgement(i, inc);
        }
    }

    /// Node `i`'s detector judged node `t` dead: as `mutual node` does, its engine and
    /// everyone else are told, and the judgement is repeated while it holds.
    fn judge(&mut self, i: u32, t: u32) {
        self.trace(
            t,
            &format!("judged dead by watcher {:?}", self.nodes[i as usize].id),
        );
        self.mark(i, t, false);
        let id = self.nodes[t as usize].id;
        self.feed(i, Event::Suspect(id), None);
        let at = self.dead_at(i, t);
        self.broadcast(i, Msg::Down(t, at));
        let timeout = self.cfg.fd_timeout_ms;
        self.nodes[i as usize].downs.judged(t, self.now, timeout);
    }

    /// As `mutual node` does each probe period: node `i` sends its unconfirmed submissions
    /// to the holders of its current view again, and answers those that waited the whole
    /// wait unconfirmed (their clients are warned: the jobs are no longer promised).
    fn submit_tick(&mut self, i: u32) {
        if self.nodes[i as usize].submits.is_empty() {
            return;
        }
        let timeout = self.cfg.fd_timeout_ms;
        let wait = mutual_core::submit::wait_ms(timeout);
        let due = self.nodes[i as usize].submits.due(self.now, timeout, wait);
        for job in due.resend {
            // The whole state, as a fresh push: still waited on, it asks to confirm.
            if let Some(payload) = self.full_state(i, &job) {
                self.push(i, job, payload, None);
            }
        }
        for job in due.expired {
            self.unconfirmed_submits += 1;
            if let Some(&n) = self.job_index.get(&job) {
                self.jobs[n].unpromised = true;
            }
        }
    }

    /// Updates node `i`'s membership view of `t`.
    /// Debugging aid: with `MUTUAL_SIM_TRACE=<node id prefix>`, prints what happens to that
    /// node's membership on stderr (never on stdout, so summaries stay deterministic).
    fn trace(&self, t: u32, what: &str) {
        if let Some(p) = &self.trace_prefix
            && self.nodes[t as usize]
                .id
                .to_string()
                .starts_with(p.as_str())
        {
            eprintln!(
                "trace t={} {:?}: {what}",
                self.now, self.nodes[t as usize].id
            );
        }
    }

    /// Node `i` is told that `x` was judged dead as of version `at` (as `mutual node`'s
    /// `told_down`): it holds unless `i` knows newer info from `x`; told of its own
    /// death, `i` refutes with a new version.
    fn told_down(&mut self, i: u32, x: u32, at: u64) {
        if x == i {
            let node = &mut self.nodes[i as usize];
            if at >= node.version {
                node.version += 1;
                let version = node.version;
                self.broadcast(i, Msg::Up(i, version));
            }
            return;
        }
        let node = &mut self.nodes[i as usize];
        if at < node.seen.get(&x).copied().unwrap_or(0) {
            return;
        }
        self.mark(i, x, false);
        let d = self.nodes[i as usize].dead_at.entry(x).or_insert(at);
        *d = (*d).max(at);
        // As `mutual node` does under placement: the holders of the dead node's jobs act
        // on the judgement at once.
        if self.cfg.replicas > 0 {
            let id = self.nodes[x as usize].id;
            self.feed(i, Event::Suspect(id), None);
        }
    }

    /// Node `i` hears version `v` of `x`'s info: newer than a judgement, it revives `x`.
    fn told_up(&mut self, i: u32, x: u32, v: u64) {
        if x == i {
            return;
        }
        let node = &mut self.nodes[i as usize];
        let seen = node.seen.entry(x).or_insert(0);
        *seen = (*seen).max(v);
        if node.dead_at.get(&x).is_some_and(|at| v > *at) {
            self.mark(i, x, true);
        }
    }

    /// Node `t` showed node `i` a sign of life while `i` believes it dead: `i` tells it.
    fn tell_if_judged(&mut self, i: u32, t: u32) {
        if let Some(&at) = self.nodes[i as usize].dead_at.get(&t) {
            self.send(i, t, Msg::Judged(at));
        }
    }

    fn dead_at(&self, i: u32, t: u32) -> u64 {
        self.nodes[i as usize].dead_at.get(&t).copied().unwrap_or(0)
    }

    /// Node `i`'s dead, each as of a version, in a fixed order (determinism).
    fn dead_list(&self, i: u32) -> Vec<(u32, u64)> {
        let mut dead: Vec<(u32, u64)> = self.nodes[i as usize]
            .dead_at
            .iter()
            .map(|(t, at)| (*t, *at))
            .collect();
        dead.sort_unstable();
        dead
    }

    fn mark(&mut self, i: u32, t: u32, alive: bool) {
        let was = self.nodes[i as usize].det.is_alive(t as usize);
        self.trace(
            t,
            &format!(
                "node {:?} marks alive={alive} (was {was})",
                self.nodes[i as usize].id
            ),
        );
        let id = self.nodes[t as usize].id;
        let node = &mut self.nodes[i as usize];
        if alive {
            node.dead_at.remove(&t);
        } else {
            let seen = node.seen.get(&t).copied().unwrap_or(0);
            node.dead_at.entry(t).or_insert(seen);
        }
        let before = (self.cfg.replicas > 0).then(|| self.alive_ring(i));
        if !self.nodes[i as usize].det.set(t as usize, alive, self.now) {
            if !alive {
                // The engine may have dropped an older judgement on evidence of life (a
                // record written after it); a new judgement must reach it all the same.
                self.feed(i, Event::MemberDown(id), None);
            }
            return;
        }
        let claimants = self.claimants(i);
        let ev = if alive {
            Event::MemberUp(id)
        } else {
            Event::MemberDown(id)
        };
        self.feed(i, ev, None);
        self.feed(i, claimants, None);
        if let Some(before) = before {
            self.hand_off(i, &before);
        }
    }

    /// Nodes that may claim a job, for the rendezvous delay (as `mutual node` counts).
    /// As `mutual node` does: who may claim, for the engine's rendezvous rank. Under full
    /// replication every live node, listed when few enough to rank exactly; under
    /// placement a job's replicas and its submitter, counted.
    fn claimants(&self, i: u32) -> Event {
        let alive = self.nodes[i as usize].det.alive_count();
        match self.cfg.replicas {
            0 if alive <= mutual_core::rank::EXACT_RANK_MAX_NODES => {
                Event::Claimants(Arc::from(self.alive_ring(i)))
            }
            0 => Event::ClusterSize(alive),
            k => Event::ClusterSize(alive.min(k + 1)),
        }
    }

    /// Node `i` and the nodes it believes alive, sorted by id.
    fn alive_ring(&self, i: u32) -> Vec<NodeId> {
        let det = &self.nodes[i as usize].det;
        (0..self.ring.len())
            .filter(|p| *p == i as usize || det.is_alive(*p))
            .map(|p| self.ring[p])
            .collect()
    }

    /// Under placement: the other nodes that hold `job` in node `i`'s view — its replicas
    /// and every live writer of its records.
    fn holders(&self, i: u32, job: &JobId) -> Vec<u32> {
        self.holders_on(i, job, &self.alive_ring(i))
    }

    /// [`Self::holders`] on a given live ring (sorted ids, `i` included).
    fn holders_on(&self, i: u32, job: &JobId, ring: &[NodeId]) -> Vec<u32> {
        let node = &self.nodes[i as usize];
        let writers = node
            .engine
            .as_ref()
            .and_then(|e| e.view(job))
            .into_iter()
            .flat_map(|v| v.records().map(|r| r.writer()));
        let mut out: Vec<u32> = mutual_core::placement::holders_with_writers(
            ring,
            *job,
            self.cfg.replicas,
            writers,
            &node.id,
        )
        .iter()
        .map(|n| self.index[n])
        .collect();
        // Index order, as the simulator always sent them (runs stay as measured).
        out.sort_unstable();
        out
    }

    /// Node `i`'s whole record set for `job`: its records, or its saved document.
    fn full_state(&mut self, i: u32, job: &JobId) -> Option<Payload> {
        let node = &mut self.nodes[i as usize];
        if self.cfg.automerge {
            return node.docs.saved(job).map(|d| Payload::Doc(Rc::new(d)));
        }
        let view = node.engine.as_ref()?.view(job)?;
        Some(Payload::Records(Rc::new(view.records().collect())))
    }

    fn fingerprint(&self, i: u32, job: &JobId) -> Option<u64> {
        self.nodes[i as usize]
            .engine
            .as_ref()
            .and_then(|e| e.view(job))
            .map(|v| v.fingerprint())
    }

    /// Under placement: sends `payload` to `job`'s holders, or, relaying a record from its
    /// writer (`relay`: the writer and the holders it sent the record to), to the holders
    /// the writer missed (see `mutual node`'s `push`).
    fn push(&mut self, i: u32, job: JobId, payload: Payload, relay: Option<(u32, Rc<Vec<u32>>)>) {
        let fingerprint = self.fingerprint(i, &job).unwrap_or(0);
        let holders = self.holders(i, &job);
        let (to, sent, reply) = match relay {
            None if self.nodes[i as usize].submits.is_waiting(&job) => {
                (holders.clone(), Rc::new(holders), CONFIRM_REPLY)
            }
            None => (holders.clone(), Rc::new(holders), 2),
            Some((writer, sent)) => (
                mutual_core::placement::relay_targets(&holders, writer, &sent),
                Rc::new(Vec::new()),
                0,
            ),
        };
        for to in to {
            let msg = Msg::Placed {
                job,
                payload: payload.clone(),
                fingerprint,
                reply,
                sent: sent.clone(),
            };
            self.send(i, to, msg);
        }
    }

    /// Under placement, after node `i`'s live ring changed from `before`: sends the jobs it
    /// is to hand off to their new replicas (`placement::handoff`).
    fn hand_off(&mut self, i: u32, before: &[NodeId]) {
        let after = self.alive_ring(i);
        if after == before {
            return;
        }
        let me = self.nodes[i as usize].id;
        let jobs: Vec<JobId> = self.nodes[i as usize]
            .engine
            .as_ref()
            .map(|e| e.views().map(|(id, _)| *id).collect())
            .unwrap_or_default();
        for job in jobs {
            let h = mutual_core::placement::handoff(before, &after, job, self.cfg.replicas);
            if h.sender.is_some_and(|s| s != me) {
                continue;
            }
            // New holders: new replicas, and nodes involved in the job that came back.
            let old = self.holders_on(i, &job, before);
            let to: Vec<u32> = self
                .holders_on(i, &job, &after)
                .into_iter()
                .filter(|n| !old.contains(n))
                .collect();
            if to.is_empty() {
                continue;
            }
            let Some(payload) = self.full_state(i, &job) else {
                continue;
            };
            let fingerprint = self.fingerprint(i, &job).unwrap_or(0);
            for t in to {
                let msg = Msg::Placed {
                    job,
                    payload: payload.clone(),
                    fingerprint,
                    reply: 0,
                    sent: Rc::new(Vec::new()),
                };
                self.send(i, t, msg);
            }
        }
    }

    /// Fingerprints of the jobs node `i` holds that `peer` should hold too, and (as
    /// `mutual node` does) 0 for each document it holds but cannot read yet.
    fn digest(&self, i: u32, peer: u32) -> Vec<(JobId, u64)> {
        let node = &self.nodes[i as usize];
        let Some(e) = node.engine.as_ref() else {
            return Vec::new();
        };
        let mut out: Vec<(JobId, u64)> = e
            .views()
            .filter(|(id, _)| self.shares(i, id, peer))
            .map(|(id, v)| (*id, v.fingerprint()))
            .collect();
        if self.cfg.automerge && self.cfg.replicas > 0 {
            out.extend(
                node.docs
                    .ids()
                    .filter(|id| e.view(id).is_none() && self.shares(i, id, peer))
                    .map(|id| (*id, 0)),
            );
        }
        out
    }

    /// Whether, in node `i`'s view, `peer` should hold `job`.
    fn shares(&self, i: u32, job: &JobId, peer: u32) -> bool {
        self.cfg.replicas == 0 || self.holders(i, job).contains(&peer)
    }

    /// Node `i`'s anti-entropy partners this round. Under full replication one random
    /// node it believes alive. Under placement, as `mutual node` picks them: one of its
    /// `k` live ring neighbours on either side (who hold most of the jobs it holds as a
    /// replica), and the far holders (`anti_entropy::far_partners`): every holder of the
    /// jobs whose document it cannot read yet, once they are quiet, and every holder of the
    /// next held job in turn (the nodes involved in a job are anywhere on the ring), so
    /// each job is compared with each of its holders once per pass over the jobs held.
    fn ae_partners(&mut self, i: u32) -> Vec<u32> {
        let n = self.nodes.len() as u32;
        if self.cfg.replicas == 0 {
            for _ in 0..8 {
                let j = self.rng.random_range(0..n.max(1));
                if j != i && self.nodes[i as usize].det.is_alive(j as usize) {
                    return vec![j];
                }
            }
            return Vec::new();
        }
        let mut out = Vec::new();
        let ring = self.alive_ring(i);
        let me = self.nodes[i as usize].id;
        let near = mutual_core::placement::ring_neighbours(&ring, &me, self.cfg.replicas);
        if !near.is_empty() {
            out.push(self.index[&near[self.rng.random_range(0..near.len())]]);
        }
        let jobs: Vec<JobId> = self.nodes[i as usize]
            .engine
            .as_ref()
            .map(|e| e.views().map(|(id, _)| *id).collect())
            .unwrap_or_default();
        let now = self.now;
        let node = &mut self.nodes[i as usize];
        let sweep = (!jobs.is_empty()).then(|| {
            let job = jobs[node.ae_cursor % jobs.len()];
            node.ae_cursor = node.ae_cursor.wrapping_add(1);
            job
        });
        let quiet = node.far.quiet(now, node.ae_pacer.hold_ms());
        let (far, covered) = far_partners(&quiet, sweep, |job| self.holders(i, job));
        for job in &covered {
            self.nodes[i as usize].far.compared(job, now);
        }
        out.extend(far);
        out.sort_unstable();
        out.dedup();
        out
    }

    fn ae_tick(&mut self, i: u32, inc: u32) {
        if !self.up(i) || self.nodes[i as usize].inc != inc {
            return;
        }
        let passive = self.nodes[i as usize]
            .engine
            .as_ref()
            .is_some_and(|e| e.is_passive());
        if passive {
            self.nodes[i as usize].passive_rounds += 1;
            if self.nodes[i as usize].passive_rounds > PASSIVE_FALLBACK_ROUNDS {
                self.feed(i, Event::CaughtUp, None);
            }
        }
        let now = self.now;
        self.nodes[i as usize].ae_pacer.tick(now);
        if self.cfg.replicas > 0 {
            // As `mutual node` does every round: probe one member believed dead, so that a
            // false belief whose refutation was lost ends. Under full replication the
            // member's next record corrects it anyway; under placement a far node may
            // never send this one anything, and its stale belief keeps jobs from their
            // replicas. (Only here, so that full-replication runs stay as measured.)
            let dead: Vec<u32> = (0..self.nodes.len() as u32)
                .filter(|t| *t != i && !self.nodes[i as usize].det.is_alive(*t as usize))
                .collect();
            if !dead.is_empty() {
                let t = dead[self.rng.random_range(0..dead.len())];
                self.send(i, t, Msg::Probe);
            }
        }
        // Membership anti-entropy, as `mutual node` does each round with one neighbour
        // (there only when the two hashes differ; here every round, the dead only).
        let partners = self.ae_partners(i);
        if let Some(&j) = partners.first() {
            let dead = Rc::new(self.dead_list(i));
            let msg = Msg::Members {
                dead,
                refuted: Vec::new(),
                reply: true,
            };
            self.send(i, j, msg);
        }
        for j in partners {
            let digest = Rc::new(self.digest(i, j));
            let catching_up = passive;
            self.send(
                i,
                j,
                Msg::AeDigest {
                    digest,
                    catching_up,
                },
            );
        }
        let next = if passive {
            self.cfg.ae_interval_ms / 4
        } else {
            self.cfg.ae_interval_ms
        };
        self.schedule(self.now + next.max(1), Ev::AeTick { node: i, inc });
    }

    /// Jobs where this node has records the peer's digest lacks or differs on, with what to
    /// send for each: the records, or in `--automerge` mode the saved document; those the
    /// [`Pacer`] holds back (in flight) wait for a later round.
    fn diff(
        &mut self,
        i: u32,
        peer: u32,
        theirs: &[(JobId, u64)],
        catching_up: bool,
    ) -> Vec<(JobId, Payload)> {
        let automerge = self.cfg.automerge;
        let now = self.now;
        let their: HashMap<JobId, u64> = theirs.iter().copied().collect();
        // Jobs the peer lacks are sent only if it should hold them.
        let shared: Option<BTreeSet<JobId>> = (self.cfg.replicas > 0).then(|| {
            self.nodes[i as usize]
                .engine
                .as_ref()
                .map(|e| {
                    e.views()
                        .map(|(id, _)| *id)
                        .filter(|id| their.contains_key(id) || self.shares(i, id, peer))
                        .collect()
                })
                .unwrap_or_default()
        });
        let node = &mut self.nodes[i as usize];
        let Some(e) = node.engine.as_ref() else {
            return Vec::new();
        };
        let pacer = &mut node.ae_pacer;
        let differ: Vec<(JobId, Option<Vec<Record>>)> = e
            .views()
            .filter(|(id, _)| shared.as_ref().is_none_or(|s| s.contains(id)))
            .filter(|(id, v)| {
                their.get(id) != Some(&v.fingerprint()) && pacer.should_send(**id, now, catching_up)
            })
            .map(|(id, v)| (*id, (!automerge).then(|| v.records().collect())))
            .collect();
        differ
            .into_iter()
            .map(|(id, records)| {
                let payload = match records {
                    Some(r) => Payload::Records(Rc::new(r)),
                    None => Payload::Doc(Rc::new(node.docs.saved(&id).unwrap_or_default())),
                };
                (id, payload)
            })
            .collect()
    }

    fn deliver(&mut self, to: u32, from: u32, msg: Msg) {
        if !self.up(to) {
            return;
        }
        // As in `mutual node` (protocol 4): a probe from a node believed dead revives no
        // one; the node is told, and refutes with newer info if it is alive. Only newer
        // info revives (`told_up`).
        if matches!(msg, Msg::Probe) {
            self.tell_if_judged(to, from);
        }
        match msg {
            Msg::Records { job, payload } => self.receive(to, job, payload),
            Msg::Placed {
                job,
                payload,
                fingerprint,
                reply,
                sent,
            } => {
                let before = self.fingerprint(to, &job);
                let confirm = reply == CONFIRM_REPLY;
                let reply = reply.min(2);
                let relay = (reply == 2).then(|| payload.clone());
                self.receive(to, job, payload);
                let after = self.fingerprint(to, &job);
                let readable = self.nodes[to as usize]
                    .engine
                    .as_ref()
                    .and_then(|e| e.view(&job))
                    .is_some_and(|v| v.spec.is_some());
                if confirm && readable {
                    self.send(to, from, Msg::Held(job));
                }
                if let Some(relay) = relay
                    && after != before
                {
                    self.push(to, job, relay, Some((from, sent)));
                }
                // A receiver that cannot decode the job yet (the writer's earlier records
                // never reached it) answers too, so the writer sends it everything.
                if reply > 0 && after != Some(fingerprint) {
                    let payload = self
                        .full_state(to, &job)
                        .unwrap_or_else(|| Payload::Records(Rc::new(Vec::new())));
                    let msg = Msg::Placed {
                        job,
                        payload,
                        fingerprint: after.unwrap_or(0),
                        reply: reply - 1,
                        sent: Rc::new(Vec::new()),
                    };
                    self.send(to, from, msg);
                }
            }
            Msg::Held(job) => {
                if let Some(waited) = self.nodes[to as usize].submits.confirm(&job, self.now) {
                    self.submit_confirm_max_ms = self.submit_confirm_max_ms.max(waited);
                    if let Some(&n) = self.job_index.get(&job) {
                        self.jobs[n].confirmed = true;
                    }
                }
            }
            Msg::Probe => self.send(to, from, Msg::Ack),
            Msg::Ack => {
                let now = self.now;
                self.tell_if_judged(to, from);
                self.nodes[to as usize].det.answered(from as usize, now);
            }
            Msg::Down(x, at) => self.told_down(to, x, at),
            Msg::Judged(at) => {
                // As `mutual node` does: refute if need be, and give the teller this
                // node's version straight (it may be cut off from its broadcasts).
                self.told_down(to, to, at);
                let version = self.nodes[to as usize].version;
                self.send(to, from, Msg::Up(to, version));
            }
            Msg::Up(x, v) => self.told_up(to, x, v),
            Msg::Members {
                dead,
                refuted,
                reply,
            } => {
                for (x, v) in refuted {
                    self.told_up(to, x, v);
                }
                let node = &self.nodes[to as usize];
                let refuted: Vec<(u32, u64)> = dead
                    .iter()
                    .filter_map(|&(x, at)| {
                        let v = if x == to {
                            node.version
                        } else {
                            *node.seen.get(&x)?
                        };
                        (v > at).then_some((x, v))
                    })
                    .collect();
                for &(x, at) in dead.iter() {
                    self.told_down(to, x, at);
                }
                if reply {
                    let dead = Rc::new(self.dead_list(to));
                    let msg = Msg::Members {
                        dead,
                        refuted,
                        reply: false,
                    };
                    self.send(to, from, msg);
                }
            }
            Msg::AeDigest {
                digest: theirs,
                catching_up,
            } => {
                let jobs = self.diff(to, from, &theirs, catching_up);
                let mine = self.digest(to, from);
                let theirs_map: HashMap<JobId, u64> = theirs.iter().copied().collect();
                let want = mine.len() != theirs.len()
                    || mine.iter().any(|(j, f)| theirs_map.get(j) != Some(f));
                let caught_up = self.nodes[to as usize]
                    .engine
                    .as_ref()
                    .is_some_and(|e| !e.is_passive());
                let digest = want.then(|| Rc::new(mine));
                self.send(
                    to,
                    from,
                    Msg::AeReply {
                        jobs,
                        caught_up,
                        digest,
                    },
                );
            }
            Msg::AeReply {
                jobs,
                caught_up,
                digest,
            } => {
                for (job, payload) in jobs {
                    self.receive(to, job, payload);
                }
                if caught_up
                    && self.nodes[to as usize]
                        .engine
                        .as_ref()
                        .is_some_and(|e| e.is_passive())
                {
                    self.feed(to, Event::CaughtUp, None);
                }
                if let Some(d) = digest {
                    let jobs = self.diff(to, from, &d, !caught_up);
                    if !jobs.is_empty() {
                        self.send(to, from, Msg::AePush { jobs });
                    }
                }
            }
            Msg::AePush { jobs } => {
                for (job, payload) in jobs {
                    self.receive(to, job, payload);
                }
            }
        }
    }

    fn merge(&mut self, to: u32, job: JobId, records: Vec<Record>) {
        let check: Vec<mutual_core::Hlc> = records.iter().map(|r| r.hlc()).collect();
        let mut writers: Vec<NodeId> = records.iter().map(|r| r.writer()).collect();
        writers.sort();
        writers.dedup();
        self.feed(to, Event::Remote { job, records }, Some(job));
        // The engine drops a death judgement when it sees a record written after it
        // (evidence of life). The detector must follow, or a node judged dead by mistake
        // (say, across a partition) is never watched again and its real death later goes
        // unnoticed: the writer is told, and its refutation revives it.
        for w in writers {
            let Some(&t) = self.index.get(&w) else {
                continue;
            };
            let judged = self.nodes[to as usize]
                .engine
                .as_ref()
                .is_some_and(|e| e.is_judged_down(&w));
            if !judged {
                self.tell_if_judged(to, t);
            }
        }
        // Invariant 8: whatever was merged is within the drift bound of local time.
        let local = self.local(to, self.now);
        let bound = self.cfg.max_drift_ms;
        let Some(view) = self.nodes[to as usize]
            .engine
            .as_ref()
            .and_then(|e| e.view(&job))
        else {
            return;
        };
        let bad = view
            .records()
            .map(|r| r.hlc())
            .filter(|h| check.contains(h))
            .find(|h| invariants::check_clock_bound(job, *h, local, bound).is_err());
        if let Some(h) = bad
            && let Err(v) = invariants::check_clock_bound(job, h, local, bound)
        {
            self.violate(v, Some(to));
        }
    }

    /// Whether every job is terminal and held alike by every node that should hold it:
    /// every live node, or under placement its replicas among the live nodes (and the
    /// other nodes that hold it agree).
    fn all_done(&self) -> bool {
        if self.jobs.iter().any(|j| j.id.is_none()) {
            return false;
        }
        let live: Vec<&Engine> = self
            .nodes
            .iter()
            .filter_map(|n| n.engine.as_ref())
            .collect();
        if live.is_empty() {
            return true;
        }
        for info in &self.jobs {
            let Some(id) = info.id else { return false };
            let holders: Vec<&JobView> = live.iter().filter_map(|e| e.view(&id)).collect();
            if holders.is_empty() && info.unpromised && !info.confirmed {
                // Never promised to its client and held by no live node: gone for good
                // (`finish` counts it in `unpromised_lost`), nothing left to wait for.
                continue;
            }
            if !self.missing_holders(&id).is_empty() {
                return false;
            }
            let Some(f0) = holders.first().map(|v| v.fingerprint()) else {
                return false;
            };
            for e in &live {
                let Some(v) = e.view(&id) else { continue };
                if e.is_passive()
                    || v.fingerprint() != f0
                    || !e.state(&id).is_some_and(|s| s.is_terminal())
                {
                    return false;
                }
            }
            // With real documents, also wait for each holder's document to hold what its
            // engine holds (`finish` checks it): a change whose dependencies a holder lacks
            // waits in its document until anti-entropy brings them, which under placement
            // may take a few rounds after the engines agree.
            if self.cfg.automerge
                && self.nodes.iter().filter(|n| n.engine.is_some()).any(|n| {
                    let engine_view = n.engine.as_ref().and_then(|e| e.view(&id));
                    let doc_view = n.docs.view(&id);
                    (doc_view.is_some() || engine_view.is_some())
                        && !matches!((doc_view, engine_view), (Some(Ok(d)), Some(e)) if d == *e)
                })
            {
                return false;
            }
        }
        true
    }

    /// Live nodes that should hold `job` and do not: any live node under full
    /// replication; under placement its replicas on the ring of live nodes.
    fn missing_holders(&self, job: &JobId) -> Vec<u32> {
        let lacks = |i: u32| {
            self.nodes[i as usize]
                .engine
                .as_ref()
                .is_some_and(|e| e.view(job).is_none())
        };
        if self.cfg.replicas == 0 {
            return (0..self.nodes.len() as u32).filter(|i| lacks(*i)).collect();
        }
        let live_ring: Vec<NodeId> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].engine.is_some())
            .map(|i| self.ring[i])
            .collect();
        mutual_core::placement::replicas(&live_ring, *job, self.cfg.replicas)
            .iter()
            .map(|n| self.index[n])
            .filter(|i| lacks(*i))
            .collect()
    }

    fn finish(mut self) -> Summary {
        let live: Vec<u32> = (0..self.nodes.len() as u32)
            .filter(|&i| self.up(i))
            .collect();
        let mut succeeded = 0;
        let mut failed = 0;
        let mut cancelled = 0;
        let mut duplicate_results = 0;
        let mut two_successes = 0;
        let mut duplicate_executions = 0;
        let mut dup_same_epoch = 0;
        let mut dup_after_success = 0;
        let mut executions = 0;
        let mut unpromised_lost = 0;
        let mut found: Vec<Violation> = Vec::new();
        for info in &self.jobs {
            executions += info.starts.len();
            let Some(id) = info.id else {
                found.push(Violation {
                    invariant: Invariant::NoLostJob,
                    job: None,
                    detail: "never submitted".into(),
                });
                continue;
            };
            let views: Vec<&JobView> = live
                .iter()
                .filter_map(|&i| {
                    self.nodes[i as usize]
                        .engine
                        .as_ref()
                        .and_then(|e| e.view(&id))
                })
                .collect();
            if views.is_empty() && info.unpromised && !info.confirmed {
                unpromised_lost += 1;
                continue;
            }
            let missing = self.missing_holders(&id);
            if !missing.is_empty() || views.is_empty() {
                found.push(Violation {
                    invariant: Invariant::Convergence,
                    job: Some(id),
                    detail: format!(
                        "{} of {} live nodes hold the job; {} that should do not",
                        views.len(),
                        live.len(),
                        missing.len()
                    ),
                });
            }
            let derived: Vec<_> = views.iter().map(|v| derive_state(v)).collect();
            if let Err(v) = invariants::check_replicas(&views, &self.fenced_writes) {
                found.push(v);
            }
            for (v, d) in views.iter().zip(&derived) {
                if let Err(v) = invariants::check_no_epoch_gap(v, d) {
                    found.push(v);
                    break;
                }
            }
            if let Some(v0) = views.first()
                && views.iter().any(|v| v != v0)
            {
                found.push(Violation {
                    invariant: Invariant::Convergence,
                    job: Some(id),
                    detail: "live replicas still differ after the liveness phase".into(),
                });
            }
            if self.cfg.automerge {
                // The documents themselves must hold exactly the replica each engine has.
                for &i in &live {
                    let node = &self.nodes[i as usize];
                    let doc_view = node.docs.view(&id);
                    let engine_view = node.engine.as_ref().and_then(|e| e.view(&id));
                    if doc_view.is_none() && engine_view.is_none() {
                        // Not a holder (placement).
                        continue;
                    }
                    let same = matches!((&doc_view, engine_view), (Some(Ok(d)), Some(e)) if d == e);
                    if !same {
                        found.push(Violation {
                            invariant: Invariant::Convergence,
                            job: Some(id),
                            detail: format!(
                                "node {:?}: automerge document and replica differ: {}",
                                node.id,
                                doc_engine_difference(doc_view.as_ref(), engine_view)
                            ),
                        });
                        break;
                    }
                }
            }
            let refs: Vec<&_> = derived.iter().collect();
            if let Err(v) = invariants::check_one_accepted_result(id, &refs) {
                duplicate_results += 1;
                found.push(v);
            }
            if let Some(d) = derived.first() {
                if let Err(v) = invariants::check_no_lost_job(id, &d.state) {
                    found.push(v);
                }
                if std::env::var_os("MUTUAL_SIM_DEBUG").is_some()
                    && !matches!(d.state, JobState::Succeeded { .. })
                {
                    eprintln!("job {id} {:?}", d.state);
                    if let Some(t) = d.state.holder() {
                        let h = &self.nodes[self.index[&t.node] as usize];
                        eprintln!(
                            "   holder up={} killed={} inc={} running_here={:?}",
                            h.engine.is_some(),
                            h.killed,
                            h.inc,
                            h.execs.get(&id).map(|x| (x.token, x.running))
                        );
                        for &i in &live {
                            let e = self.nodes[i as usize].engine.as_ref();
                            let down = e.and_then(|e| e.judged_down().find(|(n, _)| *n == t.node));
                            eprintln!(
                                "   node {:?} sim_alive_view={} engine_down={:?} state={:?}",
                                self.nodes[i as usize].id,
                                self.nodes[i as usize]
                                    .det
                                    .is_alive(self.index[&t.node] as usize),
                                down,
                                e.and_then(|e| e.state(&id))
                            );
                        }
                    }
                    for r in views[0].records() {
                        eprintln!("   {r:?}");
                    }
                }
                match d.state {
                    JobState::Succeeded { .. } => succeeded += 1,
                    JobState::Failed { .. } => failed += 1,
                    JobState::Cancelled => cancelled += 1,
                    _ => {}
                }
                if let Some(v) = views.first() {
                    let counted_successes = v
                        .results
                        .iter()
                        .filter(|((e, n), r)| {
                            r.outcome.success() && mutual_core::derive::result_counts(*e, *n, r)
                        })
                        .count();
                    if counted_successes > 1 {
                        two_successes += 1;
                    }
                }
                // Duplicate executions: starts beyond one per epoch that was needed. Epochs
                // after the accepted one were not needed at all.
                let last_needed = match d.state {
                    JobState::Succeeded { token } => token.epoch,
                    _ => mutual_core::Epoch(u32::MAX),
                };
                let mut needed: BTreeSet<mutual_core::Epoch> = BTreeSet::new();
                for (t, _) in &info.starts {
                    if t.epoch <= last_needed {
                        if !needed.insert(t.epoch) {
                            dup_same_epoch += 1;
                        }
                    } else {
                        dup_after_success += 1;
                    }
                }
                duplicate_executions += info.starts.len() - needed.len();
            }
        }
        for v in found {
            self.violate(v, None);
        }
        let mut mttr = self.mttr_ms.clone();
        mttr.sort_unstable();
        let pct = |p: f64| -> u64 {
            if mttr.is_empty() {
                0
            } else {
                mttr[(((mttr.len() as f64) * p).ceil() as usize).clamp(1, mttr.len()) - 1]
            }
        };
        let mut stats = self.dead_stats;
        for n in &self.nodes {
            if let Some(e) = &n.engine {
                let s = e.stats();
                stats.fenced_stops += s.fenced_stops;
                stats.expiries += s.expiries;
                stats.settle_losses += s.settle_losses;
                stats.clock_rejections += s.clock_rejections;
            }
        }
        let secs = (self.now.max(1) as f64) / 1_000.0;
        let per_node =
            |m: u64| ((m as f64) / secs / self.nodes.len() as f64 * 100.0).round() / 100.0;
        Summary {
            seed: self.cfg.seed,
            nodes: self.cfg.nodes,
            jobs: self.cfg.jobs,
            violations: self.violation_count,
            violation_details: self.violations.iter().map(|v| v.to_string()).collect(),
            succeeded,
            failed,
            cancelled,
            duplicate_results,
            duplicate_executions,
            duplicate_same_epoch: dup_same_epoch,
            duplicate_after_success: dup_after_success,
            jobs_with_two_valid_successes: two_successes,
            executions,
            fenced_stops: stats.fenced_stops,
            expiries: stats.expiries,
            settle_losses: stats.settle_losses,
            clock_rejections: stats.clock_rejections,
            killed_nodes: self.killed,
            restarts: self.restarts,
            takeovers: self.takeovers,
            unconfirmed_submits: self.unconfirmed_submits,
            unpromised_lost,
            submit_confirm_max_ms: self.submit_confirm_max_ms,
            mttr_p50_ms: pct(0.50),
            mttr_p95_ms: pct(0.95),
            mttr_max_ms: mttr.last().copied().unwrap_or(0),
            messages: self.messages,
            messages_per_node_per_s: per_node(self.messages),
            probe_messages_per_node_per_s: per_node(self.probe_messages),
            events: self.events,
            sim_time_ms: self.now,
            liveness_done_ms: self.liveness_done_ms,
            reproduce: self.cfg.repro_command(),
        }
    }
}

/// Runs one simulation.
pub fn run(cfg: SimConfig) -> Summary {
    Sim::new(cfg).run()
}

/// What a node's document holds that its engine's replica lacks, and the reverse (a
/// violation's detail).
fn doc_engine_difference(
    doc: Option<&Result<JobView, mutual_core::doc::DocError>>,
    engine: Option<&JobView>,
) -> String {
    let doc = match doc {
        None => return "no document".into(),
        Some(Err(e)) => return format!("document does not decode: {e}"),
        Some(Ok(d)) => d,
    };
    let Some(engine) = engine else {
        return "no replica in the engine".into();
    };
    let only_doc: Vec<Record> = doc.records().filter(|r| !engine.contains(r)).collect();
    let only_engine: Vec<Record> = engine.records().filter(|r| !doc.contains(r)).collect();
    format!("only in the document: {only_doc:?}; only in the replica: {only_engine:?}")
}
