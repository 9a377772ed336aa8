//! The claim engine: one sans-IO state machine per node.
//!
//! `handle(now_ms, event)` in, [`Command`]s out — the engine/runtime split of openraft and
//! quinn-proto. The engine owns the node's replica of every job (as [`JobView`]s), its
//! hybrid logical clock and its free capacity; it never does IO, never reads a clock and
//! never draws randomness. The real node and the simulator execute the commands: persist and
//! push records, start and stop executions, arm timers.
//!
//! The rules (`design.md` §2–§3, and the engine fixes the model check found necessary):
//!
//! - **Claiming.** A queued job that fits is claimed after a rendezvous delay
//!   ([`crate::rank`]); the claimant then waits the settle window and starts only if it is
//!   still the winner of its epoch and the epoch is still open. The window is counted from
//!   the claim's HLC, not from the local clock: a better claim is one stamped earlier, and
//!   the window is sized in that frame (`crate::propagation`), so a node whose HLC runs
//!   ahead of its clock (it heard from a faster clock) waits the difference too.
//! - **Fencing.** A holder stops its execution as soon as its view shows a smaller claim in
//!   its epoch, a claim of a later epoch, its epoch expired, or a terminal state; a holder that
//!   knows it lost writes no result. Results and checkpoints carry `seen`.
//! - **Failure.** A non-zero exit writes the result and an expiry (an attempt used up). A
//!   holder judged dead by this node's own detector has its epoch expired; a periodic sweep
//!   expires epochs of holders that anyone judged dead, as a backstop.
//! - **Restart.** A restarted engine is passive — it claims nothing and expires nothing —
//!   until the driver reports [`Event::CaughtUp`] (pulled from a caught-up peer, or gave up
//!   waiting). It then gives up, by expiry, any epoch its view says it holds but it no longer
//!   runs.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::blob::BlobRef;
use crate::derive::{JobState, derive_state, restorable_checkpoint};
use crate::hlc::{Hlc, HlcClock};
use crate::ids::{JobId, NodeId};
use crate::rank::{EXACT_RANK_MAX_NODES, estimated_rank, exact_rank, score};
use crate::spec::{JobRequest, JobSpec, Resources, SpecError};
use crate::token::{Epoch, FencingToken};
use crate::view::{
    CheckpointRec, ExecMetrics, ExpiryReason, ExpiryRec, Inserted, JobView, Outcome, Record,
    ResultRec,
};

/// Most queued jobs looked at when a slot frees (see `fill_slots`).
pub const MAX_QUEUE_SCAN: usize = 1_024;

/// Most records accepted in one [`Event::Remote`].
pub const MAX_RECORDS_PER_EVENT: usize = 4_096;

/// A node's engine settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Settle window W: start once the local clock reads the claim's HLC plus this. Must
    /// cover the delay from a competing claim's stamp to its arrival here (propagation
    /// plus that claimant's clock offset; `crate::propagation` measures it).
    pub settle_ms: u64,
    /// Rendezvous step: rank r waits r × step before claiming.
    pub rank_step_ms: u64,
    /// Executions this node runs at once.
    pub slots: u32,
    /// Resources this node offers.
    pub capacity: Resources,
    /// This node's labels.
    pub labels: BTreeMap<String, String>,
    /// Whether this node can run container jobs.
    pub containers: bool,
    /// Remote timestamps further ahead than this are refused.
    pub max_drift_ms: u64,
    /// Period of the backstop sweep.
    pub sweep_interval_ms: u64,
    /// A holder judged dead by someone else is expired by the sweep after this long.
    pub dead_holder_grace_ms: u64,
    /// When a slot frees, consider this many queued jobs for claiming.
    pub claim_window: usize,
    /// When a job becomes queued, only nodes whose estimated rendezvous rank is below this
    /// arm a claim timer; the others pick it up when they free a slot or at the next sweep.
    /// This keeps the cost of a new job O(cutoff) per cluster instead of O(nodes).
    pub claim_rank_cutoff: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            settle_ms: 10,
            rank_step_ms: 2,
            slots: 4,
            capacity: Resources {
                cpu_millis: 4_000,
                memory_bytes: 8 << 30,
                gpus: 0,
            },
            labels: BTreeMap::new(),
            containers: false,
            max_drift_ms: crate::hlc::DEFAULT_MAX_DRIFT_MS,
            sweep_interval_ms: 1_000,
            dead_holder_grace_ms: 2_000,
            claim_window: 16,
            claim_rank_cutoff: 8,
        }
    }
}

/// Something that happened to the node.
#[derive(Debug, Clone)]
pub enum Event {
    /// Records received from a peer (decoded from its job document).
    Remote {
        /// The job.
        job: JobId,
        /// The records.
        records: Vec<Record>,
    },
    /// A user asked this node to cancel a job.
    Cancel {
        /// The job.
        job: JobId,
    },
    /// A timer the engine armed fired.
    Timer(Timer),
    /// An execution this node started has ended (after a [`Command::Stop`] too).
    ExecutionFinished {
        /// The job.
        job: JobId,
        /// The token it ran under.
        token: FencingToken,
        /// How it ended.
        outcome: Outcome,
        /// Measurements.
        metrics: ExecMetrics,
        /// The outputs blob, if any.
        outputs: Option<BlobRef>,
        /// The logs blob, if any.
        logs: Option<BlobRef>,
    },
    /// The agent snapshotted a running job's checkpoint directory.
    CheckpointTaken {
        /// The job.
        job: JobId,
        /// The token it runs under.
        token: FencingToken,
        /// The snapshot.
        blob: BlobRef,
    },
    /// This node's own failure detector judged `node` dead (after probing it).
    Suspect(NodeId),
    /// Somebody judged `node` dead (membership dissemination).
    MemberDown(NodeId),
    /// `node` is alive (again).
    MemberUp(NodeId),
    /// The number of nodes that may claim changed: the rendezvous delay is then from an
    /// estimated rank (`crate::rank`). Forgets the list [`Event::Claimants`] gave.
    ClusterSize(usize),
    /// Every node that may claim a job, sorted, this node included (under full
    /// replication, the live nodes): up to [`crate::rank::EXACT_RANK_MAX_NODES`] of them,
    /// the engine ranks itself exactly among them.
    Claimants(Arc<[NodeId]>),
    /// After a restart: the replica has caught up with a peer.
    CaughtUp,
}

/// Timers the engine arms with [`Command::SetTimer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// Claim `epoch` of `job` if it is still queued.
    Claim {
        /// The job.
        job: JobId,
        /// The epoch.
        epoch: Epoch,
    },
    /// The settle window after a claim has passed.
    Settle {
        /// The job.
        job: JobId,
        /// The epoch claimed.
        epoch: Epoch,
    },
    /// The job's timeout.
    Timeout {
        /// The job.
        job: JobId,
        /// The execution's token.
        token: FencingToken,
    },
    /// The backstop sweep.
    Sweep,
}

/// Why an execution must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StopReason {
    /// A smaller claim in its epoch, a later epoch's claim, or its epoch expired.
    Fenced,
    /// The job reached a terminal state elsewhere (e.g. cancelled).
    Terminal,
    /// The job's timeout passed.
    Timeout,
}

/// Something the driver must do.
#[derive(Debug, Clone)]
pub enum Command {
    /// Persist the record durably, then push it to peers. The engine's view already has it.
    Write {
        /// The job.
        job: JobId,
        /// The record.
        record: Record,
    },
    /// Start executing the job.
    Start {
        /// The job.
        job: JobId,
        /// The fencing token (hand it to the job).
        token: FencingToken,
        /// The spec.
        spec: Arc<JobSpec>,
        /// The checkpoint to restore first, if any.
        restore: Option<BlobRef>,
    },
    /// Stop the execution at once (kill it); report [`Event::ExecutionFinished`] when gone.
    Stop {
        /// The job.
        job: JobId,
        /// Its token.
        token: FencingToken,
        /// Why.
        reason: StopReason,
    },
    /// Deliver `timer` when the local clock reads `at_ms`.
    SetTimer {
        /// Local time to fire at.
        at_ms: u64,
        /// The timer.
        timer: Timer,
    },
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// A cancel record was written.
    Cancelled,
    /// The job had already ended; nothing was written.
    AlreadyTerminal(JobState),
}

/// Errors the engine returns to callers (refused requests, not protocol outcomes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The job is not known here.
    #[error("unknown job {0}")]
    UnknownJob(JobId),
    /// The spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Too many records in one event.
    #[error("too many records in one message: {got}, the limit is {MAX_RECORDS_PER_EVENT}")]
    TooManyRecords {
        /// Found.
        got: usize,
    },
}

/// Counters for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Events handled.
    pub events: u64,
    /// Claims written.
    pub claims: u64,
    /// Claims that lost during the settle window.
    pub settle_losses: u64,
    /// Executions started.
    pub starts: u64,
    /// Executions stopped because the node learned it lost.
    pub fenced_stops: u64,
    /// Expiries written.
    pub expiries: u64,
    /// Results written.
    pub results: u64,
    /// Remote records refused for being beyond the drift bound.
    pub clock_rejections: u64,
    /// Remote records that conflicted with a different value under the same key.
    pub conflicts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExecState {
    Running,
    Stopping(StopReason),
}

#[derive(Debug, Clone, Copy)]
struct Exec {
    token: FencingToken,
    state: ExecState,
    checkpoint_seq: u64,
}

#[derive(Debug, Default)]
struct Entry {
    view: JobView,
    state: Option<JobState>,
    exec: Option<Exec>,
    /// Claim timer armed for this epoch.
    armed: Option<Epoch>,
    /// Claimed, waiting for the settle window.
    pending: Option<FencingToken>,
    /// Key in the queued index.
    queued_key: Option<QueueKey>,
    /// Node this job is indexed under in `held_by`.
    holder: Option<NodeId>,
    /// Local time at which this replica first saw the current holder.
    holder_since_ms: u64,
    /// This node's rank for an epoch, computed under claimant list `.1` (see
    /// [`Engine::rank`]).
    rank: Option<(Epoch, u64, u64)>,
}

/// Queue order: priority, then attempts already begun (a job taken over from a dead
/// holder, or retried after a failure, resumes before work that never started: its
/// user has waited longest and its checkpoint is warm), then submission time.
type QueueKey = (Reverse<i32>, Reverse<bool>, Hlc, JobId);

/// One node's claim engine.
#[derive(Debug)]
pub struct Engine {
    me: NodeId,
    config: EngineConfig,
    clock: HlcClock,
    jobs: BTreeMap<JobId, Entry>,
    queued: BTreeSet<QueueKey>,
    held_by: BTreeMap<NodeId, BTreeSet<JobId>>,
    suspected: BTreeSet<NodeId>,
    down_since: BTreeMap<NodeId, u64>,
    free: Resources,
    free_slots: u32,
    cluster_size: usize,
    /// The claimants, when the driver gave them ([`Event::Claimants`]).
    claimants: Option<Arc<[NodeId]>>,
    /// Bumped whenever the claimants change, to invalidate cached ranks.
    claimants_gen: u64,
    passive: bool,
    nonce: u64,
    out: Vec<Command>,
    stats: EngineStats,
}

impl Engine {
    /// A fresh node with no state (active at once: it has nothing stale to act on). The
    /// commands it queues at birth (the periodic sweep timer) come out of the first
    /// [`Engine::handle`] call.
    pub fn new(me: NodeId, config: EngineConfig, now_ms: u64) -> Engine {
        let mut e = Engine {
            me,
            clock: HlcClock::new(config.max_drift_ms),
            free: config.capacity,
            free_slots: config.slots,
            config,
            jobs: BTreeMap::new(),
            queued: BTreeSet::new(),
            held_by: BTreeMap::new(),
            suspected: BTreeSet::new(),
            down_since: BTreeMap::new(),
            cluster_size: 1,
            claimants: None,
            claimants_gen: 0,
            passive: false,
            nonce: 0,
            out: Vec::new(),
            stats: EngineStats::default(),
        };
        e.set_timer(now_ms + e.config.sweep_interval_ms, Timer::Sweep);
        e
    }

    /// A node restarted from its durable replica. It stays passive until
    /// [`Event::CaughtUp`]. Returns the engine and the commands to run (timers).
    pub fn restart(
        me: NodeId,
        config: EngineConfig,
        views: impl IntoIterator<Item = JobView>,
        now_ms: u64,
    ) -> (Engine, Vec<Command>) {
        let mut e = Engine::new(me, config, now_ms);
        e.passive = true;
        let mut max_hlc = Hlc(0);
        for view in views {
            let Some(id) = view.spec.as_ref().map(|s| s.id) else {
                continue;
            };
            for r in view.records() {
                max_hlc = max_hlc.max(r.hlc());
            }
            e.jobs.insert(
                id,
                Entry {
                    view,
                    ..Entry::default()
                },
            );
        }
        // Our own clock must move past everything we hold before the crash, whatever the
        // drift bound says: these are our own durable records.
        e.clock = clock_at_least(e.config.max_drift_ms, max_hlc);
        let ids: Vec<JobId> = e.jobs.keys().copied().collect();
        for id in ids {
            e.reevaluate(now_ms, id);
        }
        let out = std::mem::take(&mut e.out);
        (e, out)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.me
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Adapts the settle window and the rendezvous step to the claim propagation delay the
    /// driver measures (both must cover it: `settle_ms` so a better claim arrives before
    /// this node starts, `rank_step_ms` so lower-ranked nodes see the top one's claim
    /// before making their own). Timers already armed keep their times.
    pub fn tune(&mut self, settle_ms: u64, rank_step_ms: u64) {
        self.config.settle_ms = settle_ms;
        self.config.rank_step_ms = rank_step_ms;
    }

    /// The settle window and rendezvous step in force, in ms.
    pub fn timing(&self) -> (u64, u64) {
        (self.config.settle_ms, self.config.rank_step_ms)
    }

    /// True while restarted and not yet caught up.
    pub fn is_passive(&self) -> bool {
        self.passive
    }

    /// The node's replica of a job.
    pub fn view(&self, job: &JobId) -> Option<&JobView> {
        self.jobs.get(job).map(|e| &e.view)
    }

    /// All jobs this replica holds, with their views.
    pub fn views(&self) -> impl Iterator<Item = (&JobId, &JobView)> {
        self.jobs.iter().map(|(id, e)| (id, &e.view))
    }

    /// Consumes the engine, returning its durable state (what a crash keeps).
    pub fn into_views(self) -> impl Iterator<Item = JobView> {
        self.jobs.into_values().map(|e| e.view)
    }

    /// The derived state of a job as this replica sees it.
    pub fn state(&self, job: &JobId) -> Option<JobState> {
        self.jobs.get(job).and_then(|e| e.state)
    }

    /// Jobs this node is executing (or stopping), with their tokens.
    pub fn executions(&self) -> impl Iterator<Item = (JobId, FencingToken, bool)> + '_ {
        self.jobs.iter().filter_map(|(id, e)| {
            e.exec
                .map(|x| (*id, x.token, x.state == ExecState::Running))
        })
    }

    /// Nodes this replica currently holds judged dead (by its own detector or anyone's),
    /// with the local time of the judgement.
    pub fn judged_down(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.down_since.iter().map(|(n, t)| (*n, *t))
    }

    /// True iff this replica holds `node` judged dead.
    pub fn is_judged_down(&self, node: &NodeId) -> bool {
        self.down_since.contains_key(node)
    }

    /// The hybrid logical clock's last timestamp.
    pub fn clock(&self) -> Hlc {
        self.clock.last()
    }

    /// Accepts a job: validates it, writes its spec, and considers claiming it.
    pub fn submit(
        &mut self,
        now_ms: u64,
        request: JobRequest,
    ) -> Result<(JobId, Vec<Command>), EngineError> {
        let hlc = self.clock.now(now_ms);
        self.nonce += 1;
        let id = JobId::derive(self.me, hlc, self.nonce);
        let spec = request.validate(id, hlc, self.me)?;
        let record = Record::Spec(Arc::new(spec));
        self.jobs.entry(id).or_default().view.insert(record.clone());
        self.out.push(Command::Write { job: id, record });
        self.reevaluate(now_ms, id);
        Ok((id, std::mem::take(&mut self.out)))
    }

    /// Cancels a job (writes a cancel record unless it already ended).
    pub fn cancel(
        &mut self,
        now_ms: u64,
        job: JobId,
    ) -> Result<(CancelOutcome, Vec<Command>), EngineError> {
        let entry = self.jobs.get(&job).ok_or(EngineError::UnknownJob(job))?;
        if entry.view.spec.is_none() {
            return Err(EngineError::UnknownJob(job));
        }
        if let Some(state) = entry.state.filter(|s| s.is_terminal()) {
            return Ok((CancelOutcome::AlreadyTerminal(state), Vec::new()));
        }
        let hlc = self.clock.now(now_ms);
        self.write(job, Record::Cancel { node: self.me, hlc });
        self.reevaluate(now_ms, job);
        Ok((CancelOutcome::Cancelled, std::mem::take(&mut self.out)))
    }

    /// Handles one event; returns the commands to execute, in order.
    pub fn handle(&mut self, now_ms: u64, event: Event) -> Result<Vec<Command>, EngineError> {
        self.stats.events += 1;
        match event {
            Event::Remote { job, records } => self.on_remote(now_ms, job, records)?,
            Event::Cancel { job } => {
                let (_, cmds) = self.cancel(now_ms, job)?;
                self.out.extend(cmds);
            }
            Event::Timer(t) => self.on_timer(now_ms, t),
            Event::ExecutionFinished {
                job,
                token,
                outcome,
                metrics,
                outputs,
                logs,
            } => self.on_finished(now_ms, job, token, outcome, metrics, outputs, logs),
            Event::CheckpointTaken { job, token, blob } => {
                self.on_checkpoint(now_ms, job, token, blob)
            }
            Event::Suspect(node) if node == self.me => {}
            Event::Suspect(node) => {
                self.suspected.insert(node);
                self.down_since.entry(node).or_insert(now_ms);
                if !self.passive {
                    self.expire_held_by(now_ms, node);
                }
            }
            Event::MemberDown(node) => {
                self.down_since.entry(node).or_insert(now_ms);
            }
            Event::MemberUp(node) => {
                self.suspected.remove(&node);
                self.down_since.remove(&node);
            }
            Event::ClusterSize(n) => {
                self.cluster_size = n.max(1);
                self.claimants = None;
                self.claimants_gen += 1;
            }
            Event::Claimants(nodes) => {
                self.cluster_size = nodes.len().max(1);
                self.claimants = Some(nodes);
                self.claimants_gen += 1;
            }
            Event::CaughtUp => {
                if self.passive {
                    self.passive = false;
                    let ids: Vec<JobId> = self.jobs.keys().copied().collect();
                    for id in ids {
                        self.reevaluate(now_ms, id);
                    }
                    let dead: Vec<NodeId> = self.suspected.iter().copied().collect();
                    for node in dead {
                        self.expire_held_by(now_ms, node);
                    }
                    self.fill_slots(now_ms);
                }
            }
        }
        Ok(std::mem::take(&mut self.out))
    }

    fn write(&mut self, job: JobId, record: Record) {
        match &record {
            Record::Claim { .. } => self.stats.claims += 1,
            Record::Expiry { .. } => self.stats.expiries += 1,
            Record::Result { .. } => self.stats.results += 1,
            _ => {}
        }
        self.jobs
            .entry(job)
            .or_default()
            .view
            .insert(record.clone());
        self.out.push(Command::Write { job, record });
    }

    fn set_timer(&mut self, at_ms: u64, timer: Timer) {
        self.out.push(Command::SetTimer { at_ms, timer });
    }

    fn on_remote(
        &mut self,
        now_ms: u64,
        job: JobId,
        records: Vec<Record>,
    ) -> Result<(), EngineError> {
        if records.len() > MAX_RECORDS_PER_EVENT {
            return Err(EngineError::TooManyRecords { got: records.len() });
        }
        let mut changed = false;
        for r in records {
            if self.clock.observe(r.hlc(), now_ms).is_err() {
                self.stats.clock_rejections += 1;
                continue;
            }
            // A node that wrote after we (or anyone) judged it dead is alive: forget the
            // judgement, or the sweep would expire its every new claim.
            let writer = r.writer();
            if let Some(&since) = self.down_since.get(&writer)
                && r.hlc().as_millis() > since + self.config.max_drift_ms
            {
                self.down_since.remove(&writer);
                self.suspected.remove(&writer);
            }
            if let Record::Spec(s) = &r
                && s.id != job
            {
                continue;
            }
            let entry = self.jobs.entry(job).or_default();
            match entry.view.insert(r) {
                Inserted::New => changed = true,
                Inserted::Conflict => {
                    self.stats.conflicts += 1;
                    changed = true;
                }
                Inserted::Duplicate => {}
            }
        }
        if changed {
            self.reevaluate(now_ms, job);
        }
        Ok(())
    }

    fn fits(&self, spec: &JobSpec) -> bool {
        self.free_slots > 0
            && spec.resources.fits_in(&self.free)
            && spec.labels_match(&self.config.labels)
            && (spec.image.is_none() || self.config.containers)
    }

    fn reserve(&mut self, r: &Resources) {
        self.free_slots -= 1;
        self.free.cpu_millis -= r.cpu_millis;
        self.free.memory_bytes -= r.memory_bytes;
        self.free.gpus -= r.gpus;
    }

    fn release(&mut self, r: &Resources) {
        self.free_slots = (self.free_slots + 1).min(self.config.slots);
        self.free.cpu_millis =
            (self.free.cpu_millis + r.cpu_millis).min(self.config.capacity.cpu_millis);
        self.free.memory_bytes =
            (self.free.memory_bytes + r.memory_bytes).min(self.config.capacity.memory_bytes);
        self.free.gpus = (self.free.gpus + r.gpus).min(self.config.capacity.gpus);
    }

    /// Re-derives a job's state after its view changed and reacts to it.
    fn reevaluate(&mut self, now_ms: u64, job: JobId) {
        let Some(entry) = self.jobs.get_mut(&job) else {
            return;
        };
        let Some(spec) = entry.view.spec.clone() else {
            return;
        };
        let state = derive_state(&entry.view).state;
        entry.state = Some(state);

        // Invariant 7: a holder that learns it lost stops at once.
        if let Some(exec) = entry.exec.as_mut()
            && exec.state == ExecState::Running
        {
            let fenced = entry.view.fences(&exec.token) || entry.view.is_expired(exec.token.epoch);
            let reason = if state.is_terminal() {
                Some(StopReason::Terminal)
            } else if fenced {
                Some(StopReason::Fenced)
            } else {
                None
            };
            if let Some(reason) = reason {
                exec.state = ExecState::Stopping(reason);
                let token = exec.token;
                self.stats.fenced_stops += 1;
                self.out.push(Command::Stop { job, token, reason });
            }
        }

        // Queued index.
        let want_key = match state {
            JobState::Queued { epoch } => Some((
                Reverse(spec.priority),
                Reverse(epoch > Epoch::FIRST),
                spec.submitted_at,
                job,
            )),
            _ => None,
        };
        if entry.queued_key != want_key {
            if let Some(k) = entry.queued_key.take() {
                self.queued.remove(&k);
            }
            if let Some(k) = want_key {
                self.queued.insert(k);
                entry.queued_key = Some(k);
            }
        }

        // Holder index (for failure handling).
        let holder = state.holder().map(|t| t.node);
        if entry.holder != holder {
            if let Some(old) = entry.holder.take()
                && let Some(set) = self.held_by.get_mut(&old)
            {
                set.remove(&job);
                if set.is_empty() {
                    self.held_by.remove(&old);
                }
            }
            if let Some(h) = holder {
                self.held_by.entry(h).or_default().insert(job);
                entry.holder = Some(h);
                entry.holder_since_ms = now_ms;
            }
        }
        let (armed, pending, idle) = (entry.armed, entry.pending, entry.exec.is_none());

        if self.passive {
            return;
        }
        match state {
            JobState::Queued { epoch } => {
                let near = self.rank(job, epoch) < self.config.claim_rank_cutoff;
                if near && armed != Some(epoch) && pending.is_none() && idle && self.fits(&spec) {
                    self.arm_claim(now_ms, job, epoch);
                }
            }
            JobState::Claimed { token } | JobState::Running { token } => {
                if token.node == self.me {
                    // The view says we hold it, but we run nothing and are not settling:
                    // our execution died with a previous incarnation. Give the epoch up.
                    if idle && pending.is_none() {
                        self.expire(now_ms, job, token, ExpiryReason::GaveUp);
                    }
                } else if self.suspected.contains(&token.node) {
                    self.expire(now_ms, job, token, ExpiryReason::HolderDead);
                }
            }
            _ => {}
        }
    }

    /// This node's rendezvous rank for `epoch` of `job`: exact among the claimants the
    /// driver gave, if any and not too many, else estimated from the cluster size. Exact
    /// ranks are cached per job until the epoch or the claimants change.
    fn rank(&mut self, job: JobId, epoch: Epoch) -> u64 {
        let Some(nodes) = self
            .claimants
            .as_ref()
            .filter(|n| n.len() <= EXACT_RANK_MAX_NODES)
        else {
            return estimated_rank(score(job, epoch, self.me), self.cluster_size);
        };
        let gen_now = self.claimants_gen;
        let cached = self.jobs.get(&job).and_then(|e| e.rank);
        if let Some((e, g, r)) = cached
            && e == epoch
            && g == gen_now
        {
            return r;
        }
        let r = exact_rank(job, epoch, self.me, nodes);
        if let Some(entry) = self.jobs.get_mut(&job) {
            entry.rank = Some((epoch, gen_now, r));
        }
        r
    }

    fn arm_claim(&mut self, now_ms: u64, job: JobId, epoch: Epoch) {
        if let Some(e) = self.jobs.get_mut(&job) {
            e.armed = Some(epoch);
        }
        let delay = self.rank(job, epoch) * self.config.rank_step_ms;
        self.set_timer(now_ms + delay, Timer::Claim { job, epoch });
    }

    fn expire(&mut self, now_ms: u64, job: JobId, token: FencingToken, reason: ExpiryReason) {
        let Some(entry) = self.jobs.get(&job) else {
            return;
        };
        if entry.view.is_expired(token.epoch) {
            return;
        }
        let hlc = self.clock.now(now_ms);
        self.write(
            job,
            Record::Expiry {
                epoch: token.epoch,
                observer: self.me,
                rec: ExpiryRec { hlc, reason },
            },
        );
        self.reevaluate(now_ms, job);
    }

    /// The jobs whose current holder, in this replica, is `node`.
    fn jobs_held_by(&self, node: NodeId) -> Vec<JobId> {
        self.held_by
            .get(&node)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    fn expire_held_by(&mut self, now_ms: u64, node: NodeId) {
        let jobs = self.jobs_held_by(node);
        for job in jobs {
            if let Some(token) = self
                .jobs
                .get(&job)
                .and_then(|e| e.state)
                .and_then(|s| s.holder())
                && token.node == node
            {
                self.expire(now_ms, job, token, ExpiryReason::HolderDead);
            }
        }
    }

    /// Arms claim timers for the first queued jobs that fit, after capacity freed up.
    fn fill_slots(&mut self, now_ms: u64) {
        if self.passive || self.free_slots == 0 {
            return;
        }
        // Walk the queue in priority order and arm up to `claim_window` jobs this node can
        // run. Jobs it cannot run (labels, GPUs, containers) are skipped, so they do not
        // starve the ones behind them; the walk is bounded so a huge backlog stays cheap.
        let mut armed = 0usize;
        let mut candidates: Vec<(JobId, Epoch)> = Vec::new();
        for key in self.queued.iter().take(MAX_QUEUE_SCAN) {
            if armed >= self.config.claim_window {
                break;
            }
            let job = key.3;
            let Some(entry) = self.jobs.get(&job) else {
                continue;
            };
            let (Some(spec), Some(JobState::Queued { epoch })) =
                (entry.view.spec.as_ref(), entry.state)
            else {
                continue;
            };
            if entry.pending.is_some() || entry.exec.is_some() || !self.fits(spec) {
                continue;
            }
            armed += 1;
            if entry.armed != Some(epoch) {
                candidates.push((job, epoch));
            }
        }
        for (job, epoch) in candidates {
            self.arm_claim(now_ms, job, epoch);
        }
    }

    fn on_timer(&mut self, now_ms: u64, timer: Timer) {
        match timer {
            Timer::Claim { job, epoch } => self.on_claim_timer(now_ms, job, epoch),
            Timer::Settle { job, epoch } => self.on_settle(now_ms, job, epoch),
            Timer::Timeout { job, token } => {
                if let Some(exec) = self.jobs.get_mut(&job).and_then(|e| e.exec.as_mut())
                    && exec.token == token
                    && exec.state == ExecState::Running
                {
                    exec.state = ExecState::Stopping(StopReason::Timeout);
                    self.out.push(Command::Stop {
                        job,
                        token,
                        reason: StopReason::Timeout,
                    });
                }
            }
            Timer::Sweep => {
                if !self.passive {
                    self.sweep(now_ms);
                    self.fill_slots(now_ms);
                }
                self.set_timer(now_ms + self.config.sweep_interval_ms, Timer::Sweep);
            }
        }
    }

    /// The backstop for holders judged dead by someone else whose watcher's expiry never
    /// arrived. To avoid every node expiring the same epoch at once, only the nodes ranked
    /// near the top for the job's next epoch act at first; the admitted rank doubles with
    /// every further grace period, so the job is never stuck behind dead top-ranked nodes.
    fn sweep(&mut self, now_ms: u64) {
        let grace = self.config.dead_holder_grace_ms.max(1);
        let due: Vec<(NodeId, u64)> = self
            .down_since
            .iter()
            .filter(|(n, since)| **since + grace <= now_ms && self.held_by.contains_key(n))
            .map(|(n, since)| (*n, *since))
            .collect();
        for (node, since) in due {
            let jobs = self.jobs_held_by(node);
            for job in jobs {
                let Some(entry) = self.jobs.get(&job) else {
                    continue;
                };
                let Some(token) = entry.state.and_then(|s| s.holder()) else {
                    continue;
                };
                // Count grace periods from when this holding and the judgement both existed.
                let overdue_ms = now_ms.saturating_sub(since.max(entry.holder_since_ms));
                if token.node != node || overdue_ms < grace {
                    continue;
                }
                let periods = overdue_ms / grace - 1;
                let admitted = self
                    .config
                    .claim_rank_cutoff
                    .max(1)
                    .saturating_mul(1 << periods.min(16));
                if self.rank(job, token.epoch.next()) < admitted {
                    self.expire(now_ms, job, token, ExpiryReason::HolderDead);
                }
            }
        }
    }

    fn on_claim_timer(&mut self, now_ms: u64, job: JobId, epoch: Epoch) {
        let Some(entry) = self.jobs.get_mut(&job) else {
            return;
        };
        if entry.armed == Some(epoch) {
            entry.armed = None;
        }
        let Some(spec) = entry.view.spec.clone() else {
            return;
        };
        if self.passive
            || entry.state != Some(JobState::Queued { epoch })
            || entry.pending.is_some()
            || entry.exec.is_some()
        {
            return;
        }
        if !self.fits(&spec) {
            return;
        }
        self.reserve(&spec.resources);
        let hlc = self.clock.now(now_ms);
        let token = FencingToken {
            epoch,
            hlc,
            node: self.me,
        };
        if let Some(e) = self.jobs.get_mut(&job) {
            e.pending = Some(token);
        }
        self.write(
            job,
            Record::Claim {
                epoch,
                node: self.me,
                hlc,
            },
        );
        let from_ms = hlc.as_millis().max(now_ms);
        self.set_timer(
            from_ms + self.config.settle_ms,
            Timer::Settle { job, epoch },
        );
        self.reevaluate(now_ms, job);
    }

    fn on_settle(&mut self, now_ms: u64, job: JobId, epoch: Epoch) {
        let Some(entry) = self.jobs.get_mut(&job) else {
            return;
        };
        let Some(token) = entry.pending.filter(|t| t.epoch == epoch) else {
            return;
        };
        entry.pending = None;
        let Some(spec) = entry.view.spec.clone() else {
            return;
        };
        let lost = entry.view.fences(&token)
            || entry.view.is_expired(epoch)
            || entry.state.is_some_and(|s| s.is_terminal());
        if lost {
            self.stats.settle_losses += 1;
            self.release(&spec.resources);
            self.reevaluate(now_ms, job);
            self.fill_slots(now_ms);
            return;
        }
        let restore = restorable_checkpoint(&entry.view).map(|(_, _, rec)| rec.blob.clone());
        entry.exec = Some(Exec {
            token,
            state: ExecState::Running,
            checkpoint_seq: 0,
        });
        self.stats.starts += 1;
        let hlc = self.clock.now(now_ms);
        self.write(
            job,
            Record::Start {
                epoch,
                node: self.me,
                hlc,
            },
        );
        self.out.push(Command::Start {
            job,
            token,
            spec: spec.clone(),
            restore,
        });
        if let Some(t) = spec.timeout_ms {
            self.set_timer(now_ms + t, Timer::Timeout { job, token });
        }
        self.reevaluate(now_ms, job);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_finished(
        &mut self,
        now_ms: u64,
        job: JobId,
        token: FencingToken,
        outcome: Outcome,
        metrics: ExecMetrics,
        outputs: Option<BlobRef>,
        logs: Option<BlobRef>,
    ) {
        let Some(entry) = self.jobs.get_mut(&job) else {
            return;
        };
        let Some(exec) = entry.exec.filter(|x| x.token == token) else {
            return;
        };
        entry.exec = None;
        let Some(spec) = entry.view.spec.clone() else {
            return;
        };
        let write_result = match exec.state {
            ExecState::Running => true,
            ExecState::Stopping(StopReason::Timeout) => true,
            ExecState::Stopping(_) => false,
        };
        // The fence: a holder that knows it lost never writes a result.
        if write_result && !entry.view.fences(&token) {
            let outcome = match exec.state {
                ExecState::Stopping(StopReason::Timeout) => Outcome {
                    timed_out: true,
                    ..outcome
                },
                _ => outcome,
            };
            let hlc = self.clock.now(now_ms);
            let seen = entry.view.claims_from(token.epoch);
            let rec = ResultRec {
                claim_hlc: token.hlc,
                outcome,
                outputs,
                logs,
                metrics,
                hlc,
                seen,
            };
            self.write(
                job,
                Record::Result {
                    epoch: token.epoch,
                    node: self.me,
                    rec: Arc::new(rec),
                },
            );
            if !outcome.success() {
                let hlc = self.clock.now(now_ms);
                let rec = ExpiryRec {
                    hlc,
                    reason: ExpiryReason::Failed,
                };
                self.write(
                    job,
                    Record::Expiry {
                        epoch: token.epoch,
                        observer: self.me,
                        rec,
                    },
                );
            }
        }
        self.release(&spec.resources);
        self.reevaluate(now_ms, job);
        self.fill_slots(now_ms);
    }

    fn on_checkpoint(&mut self, now_ms: u64, job: JobId, token: FencingToken, blob: BlobRef) {
        let Some(entry) = self.jobs.get_mut(&job) else {
            return;
        };
        let Some(exec) = entry
            .exec
            .as_mut()
            .filter(|x| x.token == token && x.state == ExecState::Running)
        else {
            return;
        };
        if entry.view.fences(&token) || entry.view.is_expired(token.epoch) {
            return;
        }
        exec.checkpoint_seq += 1;
        let seq = exec.checkpoint_seq;
        let hlc = self.clock.now(now_ms);
        let seen = entry.view.claims_from(token.epoch);
        let rec = CheckpointRec {
            claim_hlc: token.hlc,
            blob,
            hlc,
            seen,
        };
        self.write(
            job,
            Record::Checkpoint {
                epoch: token.epoch,
                node: self.me,
                seq,
                rec: Arc::new(rec),
            },
        );
    }
}

/// A clock whose last timestamp is at least `floor` (after a restart, past our own records).
fn clock_at_least(max_drift_ms: u64, floor: Hlc) -> HlcClock {
    let mut c = HlcClock::new(max_drift_ms);
    // Observing with a physical time equal to the floor always passes the drift check.
    let _ = c.observe(floor, floor.as_millis());
    c
}
