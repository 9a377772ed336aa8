//! # E4 — where job documents live at scale, simulated
//!
//! The discovery half of E4 (`e4.rs`) finds nodes; this half asks what it costs to keep the
//! jobs' own documents as the cluster grows, under the two schemes of
//! [`mutual_core::placement`]:
//!
//! - **`full`** — every node holds every document; each change (record) goes to every live
//!   node down the overlay's broadcast tree. What a node does today, and what the product
//!   keeps up to [`placement::FULL_REPLICATION_MAX_NODES`] nodes.
//! - **`placed`** — each document lives on its [`placement::REPLICAS`] XOR-closest live
//!   nodes plus the node running the job; a writer sends each record straight to them (one
//!   hop). When the live set changes, [`placement::handoff`] names who copies the document
//!   to each new replica; a job status lookup from any node computes the set from its
//!   member list and asks the closest replica.
//!
//! Both schemes see one seeded timeline per cluster size, computed once:
//!
//! - **Jobs**: submitted at `jobs_per_node_per_s` per live node (Poisson) to a random live
//!   node, which writes the spec; a random live node claims it 50 ms later (claim and start:
//!   two records), writes a checkpoint every `checkpoint_every_ms` and the result after an
//!   exponential run time of mean `job_mean_ms`. Finished documents are kept (retention is
//!   longer than the run), so documents per node grow with the window.
//! - **Churn**: live nodes die at `churn_percent_per_min` (Poisson); every node learns of a
//!   death `detect_ms` later (views agree: the failure detector's spread is not modelled).
//!   As many fresh nodes join, known to all at once. A job whose executor died is taken over
//!   by a random live node when the death is known.
//! - **Lookups**: `lookups_per_node_per_s` per live node in the window, from random live
//!   nodes, for random submitted jobs: `full` answers locally;
//!   `placed` asks the replicas closest first, each not-yet-known-dead one costing
//!   [`LOOKUP_TIMEOUT_US`] before the next; latency is the network model of `e4.rs`.
//! - **Simultaneous kills**: at the end, for each of `kill_percents`, a random set of that
//!   many live nodes dies at once: a document is lost if every node holding it is in the set.
//!
//! **Counting.** Messages are counted once at the sender and once at the receiver. `placed`
//! counts every record send, every hand-off copy (a whole document) and every lookup
//! request and answer, per node. `full` counts each record's N − 1 deliveries plus each
//! forwarder's copies from the broadcast tree of the starting ring (rebuilding the tree at
//! every membership change of a 1 %-per-minute churn would move single nodes' counts, not
//! the means). Anti-entropy is left out of both: it repairs misses and its cost per node is
//! one digest exchange per period under either scheme.

use std::collections::HashMap;

use mutual_core::placement::{self, Scheme};
use mutual_core::{JobId, NodeId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::e4::{Tree, base_us, jitter_us, percentile, sorted};

/// A lookup's wait for a replica that died but is not yet known dead, µs.
pub const LOOKUP_TIMEOUT_US: u64 = 10_000;
/// From submission to claim and start, µs.
const CLAIM_AFTER_US: u64 = 50_000;

/// What shapes the placement half of an E4 run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlacementConfig {
    /// Every random choice derives from this.
    pub seed: u64,
    /// Cluster sizes.
    pub sizes: Vec<usize>,
    /// Simulated time before the window.
    pub warmup_ms: u64,
    /// The measurement window.
    pub window_ms: u64,
    /// Jobs submitted per live node per second.
    pub jobs_per_node_per_s: f64,
    /// Mean run time of a job.
    pub job_mean_ms: u64,
    /// A running job writes a checkpoint this often.
    pub checkpoint_every_ms: u64,
    /// Live nodes that die per minute, percent (as many join).
    pub churn_percent_per_min: f64,
    /// From a death to every node knowing it.
    pub detect_ms: u64,
    /// Job status lookups each live node starts per second (all in the window are recorded).
    pub lookups_per_node_per_s: f64,
    /// Fractions (percent) of live nodes killed at once at the end.
    pub kill_percents: Vec<u32>,
}

impl PlacementConfig {
    /// The standard configuration for `sizes`.
    pub fn new(seed: u64, sizes: Vec<usize>) -> PlacementConfig {
        PlacementConfig {
            seed,
            sizes,
            warmup_ms: 30_000,
            window_ms: 60_000,
            jobs_per_node_per_s: 0.02,
            job_mean_ms: 20_000,
            checkpoint_every_ms: 5_000,
            churn_percent_per_min: 1.0,
            detect_ms: 2_000,
            lookups_per_node_per_s: 0.05,
            kill_percents: vec![10, 40, 60],
        }
    }
}

/// Documents lost when a fraction of the nodes dies at once.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KillLoss {
    /// Percent of the live nodes killed.
    pub kill_percent: u32,
    /// Documents whose every holder was killed / documents.
    pub lost_fraction: f64,
    /// The same count.
    pub lost: usize,
}

/// One line of the report: one scheme and cluster size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlacementRow {
    /// `full` or `placed`.
    pub scheme: String,
    /// Cluster size (live nodes at the start; churn keeps it about constant).
    pub nodes: usize,
    /// Jobs submitted from the start to the end of the window.
    pub jobs: usize,
    /// Records written per node per second in the window (the same for both schemes).
    pub records_per_node_per_s: f64,
    /// Replication messages sent + received per node per second, mean over nodes.
    pub per_node_msgs_per_s_mean: f64,
    /// The same, the busiest node.
    pub per_node_msgs_per_s_max: f64,
    /// Documents a live node holds at the end, mean.
    pub docs_per_node_mean: f64,
    /// The same, the most loaded node.
    pub docs_per_node_max: usize,
    /// Membership changes (deaths known, joins) in the whole run.
    pub membership_changes: usize,
    /// Whole-document copies sent by hand-offs per membership change.
    pub handoff_copies_per_change: f64,
    /// Documents no live node held at some point of the run (churn only).
    pub jobs_lost_to_churn: usize,
    /// Job status lookup latency, median, ms (0: answered locally).
    pub lookup_p50_ms: f64,
    /// The same, 99th percentile.
    pub lookup_p99_ms: f64,
    /// Nodes asked per lookup, mean.
    pub lookup_hops_mean: f64,
    /// Loss under simultaneous kills at the end.
    pub kill_loss: Vec<KillLoss>,
    /// The scheme the product picks at this size ([`Scheme::for_nodes`]).
    pub product_uses: bool,
    /// The seed.
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A node dies (abruptly; its death is known `detect_ms` later).
    Die,
    /// Every node learns of a death.
    Known(usize),
    /// A fresh node joins.
    Join,
    /// A job is submitted.
    Submit,
    /// A job's claim and start, checkpoint or result is due.
    Step(usize),
    /// A job status lookup.
    Lookup,
}

struct Job {
    id: JobId,
    executor: Option<usize>,
    end_us: u64,
    done: bool,
    /// Replicas under the current view (placed).
    reps: Vec<NodeId>,
    /// Nodes that hold the document (placed).
    have: Vec<usize>,
    lost: bool,
}

struct Run<'a> {
    cfg: &'a PlacementConfig,
    rng: ChaCha8Rng,
    k: usize,
    ids: Vec<NodeId>,
    index: HashMap<NodeId, usize>,
    alive: Vec<bool>,
    /// The agreed view: live ids as every node believes, sorted.
    view: Vec<NodeId>,
    jobs: Vec<Job>,
    /// Placed: messages sent + received per node in the window.
    load: Vec<u64>,
    /// Full: records written per origin in the window, and deliveries.
    full_origin: Vec<u64>,
    full_deliveries: u64,
    records_in_window: u64,
    window: (u64, u64),
    changes: usize,
    handoff_copies: u64,
    lookups: Vec<(f64, usize)>,
}

fn id_of(i: usize) -> NodeId {
    NodeId::from_index(i as u64)
}

fn job_id(seed: u64, n: usize, j: usize) -> JobId {
    let h = NodeId::from_index((seed << 40) ^ ((n as u64) << 24) ^ (j as u64) ^ (1 << 63));
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.0[16..]);
    JobId(b)
}

impl Run<'_> {
    fn in_window(&self, t: u64) -> bool {
        t >= self.window.0 && t < self.window.1
    }

    fn random_live(&mut self) -> usize {
        loop {
            let i = self.rng.random_range(0..self.ids.len());
            if self.alive[i] {
                return i;
            }
        }
    }

    fn count(&mut self, t: u64, from: usize, to: usize) {
        if self.in_window(t) {
            self.load[from] += 1;
            self.load[to] += 1;
        }
    }

    /// `writer` writes one record of job `j`.
    fn write(&mut self, t: u64, j: usize, writer: usize) {
        if self.in_window(t) {
            self.records_in_window += 1;
            self.full_origin[writer] += 1;
            self.full_deliveries += self.view.len().saturating_sub(1) as u64;
        }
        let mut targets: Vec<usize> = self.jobs[j].reps.iter().map(|n| self.index[n]).collect();
        targets.extend(self.jobs[j].executor);
        targets.sort_unstable();
        targets.dedup();
        for to in targets {
            if to == writer {
                continue;
            }
            self.count(t, writer, to);
            if self.alive[to] && !self.jobs[j].have.contains(&to) {
                self.jobs[j].have.push(to);
            }
        }
        // The writer keeps a copy only if it is a replica or runs the job: an accepting
        // node hands the spec to the replicas and keeps nothing.
        let keeps =
            self.jobs[j].executor == Some(writer) || self.jobs[j].reps.contains(&self.ids[writer]);
        if keeps && !self.jobs[j].have.contains(&writer) {
            self.jobs[j].have.push(writer);
        }
    }

    /// Job `j`'s executor wrote its result: it drops its copy unless it is a replica.
    fn finish(&mut self, j: usize) {
        let job = &mut self.jobs[j];
        if let Some(e) = job.executor.take() {
            let id = self.ids[e];
            if !job.reps.contains(&id) {
                job.have.retain(|n| *n != e);
            }
        }
        job.done = true;
    }

    /// The view changed from `before` to the current one: hand documents off.
    fn rehome(&mut self, t: u64, before: &[NodeId], joined: Option<NodeId>, left: Option<NodeId>) {
        self.changes += 1;
        for j in 0..self.jobs.len() {
            let affected = match (joined, left) {
                (_, Some(d)) => self.jobs[j].reps.contains(&d),
                (Some(x), None) => {
                    let job = &self.jobs[j];
                    job.reps.len() < self.k
                        || job.reps.last().is_some_and(|far| {
                            placement::distance(job.id, &x) < placement::distance(job.id, far)
                        })
                }
                (None, None) => false,
            };
            if !affected || self.jobs[j].lost {
                continue;
            }
            let h = placement::handoff(before, &self.view, self.jobs[j].id, self.k);
            self.jobs[j].reps = placement::replicas(&self.view, self.jobs[j].id, self.k);
            // The named sender if it is really alive and has it; else (it died unnoticed)
            // whichever holder anti-entropy would reach first.
            let have = &self.jobs[j].have;
            let named = h
                .sender
                .map(|s| self.index[&s])
                .filter(|s| self.alive[*s] && have.contains(s));
            let sender = named.or_else(|| have.iter().copied().find(|n| self.alive[*n]));
            let Some(sender) = sender else {
                self.jobs[j].lost = true;
                continue;
            };
            for to in h.to {
                let to = self.index[&to];
                self.count(t, sender, to);
                self.handoff_copies += 1;
                if self.alive[to] && !self.jobs[j].have.contains(&to) {
                    self.jobs[j].have.push(to);
                }
            }
            // Released replicas drop their copy, unless they run the job.
            let exec = self.jobs[j].executor;
            let released: Vec<usize> = h.released.iter().map(|n| self.index[n]).collect();
            self.jobs[j]
                .have
                .retain(|n| !released.contains(n) || Some(*n) == exec);
        }
    }

    fn lookup(&mut self, t: u64) {
        let asker = self.random_live();
        let j = self.rng.random_range(0..self.jobs.len());
        let job = &self.jobs[j];
        let asker_id = self.ids[asker];
        if job.reps.contains(&asker_id) {
            self.lookups.push((0.0, 0));
            return;
        }
        let mut waited = 0u64;
        let mut asked = 0;
        let reps: Vec<usize> = job.reps.iter().map(|n| self.index[n]).collect();
        for r in reps {
            asked += 1;
            self.count(t, asker, r);
            if self.alive[r] {
                self.count(t, r, asker);
                let rtt = 2 * base_us(self.cfg.seed, asker, r)
                    + jitter_us(self.rng.random::<f64>())
                    + jitter_us(self.rng.random::<f64>());
                self.lookups.push(((waited + rtt) as f64 / 1_000.0, asked));
                return;
            }
            waited += LOOKUP_TIMEOUT_US;
        }
        // Every replica dead and not yet known: the lookup fails after waiting them all out.
        self.lookups.push((waited as f64 / 1_000.0, asked));
    }
}

fn exp_us(rng: &mut ChaCha8Rng, mean_us: f64) -> u64 {
    (-mean_us * (1.0 - rng.random::<f64>()).ln()) as u64
}

/// Runs one cluster size: the `full` and the `placed` row.
fn run_size(cfg: &PlacementConfig, n: usize) -> Vec<PlacementRow> {
    let k = placement::REPLICAS;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ (n as u64).wrapping_mul(0x9e37_79b9));
    let ids: Vec<NodeId> = (0..n).map(id_of).collect();
    let mut view = ids.clone();
    view.sort();
    let end_us = (cfg.warmup_ms + cfg.window_ms) * 1_000;
    let window = (cfg.warmup_ms * 1_000, end_us);
    // The timeline: arrivals of every kind, then job steps as they come due.
    let mut events: std::collections::BinaryHeap<std::cmp::Reverse<(u64, Ev)>> =
        std::collections::BinaryHeap::new();
    let per_us = |per_node_per_s: f64| per_node_per_s * n as f64 / 1e6;
    let churn = cfg.churn_percent_per_min / 100.0 / 60.0;
    for (rate, ev, from) in [
        (per_us(cfg.jobs_per_node_per_s), Ev::Submit, 0),
        (per_us(churn), Ev::Die, 0),
        (per_us(churn), Ev::Join, 0),
        (per_us(cfg.lookups_per_node_per_s), Ev::Lookup, window.0),
    ] {
        if rate <= 0.0 {
            continue;
        }
        let mut t = from;
        loop {
            t += exp_us(&mut rng, 1.0 / rate);
            if t >= end_us {
                break;
            }
            events.push(std::cmp::Reverse((t, ev)));
        }
    }
    let index = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut run = Run {
        cfg,
        rng,
        k,
        alive: vec![true; n],
        index,
        ids,
        view,
        jobs: Vec::new(),
        load: vec![0; n],
        full_origin: vec![0; n],
        full_deliveries: 0,
        records_in_window: 0,
        window,
        changes: 0,
        handoff_copies: 0,
        lookups: Vec::new(),
    };
    let mut next_step: Vec<u64> = Vec::new();
    while let Some(std::cmp::Reverse((t, ev))) = events.pop() {
        match ev {
            Ev::Submit => {
                let acceptor = run.random_live();
                let j = run.jobs.len();
                let id = job_id(cfg.seed, n, j);
                let run_us = exp_us(&mut run.rng, cfg.job_mean_ms as f64 * 1_000.0);
                run.jobs.push(Job {
                    id,
                    executor: None,
                    end_us: t + CLAIM_AFTER_US + run_us,
                    done: false,
                    reps: placement::replicas(&run.view, id, k),
                    have: Vec::new(),
                    lost: false,
                });
                next_step.push(t + CLAIM_AFTER_US);
                run.write(t, j, acceptor);
                events.push(std::cmp::Reverse((t + CLAIM_AFTER_US, Ev::Step(j))));
            }
            Ev::Step(j) => {
                if run.jobs[j].done || next_step[j] != t {
                    continue;
                }
                match run.jobs[j].executor {
                    None => {
                        let e = run.random_live();
                        run.jobs[j].executor = Some(e);
                        run.write(t, j, e); // claim
                        run.write(t, j, e); // start
                    }
                    Some(e) if !run.alive[e] => continue, // a takeover re-arms the job
                    Some(e) if t >= run.jobs[j].end_us => {
                        run.write(t, j, e); // result
                        run.finish(j);
                        continue;
                    }
                    Some(e) => run.write(t, j, e), // checkpoint
                }
                let next = (t + cfg.checkpoint_every_ms * 1_000).min(run.jobs[j].end_us);
                next_step[j] = next;
                events.push(std::cmp::Reverse((next, Ev::Step(j))));
            }
            Ev::Die => {
                if run.view.len() <= k + 1 {
                    continue;
                }
                let d = run.random_live();
                run.alive[d] = false;
                events.push(std::cmp::Reverse((t + cfg.detect_ms * 1_000, Ev::Known(d))));
            }
            Ev::Known(d) => {
                let before = run.view.clone();
                let dead = run.ids[d];
                run.view.retain(|x| *x != dead);
                run.rehome(t, &before, None, Some(dead));
                // Jobs the dead node ran are taken over now.
                for (j, (job, next)) in run.jobs.iter_mut().zip(&mut next_step).enumerate() {
                    if job.executor == Some(d) && !job.done {
                        job.executor = None;
                        *next = t;
                        events.push(std::cmp::Reverse((t, Ev::Step(j))));
                    }
                }
            }
            Ev::Join => {
                let i = run.ids.len();
                let id = id_of(i);
                run.ids.push(id);
                run.index.insert(id, i);
                run.alive.push(true);
                run.load.push(0);
                run.full_origin.push(0);
                let before = run.view.clone();
                let at = run.view.partition_point(|x| *x < id);
                run.view.insert(at, id);
                run.rehome(t, &before, Some(id), None);
            }
            Ev::Lookup => {
                if !run.jobs.is_empty() {
                    run.lookup(t);
                }
            }
        }
    }
    report(run, n)
}

fn report(run: Run<'_>, n: usize) -> Vec<PlacementRow> {
    let cfg = run.cfg;
    let window_s = cfg.window_ms as f64 / 1_000.0;
    let live: Vec<usize> = (0..run.ids.len()).filter(|i| run.alive[*i]).collect();
    let per_node_s = |x: u64| x as f64 / window_s;
    let records = run.records_in_window as f64 / n as f64 / window_s;
    // Placed: per-node loads and documents.
    let mut docs = vec![0usize; run.ids.len()];
    for job in &run.jobs {
        for h in &job.have {
            docs[*h] += 1;
        }
    }
    let placed_mean =
        live.iter().map(|i| per_node_s(run.load[*i])).sum::<f64>() / live.len().max(1) as f64;
    let placed_max = live
        .iter()
        .map(|i| per_node_s(run.load[*i]))
        .fold(0.0, f64::max);
    let docs_mean = live.iter().map(|i| docs[*i] as f64).sum::<f64>() / live.len().max(1) as f64;
    let docs_max = live.iter().map(|i| docs[*i]).max().unwrap_or(0);
    // Full: every delivery is a send and a receive; a node's sends are its tree children's
    // count for each origin, from the starting ring's tree.
    let mut ring: Vec<NodeId> = (0..n).map(id_of).collect();
    ring.sort();
    let pos: Vec<usize> = (0..n)
        .map(|i| ring.binary_search(&id_of(i)).unwrap_or(0))
        .collect();
    let tree = Tree::new(&ring);
    let mut by_pos = vec![0u64; n];
    let mut total_records = 0;
    for (i, c) in run.full_origin.iter().enumerate() {
        total_records += c;
        if i < n {
            by_pos[pos[i]] += c;
        }
    }
    let mut full_max = 0.0f64;
    for x in 0..n {
        let sends: u64 = (0..n)
            .filter(|o| by_pos[*o] > 0)
            .map(|o| by_pos[o] * tree.children[(x + n - o) % n])
            .sum();
        let recv = total_records - by_pos[x];
        full_max = full_max.max(per_node_s(sends + recv));
    }
    let full_mean = 2.0 * run.full_deliveries as f64 / n as f64 / window_s;
    // Simultaneous kills over the final placement.
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x6b69_6c6c ^ n as u64);
    // `placed: false` is full replication: every live node holds every document.
    let kill = |percent: u32, rng: &mut ChaCha8Rng, placed: bool| {
        let mut order = live.clone();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let dead_count = order.len() * percent as usize / 100;
        let mut dead = vec![false; run.ids.len()];
        for d in &order[..dead_count] {
            dead[*d] = true;
        }
        let considered: Vec<&Job> = run.jobs.iter().filter(|j| !j.lost).collect();
        let lost = if placed {
            considered
                .iter()
                .filter(|j| j.have.iter().all(|h| !run.alive[*h] || dead[*h]))
                .count()
        } else if dead_count == order.len() {
            considered.len()
        } else {
            0
        };
        KillLoss {
            kill_percent: percent,
            lost_fraction: lost as f64 / considered.len().max(1) as f64,
            lost,
        }
    };
    let placed_kills: Vec<KillLoss> = cfg
        .kill_percents
        .iter()
        .map(|p| kill(*p, &mut rng, true))
        .collect();
    let full_kills: Vec<KillLoss> = cfg
        .kill_percents
        .iter()
        .map(|p| kill(*p, &mut rng, false))
        .collect();
    let lat = sorted(run.lookups.iter().map(|(ms, _)| *ms).collect());
    let hops =
        run.lookups.iter().map(|(_, h)| *h as f64).sum::<f64>() / run.lookups.len().max(1) as f64;
    let changes = run.changes.max(1) as f64;
    let product = Scheme::for_nodes(n);
    vec![
        PlacementRow {
            scheme: "full".into(),
            nodes: n,
            jobs: run.jobs.len(),
            records_per_node_per_s: records,
            per_node_msgs_per_s_mean: full_mean,
            per_node_msgs_per_s_max: full_max,
            docs_per_node_mean: run.jobs.len() as f64,
            docs_per_node_max: run.jobs.len(),
            membership_changes: run.changes,
            handoff_copies_per_change: 0.0,
            jobs_lost_to_churn: 0,
            lookup_p50_ms: 0.0,
            lookup_p99_ms: 0.0,
            lookup_hops_mean: 0.0,
            kill_loss: full_kills,
            product_uses: product == Scheme::Full,
            seed: cfg.seed,
        },
        PlacementRow {
            scheme: "placed".into(),
            nodes: n,
            jobs: run.jobs.len(),
            records_per_node_per_s: records,
            per_node_msgs_per_s_mean: placed_mean,
            per_node_msgs_per_s_max: placed_max,
            docs_per_node_mean: docs_mean,
            docs_per_node_max: docs_max,
            membership_changes: run.changes,
            handoff_copies_per_change: run.handoff_copies as f64 / changes,
            jobs_lost_to_churn: run.jobs.iter().filter(|j| j.lost).count(),
            lookup_p50_ms: percentile(&lat, 50.0),
            lookup_p99_ms: percentile(&lat, 99.0),
            lookup_hops_mean: hops,
            kill_loss: placed_kills,
            product_uses: product != Scheme::Full,
            seed: cfg.seed,
        },
    ]
}

/// Runs every size; rows are ordered by size, then scheme (`full` first).
pub fn run(cfg: &PlacementConfig) -> Vec<PlacementRow> {
    cfg.sizes.iter().flat_map(|n| run_size(cfg, *n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_bounds_the_per_node_load_and_loses_nothing_to_churn() {
        let mut cfg = PlacementConfig::new(3, vec![60, 240]);
        cfg.warmup_ms = 5_000;
        cfg.window_ms = 20_000;
        cfg.churn_percent_per_min = 10.0;
        let rows = run(&cfg);
        assert_eq!(rows.len(), 4);
        let (full, placed) = (&rows[2], &rows[3]);
        assert_eq!(
            (full.scheme.as_str(), placed.scheme.as_str()),
            ("full", "placed")
        );
        assert!(placed.membership_changes > 0);
        assert_eq!(placed.jobs_lost_to_churn, 0);
        // Full replication sends each record to everyone; placement to about k + 1 nodes.
        assert!(full.per_node_msgs_per_s_mean > 10.0 * placed.per_node_msgs_per_s_mean);
        assert!(placed.docs_per_node_mean < full.docs_per_node_mean / 5.0);
        // Placement's load does not grow with N; full replication's does.
        assert!(placed.per_node_msgs_per_s_mean < 2.0 * rows[1].per_node_msgs_per_s_mean);
        assert!(full.per_node_msgs_per_s_mean > 3.0 * rows[0].per_node_msgs_per_s_mean);
        // Lookups are one hop unless a replica died unnoticed.
        assert!(
            placed.lookup_hops_mean <= 1.2,
            "{}",
            placed.lookup_hops_mean
        );
        // Full replication loses nothing short of killing everyone; placement loses some
        // documents when most nodes die at once.
        assert!(full.kill_loss.iter().all(|k| k.lost == 0));
        let at60 = placed.kill_loss.iter().find(|k| k.kill_percent == 60);
        assert!(at60.is_some_and(|k| k.lost > 0));
    }

    #[test]
    fn the_same_seed_gives_the_same_rows() {
        let mut cfg = PlacementConfig::new(9, vec![50]);
        cfg.warmup_ms = 2_000;
        cfg.window_ms = 5_000;
        assert_eq!(run(&cfg), run(&cfg));
    }
}
