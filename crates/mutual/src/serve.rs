//! Running nodes: `mutual node` (one node, the whole process) and `mutual host` (many
//! nodes in one process, for experiments that need hundreds of nodes on one machine).
//!
//! Both start a node the same way ([`launch`]): bind the HTTP API, start the actor on the
//! current tokio runtime, join, and write `ticket` and `http` into the data directory. A
//! hosted node gets its own OS thread with its own single-threaded runtime, so everything
//! it runs — its iroh endpoint, its actor, its API, the tasks iroh spawns — lives on that
//! runtime, and crashing it (`POST /v1/debug/crash`) is as abrupt as a SIGKILL of its
//! process would be: its log writer is halted first (nothing more reaches its disk), then
//! the runtime is dropped without running a shutdown (no goodbye to peers), and its thread
//! ends, which delivers the parent-death signal to its job processes as the death of a
//! node process does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use mutual::api::Crash;
use mutual::gpu::Gpu;
use mutual::node::{NodeConfig, Timing};
use mutual::ticket::Ticket;
use mutual::units::{
    parse_cpus, parse_duration_ms, parse_label, parse_signed_duration_ms, parse_size,
};
use mutual_core::Resources;
use mutual_core::engine::EngineConfig;

/// Most nodes one `mutual host` runs.
pub const MAX_HOSTED_NODES: usize = 1_000;

#[derive(Args)]
pub struct NodeArgs {
    /// Where the node keeps its identity, the cluster secret and the job documents.
    #[arg(long, env = "MUTUAL_DATA_DIR")]
    data_dir: PathBuf,
    /// Peer (QUIC) address. Port 0 picks a free one.
    #[arg(long, default_value = "0.0.0.0:7071")]
    listen: SocketAddr,
    /// HTTP API address. Port 0 picks a free one (the real one is printed).
    #[arg(long, default_value = "127.0.0.1:7070")]
    http: SocketAddr,
    /// Ticket of a member to join (repeatable).
    #[arg(long, env = "MUTUAL_JOIN", value_delimiter = ',')]
    join: Vec<String>,
    /// Give up joining after this long when no --join member answers.
    #[arg(long, default_value = "20s", value_parser = parse_duration_ms)]
    join_timeout: u64,
    /// Jobs run at once [default: the number of CPUs].
    #[arg(long)]
    slots: Option<u32>,
    /// CPUs offered (e.g. 4, 0.5) [default: the number of CPUs].
    #[arg(long, value_parser = parse_cpus)]
    cpus: Option<u32>,
    /// Memory offered (e.g. 8G) [default: the machine's memory].
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// A label jobs can require (repeatable), e.g. --label zone=a.
    #[arg(long, value_parser = parse_label)]
    label: Vec<(String, String)>,
    /// GPUs offered [default: the NVIDIA GPUs `nvidia-smi` lists]. Fewer hides the rest;
    /// more declares devices that are not detected (for testing placement).
    #[arg(long)]
    gpus: Option<u32>,
    /// Run container jobs (`--image`) through the local Docker Engine: `auto` when Docker
    /// answers at start, `on` to refuse to start without it, `off` never.
    #[arg(long, value_enum, default_value_t = mutual::node::ContainerMode::Auto)]
    containers: mutual::node::ContainerMode,
    /// OCI runtime for containers: `runc`, or `kata-runtime` / `runsc` where Docker has
    /// them (VM or gVisor isolation).
    #[arg(long, default_value = "runc")]
    container_runtime: String,
    /// Require `Authorization: Bearer TOKEN` on the API.
    #[arg(long, env = "MUTUAL_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// A relay URL to advertise, for clusters across the internet (none by default).
    #[arg(long)]
    relay: Option<String>,
    /// Failure-detector probe period. Each node probes four ring successors (two it
    /// watches, two it looks ahead at); probes are most of an idle node's CPU, so shorter
    /// periods buy faster detection with CPU. A watched node is judged the moment its
    /// silence passes the failure timeout, so detection takes between the timeout minus
    /// one period and the timeout.
    #[arg(long, default_value = "250ms", value_parser = parse_duration_ms)]
    probe_interval: u64,
    /// A watched node silent this long is judged dead.
    #[arg(long, default_value = "500ms", value_parser = parse_duration_ms)]
    failure_timeout: u64,
    /// Anti-entropy period (a random overlay neighbour, every period).
    #[arg(long, default_value = "1s", value_parser = parse_duration_ms)]
    ae_interval: u64,
    /// Smallest settle window (the wait after a claim before starting). The node
    /// widens it to the 99th percentile of how long other nodes' claims take to reach it
    /// (measured on the records it receives, up to 500ms), so a better claim arrives
    /// before a duplicate starts.
    #[arg(long, default_value = "2ms", value_parser = parse_duration_ms)]
    settle: u64,
    /// How often a running job's MUTUAL_CHECKPOINT_DIR is snapshotted (when it changed),
    /// unless the job asks for its own interval. A takeover resumes from the last one.
    #[arg(long, default_value = "30s", value_parser = parse_duration_ms)]
    checkpoint_interval: u64,
    /// Other nodes that must hold a copy of every new blob (an upload, outputs, logs, a
    /// checkpoint) before it is acknowledged or recorded, so no single death loses it.
    #[arg(long, default_value_t = 1)]
    blob_copies: usize,
    /// Job documents kept live in memory (about 20 KiB each). The others are kept in
    /// their saved form (under 1 KiB for a finished job) and loaded back, in about 26 µs,
    /// when they change. Raise it to save CPU where thousands of jobs are active at once;
    /// lower it to save memory.
    #[arg(long, default_value_t = mutual::node::DEFAULT_LIVE_DOCS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(1..=mutual::node::MAX_JOBS as u64))]
    live_docs: usize,
    /// Keep each job's document on K nodes — its K XOR-closest live nodes and the nodes
    /// involved in it (its submitter, claimants and runners) — instead of on every node.
    /// 0, the default, is full replication, the design's choice up to about a thousand
    /// nodes: any node answers for any job, and a job survives while one node does. K > 0
    /// keeps each node's work per job independent of the cluster's size (hundreds of
    /// nodes on one machine, or thousands of machines), at a price: a job runs only on
    /// a node that holds it, a node lists only the jobs it holds, and losing K nodes
    /// before a hand-off completes can lose a job. A submission is acknowledged (201)
    /// once another holder has the job; if none confirms within a few seconds, with 202
    /// and a warning that the receiving node alone holds it for now. Every member must
    /// use the same value.
    #[arg(long, default_value_t = 0,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(0..=mutual::node::MAX_REPLICAS as u64))]
    replicas: usize,
    /// Records stamped further ahead of this node's clock than this are refused until the
    /// clock catches up, so one node with a clock far ahead cannot win every claim. Must
    /// exceed the worst clock difference between two members.
    #[arg(long, default_value = "500ms", value_parser = parse_duration_ms)]
    max_clock_drift: u64,
    /// Accept `POST /v1/debug/partition`, which makes this node ignore chosen members as
    /// if the network to them had failed, and `POST /v1/debug/crash`, which kills it as
    /// SIGKILL would. For experiments and tests; never in production.
    #[arg(long, help_heading = "Fault injection (experiments only)")]
    fault_injection: bool,
    /// Run this node's clock ahead (or, with `-`, behind) the machine's by this much,
    /// e.g. `-250ms`: an injected clock error for the clock-skew experiment.
    #[arg(long, default_value = "0ms", allow_hyphen_values = true,
          value_parser = parse_signed_duration_ms, help_heading = "Fault injection (experiments only)")]
    clock_skew: i64,
}

#[derive(Args)]
pub struct HostArgs {
    /// Nodes to run in this process (at most 1000).
    #[arg(long)]
    nodes: usize,
    #[command(flatten)]
    node: NodeArgs,
}

fn machine_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kb| kb * 1024)
}

fn init_tracing() {
    // automerge opens an info-level span for every change it loads: with those enabled,
    // creating them was 8 % of a busy node's CPU (perf, 50 nodes running E2).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,iroh=warn,noq=warn,noq_proto=warn,automerge=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn parse_join(join: &[String]) -> anyhow::Result<Vec<Ticket>> {
    join.iter()
        .map(|t| {
            t.parse::<Ticket>()
                .map_err(|e| anyhow::anyhow!("--join: {e}"))
        })
        .collect()
}

/// The GPUs offered: those detected, cut or padded to `--gpus`.
fn gpus(a: &NodeArgs) -> Vec<Gpu> {
    let (mut gpus, trouble) = mutual::gpu::detect();
    if let Some(t) = trouble {
        tracing::warn!("no GPUs offered: {t}");
    }
    if let Some(n) = a.gpus {
        gpus.truncate(n as usize);
        let declared = (gpus.len() as u32..n).map(|index| Gpu {
            index,
            name: "declared (--gpus)".into(),
            memory_mib: 0,
        });
        gpus.extend(declared);
    }
    gpus
}

fn engine_config(a: &NodeArgs) -> EngineConfig {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    EngineConfig {
        settle_ms: a.settle,
        slots: a.slots.unwrap_or(cpus).max(1),
        capacity: Resources {
            cpu_millis: a.cpus.unwrap_or(cpus * 1000),
            memory_bytes: a.memory.unwrap_or_else(machine_memory_bytes),
            gpus: 0,
        },
        labels: a.label.clone().into_iter().collect(),
        max_drift_ms: a.max_clock_drift,
        ..EngineConfig::default()
    }
}

fn set_clock_skew(a: &NodeArgs) {
    if a.clock_skew != 0 {
        tracing::warn!(
            "--clock-skew {} ms: this node's clock is deliberately wrong",
            a.clock_skew
        );
        mutual::node::set_clock_skew_ms(a.clock_skew);
    }
}

/// Where one node lives and listens.
struct Place {
    data_dir: PathBuf,
    http: SocketAddr,
    listen: SocketAddr,
    join: Vec<Ticket>,
}

/// A started node.
struct Launched {
    id: mutual_core::NodeId,
    ticket: String,
    http_url: String,
}

/// Starts a node on the current runtime: HTTP API, actor, join (waiting for the first
/// answer), and the `ticket` and `http` files in its data directory.
async fn launch(
    a: &NodeArgs,
    place: Place,
    gpus: Vec<Gpu>,
    halt: Arc<AtomicBool>,
    crash: Crash,
) -> anyhow::Result<Launched> {
    let listener = tokio::net::TcpListener::bind(place.http)
        .await
        .with_context(|| format!("--http {}: cannot listen", place.http))?;
    let http = listener.local_addr()?;
    let join = place.join;
    let cfg = NodeConfig {
        data_dir: place.data_dir.clone(),
        listen: place.listen,
        http,
        join: join.clone(),
        engine: engine_config(a),
        api_token: a.api_token.clone(),
        relay: a.relay.clone(),
        timing: Timing {
            probe_interval_ms: a.probe_interval,
            failure_timeout_ms: a.failure_timeout,
            ae_interval_ms: a.ae_interval.max(1),
            ..Timing::default()
        },
        launcher: mutual::exec::Launcher {
            shim: std::env::current_exe().ok(),
        },
        containers: a.containers,
        container_runtime: a.container_runtime.clone(),
        gpus,
        checkpoint_interval_ms: a.checkpoint_interval.max(1),
        blob_copies: a.blob_copies,
        live_docs: a.live_docs,
        replicas: a.replicas,
        fault_injection: a.fault_injection,
        halt,
    };
    let mut started = mutual::node::start(cfg).await?;
    let ticket = started.ticket.to_string();
    let state = mutual::api::ApiState {
        node: started.api.clone(),
        token: a.api_token.clone().map(|t| t.into()),
        ticket: ticket.clone().into(),
        secret: started.ticket.secret,
        data_dir: place.data_dir.clone().into(),
        io: started.io.clone(),
        crash: a.fault_injection.then_some(crash),
    };
    let app = mutual::api::router(state);
    // Without TCP_NODELAY a request whose headers and body leave in two writes waits
    // for the peer's delayed ACK (40 ms on Linux): seen here as 84 ms per submit.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the HTTP server stopped: {e}");
        }
    });
    if !join.is_empty() {
        let waited = tokio::time::timeout(Duration::from_millis(a.join_timeout), async {
            loop {
                if let Some(r) = started.joined.borrow_and_update().clone() {
                    return r;
                }
                if started.joined.changed().await.is_err() {
                    return Err("the node stopped".to_string());
                }
            }
        })
        .await;
        match waited {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                bail!("cannot join the cluster: every --join member refused us ({reason})")
            }
            Err(_) => bail!(
                "cannot join the cluster: none of the {} --join member(s) answered within {} ms",
                join.len(),
                a.join_timeout
            ),
        }
    }
    let http_url = format!("http://{http}");
    std::fs::write(place.data_dir.join("ticket"), format!("{ticket}\n"))?;
    std::fs::write(place.data_dir.join("http"), format!("{http_url}\n"))?;
    Ok(Launched {
        id: started.id,
        ticket,
        http_url,
    })
}

/// Waits for Ctrl-C or SIGTERM.
async fn stop_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

pub fn run_node(a: NodeArgs) -> anyhow::Result<ExitCode> {
    init_tracing();
    let join = parse_join(&a.join)?;
    let gpus = gpus(&a);
    set_clock_skew(&a);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(async move {
        let place = Place {
            data_dir: a.data_dir.clone(),
            http: a.http,
            listen: a.listen,
            join,
        };
        let node = launch(
            &a,
            place,
            gpus,
            Arc::new(AtomicBool::new(false)),
            mutual::api::crash_process(),
        )
        .await?;
        println!("ticket: {}", node.ticket);
        println!("http: {}", node.http_url);
        use std::io::Write;
        std::io::stdout().flush()?;
        tracing::info!(id = %node.id, "node running");
        stop_signal().await?;
        tracing::info!("stopping");
        Ok(ExitCode::SUCCESS)
    });
    // Everything acknowledged is on disk already; do not wait for idle tasks.
    rt.shutdown_timeout(Duration::from_millis(200));
    result
}

/// `addr` with its port moved up by `i`, unless it is 0 (each node picks a free one).
fn nth_port(addr: SocketAddr, i: usize, flag: &str) -> anyhow::Result<SocketAddr> {
    if addr.port() == 0 {
        return Ok(addr);
    }
    let port = u16::try_from(usize::from(addr.port()) + i)
        .with_context(|| format!("{flag} {addr}: no port left for node {i}"))?;
    Ok(SocketAddr::new(addr.ip(), port))
}

pub fn run_host(h: HostArgs) -> anyhow::Result<ExitCode> {
    init_tracing();
    if h.nodes == 0 || h.nodes > MAX_HOSTED_NODES {
        bail!("--nodes must be between 1 and {MAX_HOSTED_NODES}");
    }
    let a = Arc::new(h.node);
    let join = parse_join(&a.join)?;
    let gpus = gpus(&a);
    set_clock_skew(&a);
    raise_open_files_limit();
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating {}", a.data_dir.display()))?;
    let mut previous: Option<Ticket> = None;
    for i in 0..h.nodes {
        let place = Place {
            data_dir: a.data_dir.join(format!("node{i}")),
            http: nth_port(a.http, i, "--http")?,
            listen: nth_port(a.listen, i, "--listen")?,
            // Without --join the first node founds the cluster and each other joins through
            // the one started before it, so no one member answers every hello.
            join: if join.is_empty() {
                previous.iter().cloned().collect()
            } else {
                join.clone()
            },
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (a, gpus) = (a.clone(), gpus.clone());
        std::thread::Builder::new()
            .name(format!("mutual-node{i}"))
            .spawn(move || host_node(&a, place, gpus, ready_tx))
            .context("starting a node thread")?;
        let node = ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("node {i} stopped while starting"))?
            .with_context(|| format!("node {i}"))?;
        previous = Some(node.ticket.parse().map_err(|e| anyhow::anyhow!("{e}"))?);
        println!("node {i} ticket: {}", node.ticket);
        println!("node {i} http: {}", node.http_url);
    }
    println!("hosting {} nodes", h.nodes);
    use std::io::Write;
    std::io::stdout().flush()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(stop_signal())?;
    tracing::info!("stopping");
    // The node threads are not joined: everything acknowledged is on disk already.
    Ok(ExitCode::SUCCESS)
}

/// One hosted node's thread: its runtime runs the node until it is crashed.
fn host_node(
    a: &NodeArgs,
    place: Place,
    gpus: Vec<Gpu>,
    ready: std::sync::mpsc::Sender<anyhow::Result<Launched>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("starting its runtime: {e}")));
            return;
        }
    };
    let halt = Arc::new(AtomicBool::new(false));
    let down = Arc::new(tokio::sync::Notify::new());
    let crash: Crash = {
        let (halt, down) = (halt.clone(), down.clone());
        Arc::new(move || {
            halt.store(true, Ordering::Relaxed);
            down.notify_one();
        })
    };
    rt.block_on(async {
        match launch(a, place, gpus, halt, crash).await {
            Ok(node) => {
                tracing::info!(id = %node.id, "hosted node running");
                let _ = ready.send(Ok(node));
                down.notified().await;
                tracing::warn!("hosted node crashed");
            }
            Err(e) => {
                let _ = ready.send(Err(e));
            }
        }
    });
    // Drop every task without running anything more: no goodbye, no flush.
    rt.shutdown_background();
}

/// Hundreds of nodes need thousands of descriptors (sockets, logs, stores): lift the soft
/// limit to the hard one.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!("cannot raise the open-files limit: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosted_nodes_get_consecutive_ports_unless_the_os_picks() {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        assert_eq!(nth_port(any, 7, "--http").expect("port 0"), any);
        let base: SocketAddr = "127.0.0.1:7070".parse().expect("addr");
        assert_eq!(
            nth_port(base, 3, "--http").expect("fits"),
            "127.0.0.1:7073".parse::<SocketAddr>().expect("addr")
        );
        let high: SocketAddr = "127.0.0.1:65535".parse().expect("addr");
        let err = nth_port(high, 1, "--http").expect_err("past 65535");
        assert!(err.to_string().contains("no port left for node 1"), "{err}");
    }
}
