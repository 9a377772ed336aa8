//! `mutual demo`: the first thing a newcomer runs.
//!
//! Reading that a cluster "has no leader and survives the loss of any node" proves nothing;
//! watching it happen does. The demo starts five real `mutual node` processes on loopback
//! in a temporary directory, submits a batch of short jobs, SIGKILLs a node while it runs
//! some of them, prints every job's state change as the survivors notice the death and
//! take its jobs over, and ends with a results table and a summary. It needs nothing but
//! the binary itself, and with `--keep` it leaves the cluster running to play with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use mutual::client::Client;
use mutual::harness::{self, LocalNode};
use mutual::types::JobStatus;
use mutual_core::JobRequest;

/// Flags of `mutual demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Leave the cluster running and print the addresses to use.
    #[arg(long)]
    pub keep: bool,
}

/// Nodes in the demo cluster.
const NODES: usize = 5;
/// Execution slots per node: enough for every job at once, so that the survivors have
/// room for the victim's jobs the moment they notice its death.
const SLOTS: &str = "5";
/// Jobs submitted.
const JOBS: usize = 20;
/// How long each job runs, in seconds.
const JOB_SECONDS: u32 = 3;
/// How often the demo looks at the cluster.
const POLL: Duration = Duration::from_millis(100);
/// How long every job may take to end, from the submission of the first.
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs the demo; exits 0 iff every job succeeded.
pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let began = Instant::now();
    let exe = std::env::current_exe().context("cannot find the mutual binary to start nodes")?;
    println!(
        "Mutual Cloud demo. This starts a cluster of {NODES} nodes on this machine, each its \
         own `mutual node` process with its own data directory, all equal: no leader, no \
         controller. It submits {JOBS} jobs of {JOB_SECONDS} s each through one node, \
         SIGKILLs another node while it runs jobs, and shows the survivors noticing the \
         death and taking its jobs over. It takes under 10 seconds."
    );
    println!();

    let dir = tempfile::Builder::new()
        .prefix("mutual-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    println!("Starting {NODES} nodes in {} ...", dir.path().display());
    let started = harness::start_cluster(
        &exe,
        dir.path(),
        NODES,
        &["--slots", SLOTS, "--cpus", SLOTS],
    );
    let mut nodes = match started {
        Ok(nodes) => nodes,
        Err(e) => {
            // Keep the logs the error points to.
            let _ = dir.keep();
            return Err(e.into());
        }
    };
    let ids = nodes
        .iter()
        .map(|n| {
            n.id()
                .with_context(|| format!("no node key in {}", n.dir.display()))
        })
        .collect::<anyhow::Result<Vec<String>>>()?;
    println!(
        "Cluster up in {:.1} s; every node sees all {NODES} alive:",
        began.elapsed().as_secs_f64()
    );
    for (i, (n, id)) in nodes.iter().zip(&ids).enumerate() {
        println!("  node {i}  {}  {}", short(id), n.http);
    }
    println!();

    // Node 0 takes the jobs and is never killed, so it also serves as the observer.
    let client = nodes[0].client();
    let submitted = Instant::now();
    let mut accepted = 0;
    for i in 1..=JOBS {
        let name = format!("demo-{i:02}");
        client
            .submit(&JobRequest {
                name: Some(name.clone()),
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    format!(
                        "echo \"$MUTUAL_JOB_ID attempt $MUTUAL_ATTEMPT ran in $MUTUAL_WORK_DIR\"; \
                         sleep {JOB_SECONDS}"
                    ),
                ],
                ..Default::default()
            })
            .with_context(|| format!("node 0 refused job {name}"))?;
        accepted += 1;
    }
    let deadline = submitted + DEADLINE;
    println!(
        "Submitted {accepted} jobs (demo-01 .. demo-{JOBS:02}, `sleep {JOB_SECONDS}` each) through \
         node 0; the nodes claim them among themselves, {SLOTS} at a time each.",
    );

    let (victim, before) = pick_victim(&client, &ids, deadline)?;
    let (mut runs, mut claimed) = (Vec::new(), Vec::new());
    for j in before.iter().filter(|j| holds(j, &ids[victim])) {
        match j.state.as_str() {
            "running" => runs.push(j.name.clone()),
            _ => claimed.push(j.name.clone()),
        }
    }
    runs.sort();
    claimed.sort();
    let held = runs.len() + claimed.len();
    let running = before.iter().filter(|j| j.state == "running").count();
    let kill_ms = now_ms();
    let killed = Instant::now();
    nodes[victim].kill();
    println!(
        "{:.1} s after the submission, {running} jobs run across the cluster.",
        killed.duration_since(submitted).as_secs_f64()
    );
    print!(
        "SIGKILL node {victim} ({}) while it runs {} jobs ({})",
        short(&ids[victim]),
        runs.len(),
        runs.join(", ")
    );
    if claimed.is_empty() {
        println!(".");
    } else {
        println!(
            " and has claimed {} more ({}).",
            claimed.len(),
            claimed.join(", ")
        );
    }
    println!();
    println!("What the survivors do (seen through node 0; time since the kill):");

    let watch = Watch {
        client: &client,
        ids: &ids,
        victim,
        killed,
        deadline,
    };
    let outcome = watch.run(before);
    println!();

    let Some(jobs) = outcome.jobs else {
        println!(
            "Not every job ended within {} s of the submission; the demo failed.",
            DEADLINE.as_secs()
        );
        if let Some(e) = &outcome.last_error {
            println!("Last error from node 0: {e}");
        }
        drop(nodes);
        let kept = dir.keep();
        println!(
            "The nodes are stopped; their data and logs are in {}",
            kept.display()
        );
        return Ok(ExitCode::FAILURE);
    };

    print_results(&jobs, &ids, victim);
    println!();
    let succeeded = jobs.iter().filter(|j| j.state == "succeeded").count();
    let taken: Vec<&JobStatus> = jobs
        .iter()
        .filter(|j| taken_over(j, &ids[victim]))
        .collect();
    println!("Summary");
    row("jobs succeeded", format!("{succeeded}/{}", jobs.len()));
    row(
        &format!("jobs taken over from node {victim}"),
        format!("{} (it held {held} when killed)", taken.len()),
    );
    if let Some(d) = outcome.judged_dead {
        row(
            &format!("kill -> node {victim} judged dead"),
            format!("{:.2} s (as node 0 saw it)", d.as_secs_f64()),
        );
    }
    let last_takeover = taken
        .iter()
        .filter_map(|j| takeover_started_ms(j, &ids[victim]))
        .max();
    if let Some(ms) = last_takeover {
        let secs = (i128::from(ms) - i128::from(kill_ms)) as f64 / 1000.0;
        row("kill -> last takeover started", format!("{secs:.2} s"));
    }
    row(
        "kill -> every job ended",
        format!(
            "{:.2} s",
            outcome.ended.duration_since(killed).as_secs_f64()
        ),
    );
    row(
        "total time",
        format!("{:.1} s", began.elapsed().as_secs_f64()),
    );
    if let Some(j) = taken.first() {
        print_output(j, &ids, &nodes);
    }
    println!();

    let code = if succeeded == jobs.len() {
        println!(
            "Every job succeeded although a node died mid-run: the survivors judged it dead, \
             closed its attempts and ran its jobs again elsewhere. No job was lost."
        );
        ExitCode::SUCCESS
    } else {
        println!("Not every job succeeded: see the table above.");
        ExitCode::FAILURE
    };

    if a.keep {
        keep_running(&exe, dir, nodes, &ids, victim);
    } else {
        drop(nodes);
        drop(dir);
        println!(
            "Stopped the nodes and removed their directory. `mutual demo --keep` leaves them running."
        );
    }
    Ok(code)
}

/// Waits until a node other than node 0 runs a job; returns the one that runs the most,
/// and the jobs as they were then.
fn pick_victim(
    client: &Client,
    ids: &[String],
    deadline: Instant,
) -> anyhow::Result<(usize, Vec<JobStatus>)> {
    loop {
        let jobs = client.jobs(None)?;
        let busiest = (1..ids.len())
            .map(|i| {
                let n = jobs
                    .iter()
                    .filter(|j| j.state == "running" && j.node.as_deref() == Some(ids[i].as_str()))
                    .count();
                (n, i)
            })
            .max();
        if let Some((n, i)) = busiest
            && n > 0
        {
            return Ok((i, jobs));
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "no node but node 0 started a job within {} s",
                DEADLINE.as_secs()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// How the watch after the kill ended.
struct Outcome {
    /// Every job, once all ended; `None` at the deadline.
    jobs: Option<Vec<JobStatus>>,
    /// When node 0 first reported the victim dead, after the kill.
    judged_dead: Option<Duration>,
    /// When the watch ended.
    ended: Instant,
    /// The last error asking node 0, if any.
    last_error: Option<String>,
}

/// Follows the jobs after the kill, printing every change.
struct Watch<'a> {
    client: &'a Client,
    ids: &'a [String],
    victim: usize,
    killed: Instant,
    deadline: Instant,
}

impl Watch<'_> {
    /// Polls node 0 until every job ended or the deadline passed.
    fn run(&self, before: Vec<JobStatus>) -> Outcome {
        let mut seen: BTreeMap<String, JobStatus> =
            before.into_iter().map(|j| (j.id.clone(), j)).collect();
        let mut judged_dead = None;
        let mut last_error = None;
        loop {
            if judged_dead.is_none() {
                let dead = self
                    .client
                    .nodes()
                    .is_ok_and(|l| l.iter().any(|n| n.id == self.ids[self.victim] && !n.alive));
                if dead {
                    let at = self.killed.elapsed();
                    judged_dead = Some(at);
                    self.event(
                        at,
                        &format!("node {}", self.victim),
                        "judged dead by the survivors",
                    );
                }
            }
            match self.client.jobs(None) {
                Ok(mut jobs) => {
                    jobs.sort_by(|a, b| a.name.cmp(&b.name));
                    let at = self.killed.elapsed();
                    for j in &jobs {
                        if let Some(what) = self.change(seen.get(&j.id), j) {
                            self.event(at, &j.name, &what);
                        }
                        seen.insert(j.id.clone(), j.clone());
                    }
                    if !jobs.is_empty() && jobs.iter().all(|j| is_terminal(&j.state)) {
                        return Outcome {
                            jobs: Some(jobs),
                            judged_dead,
                            ended: Instant::now(),
                            last_error,
                        };
                    }
                }
                Err(e) => last_error = Some(e.to_string()),
            }
            if Instant::now() > self.deadline {
                return Outcome {
                    jobs: None,
                    judged_dead,
                    ended: Instant::now(),
                    last_error,
                };
            }
            std::thread::sleep(POLL);
        }
    }

    /// Prints one event line.
    fn event(&self, at: Duration, who: &str, what: &str) {
        println!(
            "  {:>7}  {who:<8}  {what}",
            format!("+{:.2}s", at.as_secs_f64())
        );
    }

    /// Describes how `now` differs from `was`, if it does in a way worth a line.
    fn change(&self, was: Option<&JobStatus>, now: &JobStatus) -> Option<String> {
        let same = was.is_some_and(|w| {
            w.state == now.state && w.attempt == now.attempt && w.node == now.node
        });
        if same {
            return None;
        }
        let on = now
            .node
            .as_deref()
            .map(|n| self.label(n))
            .unwrap_or_default();
        let from_victim = was.is_some_and(|w| w.node.as_deref() == Some(self.victim_id()));
        match now.state.as_str() {
            "running" => {
                let earlier = now
                    .attempts
                    .iter()
                    .filter(|t| t.epoch < now.attempt)
                    .any(|t| t.node == self.victim_id());
                let lost_race = was
                    .filter(|w| w.attempt == now.attempt && w.state == "running")
                    .and_then(|w| w.node.as_deref())
                    .filter(|n| Some(*n) != now.node.as_deref());
                let how = if earlier {
                    format!(", took over from node {}", self.victim)
                } else if let Some(loser) = lost_race {
                    format!(", its claim beat {}'s", self.label(loser))
                } else {
                    String::new()
                };
                Some(format!("running on {on} (attempt {}{how})", now.attempt))
            }
            "queued" if from_victim => {
                let why = now
                    .attempts
                    .iter()
                    .rev()
                    .find(|t| t.node == self.victim_id())
                    .and_then(|t| t.expired.clone())
                    .unwrap_or_else(|| "its node is gone".into());
                Some(format!("back in the queue ({why})"))
            }
            "queued" => None,
            state => Some(format!(
                "{state} on {on} (attempt {}, exit {})",
                now.attempt,
                now.exit_code.map_or("-".into(), |c| c.to_string())
            )),
        }
    }

    fn victim_id(&self) -> &str {
        &self.ids[self.victim]
    }

    /// `node N` for a known node id.
    fn label(&self, id: &str) -> String {
        node_label(self.ids, id)
    }
}

/// Prints every job's final state.
fn print_results(jobs: &[JobStatus], ids: &[String], victim: usize) {
    println!("Results");
    println!(
        "  {:<8}  {:<9}  {:>8}  {:<19}  {:>4}  NOTE",
        "JOB", "STATE", "ATTEMPTS", "NODE", "EXIT"
    );
    for j in jobs {
        let node = j.node.as_deref().map_or("-".into(), |n| {
            format!("{} {}", node_label(ids, n), short(n))
        });
        let note = if taken_over(j, &ids[victim]) {
            format!("taken over from node {victim}")
        } else {
            String::new()
        };
        let line = format!(
            "  {:<8}  {:<9}  {:>8}  {:<19}  {:>4}  {note}",
            j.name,
            j.state,
            j.attempts.len(),
            node,
            j.exit_code.map_or("-".into(), |c| c.to_string()),
        );
        println!("{}", line.trim_end());
    }
}

/// Prints what one taken-over job wrote, from the log of the attempt that succeeded.
fn print_output(j: &JobStatus, ids: &[String], nodes: &[LocalNode]) {
    let Some(i) = j
        .node
        .as_deref()
        .and_then(|n| ids.iter().position(|id| id == n))
    else {
        return;
    };
    let path = nodes[i]
        .dir
        .join("logs")
        .join(&j.id)
        .join(format!("{}.stdout", j.attempt));
    if let Ok(out) = std::fs::read_to_string(&path) {
        println!();
        println!(
            "What {} printed on node {i} (from {}):",
            j.name,
            path.display()
        );
        for line in out.lines() {
            println!("  {line}");
        }
    }
}

/// Leaves the surviving nodes running and the directory in place, and says how to use them.
fn keep_running(
    exe: &Path,
    dir: tempfile::TempDir,
    mut nodes: Vec<LocalNode>,
    ids: &[String],
    victim: usize,
) {
    let root = dir.keep();
    let m = command_name(exe);
    let mut pids = Vec::new();
    println!();
    println!(
        "The cluster keeps running (node {victim} stays dead). Its data is in {}",
        root.display()
    );
    for (i, n) in nodes.iter_mut().enumerate() {
        // Dropping a `Child` neither kills nor waits for it; taking it out of the node
        // keeps `LocalNode`'s drop from killing it.
        if let Some(child) = n.child.take() {
            pids.push(child.id().to_string());
            println!(
                "  node {i}  {}  {}  pid {}",
                short(&ids[i]),
                n.http,
                child.id()
            );
        }
    }
    let url = nodes.first().map(|n| n.http.as_str()).unwrap_or_default();
    let ticket = nodes.first().map(|n| n.ticket.as_str()).unwrap_or_default();
    println!();
    println!("Talk to it through any node:");
    println!("  export MUTUAL_NODE={url}");
    println!("  {m} nodes");
    println!("  {m} submit -- echo hi");
    println!("  {m} jobs");
    println!(
        "Add a node (the ticket is also in {}):",
        root.join("node0/ticket").display()
    );
    println!(
        "  {m} node --data-dir {} --listen 127.0.0.1:0 --http 127.0.0.1:0 --join {ticket}",
        node_dir(&root, NODES).display()
    );
    println!(
        "Each node logs to {}, {} and so on.",
        root.join("node0.log").display(),
        root.join("node1.log").display()
    );
    println!("Stop the cluster and remove its data:");
    println!("  kill {} && rm -r {}", pids.join(" "), root.display());
}

/// One line of the summary.
fn row(label: &str, value: String) {
    println!("  {:<34}{value}", format!("{label}:"));
}

/// How to type this binary: `mutual` if that is what `PATH` finds, else its full path.
fn command_name(exe: &Path) -> String {
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|d| {
            d.join("mutual")
                .canonicalize()
                .is_ok_and(|p| exe.canonicalize().is_ok_and(|e| e == p))
        })
    });
    if on_path {
        "mutual".into()
    } else {
        exe.display().to_string()
    }
}

/// The data directory `harness::start_cluster` gave node `i`.
fn node_dir(root: &Path, i: usize) -> PathBuf {
    root.join(format!("node{i}"))
}

/// True if `node` holds the job's current attempt: claimed or running it, not ended.
fn holds(j: &JobStatus, node: &str) -> bool {
    !is_terminal(&j.state)
        && j.attempts
            .last()
            .is_some_and(|t| t.node == node && t.expired.is_none() && t.finished_at_ms.is_none())
}

/// True if the job had an attempt on `victim` and ended on another node.
fn taken_over(j: &JobStatus, victim: &str) -> bool {
    j.attempts.iter().any(|t| t.node == victim) && j.node.as_deref() != Some(victim)
}

/// When the first attempt after the victim's started (HLC ms since the Unix epoch).
fn takeover_started_ms(j: &JobStatus, victim: &str) -> Option<u64> {
    let lost = j.attempts.iter().rev().find(|t| t.node == victim)?.epoch;
    j.attempts
        .iter()
        .filter(|t| t.epoch > lost)
        .find_map(|t| t.started_at_ms)
}

/// `node N` for a node of the demo cluster, else the short id.
fn node_label(ids: &[String], id: &str) -> String {
    ids.iter()
        .position(|x| x == id)
        .map_or_else(|| short(id).to_string(), |i| format!("node {i}"))
}

/// The first 10 characters of a node id.
fn short(id: &str) -> &str {
    id.get(..10).unwrap_or(id)
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

/// Wall-clock ms since the Unix epoch, comparable with the API's timestamps.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
