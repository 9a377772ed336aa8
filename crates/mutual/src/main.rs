//! `mutual`: run a node (`mutual node`), or talk to one (every other subcommand).

mod demo;
mod logs;
mod serve;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mutual::client::{Client, ClientError, DEFAULT_NODE};
use mutual::types::{JobStatus, NodeStatus};
use mutual::units::{parse_cpus, parse_duration_ms, parse_label, parse_size};
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
    Node(serve::NodeArgs),
    /// Run many nodes in one process, for experiments with hundreds of nodes on one machine.
    ///
    /// Each is a whole node — its own iroh endpoint and keys, data directory, HTTP API and
    /// job processes — on its own thread and runtime. Node i lives in `<data-dir>/node<i>`
    /// and listens on the --http and --listen ports plus i (port 0: a free one each). Without
    /// --join, node 0 founds a cluster and each other node joins through the one before it. Prints `node <i> ticket: …`
    /// and `node <i> http: …` per node, then `hosting <n> nodes`. With --fault-injection,
    /// `POST /v1/debug/crash` to one node kills that node as abruptly as SIGKILL kills a
    /// `mutual node` (no goodbye, no flush, its job processes killed), and leaves the others.
    /// A real cluster runs one `mutual node` per machine.
    #[command(
        after_help = "Example:\n  mutual host --nodes 100 --data-dir /tmp/pool --http 127.0.0.1:0 --listen 127.0.0.1:0 --containers off --fault-injection"
    )]
    Host(serve::HostArgs),
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
    ///
    /// The free resources, slots and running jobs are current for the answering node
    /// (marked "answering") and as last announced for the others: a node announces its
    /// load at most once per second per live member, so in a cluster of 100 they may
    /// be 100 s old. Ask a node itself (`--node URL`) for its load now.
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
        Cmd::Node(args) => serve::run_node(args),
        Cmd::Host(args) => serve::run_host(args),
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
            if let Some(w) = &st.warning {
                eprintln!("warning: {w}");
            }
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
