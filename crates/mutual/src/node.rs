//! One node: the engine, its job documents, the failure detector, the agent and the
//! transport, driven by one task (the actor) that owns all of it.
//!
//! The actor is the "driver" of the sans-IO engine (`mutual_core::engine`): it turns
//! network messages, API requests, timers and finished executions into engine events, and
//! executes the engine's commands: records become automerge changes that are appended to
//! the write-ahead log and, once durable, pushed to every live peer — or with `--replicas`
//! to the job's holders only (`mutual_core::placement`) — and only then is the client
//! answered; executions are started and killed; timers are armed. It is the real
//! counterpart of `mutual-sim`, and follows the same rules for what the simulator found
//! necessary: both evidence-of-life rules for the detector, passive restart until a caught-up
//! peer answered, and anti-entropy by per-job fingerprints.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use mutual_core::anti_entropy::{FarQueue, Pacer, far_partners};
use mutual_core::doc::JobDoc;
use mutual_core::doc_cache::DocCache;
use mutual_core::engine::{
    CancelOutcome, Command, Engine, EngineConfig, EngineError, Event, StopReason,
};
use mutual_core::membership::{Detector, DownRepeats};
use mutual_core::overlay;
use mutual_core::placement::{self, Scheme};
use mutual_core::propagation::PropagationMeter;
use mutual_core::submit::{CONFIRM_REPLY, SubmitWaits};
use mutual_core::view::Record;
use mutual_core::{BlobRef, FencingToken, JobId, JobRequest, JobSpec, NodeId, Resources};
use prometheus_client::metrics::histogram::Histogram;
use rand::seq::IteratorRandom;
use tokio::sync::{mpsc, oneshot};

use crate::blobs::Blobs;
use crate::container::Containers;
use crate::exec::{self, Finished, Running};
use crate::gpu::{self, Gpu};
use crate::jobio::{ExecDirs, JobIo, RestoreError};
use crate::net::{self, Link, NetEvent, NetStats, Transport};
use crate::store::{self, Frame, Kind, Store};
use crate::ticket::{ClusterSecret, Ticket};
use crate::types::{CancelReply, JobStatus, NodeStatus, job_status};
use crate::wire::{self, Bcast, Msg, NodeInfo};

/// Most jobs one node holds; documents for new jobs beyond it are refused (from peers and
/// clients alike) rather than exhaust memory.
pub const MAX_JOBS: usize = 1_000_000;
/// Job documents a node keeps live in memory unless told otherwise (`--live-docs`): about
/// 20 KiB each, so 512 are about 10 MiB; the others are held saved (under 1 KiB for a
/// finished job) and loaded back when they change. See [`DocCache`].
pub const DEFAULT_LIVE_DOCS: usize = 512;
/// Largest `--replicas`: more copies than this cost what full replication costs without
/// its simplicity.
pub const MAX_REPLICAS: usize = 64;
/// API requests queued for the actor.
pub const API_QUEUE: usize = 1_024;
/// Transport events queued for the actor.
pub const NET_QUEUE: usize = 8_192;
/// Liveness messages (probes and answers) queued for the actor, served before
/// [`NET_QUEUE`]'s (`net` module doc); past it they are dropped. A node watches and is
/// watched by a few ring neighbours, and re-probes a few more, so this is many rounds.
pub const LIVE_QUEUE: usize = 1_024;
/// Anti-entropy rounds a restarted node waits for a caught-up peer before going active.
pub const PASSIVE_FALLBACK_ROUNDS: u32 = 3;
/// Nodes believed dead near this one on the ring are re-probed once per this many ticks.
pub const REPROBE_EVERY_TICKS: u64 = 5;
/// A node announces a change of its load (free resources, running jobs) to every member at
/// most once per this many milliseconds per live member (and never more often than
/// [`Timing::info_interval_ms`]): every 10 s at 10 members, every 500 s at 500. The
/// announcement is a broadcast to all N members, and every job start and end changes the
/// load, so announcing each change made every job cost O(N) messages: at 100 hosted nodes
/// with placement, about 400 of a job's 546 sync messages. Paced at 0.1 s per member a job
/// still cost 560 messages at 200 nodes, against 328 at 1 s (`bench/results/load/`). Paced
/// this way each member receives at most one load announcement a second, whatever N.
/// Nothing but the node list (`GET /v1/nodes`) reads another node's load; claims use the
/// claimant's own.
pub const LOAD_ANNOUNCE_MS_PER_MEMBER: u64 = 1_000;
/// QUIC keep-alive period on peer connections.
pub const QUIC_KEEP_ALIVE_S: u64 = 20;
/// A peer connection silent this long is closed (and redialled on the next send).
pub const QUIC_IDLE_TIMEOUT_S: u64 = 60;
/// A probe tick later than this many half periods (1.5 periods) means this node itself was
/// starved; the excess is not counted as the peers' silence.
pub const LATE_TICK_HALF_PERIODS: u64 = 3;
/// `members.json` is rewritten at most this often. It only helps a restarted node find
/// its peers again, so a few seconds stale is harmless; while hundreds of nodes join,
/// rewriting the whole list on every anti-entropy tick (4 a second) made every node write
/// O(N) bytes four times a second, which showed as file creation in a 300-node profile.
pub const MEMBERS_SAVE_INTERVAL: Duration = Duration::from_secs(5);
/// The failure timeout is at least this many probe retransmission timeouts.
pub const FAILURE_TIMEOUT_RTOS: f64 = 4.0;
/// The settle window never adapts above this (ms), however slow probes get.
pub const MAX_SETTLE_MS: u64 = 500;
/// The rendezvous step never adapts above this (ms).
pub const MAX_RANK_STEP_MS: u64 = 100;
/// Buckets of the record-delay histograms (ms).
const DELAY_BUCKETS_MS: [f64; 12] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
];
/// Most jobs listed by one `GET /v1/jobs`.
pub const MAX_LIST: usize = 10_000;
// A submission's confirmation wait ends well inside a client's patience.
const _: () = assert!(
    mutual_core::submit::WAIT_MAX_MS <= crate::client::REQUEST_TIMEOUT.as_millis() as u64 / 2
);

/// The QUIC transport settings of a node's peer endpoint (job protocol and blobs), as a
/// builder so benchmarks can measure variants of it (`bench/src/bin/conn_memory.rs`).
pub fn quic_transport() -> anyhow::Result<iroh::endpoint::QuicTransportConfigBuilder> {
    Ok(iroh::endpoint::QuicTransportConfig::builder()
        // Liveness is the detector's job (probes to two ring neighbours), not QUIC's: a
        // full mesh with 1 s keep-alives cost 100 idle nodes on one machine more CPU than
        // they had. Idle connections may lapse; a link redials when it next sends.
        .keep_alive_interval(Duration::from_secs(QUIC_KEEP_ALIVE_S))
        .max_idle_timeout(Some(
            Duration::from_secs(QUIC_IDLE_TIMEOUT_S)
                .try_into()
                .context("idle timeout")?,
        )))
}

/// Timing settings of the node protocol.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Failure-detector probe period.
    pub probe_interval_ms: u64,
    /// A watched node silent this long is judged dead.
    pub failure_timeout_ms: u64,
    /// Anti-entropy period.
    pub ae_interval_ms: u64,
    /// Own info is re-broadcast at most this often when it changed.
    pub info_interval_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            probe_interval_ms: 250,
            failure_timeout_ms: 500,
            ae_interval_ms: 1_000,
            info_interval_ms: 1_000,
        }
    }
}

/// Everything a node is started with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Peer (iroh) socket address.
    pub listen: SocketAddr,
    /// HTTP API address.
    pub http: SocketAddr,
    /// Tickets of members to join.
    pub join: Vec<Ticket>,
    /// Engine settings (slots, resources, labels, windows).
    pub engine: EngineConfig,
    /// Bearer token required by the API, if any.
    pub api_token: Option<String>,
    /// Relay URL to advertise in tickets, if any.
    pub relay: Option<String>,
    /// Protocol timing.
    pub timing: Timing,
    /// How job processes are started.
    pub launcher: exec::Launcher,
    /// Whether this node runs container jobs.
    pub containers: ContainerMode,
    /// The OCI runtime containers run under (`runc`, `kata-runtime`, `runsc`, …).
    pub container_runtime: String,
    /// The GPUs this node offers (`engine.capacity.gpus` is their count).
    pub gpus: Vec<Gpu>,
    /// How often a running job's checkpoint directory is snapshotted, unless the job
    /// chose its own interval.
    pub checkpoint_interval_ms: u64,
    /// Copies on other nodes each new blob needs before it is acknowledged or recorded.
    pub blob_copies: usize,
    /// Job documents kept live in memory (see [`DEFAULT_LIVE_DOCS`]).
    pub live_docs: usize,
    /// 0: every node holds every job document (full replication, `design.md` §4's
    /// choice below a thousand nodes). `k` > 0: each document lives on its `k`
    /// XOR-closest live nodes and the nodes involved in it (`mutual_core::placement`).
    /// Every member of a cluster must use the same value.
    pub replicas: usize,
    /// Accept `POST /v1/debug/partition` and `POST /v1/debug/crash` (experiments and
    /// tests only).
    pub fault_injection: bool,
    /// Set when a hosted node is crashed (`mutual host`): its log writer stops at once.
    pub halt: Arc<std::sync::atomic::AtomicBool>,
}

/// Most peers one injected partition may name.
pub const MAX_PARTITION_PEERS: usize = 10_000;

/// Exit code of an execution killed before its command started (as a SIGKILL reads).
pub const KILLED: i32 = 128 + 9;

/// Fetches and unpacks an execution's inputs and the checkpoint it resumes from.
async fn stage(
    io: &JobIo,
    spec: &JobSpec,
    restore: Option<&BlobRef>,
    dirs: &ExecDirs,
) -> Result<(), String> {
    for (i, input) in spec.inputs.iter().enumerate() {
        io.restore(input, &dirs.input)
            .await
            .map_err(|e| format!("input {i} could not be fetched: {e}"))?;
    }
    if let Some(c) = restore {
        restore_checkpoint(io, spec.id, c, &dirs.checkpoint).await?;
    }
    Ok(())
}

/// The digest of an execution's checkpoint directory before it starts, if the directory
/// is empty (cheap to pack on the actor): a job that never writes to it records no
/// checkpoint. A restored directory gets `None` and is snapshotted once more, unchanged.
fn checkpoint_baseline(dir: &std::path::Path) -> Option<[u8; 32]> {
    let empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
    if empty {
        JobIo::dir_digest(dir).ok()
    } else {
        None
    }
}

/// Tries to fetch a checkpoint this often before giving up on it.
pub const CHECKPOINT_FETCH_TRIES: u32 = 3;
/// Pause between those tries.
pub const CHECKPOINT_FETCH_PAUSE: Duration = Duration::from_secs(1);

/// Restores the checkpoint an execution resumes from. A checkpoint no live node can
/// provide (every holder died: the writer and the nodes it was copied to) is given up
/// after [`CHECKPOINT_FETCH_TRIES`]: the execution starts from an empty checkpoint
/// directory, as a first attempt does, and loses that progress rather than the job. A
/// checkpoint that arrives but does not check out (tampered, a bad archive) fails the
/// attempt, as a bad input does.
async fn restore_checkpoint(
    io: &JobIo,
    job: JobId,
    blob: &BlobRef,
    dir: &std::path::Path,
) -> Result<(), String> {
    let mut tries = 0;
    loop {
        tries += 1;
        if tries > 1 {
            // A transfer cut short may have left part of the snapshot behind.
            empty_dir(dir)?;
        }
        match io.restore(blob, dir).await {
            Ok(_) => return Ok(()),
            Err(RestoreError::Content(e)) => {
                return Err(format!("the checkpoint to resume from is invalid: {e}"));
            }
            Err(RestoreError::Unavailable(e)) if tries >= CHECKPOINT_FETCH_TRIES => {
                tracing::warn!(
                    %job,
                    "no node can provide the checkpoint to resume from ({e}); starting from an empty checkpoint directory"
                );
                return empty_dir(dir);
            }
            Err(RestoreError::Unavailable(_)) => tokio::time::sleep(CHECKPOINT_FETCH_PAUSE).await,
        }
    }
}

/// Empties the checkpoint directory `dir` (whatever a failed restore left in it).
fn empty_dir(dir: &std::path::Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot recreate the checkpoint directory: {e}"))
}

/// Default of [`NodeConfig::checkpoint_interval_ms`].
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 30_000;

/// Whether a node runs container jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ContainerMode {
    /// If Docker answers at start (and knows the runtime).
    #[default]
    Auto,
    /// Always: the node refuses to start without Docker.
    On,
    /// Never.
    Off,
}

/// A request from the HTTP API to the actor.
#[derive(Debug)]
pub enum ApiReq {
    /// Submit a job; answered once its spec is durable.
    Submit(
        Box<JobRequest>,
        oneshot::Sender<Result<JobStatus, ApiError>>,
    ),
    /// One job.
    Get(JobId, oneshot::Sender<Result<JobStatus, ApiError>>),
    /// Jobs, optionally in one state, newest first.
    List(Option<String>, usize, oneshot::Sender<Vec<JobStatus>>),
    /// Cancel a job; answered once the cancel is durable.
    Cancel(JobId, oneshot::Sender<Result<CancelReply, ApiError>>),
    /// Members.
    Nodes(oneshot::Sender<Vec<NodeStatus>>),
    /// Where a job's logs are: its current (or last) attempt and that node's API.
    LogSource(JobId, oneshot::Sender<Result<LogSource, ApiError>>),
    /// Prometheus text.
    Metrics(oneshot::Sender<String>),
    /// Refuse all traffic from these members (node ids), replacing the previous set;
    /// answered with the ids now cut off. Needs [`NodeConfig::fault_injection`].
    Partition(Vec<String>, oneshot::Sender<Result<Vec<String>, ApiError>>),
}

/// Where a job's logs can be read.
#[derive(Debug, Clone)]
pub struct LogSource {
    /// The job.
    pub job: String,
    /// Its current (or last) attempt.
    pub attempt: u64,
    /// The node that runs (or ran) it.
    pub node: String,
    /// That node's HTTP API, if it is reachable.
    pub agent: Option<String>,
    /// The job's state.
    pub state: String,
    /// Whether the attempt has ended.
    pub ended: bool,
    /// Its stored logs, once it has ended (and if it wrote any).
    pub stored: Option<BlobRef>,
}

/// Refusals the API turns into status codes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// Invalid request (400).
    #[error("{message}")]
    Invalid {
        /// Field at fault.
        field: Option<String>,
        /// Why.
        message: String,
    },
    /// Unknown job (404).
    #[error("no job {0} on this node")]
    NotFound(String),
    /// Not held here: under placement only the job's holders know it (404).
    #[error("no job {job} on this node: this cluster keeps each job only on the {replicas} nodes closest to it (--replicas {replicas}); ask one of them: {}", holders.join(", "))]
    Elsewhere {
        /// The job.
        job: String,
        /// `--replicas`.
        replicas: usize,
        /// The HTTP APIs of its replicas as this node sees them.
        holders: Vec<String>,
    },
    /// Valid but cannot run anywhere (422).
    #[error("{0}")]
    Unschedulable(String),
    /// Out of room (503).
    #[error("{0}")]
    Full(String),
    /// No logs to point at yet, or their node is gone (409).
    #[error("{0}")]
    NoLogs(String),
    /// A feature this node was not started with (403).
    #[error("{0}")]
    Disabled(String),
}

/// What a started node tells its owner.
#[derive(Debug, Clone)]
pub struct Started {
    /// This node's id.
    pub id: NodeId,
    /// A ticket to join its cluster.
    pub ticket: Ticket,
    /// Requests to the actor.
    pub api: mpsc::Sender<ApiReq>,
    /// Joining: `None` while no member has answered yet, then `Ok` once one did, or the
    /// reason every `--join` member refused us.
    pub joined: tokio::sync::watch::Receiver<Option<Result<(), String>>>,
    /// The data plane (the API serves uploads and downloads through it).
    pub io: JobIo,
}

/// An offset added to this process's wall clock: an injected clock error, for the
/// clock-skew experiment (`mutual node --clock-skew`). One node per process, so a
/// process-wide setting; zero unless set.
static CLOCK_SKEW_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Makes this process's clock read `skew_ms` ahead of (or, negative, behind) the system's.
pub fn set_clock_skew_ms(skew_ms: i64) {
    CLOCK_SKEW_MS.store(skew_ms, std::sync::atomic::Ordering::Relaxed);
}

/// Wall-clock milliseconds since the Unix epoch (the HLC's physical time), plus any
/// injected skew.
pub fn now_ms() -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    wall.saturating_add_signed(CLOCK_SKEW_MS.load(std::sync::atomic::Ordering::Relaxed))
}

fn read_or_create_key(path: &Path) -> anyhow::Result<iroh::SecretKey> {
    match std::fs::read(path) {
        Ok(b) => {
            let arr: [u8; 32] = b
                .as_slice()
                .try_into()
                .map_err(|_| anyhow::anyhow!("{} is damaged (not 32 bytes)", path.display()))?;
            Ok(iroh::SecretKey::from_bytes(&arr))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = iroh::SecretKey::generate();
            write_private(path, &key.to_bytes())?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The cluster secret: the one stored in the data directory, else the joined ticket's, else
/// a new one (this node founds a cluster). A data directory of another cluster is refused.
fn cluster_secret(dir: &Path, join: &[Ticket]) -> anyhow::Result<ClusterSecret> {
    let path = dir.join("cluster.secret");
    let stored = match std::fs::read(&path) {
        Ok(b) => Some(ClusterSecret(b.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!("{} is damaged (not 32 bytes)", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let from_ticket = join.first().map(|t| t.secret);
    if join.iter().any(|t| Some(t.secret) != from_ticket) {
        bail!("the --join tickets belong to different clusters");
    }
    match (stored, from_ticket) {
        (Some(s), Some(t)) if s != t => bail!(
            "{} belongs to another cluster than the --join ticket; use a fresh --data-dir",
            dir.display()
        ),
        (Some(s), _) => Ok(s),
        (None, Some(t)) => {
            write_private(&path, &t.0)?;
            Ok(t)
        }
        (None, None) => {
            let s = ClusterSecret::generate();
            write_private(&path, &s.0)?;
            Ok(s)
        }
    }
}

/// Binds the endpoint, loads the data directory and starts the actor. The HTTP server is
/// started by the caller with the returned handle.
pub async fn start(mut cfg: NodeConfig) -> anyhow::Result<Started> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    // Jobs run elsewhere (their own working directory) and get paths under it.
    cfg.data_dir = std::path::absolute(&cfg.data_dir)
        .with_context(|| format!("resolving {}", cfg.data_dir.display()))?;
    let identity = read_or_create_key(&cfg.data_dir.join("node.key"))?;
    let id = NodeId(*identity.public().as_bytes());
    let containers = match cfg.containers {
        ContainerMode::Off => None,
        mode => match Containers::connect(&cfg.container_runtime, id).await {
            Ok(c) => {
                let left = c.remove_leftovers().await;
                if left > 0 {
                    tracing::info!("removed {left} containers an earlier run left behind");
                }
                if let Some(bin) = &cfg.launcher.shim {
                    // Spawned from this (the main) thread, which lives as long as the
                    // process: the death signal follows the thread that spawned.
                    std::process::Command::new(bin)
                        .arg("container-reaper")
                        .arg("--parent")
                        .arg(std::process::id().to_string())
                        .arg("--node")
                        .arg(id.to_string())
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .context("starting the container reaper")?;
                }
                Some(c)
            }
            Err(e) if mode == ContainerMode::On => bail!("--containers on: {e}"),
            Err(e) => {
                tracing::info!("not running container jobs: {e}");
                None
            }
        },
    };
    cfg.engine.containers = containers.is_some();
    cfg.engine.capacity.gpus = cfg.gpus.len() as u32;
    let gpu_pool = gpu::Pool::new(&cfg.gpus);
    let secret = cluster_secret(&cfg.data_dir, &cfg.join)?;
    let transport_config = quic_transport()?.build();
    let endpoint = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
        .secret_key(iroh::SecretKey::generate())
        .alpns(
            std::iter::once(wire::ALPN.to_vec())
                .chain(wire::OLD_ALPNS.iter().map(|a| a.to_vec()))
                .chain(Blobs::alpns())
                .collect(),
        )
        .relay_mode(iroh::RelayMode::Disabled)
        .transport_config(transport_config)
        .clear_ip_transports()
        .bind_addr(cfg.listen)
        .with_context(|| format!("--listen {}", cfg.listen))?
        .bind()
        .await
        .with_context(|| format!("binding the peer endpoint on {}", cfg.listen))?;
    let endpoint_id = *endpoint.id().as_bytes();
    let mut addrs: Vec<SocketAddr> = endpoint.bound_sockets();
    if addrs.iter().any(|a| a.ip().is_unspecified()) {
        // Bound to every interface: advertise what iroh found on the host.
        let found: Vec<SocketAddr> = endpoint.addr().ip_addrs().copied().collect();
        if !found.is_empty() {
            addrs = found;
        }
    }
    addrs.truncate(crate::ticket::MAX_TICKET_ADDRS);
    let ticket = Ticket {
        secret,
        endpoint: endpoint_id,
        addrs: addrs.clone(),
        relay: cfg.relay.clone(),
    };

    // Executions do not survive a restart; their scratch directories are garbage.
    for scratch in ["work", "io", "tmp"] {
        let _ = std::fs::remove_dir_all(cfg.data_dir.join(scratch));
    }
    let blobs = Blobs::open(&cfg.data_dir.join("blobs"), endpoint.clone(), id).await?;
    let io = JobIo {
        blobs: blobs.clone(),
        secret,
        tmp_dir: cfg.data_dir.join("tmp"),
        me: id,
        copies: cfg.blob_copies,
    };
    let (store, loaded) = Store::open_with_halt(&cfg.data_dir.join("jobs"), cfg.halt.clone())?;
    if loaded.truncated_bytes > 0 {
        tracing::warn!(
            "the job log ended in a torn write ({} bytes cut); nothing acknowledged was lost",
            loaded.truncated_bytes
        );
    }
    let now = now_ms();
    // One job at a time (frames keep their order within a job), so that each document
    // is built live once and then left to the cache's budget.
    let mut by_job: BTreeMap<JobId, Vec<&[u8]>> = BTreeMap::new();
    for f in &loaded.frames {
        by_job.entry(f.job).or_default().push(&f.bytes);
    }
    let mut docs = DocCache::new(id, cfg.live_docs);
    let mut views = Vec::with_capacity(by_job.len());
    for (job, frames) in by_job {
        let doc = docs.insert(job, JobDoc::empty(id));
        for bytes in frames {
            if let Err(e) = doc.apply(bytes) {
                tracing::warn!(%job, "skipping a stored change that does not apply: {e}");
            }
        }
        views.extend(doc.view().ok());
    }
    let restarted = !views.is_empty();
    let (engine, boot_cmds) = if restarted {
        Engine::restart(id, cfg.engine.clone(), views, now)
    } else {
        (Engine::new(id, cfg.engine.clone(), now), Vec::new())
    };

    let (net_tx, net_rx) = mpsc::channel(NET_QUEUE);
    let (live_tx, live_rx) = mpsc::channel(LIVE_QUEUE);
    let (api_tx, api_rx) = mpsc::channel(API_QUEUE);
    let (int_tx, int_rx) = mpsc::unbounded_channel();
    let (joined_tx, joined_rx) = tokio::sync::watch::channel(None);
    let stats = Arc::new(NetStats::default());
    let transport = Transport {
        endpoint: endpoint.clone(),
        secret,
        events: net_tx,
        live: live_tx,
        stats: stats.clone(),
        faults: Arc::new(net::Faults::default()),
        replicas: cfg.replicas as u32,
        conns: net::Conns::default(),
    };
    {
        let t = transport.clone();
        tokio::spawn(async move {
            while let Some(incoming) = t.endpoint.accept().await {
                let (t, blobs) = (t.clone(), blobs.clone());
                tokio::spawn(async move {
                    let Ok(Ok(conn)) = tokio::time::timeout(net::HELLO_TIMEOUT, incoming).await
                    else {
                        return;
                    };
                    if t.partitioned(&conn) {
                        return;
                    }
                    let stats = t.stats.clone();
                    let _open = net::OpenConn::new(&stats.accepted_open);
                    if conn.alpn() == wire::ALPN {
                        t.serve(conn).await;
                    } else if wire::OLD_ALPNS.contains(&conn.alpn()) {
                        t.refuse_version(conn);
                    } else {
                        blobs.accept(conn).await;
                    }
                });
            }
        });
    }
    let mut stored_members: Vec<NodeInfo> = std::fs::read(cfg.data_dir.join("members.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    stored_members.retain(|m| m.id != id);
    let http = Some(format!("http://{}", cfg.http));
    let ring: Arc<[NodeId]> = Arc::from(vec![id]);
    let engine_timing = engine.timing();
    let scheme = match cfg.replicas {
        0 => Scheme::Full,
        k => Scheme::Placed { k },
    };
    let mut node = Node {
        id,
        det: Detector::new(0, ring, cfg.timing.failure_timeout_ms, now),
        ae_pacer: Pacer::new(engine_timing.0),
        cfg,
        engine,
        docs,
        store,
        wal_bytes: loaded.wal_bytes,
        members: BTreeMap::new(),
        links: HashMap::new(),
        transport,
        stats,
        timers: BTreeSet::new(),
        running: HashMap::new(),
        int_tx,
        version: (now, 0),
        endpoint: endpoint_id,
        addrs,
        http,
        info_dirty: true,
        info_due_ms: 0,
        passive_rounds: 0,
        ticks: 0,
        last_tick_ms: now,
        late_ticks: 0,
        late_deadlines: 0,
        downs: DownRepeats::default(),
        detection_ms: Histogram::new([100.0, 250.0, 500.0, 750.0, 1000.0, 1500.0, 2000.0, 5000.0]),
        judged_total: 0,
        revived_total: 0,
        members_dirty: false,
        members_saved_at: None,
        containers,
        gpu_pool,
        alive_ring: vec![id],
        scheme,
        ae_cursor: 0,
        far: FarQueue::default(),
        submit_waits: SubmitWaits::default(),
        submit_replies: HashMap::new(),
        submit_confirm_ms: Histogram::new([1.0, 5.0, 25.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0]),
        arrival_ms: Histogram::new(DELAY_BUCKETS_MS),
        write_push_ms: Histogram::new(DELAY_BUCKETS_MS),
        submits_unconfirmed: 0,
        neighbours: Vec::new(),
        probed_at: HashMap::new(),
        rtt: None,
        propagation: PropagationMeter::new(),
        judge_at: None,
        timing_floor: engine_timing,
        joined: joined_tx,
        io: io.clone(),
    };
    node.run_cmds(boot_cmds, None);
    // Compact at once: the next start loads one snapshot instead of a long log.
    if restarted {
        node.compact();
    }
    for t in &node.cfg.join.clone() {
        // Until it answers, a --join member is known only by its endpoint: it stands in
        // under that key with version (0, 0), and is replaced by its hello.
        if t.endpoint != endpoint_id {
            node.ensure_member(placeholder_info(t.endpoint, t.addrs.clone()), now);
            // Stand-ins are not on the ring (never probed, never judged): say hello now.
            let members = node.member_list();
            node.send(&NodeId(t.endpoint), &members);
        }
    }
    for m in stored_members {
        node.ensure_member(m, now);
    }
    if !restarted {
        // A fresh node has nothing stale to act on.
    } else if node.members.is_empty() {
        node.feed(now, Event::CaughtUp);
    }
    tokio::spawn(node.run(live_rx, net_rx, api_rx, int_rx));
    Ok(Started {
        id,
        ticket,
        api: api_tx,
        joined: joined_rx,
        io,
    })
}

fn placeholder_info(endpoint: [u8; 32], addrs: Vec<SocketAddr>) -> NodeInfo {
    NodeInfo {
        id: NodeId(endpoint),
        endpoint,
        addrs,
        http: None,
        version: (0, 0),
        capacity: Resources {
            cpu_millis: 0,
            memory_bytes: 0,
            gpus: 0,
        },
        free: Resources {
            cpu_millis: 0,
            memory_bytes: 0,
            gpus: 0,
        },
        slots: 0,
        free_slots: 0,
        labels: BTreeMap::new(),
        containers: false,
        gpus: Vec::new(),
        running: Vec::new(),
        replicas: 0,
    }
}

struct Member {
    info: NodeInfo,
    alive: bool,
    /// While it is believed dead: the version of its info it was judged dead at. Only
    /// info of a newer version (its refutation) makes it alive again for everyone.
    dead_at: (u64, u64),
    /// Its share of the membership digest (0 for a stand-in), kept with it so a round
    /// sums N numbers instead of hashing N infos.
    digest_term: u64,
}

impl Member {
    fn term(&self) -> u64 {
        let info = &self.info;
        if info.version == (0, 0) {
            0
        } else if self.alive {
            wire::member_hash_term(&info.id, info.version)
        } else {
            wire::member_hash_term(&info.id, info.version)
                .wrapping_add(wire::member_dead_term(&info.id, self.dead_at))
        }
    }
}

/// Internal events (unbounded: each one is the end of work the actor started).
enum Internal {
    Durable {
        pushes: Vec<(JobId, Vec<Vec<u8>>)>,
        ack: Option<Ack>,
        /// When the batch was handed to the store.
        written: std::time::Instant,
    },
    Exec(Finished),
    /// An execution's inputs and checkpoint are in place (or could not be put there).
    Staged {
        job: JobId,
        token: FencingToken,
        result: Result<(), String>,
    },
    /// An ended execution's outputs and logs are stored and copied.
    Collected {
        finished: Finished,
        timed_out: bool,
        outputs: Option<BlobRef>,
        logs: Option<BlobRef>,
    },
    /// A running execution's checkpoint directory was snapshotted.
    Checkpoint {
        job: JobId,
        token: FencingToken,
        blob: BlobRef,
    },
    /// This node's copy of `job` is durable: confirm it to its submitter `to`.
    Held {
        job: JobId,
        to: NodeId,
    },
}

enum Ack {
    Submit(JobId, oneshot::Sender<Result<JobStatus, ApiError>>),
    Cancel(
        JobId,
        CancelOutcome,
        oneshot::Sender<Result<CancelReply, ApiError>>,
    ),
}

struct Exec {
    running: Running,
    stop: Option<StopReason>,
    /// The GPUs it holds, returned to the pool when it ends.
    gpus: Vec<u32>,
    /// Its input, output and checkpoint directories.
    dirs: ExecDirs,
    /// The task snapshotting its checkpoint directory, once it runs.
    checkpointer: Option<tokio::task::AbortHandle>,
}

struct Node {
    id: NodeId,
    cfg: NodeConfig,
    engine: Engine,
    docs: DocCache,
    store: Store,
    wal_bytes: u64,
    members: BTreeMap<NodeId, Member>,
    links: HashMap<NodeId, Link>,
    transport: Transport,
    stats: Arc<NetStats>,
    det: Detector,
    timers: BTreeSet<(u64, mutual_core::engine::Timer)>,
    running: HashMap<JobId, Exec>,
    int_tx: mpsc::UnboundedSender<Internal>,
    version: (u64, u64),
    endpoint: [u8; 32],
    addrs: Vec<SocketAddr>,
    http: Option<String>,
    info_dirty: bool,
    /// When this node's info may next be broadcast (ms; [`LOAD_ANNOUNCE_MS_PER_MEMBER`]).
    info_due_ms: u64,
    passive_rounds: u32,
    /// Which differing jobs anti-entropy sends now (those still in flight, changed within
    /// the settle window, wait).
    ae_pacer: Pacer,
    ticks: u64,
    last_tick_ms: u64,
    late_ticks: u64,
    /// Judgement deadlines this node came to over half a probe period late.
    late_deadlines: u64,
    /// Deaths this node judged, to broadcast again while it still believes them
    /// (`membership::DOWN_REPEATS`).
    downs: DownRepeats<NodeId>,
    detection_ms: Histogram,
    judged_total: u64,
    /// Members this node believed dead and then heard from (each a death judgement,
    /// its own or one it was told of, proved wrong).
    revived_total: u64,
    members_dirty: bool,
    /// When `members.json` was last written (see [`MEMBERS_SAVE_INTERVAL`]).
    members_saved_at: Option<std::time::Instant>,
    /// The Docker connection, if this node runs container jobs.
    containers: Option<Containers>,
    /// GPUs not held by an execution.
    gpu_pool: gpu::Pool,
    /// This node and the members it believes alive, sorted: the ring the overlay is on.
    alive_ring: Vec<NodeId>,
    /// Where job documents live (`--replicas`): on every node, or placed.
    scheme: Scheme,
    /// Under placement: the held job whose holders the next far sweep asks.
    ae_cursor: usize,
    /// Under placement: jobs whose document this node cannot read yet, to compare with
    /// their holders once quiet.
    far: FarQueue,
    /// Under placement: submissions waiting for another holder's confirmation
    /// (`mutual_core::submit`), and the clients waiting on them.
    submit_waits: SubmitWaits,
    submit_replies: HashMap<JobId, oneshot::Sender<Result<JobStatus, ApiError>>>,
    /// How long confirmed submissions waited for their first confirmation.
    submit_confirm_ms: Histogram,
    /// Stamp-to-arrival delays of other nodes' pushed control records (ms).
    arrival_ms: Histogram,
    /// From writing records to pushing them (the wait for the log's sync), in ms.
    write_push_ms: Histogram,
    /// Submissions answered unconfirmed (HTTP 202).
    submits_unconfirmed: u64,
    /// Its overlay neighbours on that ring (see [`overlay::neighbours`]).
    neighbours: Vec<NodeId>,
    /// When each watched node was last probed, for round-trip samples.
    probed_at: HashMap<NodeId, std::time::Instant>,
    /// Probe round trips: smoothed mean and mean deviation in µs (RFC 6298 style).
    rtt: Option<(f64, f64)>,
    /// Stamp-to-arrival delays of other nodes' pushed control records (see [`Node::retune`]).
    propagation: PropagationMeter,
    /// When the detector's next judgement is due (local ms), if it watches anyone.
    judge_at: Option<u64>,
    /// The configured floors of the settle window and the rendezvous step.
    timing_floor: (u64, u64),
    joined: tokio::sync::watch::Sender<Option<Result<(), String>>>,
    /// The data plane.
    io: JobIo,
}

impl Node {
    async fn run(
        mut self,
        mut live: mpsc::Receiver<NetEvent>,
        mut net: mpsc::Receiver<NetEvent>,
        mut api: mpsc::Receiver<ApiReq>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
    ) {
        let t = self.cfg.timing;
        let mut probe = tokio::time::interval(Duration::from_millis(t.probe_interval_ms));
        let mut ae = tokio::time::interval(Duration::from_millis((t.ae_interval_ms / 4).max(1)));
        let mut info = tokio::time::interval(Duration::from_millis(t.info_interval_ms));
        for i in [&mut probe, &mut ae, &mut info] {
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut ae_phase = 0u64;
        loop {
            let next_timer = self.timers.first().map(|(at, _)| *at);
            let sleep = match next_timer {
                Some(at) => Duration::from_millis(at.saturating_sub(now_ms())),
                None => Duration::from_secs(3600),
            };
            let judge_at = self.judge_at;
            let judge_sleep =
                Duration::from_millis(judge_at.map_or(0, |at| at.saturating_sub(now_ms())));
            tokio::select! {
                biased;
                // Liveness first: a probe answered late reads as a dead node.
                Some(ev) = live.recv() => self.on_net(ev),
                Some(ev) = internal.recv() => self.on_internal(ev),
                Some(ev) = net.recv() => self.on_net(ev),
                Some(req) = api.recv() => self.on_api(req),
                _ = tokio::time::sleep(sleep), if next_timer.is_some() => self.fire_timers(),
                _ = tokio::time::sleep(judge_sleep), if judge_at.is_some() => {
                    self.judge_deadline(judge_at.unwrap_or_default());
                }
                _ = probe.tick() => self.probe_tick(),
                _ = ae.tick() => {
                    self.save_members();
                    ae_phase += 1;
                    // Every period while active, four times as often while restarting.
                    if self.engine.is_passive() || ae_phase.is_multiple_of(4) {
                        self.ae_tick();
                    }
                }
                _ = info.tick() => self.info_tick(),
            }
        }
    }

    fn feed(&mut self, now: u64, ev: Event) {
        match self.engine.handle(now, ev) {
            Ok(cmds) => self.run_cmds(cmds, None),
            Err(e) => tracing::warn!("event refused: {e}"),
        }
    }

    /// Executes engine commands. Records are written to their documents and appended to
    /// the log in one batch; pushes and `ack` happen when the batch is durable.
    fn run_cmds(&mut self, cmds: Vec<Command>, ack: Option<Ack>) {
        let mut frames = Vec::new();
        let mut pushes: BTreeMap<JobId, Vec<Vec<u8>>> = BTreeMap::new();
        for c in cmds {
            match c {
                Command::Write { job, record } => {
                    let written = match &record {
                        Record::Spec(spec) => JobDoc::create(spec, self.id)
                            .map(|d| self.docs.insert(job, d).last_change()),
                        _ => self
                            .docs
                            .get_or_empty(job)
                            .and_then(|d| d.write(&record).map(|()| d.last_change())),
                    };
                    let change = match written {
                        Ok(change) => change,
                        Err(e) => {
                            tracing::error!(%job, "cannot write a record to its document: {e}");
                            continue;
                        }
                    };
                    if let Some(bytes) = change {
                        self.ae_pacer.changed(job, now_ms());
                        frames.push(Frame {
                            kind: Kind::Change,
                            job,
                            bytes: bytes.clone(),
                        });
                        pushes.entry(job).or_default().push(bytes);
                    }
                }
                Command::Start {
                    job,
                    token,
                    spec,
                    restore,
                } => self.start_exec(job, token, spec, restore),
                Command::Stop { job, token, reason } => {
                    if let Some(e) = self.running.get_mut(&job)
                        && e.running.token == token
                    {
                        e.stop.get_or_insert(reason);
                        e.running.kill();
                    }
                }
                Command::SetTimer { at_ms, timer } => {
                    self.timers.insert((at_ms, timer));
                }
            }
        }
        if frames.is_empty() && ack.is_none() {
            return;
        }
        let tx = self.int_tx.clone();
        let pushes: Vec<_> = pushes.into_iter().collect();
        let written = std::time::Instant::now();
        self.wal_bytes += self.store.append(frames, move || {
            let _ = tx.send(Internal::Durable {
                pushes,
                ack,
                written,
            });
        });
        if self.wal_bytes > store::WAL_COMPACT_BYTES {
            self.compact();
        }
    }

    fn compact(&mut self) {
        let docs = self
            .docs
            .saved_all()
            .into_iter()
            .map(|(job, bytes)| Frame {
                kind: Kind::Doc,
                job,
                bytes,
            })
            .collect();
        self.store.compact(docs);
        self.wal_bytes = 0;
    }

    fn on_internal(&mut self, ev: Internal) {
        match ev {
            Internal::Durable {
                pushes,
                ack,
                written,
            } => {
                if !pushes.is_empty() {
                    self.write_push_ms
                        .observe(written.elapsed().as_secs_f64() * 1e3);
                }
                // A submission under placement is answered once another holder confirms
                // it (`mutual_core::submit`): it waits from before its push, which then
                // asks the holders to confirm.
                let ack = match ack {
                    Some(Ack::Submit(job, reply)) => self.await_holder(job, reply),
                    other => other,
                };
                for (job, changes) in pushes {
                    self.push(job, changes, None);
                }
                match ack {
                    Some(Ack::Submit(job, reply)) => self.answer_submit(job, reply, None),
                    Some(Ack::Cancel(job, outcome, reply)) => {
                        let state = self
                            .status(&job)
                            .map_or_else(|| "unknown".to_string(), |s| s.state);
                        let outcome = match outcome {
                            CancelOutcome::Cancelled => "cancelled".to_string(),
                            CancelOutcome::AlreadyTerminal(s) => format!("already_{}", s.name()),
                        };
                        let _ = reply.send(Ok(CancelReply {
                            id: job.to_string(),
                            outcome,
                            state,
                        }));
                    }
                    None => {}
                }
            }
            Internal::Held { job, to } => self.send(&to, &Msg::Held { job }),
            Internal::Exec(f) => self.exec_ended(f),
            Internal::Staged { job, token, result } => self.staged(job, token, result),
            Internal::Collected {
                finished: f,
                timed_out,
                outputs,
                logs,
            } => {
                if let Some(err) = &f.start_error {
                    tracing::warn!(job = %f.job, "{err}");
                }
                self.feed(
                    now_ms(),
                    Event::ExecutionFinished {
                        job: f.job,
                        token: f.token,
                        outcome: exec::outcome(f.exit_code, timed_out),
                        metrics: f.metrics,
                        outputs,
                        logs,
                    },
                );
            }
            Internal::Checkpoint { job, token, blob } => {
                self.feed(now_ms(), Event::CheckpointTaken { job, token, blob });
            }
        }
    }

    // ---- executions ------------------------------------------------------------------

    /// Starts an execution the engine decided on: at once when it needs no data, else
    /// after its inputs and checkpoint are fetched and unpacked (a kill meanwhile ends
    /// the staging).
    fn start_exec(
        &mut self,
        job: JobId,
        token: FencingToken,
        spec: Arc<JobSpec>,
        restore: Option<BlobRef>,
    ) {
        let epoch = u64::from(token.epoch.0);
        let dirs = ExecDirs::new(&self.cfg.data_dir, job, epoch);
        // The engine admits a job only with enough free GPUs, so this fails only if the
        // two counts ever disagree.
        let gpus = self.gpu_pool.take(spec.resources.gpus);
        let refusal = match (&gpus, &spec.image, &self.containers) {
            (None, _, _) => Some("not enough free GPUs on this node"),
            // The engine claims container jobs only where containers run.
            (_, Some(_), None) => Some("this node does not run containers"),
            _ => None,
        };
        let mut baseline = None;
        let running = if let Some(why) = refusal {
            exec::refuse(&self.cfg.data_dir, &spec, token, why, self.exec_done())
        } else if let Err(e) = dirs.create() {
            let why = format!("cannot create the job's directories: {e}");
            exec::refuse(&self.cfg.data_dir, &spec, token, &why, self.exec_done())
        } else if spec.inputs.is_empty() && restore.is_none() {
            baseline = checkpoint_baseline(&dirs.checkpoint);
            self.launch(&spec, token, &dirs, gpus.clone().unwrap_or_default())
        } else {
            let stop = Arc::new(tokio::sync::Notify::new());
            let (io, tx, dirs2, stop2) = (
                self.io.clone(),
                self.int_tx.clone(),
                dirs.clone(),
                stop.clone(),
            );
            let spec2 = spec.clone();
            tokio::spawn(async move {
                let result = tokio::select! {
                    () = stop2.notified() => Err("killed while fetching its data".to_string()),
                    r = stage(&io, &spec2, restore.as_ref(), &dirs2) => r,
                };
                let _ = tx.send(Internal::Staged { job, token, result });
            });
            Running {
                kill: exec::Kill::Staging(stop),
                token,
                log_dir: exec::log_dir(&self.cfg.data_dir, job),
            }
        };
        let checkpointer = matches!(
            running.kill,
            exec::Kill::Process(Some(_)) | exec::Kill::Container { .. }
        )
        .then(|| self.checkpointer(&spec, token, &dirs, baseline));
        self.running.insert(
            job,
            Exec {
                running,
                stop: None,
                gpus: gpus.unwrap_or_default(),
                dirs,
                checkpointer,
            },
        );
        self.info_dirty = true;
    }

    fn exec_done(&self) -> impl FnOnce(Finished) + Send + 'static {
        let tx = self.int_tx.clone();
        move |f| {
            let _ = tx.send(Internal::Exec(f));
        }
    }

    /// Runs the execution itself, in a process or a container.
    fn launch(
        &self,
        spec: &Arc<JobSpec>,
        token: FencingToken,
        dirs: &ExecDirs,
        gpus: Vec<u32>,
    ) -> Running {
        match (&spec.image, &self.containers) {
            (Some(_), Some(c)) => c.start(
                &self.cfg.data_dir,
                spec.clone(),
                token,
                gpus,
                dirs,
                self.exec_done(),
            ),
            _ => exec::start(
                &self.cfg.data_dir,
                &self.cfg.launcher,
                spec.clone(),
                token,
                &gpus,
                dirs,
                self.exec_done(),
            ),
        }
    }

    /// Snapshots a running execution's checkpoint directory every interval when it
    /// differs from the last snapshot, or from `baseline` (see [`checkpoint_baseline`]).
    fn checkpointer(
        &self,
        spec: &JobSpec,
        token: FencingToken,
        dirs: &ExecDirs,
        baseline: Option<[u8; 32]>,
    ) -> tokio::task::AbortHandle {
        let every = Duration::from_millis(
            spec.checkpoint_interval_ms
                .unwrap_or(self.cfg.checkpoint_interval_ms)
                .max(1),
        );
        let (io, tx, dir, job) = (
            self.io.clone(),
            self.int_tx.clone(),
            dirs.checkpoint.clone(),
            spec.id,
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = baseline;
            loop {
                tick.tick().await;
                match io.snapshot(&dir, last).await {
                    Ok(Some((blob, digest))) => {
                        last = Some(digest);
                        if tx.send(Internal::Checkpoint { job, token, blob }).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(%job, "checkpoint not taken: {e}"),
                }
            }
        })
        .abort_handle()
    }

    fn staged(&mut self, job: JobId, token: FencingToken, result: Result<(), String>) {
        let Some(e) = self.running.get(&job).filter(|e| e.running.token == token) else {
            return;
        };
        let (out, err) = exec::log_paths(&self.cfg.data_dir, job, u64::from(token.epoch.0));
        let failed = |code: i32, msg: String| {
            let _ = std::fs::create_dir_all(exec::log_dir(&self.cfg.data_dir, job));
            let _ = std::fs::File::create(&out);
            let _ = std::fs::write(&err, format!("mutual: {msg}\n"));
            Finished {
                job,
                token,
                exit_code: code,
                metrics: Default::default(),
                start_error: Some(msg),
            }
        };
        let finished = match result {
            Ok(()) if e.stop.is_none() => {
                let Some(spec) = self.engine.view(&job).and_then(|v| v.spec.clone()) else {
                    return;
                };
                let (dirs, gpus) = (e.dirs.clone(), e.gpus.clone());
                let baseline = checkpoint_baseline(&dirs.checkpoint);
                let running = self.launch(&spec, token, &dirs, gpus);
                let checkpointer = self.checkpointer(&spec, token, &dirs, baseline);
                if let Some(e) = self.running.get_mut(&job) {
                    e.running = running;
                    e.checkpointer = Some(checkpointer);
                }
                return;
            }
            Ok(()) => failed(KILLED, "killed before it started".into()),
            Err(msg) if e.stop.is_some() => failed(KILLED, msg),
            Err(msg) => failed(exec::EXIT_CANNOT_START, msg),
        };
        self.exec_ended(finished);
    }

    /// An execution ended: free what it held, then store its outputs and logs (copied to
    /// another node) before its result is recorded.
    fn exec_ended(&mut self, f: Finished) {
        let Some(e) = self.running.remove(&f.job) else {
            return;
        };
        if e.running.token != f.token {
            // Not this execution's end: keep the one that runs.
            self.running.insert(f.job, e);
            return;
        }
        if let Some(c) = &e.checkpointer {
            c.abort();
        }
        self.gpu_pool.give_back(&e.gpus);
        self.info_dirty = true;
        let timed_out = e.stop == Some(StopReason::Timeout);
        let (out, err) = exec::log_paths(&self.cfg.data_dir, f.job, u64::from(f.token.epoch.0));
        let io = self.io.clone();
        let tx = self.int_tx.clone();
        let dirs = e.dirs;
        tokio::spawn(async move {
            let outputs = io.outputs(&dirs.output).await.unwrap_or_else(|msg| {
                tracing::warn!(job = %f.job, "outputs not stored: {msg}");
                None
            });
            let logs = io.logs(&out, &err).await.unwrap_or_else(|msg| {
                tracing::warn!(job = %f.job, "logs not stored: {msg}");
                None
            });
            dirs.remove().await;
            let _ = tx.send(Internal::Collected {
                finished: f,
                timed_out,
                outputs,
                logs,
            });
        });
    }

    fn fire_timers(&mut self) {
        let now = now_ms();
        while let Some(&(at, timer)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            self.feed(now, Event::Timer(timer));
        }
    }

    // ---- membership ------------------------------------------------------------------

    fn my_info(&mut self) -> NodeInfo {
        let running: Vec<JobId> = self
            .running
            .keys()
            .take(wire::MAX_RUNNING_LISTED)
            .copied()
            .collect();
        let capacity = self.cfg.engine.capacity;
        let used = self
            .running
            .keys()
            .filter_map(|j| self.engine.view(j))
            .filter_map(|v| v.spec.as_ref())
            .fold((0u32, 0u64, 0u32), |(c, m, g), s| {
                (
                    c.saturating_add(s.resources.cpu_millis),
                    m.saturating_add(s.resources.memory_bytes),
                    g.saturating_add(s.resources.gpus),
                )
            });
        NodeInfo {
            id: self.id,
            endpoint: self.endpoint,
            addrs: self.addrs.clone(),
            http: self.http.clone(),
            version: self.version,
            capacity,
            free: Resources {
                cpu_millis: capacity.cpu_millis.saturating_sub(used.0),
                memory_bytes: capacity.memory_bytes.saturating_sub(used.1),
                gpus: capacity.gpus.saturating_sub(used.2),
            },
            slots: self.cfg.engine.slots,
            free_slots: self
                .cfg
                .engine
                .slots
                .saturating_sub(self.running.len() as u32),
            labels: self.cfg.engine.labels.clone(),
            containers: self.cfg.engine.containers,
            gpus: self.cfg.gpus.clone(),
            running,
            replicas: self.cfg.replicas as u32,
        }
    }

    /// Adds or updates a member; starts (or restarts) its link when it is new or moved.
    fn ensure_member(&mut self, info: NodeInfo, now: u64) {
        if info.id == self.id {
            return;
        }
        let id = info.id;
        // The stand-in for a --join ticket (keyed by its endpoint) gives way to the real
        // member, however this node learns of it: the member may never dial us itself.
        let stand_in = NodeId(info.endpoint);
        if stand_in != id
            && self
                .members
                .get(&stand_in)
                .is_some_and(|m| m.info.version == (0, 0))
        {
            self.members.remove(&stand_in);
            self.links.remove(&stand_in);
            self.io.blobs.forget(&stand_in);
            self.rebuild_detector(now);
        }
        let relink = match self.members.get_mut(&id) {
            Some(m) => {
                if info.version < m.info.version {
                    return;
                }
                // A new boot (restart) or new addresses: the old connection is dead.
                let relink = info.version.0 != m.info.version.0
                    || info.addrs != m.info.addrs
                    || info.endpoint != m.info.endpoint;
                // members.json is for finding peers after a restart: it is rewritten
                // when a member moves, not every time its load changes.
                if relink || info.http != m.info.http {
                    self.members_dirty = true;
                }
                m.info = info.clone();
                m.digest_term = m.term();
                relink
            }
            None => {
                let mut m = Member {
                    info: info.clone(),
                    alive: true,
                    dead_at: (0, 0),
                    digest_term: 0,
                };
                m.digest_term = m.term();
                self.members.insert(id, m);
                self.members_dirty = true;
                self.rebuild_detector(now);
                true
            }
        };
        // A join ticket's stand-in (version (0, 0)) has not proved the secret yet. The key
        // is parsed (a curve point decompression) only when the member is new or moved.
        if relink
            && info.version != (0, 0)
            && let Ok(key) = iroh::PublicKey::from_bytes(&info.endpoint)
        {
            self.io
                .blobs
                .set_addr(id, net::endpoint_addr(key, &info.addrs));
        }
        if relink && !info.addrs.is_empty() {
            let hello = self.my_info();
            let link = self
                .transport
                .link(id, info.endpoint, info.addrs.clone(), hello);
            self.links.insert(id, link);
            self.refresh_overlay();
        }
        // Newer info than a judgement is the member's refutation (or a restart).
        if self
            .members
            .get(&id)
            .is_some_and(|m| !m.alive && m.info.version > m.dead_at)
        {
            self.mark(id, true, now);
            tracing::info!(node = %id, "believed alive again: it has newer info than the judgement");
        }
    }

    fn rebuild_detector(&mut self, now: u64) {
        let mut ring: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, m)| m.info.version != (0, 0))
            .map(|(id, _)| *id)
            .collect();
        ring.push(self.id);
        ring.sort();
        let me = ring.iter().position(|n| *n == self.id).unwrap_or(0);
        let ring: Arc<[NodeId]> = Arc::from(ring);
        let mut det = Detector::new(me, ring.clone(), self.cfg.timing.failure_timeout_ms, now);
        for (pos, n) in ring.iter().enumerate() {
            if self.members.get(n).is_some_and(|m| !m.alive) {
                det.set(pos, false, now);
            }
        }
        self.det = det;
        self.refresh_overlay();
        let claimants = self.claimants();
        self.feed(now, claimants);
    }

    /// Recomputes the live ring and the overlay neighbours after membership or a belief
    /// changed (not per message), and keeps the connections to those neighbours up while
    /// idle, and only those.
    fn refresh_overlay(&mut self) {
        let ring = self.det.ring();
        let alive: Vec<NodeId> = (0..ring.len())
            .filter(|p| self.det.is_alive(*p))
            .map(|p| ring[p])
            .collect();
        let before = std::mem::replace(&mut self.alive_ring, alive);
        if let Scheme::Placed { k } = self.scheme
            && before != self.alive_ring
        {
            self.hand_off(&before, k);
        }
        self.neighbours = overlay::neighbours(&self.alive_ring, self.id);
        for (id, link) in &self.links {
            link.set_keep(self.neighbours.binary_search(id).is_ok());
        }
        // The data plane asks live members in ring order from here: copies of one
        // node's blobs land on its successors, and fetches spread. Their addresses are
        // given as members are learned (`ensure_member`), not rebuilt here.
        self.io
            .blobs
            .set_live(Arc::from(self.alive_ring.as_slice()));
    }

    fn pos(&self, id: &NodeId) -> Option<usize> {
        self.det.ring().binary_search(id).ok()
    }

    /// Updates this node's belief about `id`, telling the engine what changed.
    fn mark(&mut self, id: NodeId, alive: bool, now: u64) {
        let Some(pos) = self.pos(&id) else { return };
        if let Some(m) = self.members.get_mut(&id) {
            if m.alive && !alive {
                m.dead_at = m.info.version;
            }
            m.alive = alive;
            m.digest_term = m.term();
        }
        if !self.det.set(pos, alive, now) {
            if !alive {
                // The engine may have dropped an older judgement on evidence of life.
                self.feed(now, Event::MemberDown(id));
            }
            return;
        }
        let ev = if alive {
            self.revived_total += 1;
            Event::MemberUp(id)
        } else {
            Event::MemberDown(id)
        };
        self.refresh_overlay();
        self.feed(now, ev);
        let claimants = self.claimants();
        self.feed(now, claimants);
    }

    fn send(&self, to: &NodeId, msg: &Msg) {
        let Some(link) = self.links.get(to) else {
            return;
        };
        match wire::encode(msg) {
            Ok(f) if msg.is_liveness() => link.send_live(Arc::new(f), &self.stats),
            Ok(f) => link.send(Arc::new(f), &self.stats),
            Err(e) => tracing::error!("cannot encode a message: {e}"),
        }
    }

    /// Sends `body` to every member believed alive, down the overlay's broadcast tree.
    fn broadcast(&self, body: Bcast) {
        self.forward(self.id, body);
    }

    /// Hands `body` to this node's fingers before `limit` (see [`overlay::tree_targets`]).
    fn forward(&self, limit: NodeId, body: Bcast) {
        let mut msg = Msg::Tree { limit, body };
        for (to, sub) in overlay::tree_targets(&self.alive_ring, self.id, limit) {
            if let Msg::Tree { limit, .. } = &mut msg {
                *limit = sub;
            }
            self.send(&to, &msg);
        }
    }

    /// Who may claim a job, for the engine's rendezvous rank: under full replication
    /// every live node (the live ring, listed when few enough to rank exactly), under
    /// placement the job's replicas and the node it was submitted to (counted).
    fn claimants(&self) -> Event {
        let alive = self.det.alive_count();
        match self.scheme {
            Scheme::Full if self.alive_ring.len() <= mutual_core::rank::EXACT_RANK_MAX_NODES => {
                Event::Claimants(Arc::from(self.alive_ring.as_slice()))
            }
            Scheme::Full => Event::ClusterSize(alive),
            Scheme::Placed { k } => Event::ClusterSize(alive.min(k + 1)),
        }
    }

    /// The other nodes that hold `job`'s document under placement: its `k` replicas in
    /// this node's view and every live node that wrote to it (its submitter, claimants
    /// and runners, wherever they are on the ring).
    fn holders(&self, job: &JobId, k: usize) -> Vec<NodeId> {
        self.holders_on(job, k, &self.alive_ring)
    }

    /// [`Self::holders`] on a given live ring (sorted, this node included).
    fn holders_on(&self, job: &JobId, k: usize, ring: &[NodeId]) -> Vec<NodeId> {
        let writers = self
            .engine
            .view(job)
            .into_iter()
            .flat_map(|v| v.records().map(|r| r.writer()));
        placement::holders_with_writers(ring, *job, k, writers, &self.id)
    }

    /// Pushes new changes of `job`: down the broadcast tree under full replication; under
    /// placement straight to its holders, asking them to answer with what they hold and
    /// this node lacks. `relay`: these are another writer's changes, received from it
    /// with the list of holders it sent them to; they go on, once and without asking for
    /// an answer, to the holders of this node's view that the writer missed
    /// (`placement::relay_targets`), so two writers whose views of the holders differ (a
    /// concurrent claim from a node that just joined, say) still see each other's records
    /// within two hops, inside the settle window.
    fn push(&self, job: JobId, changes: Vec<Vec<u8>>, relay: Option<(NodeId, Vec<NodeId>)>) {
        let Scheme::Placed { k } = self.scheme else {
            self.broadcast(Bcast::Changes { job, changes });
            return;
        };
        let holders = self.holders(&job, k);
        let (to, sent, reply) = match relay {
            None if self.submit_waits.is_waiting(&job) => (holders.clone(), holders, CONFIRM_REPLY),
            None => (holders.clone(), holders, 2),
            Some((writer, sent)) => (
                placement::relay_targets(&holders, writer, &sent),
                Vec::new(),
                0,
            ),
        };
        if to.is_empty() {
            return;
        }
        let msg = Msg::Changes {
            job,
            changes,
            fingerprint: self.engine.view(&job).map_or(0, |v| v.fingerprint()),
            reply,
            sent,
        };
        self.send_all(&to, &msg);
    }

    /// Under placement, starts waiting for another holder to confirm the submission of
    /// `job` (durable here) and keeps `reply` until one does: returns the acknowledgement
    /// to send now, if there is none to wait for — full replication, or no other holder
    /// in this node's view (`--replicas 1` with this node the replica, say). A node that
    /// reaches no other member answers at once, unconfirmed: waiting would not change that.
    fn await_holder(
        &mut self,
        job: JobId,
        reply: oneshot::Sender<Result<JobStatus, ApiError>>,
    ) -> Option<Ack> {
        let Scheme::Placed { k } = self.scheme else {
            return Some(Ack::Submit(job, reply));
        };
        if self.cut_off() {
            let why = "this node reaches no other member (it believes every other one dead)";
            self.answer_unconfirmed(job, reply, why.to_string());
            return None;
        }
        if self.holders(&job, k).is_empty() {
            return Some(Ack::Submit(job, reply));
        }
        if !self.submit_waits.add(job, now_ms()) {
            self.answer_unconfirmed(
                job,
                reply,
                format!(
                    "this node waits on {} submissions already (its limit), so it did not \
                     wait for another holder to confirm this one",
                    mutual_core::submit::MAX_SUBMIT_WAITS
                ),
            );
            return None;
        }
        self.submit_replies.insert(job, reply);
        None
    }

    /// Whether this node believes every other member dead (a partition, or it lost its
    /// network): nothing it writes reaches anyone.
    fn cut_off(&self) -> bool {
        self.alive_ring.len() <= 1 && !self.members.is_empty()
    }

    /// A holder confirmed that it holds `job` durably: answer its submission, if waited on.
    fn confirmed(&mut self, job: JobId, now: u64) {
        let Some(waited_ms) = self.submit_waits.confirm(&job, now) else {
            return;
        };
        self.submit_confirm_ms.observe(waited_ms as f64);
        if let Some(reply) = self.submit_replies.remove(&job) {
            self.answer_submit(job, reply, None);
        }
    }

    /// Answers a submission with the job's status, and `warning` (HTTP 202) if given.
    fn answer_submit(
        &self,
        job: JobId,
        reply: oneshot::Sender<Result<JobStatus, ApiError>>,
        warning: Option<String>,
    ) {
        let st = self
            .status(&job)
            .map(|st| JobStatus { warning, ..st })
            .ok_or_else(|| ApiError::NotFound(job.to_string()));
        let _ = reply.send(st);
    }

    /// Answers a submission that no other holder confirmed (HTTP 202, with `why`).
    fn answer_unconfirmed(
        &mut self,
        job: JobId,
        reply: oneshot::Sender<Result<JobStatus, ApiError>>,
        why: String,
    ) {
        self.submits_unconfirmed += 1;
        tracing::warn!(%job, "submission answered unconfirmed: {why}");
        let warning = format!(
            "{why}. The job stands and reaches its holders once they are reachable, but \
             until then it is held by this node alone: losing this node first loses the job"
        );
        self.answer_submit(job, reply, Some(warning));
    }

    /// Each probe period: sends the document of each submission still unconfirmed after a
    /// failure timeout to the holders of this node's current view again, and answers
    /// those that waited the whole wait.
    fn submit_tick(&mut self, now: u64) {
        // Only placement waits (`await_holder`).
        if self.submit_waits.is_empty() {
            return;
        }
        let wait_ms = mutual_core::submit::wait_ms(self.failure_timeout_ms());
        let due = self
            .submit_waits
            .due(now, self.failure_timeout_ms(), wait_ms);
        for job in due.resend {
            // The whole document, as a fresh push: still waited on, it asks to confirm.
            if let Some(saved) = self.docs.saved(&job) {
                self.push(job, vec![saved], None);
            }
        }
        for job in due.expired {
            let Some(reply) = self.submit_replies.remove(&job) else {
                continue;
            };
            let why = if self.cut_off() {
                format!("this node reached no other member within {wait_ms} ms")
            } else {
                format!("no other holder of this job confirmed it within {wait_ms} ms")
            };
            self.answer_unconfirmed(job, reply, why);
        }
    }

    /// Sends one message to several members, encoding it once.
    fn send_all(&self, to: &[NodeId], msg: &Msg) {
        let frame = match wire::encode(msg) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                tracing::error!("cannot encode a message: {e}");
                return;
            }
        };
        for n in to {
            if let Some(link) = self.links.get(n) {
                link.send(frame.clone(), &self.stats);
            }
        }
    }

    /// Under placement, after the live ring changed from `before`: sends each document
    /// this node is to hand off (`placement::handoff`) to its new holders — its new
    /// replicas, and nodes involved in it that came back — when this node is the closest
    /// old replica still alive, or when no old replica is and this node holds it as one
    /// of the nodes involved.
    fn hand_off(&mut self, before: &[NodeId], k: usize) {
        let jobs: Vec<JobId> = self.docs.ids().copied().collect();
        for job in jobs {
            let h = placement::handoff(before, &self.alive_ring, job, k);
            if h.sender.is_some_and(|s| s != self.id) {
                continue;
            }
            let old = self.holders_on(&job, k, before);
            let to: Vec<NodeId> = self
                .holders(&job, k)
                .into_iter()
                .filter(|n| !old.contains(n))
                .collect();
            if to.is_empty() {
                continue;
            }
            let Some(saved) = self.docs.saved(&job) else {
                continue;
            };
            let msg = Msg::Changes {
                job,
                changes: vec![saved],
                fingerprint: self.engine.view(&job).map_or(0, |v| v.fingerprint()),
                reply: 0,
                sent: Vec::new(),
            };
            self.send_all(&to, &msg);
        }
    }

    fn probe_tick(&mut self) {
        let now = now_ms();
        self.ticks += 1;
        // Local health: if this tick comes late, this node was starved (its own answers
        // may have sat unread); silence across the excess says nothing about the peers.
        let period = self.cfg.timing.probe_interval_ms;
        let gap = now.saturating_sub(self.last_tick_ms);
        self.last_tick_ms = now;
        if self.ticks > 1 && gap > (period / 2).saturating_mul(LATE_TICK_HALF_PERIODS) {
            self.late_ticks += 1;
            self.det.forgive(gap - period, now);
        }
        self.det.set_timeout(self.failure_timeout_ms());
        self.retune(now);
        let probe = self.judge_due(now).probe;
        self.send_probes(probe);
        self.judge_at = self.det.next_judgement_ms();
        let members = &self.members;
        let again = self.downs.due(now, self.det.timeout_ms(), |id| {
            members.get(id).is_some_and(|m| !m.alive)
        });
        for id in again {
            self.broadcast(Bcast::Down(id, self.dead_at(&id)));
        }
        self.submit_tick(now);
        if self.ticks.is_multiple_of(REPROBE_EVERY_TICKS) {
            for k in self.det.reprobe() {
                if let Some(id) = self.det.ring().get(k).copied() {
                    self.send(&id, &Msg::Probe);
                }
            }
        }
    }

    /// Judges every watched node silent past the timeout, until no one is judged: the
    /// nodes watched next may have been silent as long, timed while looked ahead at
    /// (`membership::LOOKAHEAD`). Each round marks at least one node dead, so it ends
    /// within the ring's length. Returns the last round (the probes to send).
    fn judge_due(&mut self, now: u64) -> mutual_core::membership::Tick {
        let mut tick = self.det.tick(now);
        for _ in 0..self.det.ring().len() {
            if tick.judged.is_empty() {
                break;
            }
            for j in std::mem::take(&mut tick.judged) {
                self.judge(j, now);
            }
            tick = self.det.tick(now);
        }
        tick
    }

    fn send_probes(&mut self, positions: Vec<usize>) {
        let sent = std::time::Instant::now();
        for p in positions {
            if let Some(id) = self.det.ring().get(p).copied() {
                self.probed_at.insert(id, sent);
                self.send(&id, &Msg::Probe);
            }
        }
    }

    /// A watched node's deadline (`Detector::next_judgement_ms`) came between probe
    /// periods: judge it now rather than at the next period. If the deadline fired more
    /// than half a period late, this node was starved and answers may sit unread: it
    /// leaves the judgement to the next probe period, by when they have been read (and
    /// which forgives the starvation if its own tick came late too).
    fn judge_deadline(&mut self, due_ms: u64) {
        let now = now_ms();
        if now.saturating_sub(due_ms) <= self.cfg.timing.probe_interval_ms / 2 {
            let judged_before = self.judged_total;
            let tick = self.judge_due(now);
            if self.judged_total != judged_before {
                // New nodes are watched and looked ahead at: start timing them now.
                self.send_probes(tick.probe);
            }
        } else {
            self.late_deadlines += 1;
        }
        self.judge_at = self.det.next_judgement_ms();
    }

    /// This node's detector judged the node at ring position `pos` dead: the engine and
    /// everyone else are told, and the judgement is repeated while it holds.
    fn judge(&mut self, pos: usize, now: u64) {
        let Some(id) = self.det.ring().get(pos).copied() else {
            return;
        };
        let timeout = self.det.timeout_ms();
        tracing::info!(node = %id, "judged dead (silent for {timeout} ms)");
        self.judged_total += 1;
        self.detection_ms.observe(timeout as f64);
        self.mark(id, false, now);
        self.feed(now, Event::Suspect(id));
        self.broadcast(Bcast::Down(id, self.dead_at(&id)));
        self.downs.judged(id, now, timeout);
    }

    /// Folds in a probe round trip (smoothed mean and deviation) and retunes.
    fn rtt_sample(&mut self, rtt: Duration, now: u64) {
        let x = rtt.as_secs_f64() * 1e6;
        let (mean, dev) = match self.rtt {
            None => (x, x / 2.0),
            Some((m, d)) => (m + (x - m) / 8.0, d + ((x - m).abs() - d) / 4.0),
        };
        self.rtt = Some((mean, dev));
        self.retune(now);
    }

    /// Adapts the engine's claim timing to how long other nodes' claims take to arrive.
    /// The settle window and the rendezvous step are both the 99th percentile of the
    /// stamp-to-arrival delays of the control records pushed here lately
    /// (`mutual_core::propagation`: that frame includes clock offsets, so no margin for
    /// skew is added). Without enough of them (an idle cluster), from probe round trips:
    /// a claim crosses at most [`overlay::depth`] hops, each about half a round trip
    /// (mean plus four deviations), and the settle window doubles that for skew. Neither
    /// goes below what was configured nor above [`MAX_SETTLE_MS`] / [`MAX_RANK_STEP_MS`].
    fn retune(&mut self, now: u64) {
        let (settle_ms, step_ms) = match self.propagation.estimate_ms(now) {
            Some(d) => (d, d),
            None => {
                let Some((mean, dev)) = self.rtt else {
                    return;
                };
                let hop_ms = (mean + 4.0 * dev) / 2.0 / 1e3;
                let depth = f64::from(overlay::depth(self.det.alive_count()));
                let propagation_ms = (hop_ms * depth).ceil() as u64;
                (2 * propagation_ms, propagation_ms)
            }
        };
        let (settle_floor, step_floor) = self.timing_floor;
        let settle = settle_ms.clamp(settle_floor, MAX_SETTLE_MS.max(settle_floor));
        let step = step_ms.clamp(step_floor, MAX_RANK_STEP_MS.max(step_floor));
        self.ae_pacer.set_hold(settle);
        if self.engine.timing() != (settle, step) {
            self.engine.tune(settle, step);
        }
    }

    /// The failure timeout in force: the configured one, or [`FAILURE_TIMEOUT_RTOS`]
    /// retransmission timeouts (mean round trip plus four deviations, as TCP computes
    /// it) when probes answer that slowly. On a machine so loaded that every process
    /// waits hundreds of ms for a core, answers come late but come: slow is not dead.
    fn failure_timeout_ms(&self) -> u64 {
        let configured = self.cfg.timing.failure_timeout_ms;
        let rto_ms = self.rtt.map_or(0.0, |(m, d)| (m + 4.0 * d) / 1e3);
        configured.max((rto_ms * FAILURE_TIMEOUT_RTOS) as u64)
    }

    /// Saves the member list (for rejoining after a restart) when a member came or moved.
    fn save_members(&mut self) {
        if !self.members_dirty
            || self
                .members_saved_at
                .is_some_and(|t| t.elapsed() < MEMBERS_SAVE_INTERVAL)
        {
            return;
        }
        self.members_dirty = false;
        self.members_saved_at = Some(std::time::Instant::now());
        let list: Vec<&NodeInfo> = self
            .members
            .values()
            .map(|m| &m.info)
            .filter(|i| i.version != (0, 0))
            .collect();
        if let Ok(bytes) = serde_json::to_vec(&list) {
            let path = self.cfg.data_dir.join("members.json");
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .is_err()
            {
                tracing::warn!("cannot save the member list in {}", path.display());
            }
        }
    }

    fn info_tick(&mut self) {
        let now = now_ms();
        if self.info_dirty && now >= self.info_due_ms {
            self.info_dirty = false;
            self.info_due_ms = now + self.det.alive_count() as u64 * LOAD_ANNOUNCE_MS_PER_MEMBER;
            self.version.1 += 1;
            let info = self.my_info();
            self.broadcast(Bcast::Info(Box::new(info)));
        }
    }

    /// An anti-entropy partner: a random overlay neighbour, so rounds reuse the same few
    /// connections instead of dialling a new member each time.
    fn random_neighbour(&self) -> Option<NodeId> {
        self.neighbours.iter().copied().choose(&mut rand::rng())
    }

    /// This node and every member it knows, and those it believes dead, for membership
    /// anti-entropy and joiners.
    fn member_list(&mut self) -> Msg {
        // Stand-ins for --join tickets stay local: they are not members.
        let known = || self.members.values().filter(|m| m.info.version != (0, 0));
        let dead = known()
            .filter(|m| !m.alive)
            .map(|m| (m.info.id, m.dead_at))
            .take(wire::MAX_MEMBERS)
            .collect();
        let list = known()
            .map(|m| m.info.clone())
            .take(wire::MAX_MEMBERS - 1)
            .collect::<Vec<_>>();
        Msg::Members {
            list: std::iter::once(self.my_info()).chain(list).collect(),
            dead,
        }
    }

    /// Sends this node's anti-entropy digest to `to`.
    fn send_digest(&self, to: &NodeId, reply: bool) {
        let jobs = self.digest(to);
        let catching_up = self.engine.is_passive();
        self.send(
            to,
            &Msg::Digest {
                jobs,
                reply,
                catching_up,
            },
        );
    }

    /// Fingerprints of the jobs `peer` should hold too: all of them under full
    /// replication, under placement those it is a holder of in this node's view, and 0
    /// for each document held here that does not decode yet (the peer sends it whole).
    fn digest(&self, peer: &NodeId) -> Vec<(JobId, u64)> {
        let mut out: Vec<(JobId, u64)> = self
            .engine
            .views()
            .filter(|(id, _)| self.shares(id, peer))
            .take(wire::MAX_DIGEST_JOBS)
            .map(|(id, v)| (*id, v.fingerprint()))
            .collect();
        if matches!(self.scheme, Scheme::Placed { .. }) {
            let room = wire::MAX_DIGEST_JOBS.saturating_sub(out.len());
            out.extend(
                self.docs
                    .ids()
                    .filter(|id| self.engine.view(id).is_none() && self.shares(id, peer))
                    .take(room)
                    .map(|id| (*id, 0)),
            );
        }
        out
    }

    /// Whether `peer` should hold `job`'s document (so anti-entropy compares it).
    fn shares(&self, job: &JobId, peer: &NodeId) -> bool {
        match self.scheme {
            Scheme::Full => true,
            Scheme::Placed { k } => self.holders(job, k).contains(peer),
        }
    }

    /// Partners for job anti-entropy this round. Under full replication a random overlay
    /// neighbour. Under placement, one of the `k` live ring neighbours on either side (who
    /// hold most of the jobs this node holds as a replica: `placement::ring_neighbours`),
    /// and the far holders (the nodes involved in a job are anywhere on the ring) that
    /// `anti_entropy::far_partners` picks: every holder of the jobs whose document this
    /// node cannot read yet, once they are quiet, and every holder of the next held job in
    /// turn, so each job is compared with each of its holders once per pass over the jobs
    /// held. Picking one random holder of one random job instead left a far holder's
    /// difference unrepaired for minutes in the simulator.
    fn ae_partners(&mut self) -> Vec<NodeId> {
        let Scheme::Placed { k } = self.scheme else {
            return self.random_neighbour().into_iter().collect();
        };
        let near = placement::ring_neighbours(&self.alive_ring, &self.id, k);
        let mut out: Vec<NodeId> = near
            .into_iter()
            .choose(&mut rand::rng())
            .into_iter()
            .collect();
        let held = self.docs.len();
        let sweep = if held > 0 {
            let pick = self.ae_cursor % held;
            self.ae_cursor = self.ae_cursor.wrapping_add(1);
            self.docs.ids().nth(pick).copied()
        } else {
            None
        };
        let now = now_ms();
        let quiet = self.far.quiet(now, self.ae_pacer.hold_ms());
        let (far, covered) = far_partners(&quiet, sweep, |job| self.holders(job, k));
        for job in &covered {
            self.far.compared(job, now);
        }
        out.extend(far);
        out.sort();
        out.dedup();
        out
    }

    fn ae_tick(&mut self) {
        let now = now_ms();
        self.ae_pacer.tick(now);
        if self.engine.is_passive() {
            self.passive_rounds += 1;
            if self.passive_rounds > PASSIVE_FALLBACK_ROUNDS {
                tracing::info!("no caught-up peer answered; going active on what this node holds");
                self.feed(now, Event::CaughtUp);
            }
        }
        // A member believed dead is probed now and then: if the belief was false (a
        // refutation lost, say) its answer makes this node tell it, and it refutes again;
        // watchers alone may never look.
        if let Some(dead) = self
            .members
            .iter()
            .filter(|(_, m)| !m.alive)
            .map(|(id, _)| *id)
            .choose(&mut rand::rng())
        {
            self.send(&dead, &Msg::Probe);
        }
        for peer in self.ae_partners() {
            self.send_digest(&peer, true);
        }
        if let Some(peer) = self.random_neighbour() {
            // Membership anti-entropy rides along: it heals one-sided member views. Only
            // a hash travels; the lists follow only where the views differ.
            let hash = self.member_hash();
            self.send(&peer, &Msg::MemberDigest { hash, reply: true });
        }
    }

    /// The membership digest: the wrapping sum of every known member's (id, version)
    /// term and this node's own.
    fn member_hash(&self) -> u64 {
        let mine = wire::member_hash_term(&self.id, self.version);
        self.members
            .values()
            .fold(mine, |sum, m| sum.wrapping_add(m.digest_term))
    }

    // ---- peers ---------------------------------------------------------------------

    fn on_net(&mut self, ev: NetEvent) {
        let now = now_ms();
        match ev {
            NetEvent::Hello { info, late } => {
                let id = info.id;
                let new = !self.members.contains_key(&id);
                // A new member or a new boot needs anti-entropy now; a link that merely
                // reconnected after going idle does not.
                let reboot = self
                    .members
                    .get(&id)
                    .is_some_and(|m| m.info.version.0 != info.version.0 || !m.alive);
                let announce = new.then(|| info.clone());
                self.ensure_member(info, now);
                if !matches!(*self.joined.borrow(), Some(Ok(()))) {
                    self.joined.send_replace(Some(Ok(())));
                }
                if !late {
                    self.tell_if_judged(id);
                }
                if let Some(info) = announce {
                    let members = self.member_list();
                    self.send(&id, &members);
                    // Everyone else learns of the joiner now, not a few gossip rounds later.
                    self.broadcast(Bcast::Info(Box::new(info)));
                }
                if new || reboot {
                    self.send_digest(&id, true);
                }
            }
            NetEvent::Refused { peer, reason } => {
                tracing::error!(%peer, "refused our hello: {reason}");
                if let Some(m) = self.members.get(&peer)
                    && m.info.version == (0, 0)
                {
                    // A --join ticket with the wrong secret: forget it.
                    self.members.remove(&peer);
                    self.links.remove(&peer);
                    self.io.blobs.forget(&peer);
                    self.rebuild_detector(now);
                    let waiting = self.members.values().any(|m| m.info.version == (0, 0));
                    if !waiting && self.joined.borrow().is_none() {
                        self.joined.send_replace(Some(Err(reason)));
                    }
                }
            }
            NetEvent::Msg { from, msg } => self.on_msg(from, msg, now),
        }
    }

    fn on_msg(&mut self, from: NodeId, msg: Msg, now: u64) {
        if !self.members.contains_key(&from) {
            return;
        }
        // Only newer info from a member revives it (`told_down`, `ensure_member`): its
        // own refutation. No message is taken as evidence of life, not even a probe on
        // the liveness lane: any of them may have waited behind thousands of others, in
        // this node's queue or in QUIC's buffers, and been sent before its sender died
        // and was judged dead; revived on one, a dead holder's jobs wait for a judgement
        // that does not come again. A probe (an answer, a hello, a record written after
        // the judgement) from a member believed dead makes this node tell it
        // (`tell_if_judged`), and a live one refutes.
        if matches!(msg, Msg::Probe) {
            self.tell_if_judged(from);
        }
        match msg {
            Msg::Hello { .. } => {}
            Msg::Members { list, dead } => {
                for info in list.into_iter().take(wire::MAX_MEMBERS) {
                    if info.id == self.id || info.version == (0, 0) {
                        continue;
                    }
                    let known = self.members.contains_key(&info.id);
                    // A member we never heard of is dialled; a known one only updated.
                    if !known
                        || self
                            .members
                            .get(&info.id)
                            .is_some_and(|m| m.info.version < info.version)
                    {
                        self.ensure_member(info, now);
                    }
                }
                // After the infos: a judgement older than what they brought is void.
                for (x, at) in dead.into_iter().take(wire::MAX_MEMBERS) {
                    self.told_down(x, at, now);
                }
            }
            Msg::MemberDigest { hash, reply } => {
                let mine = self.member_hash();
                if mine != hash {
                    // Our list first, then (if asked) our hash: the sender merges the list
                    // before it compares, so it answers only if it holds something newer.
                    let members = self.member_list();
                    self.send(&from, &members);
                    if reply {
                        self.send(
                            &from,
                            &Msg::MemberDigest {
                                hash: mine,
                                reply: false,
                            },
                        );
                    }
                }
            }
            Msg::Tree { limit, body } => {
                // Forward first: the subtree should not wait for this node's own work.
                self.forward(limit, body.clone());
                self.on_bcast(body, now);
            }
            Msg::Probe => self.send(&from, &Msg::Ack),
            Msg::Judged(at) => {
                self.told_down(self.id, at, now);
                // The teller may be cut off from this node's broadcasts (a healed
                // partition: each side believes the other dead, and a broadcast goes down
                // the live ring only), so it gets this node's info straight; member
                // anti-entropy spreads it on its side.
                let members = Msg::Members {
                    list: vec![self.my_info()],
                    dead: Vec::new(),
                };
                self.send(&from, &members);
            }
            Msg::Ack => {
                if let Some(sent) = self.probed_at.remove(&from) {
                    self.rtt_sample(sent.elapsed(), now);
                }
                self.tell_if_judged(from);
                if let Some(pos) = self.pos(&from) {
                    self.det.answered(pos, now);
                }
            }
            Msg::Digest {
                jobs,
                reply,
                catching_up,
            } => {
                let theirs: HashMap<JobId, u64> =
                    jobs.into_iter().take(wire::MAX_DIGEST_JOBS).collect();
                let caught_up = !self.engine.is_passive();
                let differ: Vec<JobId> = self
                    .engine
                    .views()
                    .filter(|(id, v)| theirs.get(id) != Some(&v.fingerprint()))
                    .filter(|(id, _)| theirs.contains_key(id) || self.shares(id, &from))
                    .map(|(id, _)| *id)
                    .collect();
                let pacer = &mut self.ae_pacer;
                let differ: Vec<JobId> = differ
                    .into_iter()
                    .filter(|id| pacer.should_send(*id, now, catching_up))
                    .collect();
                let mut batch = Vec::new();
                let mut bytes = 0usize;
                for id in differ {
                    if let Some(saved) = self.docs.saved(&id) {
                        bytes += saved.len();
                        batch.push((id, saved));
                    }
                    if batch.len() >= wire::MAX_DOCS_PER_MSG || bytes >= wire::DOCS_MSG_BYTES {
                        let docs = std::mem::take(&mut batch);
                        bytes = 0;
                        self.send(&from, &Msg::Docs { docs, caught_up });
                    }
                }
                self.send(
                    &from,
                    &Msg::Docs {
                        docs: batch,
                        caught_up,
                    },
                );
                if reply {
                    let lacking = theirs.iter().any(|(id, f)| {
                        self.engine.view(id).map(|v| v.fingerprint()) != Some(*f)
                            && (!caught_up || !self.ae_pacer.is_recent(id, now))
                    });
                    if lacking {
                        self.send_digest(&from, false);
                    }
                }
            }
            Msg::Changes {
                job,
                changes,
                fingerprint,
                reply,
                mut sent,
            } => {
                // A submission: confirm once this copy is durable (it is appended after
                // `receive`'s frames, so their sync covers it). A peer's value above 3
                // means no more than 2.
                let confirm = reply == CONFIRM_REPLY;
                // Only a writer's own push asks for replies; relays and hand-offs do not.
                let pushed = reply != 0;
                let reply = reply.min(2);
                let relay = (reply == 2).then(|| changes.clone());
                let changed = self.receive(job, changes, Kind::Change, pushed, now);
                if confirm && self.engine.view(&job).is_some_and(|v| v.spec.is_some()) {
                    let tx = self.int_tx.clone();
                    self.store.append(Vec::new(), move || {
                        let _ = tx.send(Internal::Held { job, to: from });
                    });
                }
                if let Some(relay) = relay
                    && changed
                {
                    if sent.len() > wire::MAX_SENT_TO {
                        sent.clear();
                    }
                    self.push(job, relay, Some((from, sent)));
                }
                // A receiver that cannot decode the job yet (the writer's earlier records
                // never reached it) answers too, so the writer sends it everything.
                let mine = self.engine.view(&job).map(|v| v.fingerprint());
                if reply > 0
                    && mine != Some(fingerprint)
                    && let Some(saved) = self.docs.saved(&job)
                {
                    let msg = Msg::Changes {
                        job,
                        changes: vec![saved],
                        fingerprint: mine.unwrap_or(0),
                        reply: reply - 1,
                        sent: Vec::new(),
                    };
                    self.send(&from, &msg);
                }
            }
            Msg::Held { job } => self.confirmed(job, now),
            Msg::Docs { docs, caught_up } => {
                for (job, bytes) in docs.into_iter().take(wire::MAX_DOCS_PER_MSG) {
                    self.receive(job, vec![bytes], Kind::Doc, false, now);
                }
                if caught_up && self.engine.is_passive() {
                    tracing::info!(peer = %from, "caught up with a peer; going active");
                    self.feed(now, Event::CaughtUp);
                }
            }
        }
    }

    fn on_bcast(&mut self, body: Bcast, now: u64) {
        match body {
            // Relayed: it may be another member's info (a joiner announced by the member
            // it joined through); `ensure_member` keeps only newer versions.
            Bcast::Info(info) => self.ensure_member(*info, now),
            Bcast::Changes { job, changes } => {
                self.receive(job, changes, Kind::Change, true, now);
            }
            Bcast::Down(x, at) => self.told_down(x, at, now),
        }
    }

    /// Another member judged `x` dead as of version `at` of its info (a broadcast, or a
    /// member list from anti-entropy). It holds unless this node has newer info from
    /// `x`: `x` refuted it since. Told of its own death, this node refutes: it bumps its
    /// version and broadcasts its info, which revives it wherever it was judged dead.
    fn told_down(&mut self, x: NodeId, at: (u64, u64), now: u64) {
        if x == self.id {
            if at >= self.version {
                tracing::info!("judged dead by another member; refuting");
                self.version.1 += 1;
                let info = self.my_info();
                self.broadcast(Bcast::Info(Box::new(info)));
            }
            return;
        }
        if self.members.get(&x).is_none_or(|m| at < m.info.version) {
            return;
        }
        // Dead already, the engine is told again: it may have dropped an older judgement
        // on evidence of life.
        self.mark(x, false, now);
        if let Some(m) = self.members.get_mut(&x) {
            m.dead_at = m.dead_at.max(at);
            m.digest_term = m.term();
        }
        // Under full replication the watcher that judged `x` holds all its jobs and
        // expires them at once; the others wait a grace period for a refutation (the
        // sweep). Under placement the watcher rarely holds them, so their holders act on
        // the judgement as on their own: what one watcher's judgement does under full
        // replication, no more.
        if matches!(self.scheme, Scheme::Placed { .. }) {
            self.feed(now, Event::Suspect(x));
        }
    }

    /// `id`, believed dead here, showed a sign of life: tell it, so that it refutes the
    /// judgement with newer info if it is alive. The sign itself revives no one: a probe,
    /// an answer or a record may have been sent before `id` died and waited in queues
    /// until after the judgement. (E3 at 100 placed agents, 40 % killed, once left a dead
    /// holder believed alive by all but its judges and its jobs untaken for good, when
    /// any such sign revived for good.)
    fn tell_if_judged(&self, id: NodeId) {
        if let Some(m) = self.members.get(&id).filter(|m| !m.alive) {
            self.send(&id, &Msg::Judged(m.dead_at));
        }
    }

    /// The version of `id`'s info it is believed dead as of.
    fn dead_at(&self, id: &NodeId) -> (u64, u64) {
        self.members.get(id).map_or((0, 0), |m| m.dead_at)
    }

    /// Applies changes (or a saved document) from a peer, persists them, and hands the
    /// engine the records it did not have. Returns whether the document changed.
    /// `pushed`: the changes came from their writer's live push (not anti-entropy, a relay
    /// or a hand-off), so their control records time the path claims take.
    fn receive(
        &mut self,
        job: JobId,
        chunks: Vec<Vec<u8>>,
        kind: Kind,
        pushed: bool,
        now: u64,
    ) -> bool {
        if !self.docs.contains(&job) && self.docs.len() >= MAX_JOBS {
            tracing::warn!(%job, "refusing a new job from a peer: this node holds {MAX_JOBS} jobs");
            return false;
        }
        let doc = match self.docs.get_or_empty(job) {
            Ok(doc) => doc,
            Err(e) => {
                tracing::error!(%job, "cannot load this job's saved document: {e}");
                return false;
            }
        };
        let before = doc.heads();
        let mut frames = Vec::new();
        for bytes in chunks {
            match doc.apply(&bytes) {
                Ok(()) => frames.push(Frame { kind, job, bytes }),
                Err(e) => tracing::warn!(%job, "refusing bytes from a peer: {e}"),
            }
        }
        let changed = doc.heads() != before;
        let known = self.engine.view(&job);
        let placed = matches!(self.scheme, Scheme::Placed { .. });
        let records: Vec<Record> = if !changed {
            // Nothing new (a duplicate, or changes still waiting for their dependencies).
            if known.is_none() && placed {
                // A document this node cannot read: ask the job's holders once quiet.
                self.far.add(job, now);
            }
            Vec::new()
        } else if known.is_some_and(|k| k.spec.is_some()) {
            // The engine holds everything this document held before: decode what changed.
            match doc.records_since(&before) {
                Ok(records) => records,
                Err(e) => {
                    tracing::warn!(%job, "refusing records from a peer: {e}");
                    Vec::new()
                }
            }
        } else {
            // Before the creator's first change arrives the document does not decode yet.
            // Under placement nobody else may know this node lacks it (a relay reached it,
            // the spec did not): it asks the job's holders once quiet (`FarQueue`).
            let Ok(view) = doc.view() else {
                if placed {
                    self.far.add(job, now);
                }
                return changed;
            };
            if view.spec.as_ref().is_some_and(|s| s.id != job) {
                tracing::warn!(%job, "a peer sent a document whose spec names another job");
                self.docs.remove(&job);
                return false;
            }
            view.records().collect()
        };
        let records: Vec<Record> = records
            .into_iter()
            .filter(|r| !known.is_some_and(|k| k.contains(r)))
            .collect();
        if pushed {
            for r in &records {
                if matches!(
                    r,
                    Record::Claim { .. } | Record::Start { .. } | Record::Expiry { .. }
                ) && r.writer() != self.id
                {
                    self.propagation.observe(now, r.hlc());
                    self.arrival_ms
                        .observe(now.saturating_sub(r.hlc().as_millis()) as f64);
                }
            }
        }
        if changed {
            self.ae_pacer.changed(job, now);
        }
        if !frames.is_empty() {
            self.wal_bytes += self.store.append_unsynced(frames);
        }
        if records.is_empty() {
            return changed;
        }
        if placed && !self.far.is_empty() && known.is_none_or(|k| k.spec.is_none()) {
            self.far.readable(&job);
        }
        let mut writers: Vec<NodeId> = records.iter().map(|r| r.writer()).collect();
        writers.sort();
        writers.dedup();
        for chunk in records.chunks(mutual_core::engine::MAX_RECORDS_PER_EVENT) {
            self.feed(
                now,
                Event::Remote {
                    job,
                    records: chunk.to_vec(),
                },
            );
        }
        // The engine drops a death judgement when it sees a record written after it
        // (evidence of life). The writer is told, and refutes if it is alive; the detector
        // follows its newer info, or a node judged dead by mistake is never watched again.
        for w in writers {
            if w != self.id && !self.engine.is_judged_down(&w) {
                self.tell_if_judged(w);
            }
        }
        changed
    }

    // ---- API -----------------------------------------------------------------------

    fn log_source(&self, job: &JobId) -> Result<LogSource, ApiError> {
        let st = self.status(job).ok_or_else(|| self.not_here(job))?;
        let Some(node) = st.node.clone() else {
            return Err(ApiError::NoLogs(format!(
                "job {job} has not started anywhere yet"
            )));
        };
        let http = if node == self.id.to_string() {
            self.http.clone()
        } else {
            self.members
                .values()
                .find(|m| m.info.id.to_string() == node && m.alive)
                .and_then(|m| m.info.http.clone())
        };
        let attempt = st.attempts.iter().find(|a| a.epoch == st.attempt);
        let ended = attempt.is_some_and(|a| a.finished_at_ms.is_some());
        if http.is_none() && !ended {
            return Err(ApiError::NoLogs(format!(
                "the node that runs job {job} ({node}) is not reachable"
            )));
        }
        Ok(LogSource {
            stored: attempt.and_then(|a| a.logs.clone()),
            job: st.id,
            attempt: st.attempt,
            node,
            agent: http,
            state: st.state,
            ended,
        })
    }

    /// Why this node cannot answer for `job`: it never heard of it, or under placement
    /// it is not one of its holders (and which nodes are, as far as it knows).
    fn not_here(&self, job: &JobId) -> ApiError {
        let Scheme::Placed { k } = self.scheme else {
            return ApiError::NotFound(job.to_string());
        };
        let holders = placement::replicas(&self.alive_ring, *job, k)
            .iter()
            .filter(|n| **n != self.id)
            .filter_map(|n| self.members.get(n)?.info.http.clone())
            .collect();
        ApiError::Elsewhere {
            job: job.to_string(),
            replicas: k,
            holders,
        }
    }

    fn status(&self, job: &JobId) -> Option<JobStatus> {
        self.engine.view(job).and_then(job_status)
    }

    fn fits_somewhere(
        &self,
        r: &Resources,
        labels: &BTreeMap<String, String>,
        container: bool,
    ) -> bool {
        let e = &self.cfg.engine;
        let mine = (e.capacity, &e.labels, e.containers);
        std::iter::once(mine)
            .chain(
                self.members
                    .values()
                    .filter(|m| m.alive && m.info.version != (0, 0))
                    .map(|m| (m.info.capacity, &m.info.labels, m.info.containers)),
            )
            .any(|(c, l, runs_containers)| {
                c.cpu_millis >= r.cpu_millis
                    && c.memory_bytes >= r.memory_bytes
                    && c.gpus >= r.gpus
                    && labels.iter().all(|(k, v)| l.get(k) == Some(v))
                    && (runs_containers || !container)
            })
    }

    /// Cuts this node off from `ids` (an injected partition; empty heals).
    fn partition(&mut self, ids: &[String]) -> Result<Vec<String>, ApiError> {
        if !self.cfg.fault_injection {
            return Err(ApiError::Disabled(
                "fault injection is off: start the node with --fault-injection".into(),
            ));
        }
        if ids.len() > MAX_PARTITION_PEERS {
            return Err(ApiError::Invalid {
                field: Some("block".into()),
                message: format!("at most {MAX_PARTITION_PEERS} node ids"),
            });
        }
        let mut keys = Vec::with_capacity(ids.len());
        for text in ids {
            let id: NodeId = text.parse().map_err(|e| ApiError::Invalid {
                field: Some("block".into()),
                message: format!("{text:?} is not a node id: {e}"),
            })?;
            let m = self.members.get(&id).ok_or_else(|| ApiError::Invalid {
                field: Some("block".into()),
                message: format!("{id} is not a member this node knows"),
            })?;
            keys.push(m.info.endpoint);
        }
        self.transport.faults.block(keys);
        tracing::warn!(
            peers = ids.len(),
            "injected partition: ignoring traffic from {ids:?}"
        );
        Ok(ids.to_vec())
    }

    fn on_api(&mut self, req: ApiReq) {
        let now = now_ms();
        match req {
            ApiReq::Submit(request, reply) => {
                if self.docs.len() >= MAX_JOBS {
                    let _ = reply.send(Err(ApiError::Full(format!(
                        "this node holds {MAX_JOBS} jobs, its limit"
                    ))));
                    return;
                }
                let needs = request.resources.unwrap_or_default();
                let container = request.image.is_some();
                if !self.fits_somewhere(&needs, &request.labels, container) {
                    let _ = reply.send(Err(ApiError::Unschedulable(format!(
                        "no live node offers {} mCPU, {} bytes of memory, {} GPUs{}{}",
                        needs.cpu_millis,
                        needs.memory_bytes,
                        needs.gpus,
                        if container {
                            " and runs containers"
                        } else {
                            ""
                        },
                        if request.labels.is_empty() {
                            String::new()
                        } else {
                            format!(" with labels {:?}", request.labels)
                        }
                    ))));
                    return;
                }
                match self.engine.submit(now, *request) {
                    Ok((id, cmds)) => self.run_cmds(cmds, Some(Ack::Submit(id, reply))),
                    Err(EngineError::Spec(e)) => {
                        let _ = reply.send(Err(ApiError::Invalid {
                            field: Some(e.field.clone()),
                            message: e.to_string(),
                        }));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ApiError::Invalid {
                            field: None,
                            message: e.to_string(),
                        }));
                    }
                }
            }
            ApiReq::Get(id, reply) => {
                let _ = reply.send(self.status(&id).ok_or_else(|| self.not_here(&id)));
            }
            ApiReq::LogSource(id, reply) => {
                let _ = reply.send(self.log_source(&id));
            }
            ApiReq::List(state, limit, reply) => {
                let mut out: Vec<JobStatus> = self
                    .engine
                    .views()
                    .filter_map(|(_, v)| job_status(v))
                    .filter(|s| state.as_ref().is_none_or(|want| &s.state == want))
                    .collect();
                out.sort_by(|a, b| {
                    b.submitted_at_ms
                        .cmp(&a.submitted_at_ms)
                        .then_with(|| a.id.cmp(&b.id))
                });
                out.truncate(limit.min(MAX_LIST));
                let _ = reply.send(out);
            }
            ApiReq::Cancel(id, reply) => match self.engine.cancel(now, id) {
                Ok((outcome, cmds)) => {
                    self.run_cmds(cmds, Some(Ack::Cancel(id, outcome, reply)));
                }
                Err(_) => {
                    let _ = reply.send(Err(self.not_here(&id)));
                }
            },
            ApiReq::Nodes(reply) => {
                let me = self.my_info();
                let mut out = vec![node_status(&me, true, true)];
                out.extend(
                    self.members
                        .values()
                        .filter(|m| m.info.version != (0, 0))
                        .map(|m| node_status(&m.info, m.alive, false)),
                );
                let _ = reply.send(out);
            }
            ApiReq::Partition(ids, reply) => {
                let _ = reply.send(self.partition(&ids));
            }
            ApiReq::Metrics(reply) => {
                let _ = reply.send(self.metrics_text());
            }
        }
    }

    fn metrics_text(&self) -> String {
        use prometheus_client::encoding::text::encode;
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        use prometheus_client::registry::Registry;
        use std::sync::atomic::Ordering::Relaxed;

        let mut reg = Registry::with_prefix("mutual");
        let jobs = Family::<Vec<(String, String)>, Gauge>::default();
        let mut counts: BTreeMap<&'static str, i64> = BTreeMap::new();
        for name in [
            "queued",
            "claimed",
            "running",
            "succeeded",
            "failed",
            "cancelled",
        ] {
            counts.insert(name, 0);
        }
        for (id, _) in self.engine.views() {
            if let Some(s) = self.engine.state(id) {
                *counts.entry(s.name()).or_default() += 1;
            }
        }
        for (state, n) in counts {
            jobs.get_or_create(&vec![("state".to_string(), state.to_string())])
                .set(n);
        }
        reg.register("jobs", "Jobs this replica holds, by derived state", jobs);
        let st = self.engine.stats();
        let counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
            let c: Counter = Counter::default();
            c.inc_by(v);
            reg.register(name, help, c);
        };
        counter(&mut reg, "claims", "Claims this node wrote", st.claims);
        counter(
            &mut reg,
            "settle_losses",
            "Claims lost in the settle window",
            st.settle_losses,
        );
        counter(
            &mut reg,
            "executions_started",
            "Executions this node started",
            st.starts,
        );
        counter(
            &mut reg,
            "fenced_executions",
            "Executions stopped because this node learned it lost (fenced)",
            st.fenced_stops,
        );
        counter(
            &mut reg,
            "expiries",
            "Expiry records this node wrote",
            st.expiries,
        );
        counter(
            &mut reg,
            "results",
            "Result records this node wrote",
            st.results,
        );
        counter(
            &mut reg,
            "clock_rejections",
            "Remote records refused beyond the drift bound",
            st.clock_rejections,
        );
        let cache = self.docs.stats();
        counter(
            &mut reg,
            "doc_loads",
            "Saved job documents loaded back into memory (a change arrived or a record was written)",
            cache.loads,
        );
        counter(
            &mut reg,
            "doc_evictions",
            "Live job documents saved and dropped from memory (beyond the live budget)",
            cache.evictions,
        );
        let live: Gauge = Gauge::default();
        live.set(i64::try_from(self.docs.hot_len()).unwrap_or(i64::MAX));
        reg.register(
            "docs_live",
            "Job documents held live in memory (the rest are held saved)",
            live,
        );
        let n = &self.stats;
        counter(
            &mut reg,
            "sync_bytes_sent",
            "Bytes sent to peers",
            n.bytes_out.load(Relaxed),
        );
        counter(
            &mut reg,
            "sync_bytes_received",
            "Bytes received from peers",
            n.bytes_in.load(Relaxed),
        );
        counter(
            &mut reg,
            "sync_messages_sent",
            "Messages queued to peers",
            n.msgs_out.load(Relaxed),
        );
        counter(
            &mut reg,
            "sync_messages_received",
            "Messages received from peers",
            n.msgs_in.load(Relaxed),
        );
        counter(
            &mut reg,
            "sync_messages_dropped",
            "Messages dropped on full peer queues",
            n.dropped.load(Relaxed),
        );
        counter(
            &mut reg,
            "liveness_messages_dropped",
            "Probes and answers dropped: a full liveness lane, or no stream to send them on",
            n.live_dropped.load(Relaxed),
        );
        counter(
            &mut reg,
            "connections_dialled",
            "Peer connections this node dialled (a QUIC handshake each)",
            n.dialled.load(Relaxed),
        );
        for (name, help, v) in [
            (
                "connections_dialled_open",
                "Peer connections this node dialled that are up now",
                &n.dialled_open,
            ),
            (
                "connections_accepted_open",
                "Inbound peer connections (job protocol and blobs) served now",
                &n.accepted_open,
            ),
        ] {
            let g = Gauge::<i64>::default();
            g.set(v.load(Relaxed) as i64);
            reg.register(name, help, g);
        }
        counter(
            &mut reg,
            "connections_refused",
            "Inbound connections refused (wrong secret)",
            n.refused.load(Relaxed),
        );
        counter(
            &mut reg,
            "late_probe_ticks",
            "Probe periods this node itself came late to (their excess not counted as silence)",
            self.late_ticks,
        );
        counter(
            &mut reg,
            "late_judgement_deadlines",
            "Judgement deadlines this node came to over half a probe period late (left to the next period)",
            self.late_deadlines,
        );
        counter(
            &mut reg,
            "members_judged_dead",
            "Members this node's detector judged dead",
            self.judged_total,
        );
        counter(
            &mut reg,
            "members_revived",
            "Members believed dead that were heard from again (a death judgement proved wrong)",
            self.revived_total,
        );
        reg.register(
            "submit_confirm_milliseconds",
            "Under --replicas: how long a submission waited for another holder's confirmation",
            self.submit_confirm_ms.clone(),
        );
        counter(
            &mut reg,
            "submits_unconfirmed",
            "Submissions answered unconfirmed (HTTP 202): no other holder confirmed in time",
            self.submits_unconfirmed,
        );
        reg.register(
            "record_arrival_delay_milliseconds",
            "From another node stamping a claim, start or expiry to its arrival here by push",
            self.arrival_ms.clone(),
        );
        reg.register(
            "write_to_push_milliseconds",
            "From writing records to pushing them, once the log has synced them",
            self.write_push_ms.clone(),
        );
        reg.register(
            "detection_silence_milliseconds",
            "Silence of a watched member when it was judged dead",
            self.detection_ms.clone(),
        );
        let members = Gauge::<i64>::default();
        members.set(self.det.alive_count() as i64);
        reg.register(
            "members_alive",
            "Members believed alive, this node included",
            members,
        );
        let (settle, step) = self.engine.timing();
        let rtt_us = self.rtt.map_or(0, |(m, _)| m as i64);
        for (name, help, v) in [
            (
                "executions_running",
                "Executions running on this node",
                self.running.len() as i64,
            ),
            (
                "settle_window_milliseconds",
                "Settle window in force (adapted to how long claims take to arrive)",
                settle as i64,
            ),
            (
                "rank_step_milliseconds",
                "Rendezvous step in force (adapted to how long claims take to arrive)",
                step as i64,
            ),
            (
                "probe_rtt_microseconds",
                "Smoothed probe round trip",
                rtt_us,
            ),
        ] {
            let g = Gauge::<i64>::default();
            g.set(v);
            reg.register(name, help, g);
        }
        let mut out = String::new();
        let _ = encode(&mut out, &reg);
        out
    }
}

fn node_status(info: &NodeInfo, alive: bool, is_self: bool) -> NodeStatus {
    NodeStatus {
        id: info.id.to_string(),
        alive,
        http: info.http.clone(),
        addrs: info.addrs.iter().map(|a| a.to_string()).collect(),
        capacity: info.capacity,
        free: info.free,
        slots: info.slots,
        free_slots: info.free_slots,
        labels: info.labels.clone(),
        containers: info.containers,
        gpus: info.gpus.clone(),
        // A node believed dead runs nothing we can count on; its last report would mislead.
        running: if alive {
            info.running.iter().map(|j| j.to_string()).collect()
        } else {
            Vec::new()
        },
        is_self,
    }
}
