//! `mutual`: run a node (`mutual node`), or talk to one (every other subcommand).

mod demo;
mod logs;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mutual::client::{Client, ClientError, DEFAULT_NODE};
use mutual::node::{NodeConfig, Timing};
use mutual::ticket::Ticket;
use mutual::types::{JobStatus, NodeStatus};
use mutual::units::{
    parse_cpus, parse_duration_ms, parse_label, parse_signed_duration_ms, parse_size,
};
use mutual_core::engine::EngineConfig;
use mutual_core::{JobRequest, Resources};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error (I/O, unexpected answer, a node that failed to start)
  2  usage error (bad flags or values)
  3  the node could not be reached
  4  no such job
  5  the node refused the request (invalid job, unauthorized, unschedulable)
  6  `wait`: a job ended without succeeding (failed or cancelled)
  7  `wait`: timed out";

/// Mutual Cloud: a peer-to-peer compute pool with no controller, no leader and no central
/// database. Every node is equal: it accepts jobs, runs them and holds a replica of the job
/// state. Start a cluster with `mutual node`, or try `mutual demo` first.
#[derive(Parser)]
#[command(name = "mutual", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the client commands send their requests.
#[derive(Args, Clone)]
struct Conn {
    /// The node to talk to (any member of the cluster).
    #[arg(long, global = true, env = "MUTUAL_NODE", default_value = DEFAULT_NODE)]
    node: String,
    /// Bearer token, if the node was started with --api-token.
    #[arg(long, global = true, env = "MUTUAL_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
}

impl Conn {
    fn client(&self) -> Client {
        Client::new(&self.node, self.api_token.clone())
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node: HTTP API + agent + replica. Prints `ticket: …` and `http: …` on stdout.
    ///
    /// The first node founds a cluster; every other joins with the ticket of any member
    /// (`--join`, repeatable: joining succeeds if any one answers). A restarted node needs no
    /// --join: it remembers its peers in its data directory.
    #[command(
        after_help = "Example:\n  mutual node --data-dir /var/lib/mutual\n  mutual node --data-dir ./n2 --http 127.0.0.1:7080 --listen 0.0.0.0:7081 --join mutual1…"
    )]
    Node(NodeArgs),
    /// Print a ticket to join the cluster of a node.
    Ticket {
        /// Read it from this node data directory instead of asking a running node.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Submit a job; prints its id.
    #[command(
        after_help = "Examples:\n  mutual submit -- echo hello\n  mutual submit --cpus 2 --memory 4G --timeout 10m --name train -- python train.py\n  mutual submit --label gpu=a100 --max-attempts 5 -- ./run.sh"
    )]
    Submit(SubmitArgs),
    /// Show one job.
    Status {
        /// The job id.
        job: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List jobs, newest first.
    Jobs {
        /// Only jobs in this state.
        #[arg(long, value_parser = ["queued", "running", "succeeded", "failed", "cancelled"])]
        state: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the cluster's nodes as the answering node sees them.
    Nodes {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a job (kills its execution wherever it runs).
    Cancel {
        /// The job id.
        job: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Wait until jobs end; exit 0 only if every one succeeded.
    Wait {
        /// Job ids.
        #[arg(required = true)]
        jobs: Vec<String>,
        /// Give up after this long (e.g. 90s, 5m).
        #[arg(long, value_parser = parse_duration_ms)]
        timeout: Option<u64>,
        /// Print JSON (the final status of every job).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Start a local five-node cluster, run jobs, kill a node mid-run and show the takeover.
    Demo(demo::DemoArgs),
    /// Print a job's output (stdout and stderr, each to its own), straight from the node
    /// that runs it; `-f` follows it live, across node deaths and takeovers, until the job
    /// ends.
    Logs {
        /// The job.
        job: String,
        /// Keep printing as the job writes, until it ends.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Download a job's outputs (what it left in MUTUAL_OUTPUT_DIR) from any node that
    /// has them, and decrypt them into a directory.
    #[command(after_help = "Example:\n  mutual get 3f2a… -o results/")]
    Get {
        /// The job.
        job: String,
        /// Where to put them (created if missing; existing files are overwritten).
        #[arg(short, long, value_name = "DIR")]
        output: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// (Internal) How a node starts a job: die with the node, then run the command.
    #[command(hide = true)]
    JobShim {
        /// The node's process id.
        #[arg(long)]
        parent: i32,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// (Internal) Removes a node's containers when the node dies.
    #[command(hide = true)]
    ContainerReaper {
        /// The node's process id.
        #[arg(long)]
        parent: i32,
        /// The node's id.
        #[arg(long)]
        node: mutual_core::NodeId,
    },
}

#[derive(Args)]
struct NodeArgs {
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
    /// Failure-detector probe period. Each node probes two ring neighbours; probes are
    /// most of an idle node's CPU (at 250ms, about 6 ms per second on this 2-core
    /// machine), so shorter periods buy faster detection with CPU.
    #[arg(long, default_value = "250ms", value_parser = parse_duration_ms)]
    probe_interval: u64,
    /// A watched node silent this long is judged dead.
    #[arg(long, default_value = "500ms", value_parser = parse_duration_ms)]
    failure_timeout: u64,
    /// Anti-entropy period (a random overlay neighbour, every period).
    #[arg(long, default_value = "1s", value_parser = parse_duration_ms)]
    ae_interval: u64,
    /// Smallest settle window (the wait after a claim before starting). The node
    /// widens it to twice the claim propagation delay it measures (probe round trips
    /// times the overlay's depth), so a better claim arrives before a duplicate starts.
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
    /// Records stamped further ahead of this node's clock than this are refused until the
    /// clock catches up, so one node with a clock far ahead cannot win every claim. Must
    /// exceed the worst clock difference between two members.
    #[arg(long, default_value = "500ms", value_parser = parse_duration_ms)]
    max_clock_drift: u64,
    /// Accept `POST /v1/debug/partition`, which makes this node ignore chosen members as
    /// if the network to them had failed. For experiments and tests; never in production.
    #[arg(long, help_heading = "Fault injection (experiments only)")]
    fault_injection: bool,
    /// Run this node's clock ahead (or, with `-`, behind) the machine's by this much,
    /// e.g. `-250ms`: an injected clock error for the clock-skew experiment.
    #[arg(long, default_value = "0ms", allow_hyphen_values = true,
          value_parser = parse_signed_duration_ms, help_heading = "Fault injection (experiments only)")]
    clock_skew: i64,
}

#[derive(Args)]
struct SubmitArgs {
    /// CPUs the job needs (e.g. 1, 0.5).
    #[arg(long, value_parser = parse_cpus)]
    cpus: Option<u32>,
    /// Memory the job needs (e.g. 512M, 4G).
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// GPUs the job needs.
    #[arg(long)]
    gpus: Option<u32>,
    /// A node label the job requires (repeatable), e.g. --label zone=a.
    #[arg(long, value_parser = parse_label)]
    label: Vec<(String, String)>,
    /// An environment variable for the job (repeatable), e.g. --env MODE=fast.
    #[arg(long, value_parser = parse_label)]
    env: Vec<(String, String)>,
    /// Failed attempts allowed before the job fails [default: 3].
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Kill the job after this long (e.g. 90s, 5m).
    #[arg(long, value_parser = parse_duration_ms)]
    timeout: Option<u64>,
    /// A name for people.
    #[arg(long)]
    name: Option<String>,
    /// Higher runs first (-1000..=1000).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    priority: i32,
    /// A file or directory the job reads (repeatable). It is encrypted here, before it
    /// leaves this machine, and appears decrypted under its own name in the job's
    /// MUTUAL_INPUT_DIR. The submit returns once another node holds a copy too.
    #[arg(long, value_name = "PATH")]
    input: Vec<PathBuf>,
    /// Snapshot the job's MUTUAL_CHECKPOINT_DIR this often (when it changed) [default:
    /// the node's --checkpoint-interval].
    #[arg(long, value_parser = parse_duration_ms)]
    checkpoint_interval: Option<u64>,
    /// Print JSON (an object with `id`).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
    /// Run in a container of this image (nodes never pull: it must be on the node, e.g.
    /// from `docker load`). Cpu and memory become Docker limits. Only nodes that run
    /// containers take the job.
    #[arg(long)]
    image: Option<String>,
    /// The command and its arguments, after `--` (with --image: may be empty to run the
    /// image's own entry point).
    #[arg(last = true, required_unless_present = "image")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code_of(&e))
        }
    }
}

fn exit_code_of(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Unreachable { .. }) => 3,
        Some(ClientError::Api { status: 404, .. }) => 4,
        Some(ClientError::Api { .. }) => 5,
        _ => 1,
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints a read command's answer: JSON with `--json`, else the human form.
fn show<T: serde::Serialize + ?Sized>(
    v: &T,
    json: bool,
    human: impl FnOnce(&T),
) -> anyhow::Result<ExitCode> {
    if json {
        print_json(&v)?;
    } else {
        human(v);
    }
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Node(args) => run_node(args),
        Cmd::Ticket { data_dir, conn } => {
            let t = match data_dir {
                Some(d) => std::fs::read_to_string(d.join("ticket"))
                    .with_context(|| format!("no ticket in {} (has the node run?)", d.display()))?
                    .trim()
                    .to_string(),
                None => conn.client().ticket()?,
            };
            println!("{t}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Submit(a) => {
            let req = JobRequest {
                name: a.name,
                command: a.command,
                env: a.env.into_iter().collect(),
                resources: (a.cpus.is_some() || a.memory.is_some() || a.gpus.is_some()).then(
                    || {
                        let d = Resources::default();
                        Resources {
                            cpu_millis: a.cpus.unwrap_or(d.cpu_millis),
                            memory_bytes: a.memory.unwrap_or(d.memory_bytes),
                            gpus: a.gpus.unwrap_or(d.gpus),
                        }
                    },
                ),
                labels: a.label.into_iter().collect(),
                image: a.image,
                priority: a.priority,
                timeout_ms: a.timeout,
                max_attempts: a.max_attempts,
                checkpoint_interval_ms: a.checkpoint_interval,
                inputs: upload_inputs(&a.conn.client(), &a.input)?,
                ..JobRequest::default()
            };
            let st = a.conn.client().submit(&req)?;
            if a.json {
                print_json(&st)?;
            } else {
                println!("{}", st.id);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { job, json, conn } => show(&conn.client().job(&job)?, json, print_status),
        Cmd::Jobs { state, json, conn } => {
            show(&conn.client().jobs(state.as_deref())?, json, |l| {
                print_jobs(l)
            })
        }
        Cmd::Nodes { json, conn } => show(&conn.client().nodes()?, json, |l| print_nodes(l)),
        Cmd::Cancel { job, json, conn } => {
            let r = conn.client().cancel(&job)?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "{}: {} (state {})",
                    r.id,
                    r.outcome.replace('_', " "),
                    r.state
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Wait {
            jobs,
            timeout,
            json,
            conn,
        } => wait(&conn.client(), &jobs, timeout, json),
        Cmd::Demo(args) => demo::run(args),
        Cmd::Logs { job, follow, conn } => logs::run(&conn.client(), &job, follow),
        Cmd::Get { job, output, conn } => get_outputs(&conn.client(), &job, &output),
        Cmd::JobShim { parent, command } => {
            let code = mutual::exec::run_shim(parent, &command);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        Cmd::ContainerReaper { parent, node } => {
            let code = mutual::container::run_reaper(parent, node);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
    }
}

/// Encrypts and uploads each `--input`, with a progress bar.
fn upload_inputs(client: &Client, paths: &[PathBuf]) -> anyhow::Result<Vec<mutual_core::BlobRef>> {
    let mut inputs = Vec::new();
    for p in paths {
        let total =
            mutual::seal::tree_bytes(p).with_context(|| format!("--input {}", p.display()))?;
        let bar = mutual::transfer::bar(total, &format!("uploading {}", p.display()));
        let input = mutual::transfer::upload(client, p, &bar)
            .with_context(|| format!("uploading --input {}", p.display()))?;
        bar.finish_and_clear();
        if input.holders.len() < 2 {
            eprintln!(
                "warning: {} is on one node only (no other live node took a copy)",
                p.display()
            );
        }
        inputs.push(input);
    }
    Ok(inputs)
}

/// `mutual get`: downloads and decrypts a job's outputs.
fn get_outputs(client: &Client, job: &str, dest: &std::path::Path) -> anyhow::Result<ExitCode> {
    let access = client.outputs(job)?;
    let bar = mutual::transfer::bar(access.bytes, "downloading");
    let stats = mutual::transfer::download(client, &access, dest, &bar)
        .with_context(|| format!("downloading the outputs of job {job}"))?;
    bar.finish_and_clear();
    eprintln!(
        "{} files, {} bytes in {}",
        stats.files,
        stats.bytes,
        dest.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

fn wait(
    client: &Client,
    jobs: &[String],
    timeout_ms: Option<u64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let deadline = timeout_ms.map(|t| Instant::now() + Duration::from_millis(t));
    let mut done: BTreeMap<String, JobStatus> = BTreeMap::new();
    loop {
        for j in jobs {
            if done.contains_key(j) {
                continue;
            }
            let st = client.job(j)?;
            if is_terminal(&st.state) {
                if !json {
                    println!(
                        "{} {}{}",
                        st.id,
                        st.state,
                        st.exit_code
                            .map(|c| format!(" (exit {c})"))
                            .unwrap_or_default()
                    );
                }
                done.insert(j.clone(), st);
            }
        }
        if done.len() == jobs.len() {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if json {
                print_json(&done.values().collect::<Vec<_>>())?;
            }
            eprintln!(
                "timed out: {} of {} jobs still running or queued",
                jobs.len() - done.len(),
                jobs.len()
            );
            return Ok(ExitCode::from(7));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if json {
        print_json(&jobs.iter().filter_map(|j| done.get(j)).collect::<Vec<_>>())?;
    }
    let all_ok = done.values().all(|s| s.state == "succeeded");
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(6)
    })
}

fn short(id: &str) -> &str {
    id.get(..10).unwrap_or(id)
}

fn print_status(st: &JobStatus) {
    println!("id:            {}", st.id);
    if !st.name.is_empty() {
        println!("name:          {}", st.name);
    }
    println!("state:         {}", st.state);
    println!("attempt:       {}", st.attempt);
    println!("node:          {}", st.node.as_deref().unwrap_or("-"));
    println!(
        "exit code:     {}",
        st.exit_code.map_or("-".into(), |c| c.to_string())
    );
    println!("command:       {}", st.command.join(" "));
    if let Some(image) = &st.image {
        println!("image:         {image}");
    }
    println!(
        "resources:     {} CPU, {} MiB, {} GPU",
        f64::from(st.resources.cpu_millis) / 1000.0,
        st.resources.memory_bytes >> 20,
        st.resources.gpus
    );
    println!(
        "failures:      {} of {} allowed",
        st.attempts_used, st.max_attempts
    );
    for (i, b) in st.inputs.iter().enumerate() {
        println!("input {i}:       {} ({})", short(&b.cid), blob_size(b));
    }
    if let Some(b) = &st.outputs {
        println!(
            "outputs:       {} ({}; `mutual get {} -o DIR`)",
            short(&b.cid),
            blob_size(b),
            st.id
        );
    }
    for a in &st.attempts {
        println!(
            "  attempt {} on {}: claimed {}, {}{}{}",
            a.epoch,
            short(&a.node),
            a.claimed_at_ms,
            a.started_at_ms
                .map_or("not started".into(), |s| format!("started {s}")),
            a.exit_code.map_or(String::new(), |c| format!(", exit {c}")),
            a.expired
                .as_ref()
                .map_or(String::new(), |r| format!(", closed ({r})")),
        );
        if let Some(m) = &a.metrics {
            println!(
                "    used: {:.3} s wall, {:.2} CPU on average, {:.1} MiB peak memory, {} bytes in, {} bytes out",
                m.wall_ms as f64 / 1000.0,
                f64::from(m.cpu_avg_millis) / 1000.0,
                m.memory_peak_bytes as f64 / f64::from(1u32 << 20),
                m.bytes_in,
                m.bytes_out
            );
        }
        if a.checkpoints > 0 {
            println!("    checkpoints: {}", a.checkpoints);
        }
    }
}

/// "N bytes encrypted, on K nodes".
fn blob_size(b: &mutual_core::BlobRef) -> String {
    format!(
        "{} bytes encrypted, on {} node{}",
        b.bytes,
        b.holders.len(),
        if b.holders.len() == 1 { "" } else { "s" }
    )
}

fn print_jobs(list: &[JobStatus]) {
    println!(
        "{:<32}  {:<9}  {:>3}  {:<10}  {:>4}  {:<12}  COMMAND",
        "ID", "STATE", "TRY", "NODE", "EXIT", "NAME"
    );
    for s in list {
        println!(
            "{:<32}  {:<9}  {:>3}  {:<10}  {:>4}  {:<12}  {}",
            s.id,
            s.state,
            s.attempt,
            s.node.as_deref().map_or("-", short),
            s.exit_code.map_or("-".into(), |c| c.to_string()),
            s.name,
            s.command.join(" ")
        );
    }
}

fn print_nodes(list: &[NodeStatus]) {
    println!(
        "{:<10}  {:<5}  {:<26}  {:>11}  {:>13}  {:>5}  {:>5}  {:<10}  RUNNING",
        "ID", "ALIVE", "HTTP", "CPU FREE", "MEM FREE MiB", "SLOTS", "GPUS", "CONTAINERS"
    );
    for n in list {
        println!(
            "{:<10}  {:<5}  {:<26}  {:>11}  {:>13}  {:>5}  {:>5}  {:<10}  {}{}",
            short(&n.id),
            if n.alive { "yes" } else { "no" },
            n.http.as_deref().unwrap_or("-"),
            format!(
                "{}/{}",
                f64::from(n.free.cpu_millis) / 1000.0,
                f64::from(n.capacity.cpu_millis) / 1000.0
            ),
            format!(
                "{}/{}",
                n.free.memory_bytes >> 20,
                n.capacity.memory_bytes >> 20
            ),
            format!("{}/{}", n.free_slots, n.slots),
            format!("{}/{}", n.free.gpus, n.capacity.gpus),
            if n.containers { "yes" } else { "no" },
            n.running.len(),
            if n.is_self { "  (answering)" } else { "" }
        );
    }
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

fn run_node(a: NodeArgs) -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,iroh=warn,noq=warn,noq_proto=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let join = a
        .join
        .iter()
        .map(|t| {
            t.parse::<Ticket>()
                .map_err(|e| anyhow::anyhow!("--join: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let (mut gpus, trouble) = mutual::gpu::detect();
    if let Some(t) = trouble {
        tracing::warn!("no GPUs offered: {t}");
    }
    if let Some(n) = a.gpus {
        gpus.truncate(n as usize);
        let declared = (gpus.len() as u32..n).map(|index| mutual::gpu::Gpu {
            index,
            name: "declared (--gpus)".into(),
            memory_mib: 0,
        });
        gpus.extend(declared);
    }
    let engine = EngineConfig {
        settle_ms: a.settle,
        slots: a.slots.unwrap_or(cpus).max(1),
        capacity: Resources {
            cpu_millis: a.cpus.unwrap_or(cpus * 1000),
            memory_bytes: a.memory.unwrap_or_else(machine_memory_bytes),
            gpus: 0,
        },
        labels: a.label.into_iter().collect(),
        max_drift_ms: a.max_clock_drift,
        ..EngineConfig::default()
    };
    if a.clock_skew != 0 {
        tracing::warn!(
            "--clock-skew {} ms: this node's clock is deliberately wrong",
            a.clock_skew
        );
        mutual::node::set_clock_skew_ms(a.clock_skew);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.http)
            .await
            .with_context(|| format!("--http {}: cannot listen", a.http))?;
        let http = listener.local_addr()?;
        let cfg = NodeConfig {
            data_dir: a.data_dir.clone(),
            listen: a.listen,
            http,
            join: join.clone(),
            engine,
            api_token: a.api_token.clone(),
            relay: a.relay,
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
            fault_injection: a.fault_injection,
        };
        let mut started = mutual::node::start(cfg).await?;
        let ticket = started.ticket.to_string();
        let state = mutual::api::ApiState {
            node: started.api.clone(),
            token: a.api_token.map(|t| t.into()),
            ticket: ticket.clone().into(),
            secret: started.ticket.secret,
            data_dir: a.data_dir.clone().into(),
            io: started.io.clone(),
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
                Ok(Err(reason)) => anyhow::bail!("cannot join the cluster: every --join member refused us ({reason})"),
                Err(_) => anyhow::bail!(
                    "cannot join the cluster: none of the {} --join member(s) answered within {} ms",
                    join.len(),
                    a.join_timeout
                ),
            }
        }
        let http_url = format!("http://{http}");
        std::fs::write(a.data_dir.join("ticket"), format!("{ticket}\n"))?;
        std::fs::write(a.data_dir.join("http"), format!("{http_url}\n"))?;
        println!("ticket: {ticket}");
        println!("http: {http_url}");
        use std::io::Write;
        std::io::stdout().flush()?;
        tracing::info!(id = %started.id, "node running");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
        Ok(ExitCode::SUCCESS)
    });
    // Everything acknowledged is on disk already; do not wait for idle tasks.
    rt.shutdown_timeout(Duration::from_millis(200));
    result
}
