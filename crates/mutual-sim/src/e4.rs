//! # E4 — discovery at scale, simulated
//!
//! How do lookup latency, lookup success and per-node load grow with the cluster size, for
//! the two ways of finding "a node that matches a constraint right now"?
//!
//! - **`broadcast`** — what the product does today: every status change goes to all N
//!   nodes down the overlay's broadcast tree ([`overlay::tree_targets`], ~log₂ N hops); a
//!   lookup scans the node's full table and verifies the chosen node with one round trip
//!   (the next one if that fails, up to the directory's verify bound).
//! - **`directory`** — [`mutual_core::discovery`]: statuses go to the ~2·log₂ N overlay
//!   links only; lookups widen from the node's own directory to its links' directories.
//!
//! Both schemes see the same workload (one seeded stream per cluster size) and the same
//! network model; each run is deterministic for its seed.
//!
//! **Network.** Every pair of nodes has a base one-way latency drawn uniformly from
//! [[`LINK_BASE_MIN_US`], [`LINK_BASE_MAX_US`]] (a LAN: one or two switches), fixed for
//! the run; each message adds an exponential jitter of mean [`JITTER_MEAN_US`] capped at
//! [`JITTER_MAX_US`]. There is no loss, no bandwidth limit and no CPU cost per message:
//! the load columns say how many messages a node would handle, and a real node handling
//! thousands a second would add queueing delay that this model (favouring broadcast) omits.
//!
//! **Workload.** Nodes have 4, 8 or 16 execution slots; `gpu_node_percent` of them also
//! have 1–4 GPUs and `label_node_percent` (at least one node) carry a rare label. Each node
//! alternates between idle (everything free) and busy (1..=all slots and 0..=all GPUs in
//! use) with exponential dwell times of mean `status_dwell_mean_ms`: one status change per
//! dwell. Lookups come from uniformly random nodes at `lookups_per_node_per_s` per node,
//! cycling through the constraint mixes ([`Mix`]); the first `lookups` of each mix after
//! the warm-up are recorded, later ones only add load. The measurement window lasts until
//! those are issued and at least `min_measure_ms`.
//!
//! **Metrics** (per scheme, N and mix; the load and reach columns are per scheme and N,
//! as all mixes run at once):
//!
//! - lookup latency: from issuing to the verified answer, over lookups that found a node;
//! - lookup success: the node found matched, by ground truth, at the moment the lookup
//!   completed (over all recorded lookups; `lookup_feasible_rate` says how many had any
//!   other matching node when issued);
//! - status reach: for a sample of changes, the time until 99 % of the nodes that track the
//!   status have it (or a newer one): all other nodes for `broadcast`, the changing node's
//!   links for `directory` (the directory's figure includes waiting out the push rate
//!   limit);
//! - per-node messages per second: sent + received, each message counted once at its
//!   sender and once at its receiver, over the window.
//!
//! **Broadcast at 10,000 nodes** would be ~33 million deliveries per simulated second, so
//! it is not simulated message by message. The tree delivers exactly N − 1 copies per
//! change. Its shape depends on the origin (fingers are laid out in the id space), and
//! building N trees of N nodes is out of reach at 10,000, so the model uses the tree of
//! the node at position 0 for every origin, rotated: a node at offset o from the origin
//! forwards to `children(o)` others. The mean load is exact (N − 1 deliveries per change);
//! the busiest node's load and the per-path delays are those of one real tree, moved.
//! Loads are counted from the changes in the window; a node's table is evaluated lazily at lookup
//! time (a change is visible once the sum of its tree path's hop latencies has passed, hop
//! jitter being a hash of the change and the hop); reach is computed for sampled changes.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use mutual_core::NodeId;
use mutual_core::discovery::{
    self, Capacity, Constraint, Directory, Input, LabelSet, LookupId, Msg, Output, preference,
};
use mutual_core::overlay;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Smallest base one-way latency between two nodes, µs.
pub const LINK_BASE_MIN_US: u64 = 100;
/// Largest base one-way latency between two nodes, µs.
pub const LINK_BASE_MAX_US: u64 = 500;
/// Mean of the per-message jitter (exponential), µs.
pub const JITTER_MEAN_US: f64 = 20.0;
/// Largest per-message jitter, µs.
pub const JITTER_MAX_US: u64 = 200;
/// Nodes start (send their first status and learn the members) within this long.
const START_SPREAD_US: u64 = 1_000_000;
/// Execution slots a node may have (drawn uniformly).
const SLOT_CHOICES: [u32; 3] = [4, 8, 16];
/// Most GPUs on a GPU node (1..= this, uniformly).
const GPUS_MAX: u32 = 4;
/// The label of the rare mix.
const RARE_LABEL: LabelSet = LabelSet(1);
/// After the window, lookups still running get this long to finish.
const DRAIN_US: u64 = (discovery::LOOKUP_TIMEOUT_MS + 100) * 1_000;
/// Cluster sizes of a full run.
pub const FULL_SIZES: [usize; 3] = [100, 1_000, 10_000];
/// Cluster sizes of a quick run.
pub const QUICK_SIZES: [usize; 2] = [100, 1_000];
/// Recorded lookups per mix in a full run.
pub const FULL_LOOKUPS: usize = 1_000;
/// Recorded lookups per mix in a quick run.
pub const QUICK_LOOKUPS: usize = 200;

/// What shapes an E4 run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct E4Config {
    /// Every random choice derives from this.
    pub seed: u64,
    /// Quick mode: [`QUICK_SIZES`] and [`QUICK_LOOKUPS`] unless set below.
    pub quick: bool,
    /// Cluster sizes; `None`: [`FULL_SIZES`] ([`QUICK_SIZES`] when quick).
    pub nodes: Option<Vec<usize>>,
    /// Recorded lookups per mix; `None`: [`FULL_LOOKUPS`] ([`QUICK_LOOKUPS`] when quick).
    pub lookups: Option<usize>,
    /// Simulated time before the window (directories fill, states mix).
    pub warmup_ms: u64,
    /// Shortest measurement window.
    pub min_measure_ms: u64,
    /// Mean time between two status changes of a node.
    pub status_dwell_mean_ms: u64,
    /// Lookups each node starts per second.
    pub lookups_per_node_per_s: f64,
    /// Percent of nodes with GPUs.
    pub gpu_node_percent: f64,
    /// Percent of nodes with the rare label (at least one node).
    pub label_node_percent: f64,
    /// Status changes sampled for the reach columns, per scheme and size.
    pub reach_samples: usize,
}

impl E4Config {
    /// The standard configuration (full or quick).
    pub fn new(seed: u64, quick: bool) -> E4Config {
        E4Config {
            seed,
            quick,
            nodes: None,
            lookups: None,
            warmup_ms: 5_000,
            min_measure_ms: 20_000,
            status_dwell_mean_ms: 3_000,
            lookups_per_node_per_s: 0.05,
            gpu_node_percent: 10.0,
            label_node_percent: 1.0,
            reach_samples: 500,
        }
    }

    /// The cluster sizes this run covers.
    pub fn sizes(&self) -> Vec<usize> {
        match (&self.nodes, self.quick) {
            (Some(n), _) => n.clone(),
            (None, true) => QUICK_SIZES.to_vec(),
            (None, false) => FULL_SIZES.to_vec(),
        }
    }

    /// Recorded lookups per mix.
    pub fn lookups_per_mix(&self) -> usize {
        self.lookups.unwrap_or(if self.quick {
            QUICK_LOOKUPS
        } else {
            FULL_LOOKUPS
        })
    }
}

impl Default for E4Config {
    fn default() -> Self {
        E4Config::new(0, false)
    }
}

/// The constraint mixes looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// "≥ 1 free GPU and idle" (≈ 5 % of nodes: GPU nodes that are idle).
    GpuIdle,
    /// "≥ 4 free slots" (most nodes).
    Cpu4,
    /// "the rare label and ≥ 1 free slot" (≈ 1 % of nodes).
    LabelRare,
}

impl Mix {
    /// Every mix, in report order.
    pub const ALL: [Mix; 3] = [Mix::GpuIdle, Mix::Cpu4, Mix::LabelRare];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Mix::GpuIdle => "gpu_idle",
            Mix::Cpu4 => "cpu4",
            Mix::LabelRare => "label_rare",
        }
    }

    /// What it looks for.
    pub fn constraint(self) -> Constraint {
        match self {
            Mix::GpuIdle => Constraint {
                min_free_gpus: 1,
                idle: true,
                ..Constraint::default()
            },
            Mix::Cpu4 => Constraint {
                min_free_cpu_slots: 4,
                ..Constraint::default()
            },
            Mix::LabelRare => Constraint {
                min_free_cpu_slots: 1,
                labels: RARE_LABEL,
                ..Constraint::default()
            },
        }
    }
}

/// One line of the report: one scheme, cluster size and constraint mix.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct E4Row {
    /// `broadcast` or `directory`.
    pub scheme: String,
    /// Cluster size.
    pub nodes: usize,
    /// The mix ([`Mix::name`]).
    pub constraint: String,
    /// Lookups recorded.
    pub lookups: usize,
    /// Mean latency of lookups that found a node, ms.
    pub lookup_mean_ms: f64,
    /// 99th percentile of the same, ms.
    pub lookup_p99_ms: f64,
    /// Lookups whose node matched, by ground truth, when the lookup completed / lookups.
    pub lookup_success_rate: f64,
    /// Lookups for which some other node matched when issued / lookups.
    pub lookup_feasible_rate: f64,
    /// Messages per lookup (queries, answers, verifies; all nodes), mean.
    pub lookup_msgs_mean: f64,
    /// Time until a status change reaches 99 % of its trackers, mean over sampled changes, ms.
    pub status_reach_p99_ms: f64,
    /// The same, 99th percentile over sampled changes, ms.
    pub status_reach_p99_tail_ms: f64,
    /// Nodes that track each status: N − 1 (`broadcast`) or the node's links (`directory`).
    pub trackers_mean: f64,
    /// Status changes per node per second in the window.
    pub status_changes_per_node_per_s: f64,
    /// Messages sent + received per node per second, mean over nodes.
    pub per_node_msgs_per_s_mean: f64,
    /// The same, the busiest node.
    pub per_node_msgs_per_s_max: f64,
    /// Inputs the directories refused (a bug in the simulator or the module; must be 0).
    pub refused_inputs: u64,
    /// The seed.
    pub seed: u64,
}

/// Runs E4: for each size, the broadcast and the directory scheme on the same workload.
/// Rows are ordered by size, then scheme (`broadcast` first), then mix.
pub fn run(cfg: &E4Config) -> Vec<E4Row> {
    let mut rows = Vec::new();
    for n in cfg.sizes() {
        let w = Workload::new(cfg, n);
        // The two schemes are independent: one per core.
        let (b, d) = std::thread::scope(|s| {
            let b = s.spawn(|| run_broadcast(&w));
            let d = run_directory(&w);
            (b.join(), d)
        });
        match b {
            Ok(b) => rows.extend(b),
            Err(e) => std::panic::resume_unwind(e),
        }
        rows.extend(d);
    }
    rows
}

/// SplitMix64's finaliser.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A uniform draw in [0, 1) from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn exp_us(mean: f64, u: f64) -> f64 {
    -mean * (1.0 - u).ln()
}

pub(crate) fn jitter_us(u: f64) -> u64 {
    (exp_us(JITTER_MEAN_US, u) as u64).min(JITTER_MAX_US)
}

/// The fixed base latency between positions `a` and `b` (symmetric).
pub(crate) fn base_us(seed: u64, a: usize, b: usize) -> u64 {
    let (lo, hi) = (a.min(b) as u64, a.max(b) as u64);
    let h = mix64(seed ^ mix64(lo.wrapping_mul(0x1_0000_0001) ^ mix64(hi)));
    LINK_BASE_MIN_US + h % (LINK_BASE_MAX_US - LINK_BASE_MIN_US + 1)
}

fn in_window(w: &Workload, t_us: u64) -> bool {
    t_us >= w.window_start_us && t_us < w.window_end_us
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

pub(crate) fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

#[derive(Debug, Clone, Copy)]
struct Change {
    t_us: u64,
    node: usize,
    capacity: Capacity,
}

#[derive(Debug, Clone, Copy)]
struct LookupReq {
    t_us: u64,
    origin: usize,
    mix: Mix,
    recorded: bool,
    /// Some other node matched when it was issued.
    feasible: bool,
    nonce: u64,
}

/// Everything both schemes share for one cluster size.
struct Workload {
    n: usize,
    seed: u64,
    ring: Arc<[NodeId]>,
    start_us: Vec<u64>,
    initial: Vec<Capacity>,
    /// Sorted by time.
    changes: Vec<Change>,
    /// Changes whose reach is measured.
    sampled: Vec<bool>,
    /// Sorted by time.
    lookups: Vec<LookupReq>,
    window_start_us: u64,
    window_end_us: u64,
    end_us: u64,
}

/// A node's fixed resources.
#[derive(Debug, Clone, Copy)]
struct Profile {
    slots: u32,
    gpus: u32,
    labels: LabelSet,
}

impl Profile {
    fn state(&self, busy: bool, rng: &mut ChaCha8Rng) -> Capacity {
        let (used_slots, used_gpus) = if busy {
            (
                rng.random_range(1..=self.slots),
                rng.random_range(0..=self.gpus),
            )
        } else {
            (0, 0)
        };
        Capacity {
            free_cpu_slots: self.slots - used_slots,
            total_cpu_slots: self.slots,
            free_gpus: self.gpus - used_gpus,
            total_gpus: self.gpus,
            labels: self.labels,
        }
    }
}

impl Workload {
    fn new(cfg: &E4Config, n: usize) -> Workload {
        let n = n.max(2);
        let seed = mix64(cfg.seed ^ mix64(n as u64));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut ids: Vec<NodeId> = (0..n as u64).map(NodeId::from_index).collect();
        ids.sort();
        let ring: Arc<[NodeId]> = ids.into();

        let labelled = ((n as f64 * cfg.label_node_percent / 100.0).round() as usize).max(1);
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut profiles: Vec<Profile> = (0..n)
            .map(|_| {
                let gpu = rng.random_bool((cfg.gpu_node_percent / 100.0).clamp(0.0, 1.0));
                Profile {
                    slots: SLOT_CHOICES[rng.random_range(0..SLOT_CHOICES.len())],
                    gpus: if gpu {
                        rng.random_range(1..=GPUS_MAX)
                    } else {
                        0
                    },
                    labels: LabelSet(0),
                }
            })
            .collect();
        for &i in &order[..labelled.min(n)] {
            profiles[i].labels = RARE_LABEL;
        }

        // Lookups: a Poisson process from the warm-up on, mixes in turn, until every mix has
        // its recorded lookups and the window its least length.
        let per_mix = cfg.lookups_per_mix();
        let rate_per_s = (n as f64 * cfg.lookups_per_node_per_s).max(1e-6);
        let window_start_us = cfg.warmup_ms * 1_000;
        let min_end_us = window_start_us + cfg.min_measure_ms * 1_000;
        let mut lookups = Vec::new();
        let mut issued = [0usize; 3];
        let mut t = window_start_us as f64;
        let mut k = 0usize;
        let window_end_us = loop {
            t += exp_us(1e6 / rate_per_s, rng.random::<f64>());
            if issued.iter().all(|i| *i >= per_mix) && t >= min_end_us as f64 {
                break t as u64;
            }
            let m = k % Mix::ALL.len();
            k += 1;
            let recorded = issued[m] < per_mix;
            issued[m] += 1;
            lookups.push(LookupReq {
                t_us: t as u64,
                origin: rng.random_range(0..n),
                mix: Mix::ALL[m],
                recorded,
                feasible: false,
                nonce: rng.random(),
            });
        };
        let end_us = window_end_us + DRAIN_US;

        let dwell_us = cfg.status_dwell_mean_ms as f64 * 1_000.0;
        let mut start_us = Vec::with_capacity(n);
        let mut initial = Vec::with_capacity(n);
        let mut changes = Vec::new();
        for p in &profiles {
            let start = rng.random_range(0..START_SPREAD_US);
            let mut busy = rng.random_bool(0.5);
            start_us.push(start);
            initial.push(p.state(busy, &mut rng));
            let mut t = start as f64;
            loop {
                t += exp_us(dwell_us, rng.random::<f64>()).max(1.0);
                if t >= window_end_us as f64 {
                    break;
                }
                busy = !busy;
                changes.push(Change {
                    t_us: t as u64,
                    node: start_us.len() - 1,
                    capacity: p.state(busy, &mut rng),
                });
            }
        }
        changes.sort_by_key(|c| (c.t_us, c.node));

        let in_win: Vec<usize> = (0..changes.len())
            .filter(|&i| {
                changes[i].t_us >= window_start_us && changes[i].t_us + DRAIN_US / 2 < window_end_us
            })
            .collect();
        let mut sampled = vec![false; changes.len()];
        let step = (in_win.len() / cfg.reach_samples.max(1)).max(1);
        for &i in in_win.iter().step_by(step).take(cfg.reach_samples) {
            sampled[i] = true;
        }

        // Ground truth at each lookup's issue: does another node match?
        let mut current = initial.clone();
        let mut matching: Vec<usize> = Mix::ALL
            .iter()
            .map(|m| current.iter().filter(|c| m.constraint().matches(c)).count())
            .collect();
        let mut ci = 0;
        for l in &mut lookups {
            while ci < changes.len() && changes[ci].t_us <= l.t_us {
                let c = changes[ci];
                for (mi, m) in Mix::ALL.iter().enumerate() {
                    let k = m.constraint();
                    matching[mi] -= usize::from(k.matches(&current[c.node]));
                    matching[mi] += usize::from(k.matches(&c.capacity));
                }
                current[c.node] = c.capacity;
                ci += 1;
            }
            let mi = Mix::ALL.iter().position(|m| *m == l.mix).unwrap_or(0);
            let own = usize::from(l.mix.constraint().matches(&current[l.origin]));
            l.feasible = matching[mi] > own;
        }

        Workload {
            n,
            seed,
            ring,
            start_us,
            initial,
            changes,
            sampled,
            lookups,
            window_start_us,
            window_end_us,
            end_us,
        }
    }

    fn window_s(&self) -> f64 {
        (self.window_end_us - self.window_start_us) as f64 / 1e6
    }

    fn pos(&self, id: &NodeId) -> Option<usize> {
        self.ring.binary_search(id).ok()
    }
}

/// How one recorded lookup went.
#[derive(Debug, Clone, Copy, Default)]
struct LookupResult {
    done: bool,
    latency_us: u64,
    found: bool,
    success: bool,
    msgs: u64,
}

/// Builds the rows of one scheme and size.
fn rows(
    scheme: &str,
    w: &Workload,
    results: &[LookupResult],
    reach_us: Vec<f64>,
    trackers_mean: f64,
    msgs_per_node: &[u64],
    refused_inputs: u64,
) -> Vec<E4Row> {
    let window_s = w.window_s();
    let loads: Vec<f64> = msgs_per_node.iter().map(|m| *m as f64 / window_s).collect();
    let load_max = loads.iter().copied().fold(0.0, f64::max);
    let reach_ms = sorted(reach_us.iter().map(|u| u / 1_000.0).collect());
    let changes_in_window = w.changes.iter().filter(|c| in_window(w, c.t_us)).count();
    Mix::ALL
        .iter()
        .map(|m| {
            let mine: Vec<(&LookupReq, &LookupResult)> = w
                .lookups
                .iter()
                .zip(results)
                .filter(|(l, _)| l.recorded && l.mix == *m)
                .collect();
            let count = mine.len().max(1) as f64;
            let lat = sorted(
                mine.iter()
                    .filter(|(_, r)| r.done && r.found)
                    .map(|(_, r)| r.latency_us as f64 / 1_000.0)
                    .collect(),
            );
            E4Row {
                scheme: scheme.to_string(),
                nodes: w.n,
                constraint: m.name().to_string(),
                lookups: mine.len(),
                lookup_mean_ms: mean(&lat),
                lookup_p99_ms: percentile(&lat, 99.0),
                lookup_success_rate: mine.iter().filter(|(_, r)| r.success).count() as f64 / count,
                lookup_feasible_rate: mine.iter().filter(|(l, _)| l.feasible).count() as f64
                    / count,
                lookup_msgs_mean: mine.iter().map(|(_, r)| r.msgs as f64).sum::<f64>() / count,
                status_reach_p99_ms: mean(&reach_ms),
                status_reach_p99_tail_ms: percentile(&reach_ms, 99.0),
                trackers_mean,
                status_changes_per_node_per_s: changes_in_window as f64 / w.n as f64 / window_s,
                per_node_msgs_per_s_mean: mean(&loads),
                per_node_msgs_per_s_max: load_max,
                refused_inputs,
                seed: w.seed,
            }
        })
        .collect()
}

/// Time for 99 % of `arrivals` (µs after the change).
fn reach99(mut arrivals: Vec<f64>) -> f64 {
    arrivals.sort_by(f64::total_cmp);
    percentile(&arrivals, 99.0)
}

// ---------------------------------------------------------------------------------------
// broadcast

/// The broadcast tree rooted at position 0 of a ring of `n` (any root is a rotation).
pub(crate) struct Tree {
    parent: Vec<usize>,
    /// How many copies the node at each offset from the root forwards.
    pub(crate) children: Vec<u64>,
    /// Positions in breadth-first order (root first).
    order: Vec<usize>,
    depth: u32,
}

impl Tree {
    pub(crate) fn new(ring: &[NodeId]) -> Tree {
        let n = ring.len();
        let mut parent = vec![0; n];
        let mut children = vec![0u64; n];
        let mut order = Vec::with_capacity(n);
        let mut level = vec![0u32; n];
        let mut queue = std::collections::VecDeque::from([(0usize, 0usize)]);
        while let Some((at, limit)) = queue.pop_front() {
            order.push(at);
            for (to, l) in overlay::tree_targets(ring, ring[at], ring[limit]) {
                let (Ok(to), Ok(l)) = (ring.binary_search(&to), ring.binary_search(&l)) else {
                    continue;
                };
                parent[to] = at;
                level[to] = level[at] + 1;
                children[at] += 1;
                queue.push_back((to, l));
            }
        }
        let depth = level.iter().copied().max().unwrap_or(0);
        Tree {
            parent,
            children,
            order,
            depth,
        }
    }
}

struct Broadcast<'a> {
    w: &'a Workload,
    tree: Tree,
    /// Per node: (time, capacity, change key) from the start; key 0 is the initial state.
    history: Vec<Vec<(u64, Capacity, u64)>>,
    max_delay_us: u64,
}

impl Broadcast<'_> {
    /// One hop of change `key` from position `a` to `b`.
    fn hop_us(&self, key: u64, a: usize, b: usize) -> u64 {
        let h = mix64(self.w.seed ^ mix64(key) ^ mix64(b as u64 ^ 0x5bd1_e995));
        base_us(self.w.seed, a, b) + jitter_us(unit(h))
    }

    /// How long change `key` of `origin` takes to reach `to` down the tree.
    fn delay_us(&self, key: u64, origin: usize, to: usize) -> u64 {
        let n = self.w.n;
        let mut o = (to + n - origin) % n;
        let mut d = 0;
        while o != 0 {
            let p = self.tree.parent[o];
            d += self.hop_us(key, (origin + p) % n, (origin + o) % n);
            o = p;
        }
        d
    }

    /// The status of `y` in `x`'s table at `t_us`, given the latest change of `y` at or
    /// before `t_us` is `history[y][k]`.
    fn visible(&self, x: usize, y: usize, mut k: usize, t_us: u64) -> Capacity {
        loop {
            let (t, c, key) = self.history[y][k];
            if k == 0 || t_us >= t + self.max_delay_us || t + self.delay_us(key, y, x) <= t_us {
                return c;
            }
            k -= 1;
        }
    }

    fn truth(&self, y: usize, t_us: u64) -> Capacity {
        let h = &self.history[y];
        let k = h.partition_point(|(t, _, _)| *t <= t_us);
        h[k.saturating_sub(1)].1
    }
}

fn run_broadcast(w: &Workload) -> Vec<E4Row> {
    let n = w.n;
    let tree = Tree::new(&w.ring);
    let mut history: Vec<Vec<(u64, Capacity, u64)>> =
        w.initial.iter().map(|c| vec![(0, *c, 0)]).collect();
    for (i, c) in w.changes.iter().enumerate() {
        history[c.node].push((c.t_us, c.capacity, i as u64 + 1));
    }
    let max_delay_us = u64::from(tree.depth) * (LINK_BASE_MAX_US + JITTER_MAX_US) + 1;
    let b = Broadcast {
        w,
        tree,
        history,
        max_delay_us,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(mix64(w.seed ^ 0xb0ad_ca57));
    let mut msgs = vec![0u64; n];

    // Lookups, in time order: scan, then verify one candidate after the other.
    let mut cursor = vec![0usize; n];
    let mut results = vec![LookupResult::default(); w.lookups.len()];
    let mut matches: Vec<usize> = Vec::new();
    for (li, l) in w.lookups.iter().enumerate() {
        let k = l.mix.constraint();
        let x = l.origin;
        matches.clear();
        for y in 0..n {
            let h = &b.history[y];
            while cursor[y] + 1 < h.len() && h[cursor[y] + 1].0 <= l.t_us {
                cursor[y] += 1;
            }
            if y != x && k.matches(&b.visible(x, y, cursor[y], l.t_us)) {
                matches.push(y);
            }
        }
        matches.sort_by_key(|y| std::cmp::Reverse(preference(l.nonce, &w.ring[*y])));
        matches.truncate(discovery::MAX_VERIFIES_PER_LOOKUP);
        let mut r = LookupResult::default();
        let mut t = l.t_us;
        for &y in &matches {
            let there = t + base_us(w.seed, x, y) + jitter_us(rng.random());
            let back = there + base_us(w.seed, x, y) + jitter_us(rng.random());
            r.msgs += 2;
            for (at, who) in [(t, x), (there, y), (there, y), (back, x)] {
                if in_window(w, at) {
                    msgs[who] += 1;
                }
            }
            t = back;
            if k.matches(&b.truth(y, there)) {
                r.found = true;
                r.success = k.matches(&b.truth(y, back));
                break;
            }
        }
        r.done = true;
        r.latency_us = t - l.t_us;
        results[li] = r;
    }

    // Pushes, counted exactly: each change in the window reaches the N − 1 others once,
    // and the node at offset o from the origin sends children(o) copies.
    let mut changes_of = vec![0u64; n];
    for c in w.changes.iter().filter(|c| in_window(w, c.t_us)) {
        changes_of[c.node] += 1;
    }
    let total: u64 = changes_of.iter().sum();
    for (x, m) in msgs.iter_mut().enumerate() {
        let mut sent = 0u64;
        for (y, c) in changes_of.iter().enumerate() {
            if *c > 0 {
                sent += c * b.tree.children[(x + n - y) % n];
            }
        }
        *m += sent + (total - changes_of[x]);
    }

    // Reach of sampled changes: arrival at every other node, breadth first.
    let mut reach = Vec::new();
    let mut arrival = vec![0u64; n];
    for (i, c) in w.changes.iter().enumerate() {
        if !w.sampled[i] {
            continue;
        }
        let key = i as u64 + 1;
        for &o in &b.tree.order[1..] {
            let p = b.tree.parent[o];
            arrival[o] = arrival[p] + b.hop_us(key, (c.node + p) % n, (c.node + o) % n);
        }
        reach.push(reach99(arrival[1..].iter().map(|a| *a as f64).collect()));
    }
    rows("broadcast", w, &results, reach, (n - 1) as f64, &msgs, 0)
}

// ---------------------------------------------------------------------------------------
// directory

#[derive(Debug)]
enum Ev {
    Start(usize),
    Change(usize),
    Lookup(usize),
    Deliver { to: usize, from: usize, msg: Msg },
    Tick(usize),
}

/// An event in the queue, ordered by time then by scheduling order.
#[derive(Debug)]
struct Scheduled {
    at_us: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at_us, self.seq) == (o.at_us, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    /// Reversed: the earliest event is the greatest (`BinaryHeap` is a max-heap).
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at_us, o.seq).cmp(&(self.at_us, self.seq))
    }
}

/// A change whose reach is being measured.
struct ReachSample {
    t_us: u64,
    seq: u64,
    trackers: Vec<usize>,
    arrived: Vec<Option<u64>>,
    left: usize,
}

struct DirSim<'a> {
    w: &'a Workload,
    dirs: Vec<Directory>,
    truth: Vec<Capacity>,
    queue: BinaryHeap<Scheduled>,
    seq: u64,
    rng: ChaCha8Rng,
    msgs: Vec<u64>,
    /// (origin, lookup) → index in `w.lookups`.
    lookup_of: HashMap<(usize, LookupId), usize>,
    results: Vec<LookupResult>,
    samples: Vec<ReachSample>,
    /// Node → indices of its samples still waiting for arrivals.
    active: HashMap<usize, Vec<usize>>,
    errors: u64,
}

impl DirSim<'_> {
    fn at(&mut self, at_us: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at_us,
            seq: self.seq,
            ev,
        });
    }

    fn count(&mut self, node: usize, t_us: u64) {
        if in_window(self.w, t_us) {
            self.msgs[node] += 1;
        }
    }

    /// Which recorded lookup a message belongs to, if any.
    fn lookup_msg(&mut self, from: usize, to: usize, msg: &Msg) {
        let key = match msg {
            Msg::Push(_) => return,
            Msg::Query { origin, lookup, .. } => match self.w.pos(origin) {
                Some(o) => (o, *lookup),
                None => return,
            },
            Msg::QueryReply { lookup, .. } | Msg::VerifyReply { lookup, .. } => (to, *lookup),
            Msg::Verify { lookup } => (from, *lookup),
        };
        if let Some(&li) = self.lookup_of.get(&key) {
            self.results[li].msgs += 1;
        }
    }

    fn apply(&mut self, now_us: u64, node: usize, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Send { to, msg } => {
                    let Some(to) = self.w.pos(&to) else {
                        self.errors += 1;
                        continue;
                    };
                    self.count(node, now_us);
                    self.lookup_msg(node, to, &msg);
                    let lat = base_us(self.w.seed, node, to) + jitter_us(self.rng.random());
                    self.at(
                        now_us + lat,
                        Ev::Deliver {
                            to,
                            from: node,
                            msg,
                        },
                    );
                }
                Output::Wake { at_ms } => {
                    self.at((at_ms * 1_000).max(now_us), Ev::Tick(node));
                }
                Output::Done(d) => {
                    let Some(&li) = self.lookup_of.get(&(node, d.id)) else {
                        continue;
                    };
                    let l = self.w.lookups[li];
                    let r = &mut self.results[li];
                    r.done = true;
                    r.latency_us = now_us - l.t_us;
                    if let Some(found) = d.found.and_then(|s| self.w.pos(&s.node)) {
                        r.found = true;
                        r.success = l.mix.constraint().matches(&self.truth[found]);
                    }
                }
            }
        }
    }

    fn handle(&mut self, now_us: u64, node: usize, input: Input) {
        match self.dirs[node].handle(now_us / 1_000, input) {
            Ok(out) => self.apply(now_us, node, out),
            Err(_) => self.errors += 1,
        }
    }

    fn on_push_arrival(&mut self, now_us: u64, from: usize, to: usize, seq: u64) {
        let Some(list) = self.active.get_mut(&from) else {
            return;
        };
        list.retain(|&si| {
            let s = &mut self.samples[si];
            if seq >= s.seq
                && let Some(k) = s.trackers.iter().position(|t| *t == to)
                && s.arrived[k].is_none()
            {
                s.arrived[k] = Some(now_us - s.t_us);
                s.left -= 1;
            }
            s.left > 0
        });
        if list.is_empty() {
            self.active.remove(&from);
        }
    }

    fn step(&mut self, e: Scheduled) {
        let now = e.at_us;
        match e.ev {
            Ev::Start(i) => {
                self.handle(now, i, Input::LocalStatus(self.truth[i]));
                self.handle(now, i, Input::Members(self.w.ring.clone()));
            }
            Ev::Change(ci) => {
                let c = self.w.changes[ci];
                self.truth[c.node] = c.capacity;
                self.handle(now, c.node, Input::LocalStatus(c.capacity));
                if self.w.sampled[ci]
                    && let Some(seq) = self.dirs[c.node].status().map(|s| s.seq)
                {
                    let trackers: Vec<usize> = self.dirs[c.node]
                        .links()
                        .iter()
                        .filter_map(|l| self.w.pos(l))
                        .collect();
                    if !trackers.is_empty() {
                        let si = self.samples.len();
                        self.samples.push(ReachSample {
                            t_us: now,
                            seq,
                            arrived: vec![None; trackers.len()],
                            left: trackers.len(),
                            trackers,
                        });
                        self.active.entry(c.node).or_default().push(si);
                    }
                }
            }
            Ev::Lookup(li) => {
                let l = self.w.lookups[li];
                match self.dirs[l.origin].lookup(now / 1_000, l.mix.constraint()) {
                    Ok((id, out)) => {
                        self.lookup_of.insert((l.origin, id), li);
                        self.apply(now, l.origin, out);
                    }
                    Err(_) => self.errors += 1,
                }
            }
            Ev::Deliver { to, from, msg } => {
                self.count(to, now);
                if let Msg::Push(s) = &msg {
                    self.on_push_arrival(now, from, to, s.seq);
                }
                let from_id = self.w.ring[from];
                self.handle(now, to, Input::Message { from: from_id, msg });
            }
            Ev::Tick(i) => self.handle(now, i, Input::Tick),
        }
    }
}

fn run_directory(w: &Workload) -> Vec<E4Row> {
    let n = w.n;
    let mut sim = DirSim {
        w,
        dirs: w.ring.iter().map(|id| Directory::new(*id)).collect(),
        truth: w.initial.clone(),
        queue: BinaryHeap::new(),
        seq: 0,
        rng: ChaCha8Rng::seed_from_u64(mix64(w.seed ^ 0xd1ec_7047)),
        msgs: vec![0; n],
        lookup_of: HashMap::new(),
        results: vec![LookupResult::default(); w.lookups.len()],
        samples: Vec::new(),
        active: HashMap::new(),
        errors: 0,
    };
    for (i, t) in w.start_us.iter().enumerate() {
        sim.at(*t, Ev::Start(i));
    }
    for (i, c) in w.changes.iter().enumerate() {
        sim.at(c.t_us, Ev::Change(i));
    }
    for (i, l) in w.lookups.iter().enumerate() {
        sim.at(l.t_us, Ev::Lookup(i));
    }
    while let Some(e) = sim.queue.pop() {
        if e.at_us > w.end_us {
            break;
        }
        sim.step(e);
    }
    let reach: Vec<f64> = sim
        .samples
        .iter()
        .filter(|s| s.left == 0)
        .map(|s| reach99(s.arrived.iter().flatten().map(|a| *a as f64).collect()))
        .collect();
    let trackers_mean = sim.dirs.iter().map(|d| d.links().len() as f64).sum::<f64>() / n as f64;
    rows(
        "directory",
        w,
        &sim.results,
        reach,
        trackers_mean,
        &sim.msgs,
        sim.errors,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn small(seed: u64) -> E4Config {
        E4Config {
            nodes: Some(vec![64]),
            lookups: Some(100),
            min_measure_ms: 5_000,
            warmup_ms: 2_000,
            reach_samples: 100,
            ..E4Config::new(seed, true)
        }
    }

    #[test]
    fn small_run_is_sane_and_deterministic() {
        let rows = run(&small(7));
        assert_eq!(rows.len(), 2 * Mix::ALL.len());
        let get = |scheme: &str, mix: Mix| {
            rows.iter()
                .find(|r| r.scheme == scheme && r.constraint == mix.name())
                .unwrap()
        };
        for r in &rows {
            assert_eq!(r.lookups, 100, "{r:?}");
            assert!(
                r.lookup_success_rate >= 0.9 * r.lookup_feasible_rate,
                "{r:?}"
            );
            assert!(r.lookup_p99_ms < 20.0, "{r:?}");
            assert!(r.status_reach_p99_ms > 0.0, "{r:?}");
            assert_eq!(r.refused_inputs, 0, "{r:?}");
        }
        for m in Mix::ALL {
            let (b, d) = (get("broadcast", m), get("directory", m));
            assert!(
                d.per_node_msgs_per_s_mean * 2.0 < b.per_node_msgs_per_s_mean,
                "directory {d:?} vs broadcast {b:?}"
            );
            assert!(d.trackers_mean < b.trackers_mean);
        }
        assert!(get("directory", Mix::Cpu4).lookup_success_rate >= 0.95);
        assert_eq!(rows, run(&small(7)), "same seed, same rows");
        assert_ne!(rows, run(&small(8)));
    }

    #[test]
    fn broadcast_tree_counts_add_up() {
        let mut ids: Vec<NodeId> = (0..100).map(NodeId::from_index).collect();
        ids.sort();
        let t = Tree::new(&ids);
        assert_eq!(t.order.len(), 100);
        assert_eq!(t.children.iter().sum::<u64>(), 99);
        assert!(t.depth <= overlay::depth(100));
    }
}
