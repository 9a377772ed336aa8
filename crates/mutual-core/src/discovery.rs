//! Discovery: finding "a node that matches a constraint right now" without telling every
//! node about every change.
//!
//! **Why not broadcast.** Broadcasting each node's status (free slots, GPUs) to everyone
//! whenever it changes makes every node receive N × (change rate) messages a second: O(N)
//! per node, 3,000+ a second at 10,000 nodes that change once every three seconds. Only a
//! node looking for capacity needs the answer, and only one answer.
//!
//! **The directory.** Each node keeps the status of its *links* only: its overlay
//! neighbours ([`crate::overlay::neighbours`]: its fingers and the nodes whose finger it is,
//! about 2·log₂ N). It pushes its own [`Status`] to its links when it changes — at most once
//! per [`PUSH_MIN_INTERVAL_MS`], later changes coalesce into the next push — and again every
//! [`REFRESH_INTERVAL_MS`] as a heartbeat; entries not refreshed within [`ENTRY_TTL_MS`]
//! expire. Per-node send and receive load is O(log N) × the change rate.
//!
//! **Lookups** ([`Directory::lookup`]) widen step by step, and stop at the first verified
//! match:
//!
//! 1. Fresh matching entries of the node's own directory (usually enough for common
//!    constraints: 2·log₂ N statuses are a good sample).
//! 2. Round 1: [`QUERY_FANOUT`] links are asked ([`Msg::Query`]); each answers with up to
//!    [`QUERY_MAX_CANDIDATES`] matches from its own directory and itself: about
//!    (2·log₂ N)² statuses in one more round trip.
//! 3. Rounds 2 and 3 (rare constraints): the query carries a time-to-live; a node that has no
//!    candidate forwards it to [`FORWARD_FANOUT`] of its links, whose answers go straight to
//!    the asker (an expanding ring along the fingers). After [`MAX_QUERY_ROUNDS`] rounds, or
//!    [`LOOKUP_TIMEOUT_MS`], the lookup reports failure.
//!
//! Statuses in directories are hints. Every candidate is *verified* ([`Msg::Verify`]): the
//! node answers with its current status and the asker checks it, so a stale entry costs a
//! retry, never a wrong answer. (The answer is still a snapshot: the claim engine stays the
//! arbiter of who runs what.) Among several matches the choice is a hash of the lookup's
//! nonce and the candidate's id, so concurrent lookups for the same constraint spread over
//! the matching nodes instead of all verifying — and then claiming — the same one.
//!
//! Lookups and their answers do talk to nodes outside the link set (the verified node, and
//! the nodes a forwarded query reaches answer the asker directly); that costs a bounded
//! number of messages per lookup. The steady load — pushes — only ever uses links.
//!
//! The directory is sans-IO, like the engine: [`Directory::handle`] takes the local time and
//! an [`Input`] and returns [`Output`]s (messages to send, when to be woken, finished
//! lookups). It never reads a clock and draws no randomness: the nonce is derived from the
//! node id and the lookup number.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::overlay;

/// Least time between two pushes of a node's status; changes in between coalesce.
pub const PUSH_MIN_INTERVAL_MS: u64 = 100;
/// A node re-pushes its status this often even when nothing changed (a heartbeat).
pub const REFRESH_INTERVAL_MS: u64 = 10_000;
/// An entry not refreshed for this long is dropped (three missed heartbeats).
pub const ENTRY_TTL_MS: u64 = 3 * REFRESH_INTERVAL_MS;
/// Most links a node pushes to (neighbours on a ring of 2⁶⁴ nodes are fewer).
pub const MAX_LINKS: usize = 128;
/// Most entries a directory holds (links, plus nodes that still push to it after a view
/// change, until they expire).
pub const MAX_DIRECTORY_ENTRIES: usize = 256;
/// Links asked in each query round.
pub const QUERY_FANOUT: usize = 8;
/// Links a node forwards a query with time-to-live left to, when it has no candidate.
pub const FORWARD_FANOUT: usize = 4;
/// Most candidates in one [`Msg::QueryReply`].
pub const QUERY_MAX_CANDIDATES: usize = 4;
/// Query rounds before a lookup gives up; round r carries time-to-live r − 1.
pub const MAX_QUERY_ROUNDS: u8 = 3;
/// Largest time-to-live a query may carry.
pub const MAX_QUERY_TTL: u8 = MAX_QUERY_ROUNDS - 1;
/// Most candidates a lookup keeps waiting to be verified.
pub const MAX_LOOKUP_CANDIDATES: usize = 32;
/// Most candidates one lookup verifies before it gives up.
pub const MAX_VERIFIES_PER_LOOKUP: usize = 8;
/// Most lookups in flight at one node.
pub const MAX_LOOKUPS_IN_FLIGHT: usize = 256;
/// Queries remembered to answer a repeat (a forwarded query reaching a node twice) once.
pub const MAX_RECENT_QUERIES: usize = 1_024;
/// A verify unanswered for this long counts as failed.
pub const VERIFY_TIMEOUT_MS: u64 = 50;
/// A query round waits this long for outstanding answers before the next one starts.
pub const ROUND_TIMEOUT_MS: u64 = 50;
/// A lookup not finished after this long reports failure.
pub const LOOKUP_TIMEOUT_MS: u64 = 1_000;

/// Labels as a bit set. The driver maps each label (`key=value`) the cluster searches on to
/// a bit; a constraint needs all of its bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LabelSet(pub u64);

impl LabelSet {
    /// True iff every label of `other` is in `self`.
    pub fn contains_all(self, other: LabelSet) -> bool {
        self.0 & other.0 == other.0
    }
}

/// What a node offers right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Capacity {
    /// Execution slots free now.
    pub free_cpu_slots: u32,
    /// Execution slots in all.
    pub total_cpu_slots: u32,
    /// GPUs free now.
    pub free_gpus: u32,
    /// GPUs in all.
    pub total_gpus: u32,
    /// The node's labels.
    pub labels: LabelSet,
}

impl Capacity {
    /// True iff nothing runs: every slot and GPU is free.
    pub fn idle(&self) -> bool {
        self.free_cpu_slots >= self.total_cpu_slots && self.free_gpus >= self.total_gpus
    }
}

/// A node's status as pushed to its links: its capacity, stamped with its id and a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Status {
    /// The node.
    pub node: NodeId,
    /// Version: larger is newer. Stamped by the node's directory as
    /// max(previous + 1, local time in ms), so it keeps growing across restarts.
    pub seq: u64,
    /// What it offers.
    pub capacity: Capacity,
}

/// What a lookup looks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Constraint {
    /// At least this many free slots.
    pub min_free_cpu_slots: u32,
    /// At least this many free GPUs.
    pub min_free_gpus: u32,
    /// Nothing running on the node.
    pub idle: bool,
    /// All of these labels.
    pub labels: LabelSet,
}

impl Constraint {
    /// True iff a node with `capacity` satisfies the constraint.
    pub fn matches(&self, capacity: &Capacity) -> bool {
        capacity.free_cpu_slots >= self.min_free_cpu_slots
            && capacity.free_gpus >= self.min_free_gpus
            && (!self.idle || capacity.idle())
            && capacity.labels.contains_all(self.labels)
    }
}

/// A lookup's number at the node that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LookupId(pub u64);

/// Messages between directories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// The sender's status (a change or a heartbeat), to a link.
    Push(Status),
    /// "Which nodes you know of match?" Answer the origin with a [`Msg::QueryReply`].
    Query {
        /// The node that started the lookup (answers go there, not to the forwarder).
        origin: NodeId,
        /// The lookup at the origin.
        lookup: LookupId,
        /// The round of the lookup (1 = the origin's links).
        round: u8,
        /// How many more times a node without candidates forwards it.
        ttl: u8,
        /// Spreads the choice among matches (the same for the whole lookup).
        nonce: u64,
        /// What is looked for.
        constraint: Constraint,
    },
    /// Candidates for a query, and how many nodes the answerer forwarded it to (their
    /// answers will come too).
    QueryReply {
        /// The lookup.
        lookup: LookupId,
        /// The round the query belonged to.
        round: u8,
        /// Nodes the query was forwarded to.
        forwarded: u8,
        /// Matching statuses, at most [`QUERY_MAX_CANDIDATES`].
        candidates: Vec<Status>,
    },
    /// "What is your status now?"
    Verify {
        /// The lookup.
        lookup: LookupId,
    },
    /// The answerer's current status (`None` before it knows its own).
    VerifyReply {
        /// The lookup.
        lookup: LookupId,
        /// The current status.
        status: Option<Status>,
    },
}

/// Something that happened to the node.
#[derive(Debug, Clone)]
pub enum Input {
    /// The live nodes (sorted by id, this one included) changed; links follow.
    Members(Arc<[NodeId]>),
    /// The node's own capacity (it may be unchanged: then nothing happens).
    LocalStatus(Capacity),
    /// A message from `from`.
    Message {
        /// The sender.
        from: NodeId,
        /// The message.
        msg: Msg,
    },
    /// A wake-up the directory asked for with [`Output::Wake`] (extra ones are harmless).
    Tick,
}

/// How a lookup ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupOutcome {
    /// The lookup.
    pub id: LookupId,
    /// The verified match, or `None` when none was found within the bounds.
    pub found: Option<Status>,
    /// Query rounds used (0: the node's own directory was enough).
    pub rounds: u8,
    /// Verifies sent.
    pub verifies: u32,
    /// Queries this node sent (forwarded ones not included).
    pub queries_sent: u32,
    /// Local time from the start to the end, in ms.
    pub elapsed_ms: u64,
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `msg` to `to`.
    Send {
        /// The receiver.
        to: NodeId,
        /// The message.
        msg: Msg,
    },
    /// Call [`Directory::handle`] with [`Input::Tick`] when the local clock reads `at_ms`.
    Wake {
        /// Local time, ms.
        at_ms: u64,
    },
    /// A lookup finished.
    Done(LookupOutcome),
}

/// Input refused: it breaks a limit or the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// [`MAX_LOOKUPS_IN_FLIGHT`] lookups are already running.
    #[error("too many lookups in flight (limit {MAX_LOOKUPS_IN_FLIGHT})")]
    TooManyLookups,
    /// A push or a verify answer carried someone else's status.
    #[error("{from} sent a status of {claimed}")]
    WrongSender {
        /// The sender.
        from: NodeId,
        /// The node the status claims to be.
        claimed: NodeId,
    },
    /// A query answer carried too many candidates.
    #[error("{got} candidates in one answer, the limit is {QUERY_MAX_CANDIDATES}")]
    TooManyCandidates {
        /// Found.
        got: usize,
    },
    /// A query carried a time-to-live beyond [`MAX_QUERY_TTL`].
    #[error("query time-to-live {got}, the limit is {MAX_QUERY_TTL}")]
    TtlTooLarge {
        /// Found.
        got: u8,
    },
    /// The member list was not sorted by id.
    #[error("member list not sorted")]
    UnsortedMembers,
}

/// Counters for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectoryStats {
    /// Push messages sent (one per link per push).
    pub pushes_sent: u64,
    /// Status changes folded into a later push by the rate limit.
    pub coalesced: u64,
    /// Queries answered.
    pub queries_answered: u64,
    /// Queries forwarded (one per receiver).
    pub queries_forwarded: u64,
    /// Pushes dropped because the directory was full.
    pub entries_dropped: u64,
    /// Lookups that found a verified match.
    pub lookups_found: u64,
    /// Lookups that gave up.
    pub lookups_failed: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    status: Status,
    received_ms: u64,
}

#[derive(Debug, Clone)]
struct Lookup {
    id: LookupId,
    nonce: u64,
    constraint: Constraint,
    started_ms: u64,
    /// Current query round (0: own directory).
    round: u8,
    round_deadline_ms: u64,
    /// Answers still expected in the current round.
    awaiting: u32,
    /// Candidates not yet verified, best first.
    candidates: VecDeque<Status>,
    /// Nodes verified (or being verified).
    tried: Vec<NodeId>,
    /// The node being verified and when to give up on it.
    verifying: Option<(NodeId, u64)>,
    /// Queries this node sent for the lookup (forwarded ones not included).
    queries_sent: u32,
}

/// One node's directory and lookups.
#[derive(Debug, Clone)]
pub struct Directory {
    me: NodeId,
    links: Vec<NodeId>,
    /// Sorted by node id.
    entries: Vec<Entry>,
    own: Option<Status>,
    pushed_seq: Option<u64>,
    last_push_ms: Option<u64>,
    lookups: Vec<Lookup>,
    next_lookup: u64,
    recent_queries: VecDeque<(NodeId, LookupId, u8)>,
    wake_armed_ms: Option<u64>,
    stats: DirectoryStats,
    out: Vec<Output>,
}

/// SplitMix64's finaliser: a cheap, well-mixed hash of a u64.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn node_key(n: &NodeId) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&n.0[..8]);
    u64::from_le_bytes(b)
}

/// How much a lookup with `nonce` prefers `node` (higher first): a rendezvous hash, so each
/// lookup orders the same matches differently.
pub fn preference(nonce: u64, node: &NodeId) -> u64 {
    mix(nonce ^ node_key(node))
}

impl Directory {
    /// An empty directory for node `me`: no links, no status yet.
    pub fn new(me: NodeId) -> Directory {
        Directory {
            me,
            links: Vec::new(),
            entries: Vec::new(),
            own: None,
            pushed_seq: None,
            last_push_ms: None,
            lookups: Vec::new(),
            next_lookup: 0,
            recent_queries: VecDeque::new(),
            wake_armed_ms: None,
            stats: DirectoryStats::default(),
            out: Vec::new(),
        }
    }

    /// This node.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// The nodes this one pushes its status to (sorted).
    pub fn links(&self) -> &[NodeId] {
        &self.links
    }

    /// This node's current status (`None` before the first [`Input::LocalStatus`]).
    pub fn status(&self) -> Option<&Status> {
        self.own.as_ref()
    }

    /// The status of `node` held here, fresh or not.
    pub fn entry(&self, node: &NodeId) -> Option<&Status> {
        self.find(node).ok().map(|i| &self.entries[i].status)
    }

    /// Number of entries held.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Lookups in flight.
    pub fn lookups_in_flight(&self) -> usize {
        self.lookups.len()
    }

    /// Counters.
    pub fn stats(&self) -> DirectoryStats {
        self.stats
    }

    fn find(&self, node: &NodeId) -> Result<usize, usize> {
        self.entries.binary_search_by(|e| e.status.node.cmp(node))
    }

    fn fresh(e: &Entry, now_ms: u64) -> bool {
        now_ms.saturating_sub(e.received_ms) <= ENTRY_TTL_MS
    }

    fn send(&mut self, to: NodeId, msg: Msg) {
        self.out.push(Output::Send { to, msg });
    }

    /// Handles one input; returns what to do, in order.
    pub fn handle(&mut self, now_ms: u64, input: Input) -> Result<Vec<Output>, DiscoveryError> {
        let r = match input {
            Input::Members(alive) => self.on_members(alive),
            Input::LocalStatus(capacity) => {
                self.on_local(now_ms, capacity);
                Ok(())
            }
            Input::Message { from, msg } => self.on_message(now_ms, from, msg),
            Input::Tick => {
                self.on_tick(now_ms);
                Ok(())
            }
        };
        self.arm_wake(now_ms);
        let out = std::mem::take(&mut self.out);
        r.map(|()| out)
    }

    /// Starts a lookup for another node matching `constraint`; its end comes as
    /// [`Output::Done`], possibly among the outputs returned here.
    pub fn lookup(
        &mut self,
        now_ms: u64,
        constraint: Constraint,
    ) -> Result<(LookupId, Vec<Output>), DiscoveryError> {
        if self.lookups.len() >= MAX_LOOKUPS_IN_FLIGHT {
            return Err(DiscoveryError::TooManyLookups);
        }
        let id = LookupId(self.next_lookup);
        self.next_lookup = self.next_lookup.wrapping_add(1);
        let nonce = mix(node_key(&self.me) ^ mix(id.0));
        let mut local: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| {
                e.status.node != self.me
                    && Self::fresh(e, now_ms)
                    && constraint.matches(&e.status.capacity)
            })
            .collect();
        local.sort_by_key(|e| std::cmp::Reverse(preference(nonce, &e.status.node)));
        let candidates = local
            .into_iter()
            .take(MAX_LOOKUP_CANDIDATES)
            .map(|e| e.status)
            .collect();
        self.lookups.push(Lookup {
            id,
            nonce,
            constraint,
            started_ms: now_ms,
            round: 0,
            round_deadline_ms: now_ms,
            awaiting: 0,
            candidates,
            tried: Vec::new(),
            verifying: None,
            queries_sent: 0,
        });
        self.advance(now_ms, id);
        self.arm_wake(now_ms);
        Ok((id, std::mem::take(&mut self.out)))
    }

    fn on_members(&mut self, alive: Arc<[NodeId]>) -> Result<(), DiscoveryError> {
        if !alive.is_sorted() {
            return Err(DiscoveryError::UnsortedMembers);
        }
        let mut links = overlay::neighbours(&alive, self.me);
        links.truncate(MAX_LINKS);
        let added: Vec<NodeId> = links
            .iter()
            .filter(|l| self.links.binary_search(l).is_err())
            .copied()
            .collect();
        self.links = links;
        self.entries
            .retain(|e| alive.binary_search(&e.status.node).is_ok());
        // A new link learns this node's status now, not at the next change or heartbeat.
        if let Some(s) = self.own {
            for to in added {
                self.stats.pushes_sent += 1;
                self.send(to, Msg::Push(s));
            }
        }
        Ok(())
    }

    fn on_local(&mut self, now_ms: u64, capacity: Capacity) {
        if self.own.is_some_and(|s| s.capacity == capacity) {
            return;
        }
        let seq = self
            .own
            .map_or(now_ms, |s| s.seq.saturating_add(1).max(now_ms));
        self.own = Some(Status {
            node: self.me,
            seq,
            capacity,
        });
        match self.last_push_ms {
            Some(last) if now_ms < last.saturating_add(PUSH_MIN_INTERVAL_MS) => {
                self.stats.coalesced += 1;
            }
            _ => self.push(now_ms),
        }
    }

    fn push(&mut self, now_ms: u64) {
        let Some(s) = self.own else { return };
        self.last_push_ms = Some(now_ms);
        self.pushed_seq = Some(s.seq);
        self.stats.pushes_sent += self.links.len() as u64;
        for i in 0..self.links.len() {
            let to = self.links[i];
            self.send(to, Msg::Push(s));
        }
    }

    fn dirty(&self) -> bool {
        self.own.map(|s| s.seq) != self.pushed_seq
    }

    fn on_tick(&mut self, now_ms: u64) {
        if self.wake_armed_ms.is_some_and(|w| w <= now_ms) {
            self.wake_armed_ms = None;
        }
        if let Some(last) = self.last_push_ms {
            if (self.dirty() && now_ms >= last.saturating_add(PUSH_MIN_INTERVAL_MS))
                || now_ms >= last.saturating_add(REFRESH_INTERVAL_MS)
            {
                self.push(now_ms);
            }
        } else if self.dirty() {
            self.push(now_ms);
        }
        self.entries.retain(|e| Self::fresh(e, now_ms));
        let due: Vec<LookupId> = self
            .lookups
            .iter()
            .filter(|l| {
                now_ms >= l.started_ms.saturating_add(LOOKUP_TIMEOUT_MS)
                    || l.verifying.is_some_and(|(_, d)| now_ms >= d)
                    || (l.awaiting > 0 && now_ms >= l.round_deadline_ms)
            })
            .map(|l| l.id)
            .collect();
        for id in due {
            let Some(l) = self.lookup_mut(id) else {
                continue;
            };
            if now_ms >= l.started_ms.saturating_add(LOOKUP_TIMEOUT_MS) {
                self.finish(now_ms, id, None);
                continue;
            }
            if l.verifying.is_some_and(|(_, d)| now_ms >= d) {
                l.verifying = None;
            }
            if l.awaiting > 0 && now_ms >= l.round_deadline_ms {
                l.awaiting = 0;
            }
            self.advance(now_ms, id);
        }
    }

    /// The earliest time something is due, if anything is.
    fn next_deadline_ms(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        let mut at = |t: u64| next = Some(next.map_or(t, |n: u64| n.min(t)));
        if let Some(last) = self.last_push_ms {
            if self.dirty() {
                at(last.saturating_add(PUSH_MIN_INTERVAL_MS));
            }
            if self.own.is_some() {
                at(last.saturating_add(REFRESH_INTERVAL_MS));
            }
        }
        for l in &self.lookups {
            at(l.started_ms.saturating_add(LOOKUP_TIMEOUT_MS));
            if let Some((_, d)) = l.verifying {
                at(d);
            }
            if l.awaiting > 0 {
                at(l.round_deadline_ms);
            }
        }
        next
    }

    /// Asks for a wake-up when the next deadline is earlier than the one already asked for.
    fn arm_wake(&mut self, now_ms: u64) {
        if self.wake_armed_ms.is_some_and(|w| w < now_ms) {
            // Its tick is late or lost: don't rely on it.
            self.wake_armed_ms = None;
        }
        let Some(next) = self.next_deadline_ms() else {
            return;
        };
        let next = next.max(now_ms);
        if self.wake_armed_ms.is_none_or(|w| next < w) {
            self.wake_armed_ms = Some(next);
            self.out.push(Output::Wake { at_ms: next });
        }
    }

    fn on_message(&mut self, now_ms: u64, from: NodeId, msg: Msg) -> Result<(), DiscoveryError> {
        match msg {
            Msg::Push(status) => {
                if status.node != from {
                    return Err(DiscoveryError::WrongSender {
                        from,
                        claimed: status.node,
                    });
                }
                self.store(now_ms, status);
            }
            Msg::Query {
                origin,
                lookup,
                round,
                ttl,
                nonce,
                constraint,
            } => {
                if ttl > MAX_QUERY_TTL {
                    return Err(DiscoveryError::TtlTooLarge { got: ttl });
                }
                self.on_query(now_ms, from, origin, lookup, round, ttl, nonce, constraint);
            }
            Msg::QueryReply {
                lookup,
                round,
                forwarded,
                candidates,
            } => {
                if candidates.len() > QUERY_MAX_CANDIDATES {
                    return Err(DiscoveryError::TooManyCandidates {
                        got: candidates.len(),
                    });
                }
                let me = self.me;
                if let Some(l) = self.lookup_mut(lookup) {
                    if round == l.round && l.awaiting > 0 {
                        l.awaiting = l.awaiting - 1 + u32::from(forwarded);
                    }
                    for c in candidates {
                        if l.candidates.len() >= MAX_LOOKUP_CANDIDATES {
                            break;
                        }
                        if c.node != me
                            && l.constraint.matches(&c.capacity)
                            && !l.tried.contains(&c.node)
                            && !l.candidates.iter().any(|x| x.node == c.node)
                        {
                            l.candidates.push_back(c);
                        }
                    }
                    self.advance(now_ms, lookup);
                }
            }
            Msg::Verify { lookup } => {
                let status = self.own;
                self.send(from, Msg::VerifyReply { lookup, status });
            }
            Msg::VerifyReply { lookup, status } => {
                if let Some(s) = status {
                    if s.node != from {
                        return Err(DiscoveryError::WrongSender {
                            from,
                            claimed: s.node,
                        });
                    }
                    // A fresher status than the pushed one; keep it if we track the node.
                    if let Ok(i) = self.find(&from)
                        && self.entries[i].status.seq <= s.seq
                    {
                        self.entries[i].status = s;
                    }
                }
                if let Some(l) = self.lookup_mut(lookup) {
                    if l.verifying.is_some_and(|(n, _)| n == from) {
                        l.verifying = None;
                    }
                    // A late answer to a verify that timed out still counts if it matches.
                    match status {
                        Some(s) if l.tried.contains(&from) && l.constraint.matches(&s.capacity) => {
                            self.finish(now_ms, lookup, Some(s));
                        }
                        _ => self.advance(now_ms, lookup),
                    }
                }
            }
        }
        Ok(())
    }

    fn store(&mut self, now_ms: u64, status: Status) {
        match self.find(&status.node) {
            Ok(i) => {
                let e = &mut self.entries[i];
                if status.seq >= e.status.seq {
                    e.status = status;
                    e.received_ms = now_ms;
                }
            }
            Err(i) => {
                if self.entries.len() >= MAX_DIRECTORY_ENTRIES {
                    self.stats.entries_dropped += 1;
                    return;
                }
                self.entries.insert(
                    i,
                    Entry {
                        status,
                        received_ms: now_ms,
                    },
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_query(
        &mut self,
        now_ms: u64,
        from: NodeId,
        origin: NodeId,
        lookup: LookupId,
        round: u8,
        ttl: u8,
        nonce: u64,
        constraint: Constraint,
    ) {
        self.stats.queries_answered += 1;
        let key = (origin, lookup, round);
        let repeat = self.recent_queries.contains(&key);
        let mut candidates = Vec::new();
        let mut forwarded = 0u8;
        if !repeat {
            if self.recent_queries.len() >= MAX_RECENT_QUERIES {
                self.recent_queries.pop_front();
            }
            self.recent_queries.push_back(key);
            if let Some(s) = self.own
                && self.me != origin
                && constraint.matches(&s.capacity)
            {
                candidates.push(s);
            }
            let mut matches: Vec<&Entry> = self
                .entries
                .iter()
                .filter(|e| {
                    e.status.node != origin
                        && e.status.node != self.me
                        && Self::fresh(e, now_ms)
                        && constraint.matches(&e.status.capacity)
                })
                .collect();
            matches.sort_by_key(|e| std::cmp::Reverse(preference(nonce, &e.status.node)));
            candidates.extend(
                matches
                    .into_iter()
                    .take(QUERY_MAX_CANDIDATES.saturating_sub(candidates.len()))
                    .map(|e| e.status),
            );
            if candidates.is_empty() && ttl > 0 {
                let salt = mix(nonce ^ node_key(&self.me));
                let mut next: Vec<NodeId> = self
                    .links
                    .iter()
                    .filter(|l| **l != origin && **l != from)
                    .copied()
                    .collect();
                next.sort_by_key(|l| std::cmp::Reverse(preference(salt, l)));
                next.truncate(FORWARD_FANOUT);
                for to in next {
                    forwarded += 1;
                    self.stats.queries_forwarded += 1;
                    self.send(
                        to,
                        Msg::Query {
                            origin,
                            lookup,
                            round,
                            ttl: ttl - 1,
                            nonce,
                            constraint,
                        },
                    );
                }
            }
        }
        self.send(
            origin,
            Msg::QueryReply {
                lookup,
                round,
                forwarded,
                candidates,
            },
        );
    }

    fn lookup_mut(&mut self, id: LookupId) -> Option<&mut Lookup> {
        self.lookups.iter_mut().find(|l| l.id == id)
    }

    /// Moves a lookup on: verify the next candidate, or wait for answers, or start the next
    /// query round, or give up.
    fn advance(&mut self, now_ms: u64, id: LookupId) {
        let me = self.me;
        let Some(l) = self.lookups.iter_mut().find(|l| l.id == id) else {
            return;
        };
        if l.verifying.is_some() {
            return;
        }
        if l.tried.len() >= MAX_VERIFIES_PER_LOOKUP {
            self.finish(now_ms, id, None);
            return;
        }
        if let Some(c) = l.candidates.pop_front() {
            l.tried.push(c.node);
            l.verifying = Some((c.node, now_ms.saturating_add(VERIFY_TIMEOUT_MS)));
            self.send(c.node, Msg::Verify { lookup: id });
            return;
        }
        if l.awaiting > 0 && now_ms < l.round_deadline_ms {
            return;
        }
        if l.round >= MAX_QUERY_ROUNDS || self.links.is_empty() {
            self.finish(now_ms, id, None);
            return;
        }
        l.round += 1;
        l.round_deadline_ms = now_ms.saturating_add(ROUND_TIMEOUT_MS);
        // Links in this lookup's order; round r asks the r-th group of QUERY_FANOUT of them
        // (wrapping), so later rounds start from links not asked yet.
        let mut order: Vec<NodeId> = self.links.iter().filter(|x| **x != me).copied().collect();
        order.sort_by_key(|x| std::cmp::Reverse(preference(l.nonce, x)));
        let n = order.len();
        let take = QUERY_FANOUT.min(n);
        let start = (usize::from(l.round) - 1).saturating_mul(QUERY_FANOUT) % n.max(1);
        let targets: Vec<NodeId> = (0..take).map(|k| order[(start + k) % n]).collect();
        let (round, nonce, constraint) = (l.round, l.nonce, l.constraint);
        l.awaiting = take as u32;
        l.queries_sent += take as u32;
        for to in targets {
            self.send(
                to,
                Msg::Query {
                    origin: me,
                    lookup: id,
                    round,
                    ttl: round - 1,
                    nonce,
                    constraint,
                },
            );
        }
    }

    fn finish(&mut self, now_ms: u64, id: LookupId, found: Option<Status>) {
        let Some(i) = self.lookups.iter().position(|l| l.id == id) else {
            return;
        };
        let l = self.lookups.swap_remove(i);
        if found.is_some() {
            self.stats.lookups_found += 1;
        } else {
            self.stats.lookups_failed += 1;
        }
        self.out.push(Output::Done(LookupOutcome {
            id,
            found,
            rounds: l.round,
            verifies: l.tried.len() as u32,
            queries_sent: l.queries_sent,
            elapsed_ms: now_ms.saturating_sub(l.started_ms),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BinaryHeap};

    fn ring(n: u64) -> Arc<[NodeId]> {
        let mut v: Vec<NodeId> = (0..n).map(NodeId::from_index).collect();
        v.sort();
        v.into()
    }

    fn cap(free: u32, gpus: u32) -> Capacity {
        Capacity {
            free_cpu_slots: free,
            total_cpu_slots: 8,
            free_gpus: gpus,
            total_gpus: gpus,
            labels: LabelSet(0),
        }
    }

    fn sends(out: &[Output]) -> Vec<(NodeId, Msg)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { to, msg } => Some((*to, msg.clone())),
                _ => None,
            })
            .collect()
    }

    fn done(out: &[Output]) -> Option<LookupOutcome> {
        out.iter().find_map(|o| match o {
            Output::Done(d) => Some(d.clone()),
            _ => None,
        })
    }

    #[test]
    fn constraint_matching() {
        let mut c = cap(8, 2);
        let gpu_idle = Constraint {
            min_free_gpus: 1,
            idle: true,
            ..Constraint::default()
        };
        assert!(gpu_idle.matches(&c));
        c.free_cpu_slots = 7;
        assert!(!gpu_idle.matches(&c), "a running job: not idle");
        let labelled = Constraint {
            labels: LabelSet(0b101),
            ..Constraint::default()
        };
        c.labels = LabelSet(0b111);
        assert!(labelled.matches(&c));
        c.labels = LabelSet(0b011);
        assert!(!labelled.matches(&c));
    }

    #[test]
    fn pushes_to_links_coalesces_and_heartbeats() {
        let r = ring(40);
        let me = r[3];
        let mut d = Directory::new(me);
        d.handle(0, Input::Members(r.clone())).unwrap();
        assert_eq!(d.links(), overlay::neighbours(&r, me).as_slice());
        let out = d.handle(1_000, Input::LocalStatus(cap(4, 0))).unwrap();
        let s = sends(&out);
        assert_eq!(s.len(), d.links().len());
        assert!(
            s.iter()
                .all(|(_, m)| matches!(m, Msg::Push(st) if st.seq == 1_000))
        );
        // Unchanged: nothing. Changed within the interval: coalesced, and a wake-up asked.
        assert!(sends(&d.handle(1_010, Input::LocalStatus(cap(4, 0))).unwrap()).is_empty());
        let out = d.handle(1_020, Input::LocalStatus(cap(3, 0))).unwrap();
        assert!(sends(&out).is_empty());
        assert!(out.contains(&Output::Wake {
            at_ms: 1_000 + PUSH_MIN_INTERVAL_MS
        }));
        let out = d.handle(1_020, Input::LocalStatus(cap(2, 0))).unwrap();
        assert!(out.is_empty(), "the wake-up already asked for is enough");
        assert_eq!(d.stats().coalesced, 2);
        let out = d.handle(1_000 + PUSH_MIN_INTERVAL_MS, Input::Tick).unwrap();
        let s = sends(&out);
        assert_eq!(s.len(), d.links().len());
        assert!(s.iter().all(
            |(_, m)| matches!(m, Msg::Push(st) if st.capacity == cap(2, 0) && st.seq == 1_021)
        ));
        assert!(out.contains(&Output::Wake {
            at_ms: 1_100 + REFRESH_INTERVAL_MS
        }));
        // Nothing due before the heartbeat; then the same status again.
        assert!(sends(&d.handle(5_000, Input::Tick).unwrap()).is_empty());
        let s = sends(&d.handle(1_100 + REFRESH_INTERVAL_MS, Input::Tick).unwrap());
        assert_eq!(s.len(), d.links().len());
        assert!(
            s.iter()
                .all(|(_, m)| matches!(m, Msg::Push(st) if st.seq == 1_021))
        );
    }

    #[test]
    fn new_links_get_the_status_at_once_and_gone_members_are_dropped() {
        let r = ring(40);
        let me = r[0];
        let mut d = Directory::new(me);
        d.handle(5, Input::LocalStatus(cap(1, 0))).unwrap();
        let out = d.handle(6, Input::Members(r.clone())).unwrap();
        assert_eq!(sends(&out).len(), d.links().len());
        let other = d.links()[0];
        let st = Status {
            node: other,
            seq: 1,
            capacity: cap(2, 0),
        };
        d.handle(
            7,
            Input::Message {
                from: other,
                msg: Msg::Push(st),
            },
        )
        .unwrap();
        assert_eq!(d.entry(&other), Some(&st));
        // An older version is ignored; a push naming someone else is refused.
        d.handle(
            8,
            Input::Message {
                from: other,
                msg: Msg::Push(Status { seq: 0, ..st }),
            },
        )
        .unwrap();
        assert_eq!(d.entry(&other).map(|s| s.seq), Some(1));
        assert_eq!(
            d.handle(
                8,
                Input::Message {
                    from: r[5],
                    msg: Msg::Push(st),
                }
            ),
            Err(DiscoveryError::WrongSender {
                from: r[5],
                claimed: other
            })
        );
        let without: Vec<NodeId> = r.iter().copied().filter(|x| *x != other).collect();
        d.handle(9, Input::Members(without.into())).unwrap();
        assert_eq!(d.entry(&other), None);
        let mut unsorted: Vec<NodeId> = r.to_vec();
        unsorted.reverse();
        assert_eq!(
            d.handle(9, Input::Members(unsorted.into())),
            Err(DiscoveryError::UnsortedMembers)
        );
    }

    #[test]
    fn entries_expire() {
        let r = ring(4);
        let mut d = Directory::new(r[0]);
        let st = Status {
            node: r[1],
            seq: 1,
            capacity: cap(2, 0),
        };
        d.handle(
            0,
            Input::Message {
                from: r[1],
                msg: Msg::Push(st),
            },
        )
        .unwrap();
        d.handle(ENTRY_TTL_MS, Input::Tick).unwrap();
        assert_eq!(d.entry_count(), 1);
        d.handle(ENTRY_TTL_MS + 1, Input::Tick).unwrap();
        assert_eq!(d.entry_count(), 0);
    }

    #[test]
    fn lookup_from_own_directory_verifies_and_retries() {
        let r = ring(40);
        let me = r[0];
        let mut d = Directory::new(me);
        d.handle(0, Input::Members(r.clone())).unwrap();
        let links = d.links().to_vec();
        for (k, l) in links.iter().enumerate() {
            let free = if k < 2 { 8 } else { 0 };
            d.handle(
                0,
                Input::Message {
                    from: *l,
                    msg: Msg::Push(Status {
                        node: *l,
                        seq: 1,
                        capacity: cap(free, 0),
                    }),
                },
            )
            .unwrap();
        }
        let want = Constraint {
            min_free_cpu_slots: 4,
            ..Constraint::default()
        };
        let (id, out) = d.lookup(10, want).unwrap();
        let s = sends(&out);
        assert_eq!(s.len(), 1);
        let (first, Msg::Verify { lookup }) = s[0].clone() else {
            panic!("expected a verify, got {s:?}");
        };
        assert_eq!(lookup, id);
        assert!(links[..2].contains(&first));
        // It changed meanwhile: the other candidate is tried.
        let out = d
            .handle(
                11,
                Input::Message {
                    from: first,
                    msg: Msg::VerifyReply {
                        lookup: id,
                        status: Some(Status {
                            node: first,
                            seq: 2,
                            capacity: cap(0, 0),
                        }),
                    },
                },
            )
            .unwrap();
        assert_eq!(
            d.entry(&first).map(|s| s.seq),
            Some(2),
            "the answer refreshes the entry"
        );
        let s = sends(&out);
        let (second, Msg::Verify { .. }) = s[0].clone() else {
            panic!("expected a verify, got {s:?}");
        };
        assert!(links[..2].contains(&second) && second != first);
        let good = Status {
            node: second,
            seq: 2,
            capacity: cap(6, 0),
        };
        let out = d
            .handle(
                12,
                Input::Message {
                    from: second,
                    msg: Msg::VerifyReply {
                        lookup: id,
                        status: Some(good),
                    },
                },
            )
            .unwrap();
        let outcome = done(&out).unwrap();
        assert_eq!(outcome.found, Some(good));
        assert_eq!(
            (outcome.rounds, outcome.verifies, outcome.elapsed_ms),
            (0, 2, 2)
        );
        assert_eq!(d.lookups_in_flight(), 0);
    }

    #[test]
    fn different_lookups_spread_over_matches() {
        let r = ring(40);
        let mut d = Directory::new(r[0]);
        d.handle(0, Input::Members(r.clone())).unwrap();
        for l in d.links().to_vec() {
            d.handle(
                0,
                Input::Message {
                    from: l,
                    msg: Msg::Push(Status {
                        node: l,
                        seq: 1,
                        capacity: cap(8, 0),
                    }),
                },
            )
            .unwrap();
        }
        let mut first = BTreeMap::new();
        for _ in 0..40 {
            let (_, out) = d.lookup(1, Constraint::default()).unwrap();
            let (to, _) = sends(&out)[0].clone();
            *first.entry(to).or_insert(0) += 1;
        }
        assert!(
            first.len() >= 5,
            "40 lookups verified only {} nodes",
            first.len()
        );
    }

    #[test]
    fn refuses_bad_input() {
        let r = ring(40);
        let mut d = Directory::new(r[0]);
        let reply = Msg::QueryReply {
            lookup: LookupId(0),
            round: 1,
            forwarded: 0,
            candidates: vec![
                Status {
                    node: r[1],
                    seq: 0,
                    capacity: cap(1, 0)
                };
                QUERY_MAX_CANDIDATES + 1
            ],
        };
        assert_eq!(
            d.handle(
                0,
                Input::Message {
                    from: r[1],
                    msg: reply
                }
            ),
            Err(DiscoveryError::TooManyCandidates {
                got: QUERY_MAX_CANDIDATES + 1
            })
        );
        let q = Msg::Query {
            origin: r[1],
            lookup: LookupId(0),
            round: 1,
            ttl: MAX_QUERY_TTL + 1,
            nonce: 0,
            constraint: Constraint::default(),
        };
        assert_eq!(
            d.handle(0, Input::Message { from: r[1], msg: q }),
            Err(DiscoveryError::TtlTooLarge {
                got: MAX_QUERY_TTL + 1
            })
        );
        d.handle(0, Input::Members(r)).unwrap();
        for _ in 0..MAX_LOOKUPS_IN_FLIGHT {
            d.lookup(0, Constraint::default()).unwrap();
        }
        assert_eq!(
            d.lookup(0, Constraint::default()).map(|_| ()),
            Err(DiscoveryError::TooManyLookups)
        );
    }

    #[test]
    fn gives_up_after_the_rounds_and_the_timeout() {
        let r = ring(40);
        let mut d = Directory::new(r[0]);
        d.handle(0, Input::Members(r.clone())).unwrap();
        let (_, out) = d.lookup(0, Constraint::default()).unwrap();
        let queries = sends(&out);
        assert_eq!(queries.len(), QUERY_FANOUT);
        assert!(queries.iter().all(|(_, m)| matches!(
            m,
            Msg::Query {
                round: 1,
                ttl: 0,
                ..
            }
        )));
        // Nobody answers: each round times out and the next one asks other links.
        let out = d.handle(ROUND_TIMEOUT_MS, Input::Tick).unwrap();
        let second = sends(&out);
        assert_eq!(second.len(), QUERY_FANOUT);
        assert!(second.iter().all(|(_, m)| matches!(
            m,
            Msg::Query {
                round: 2,
                ttl: 1,
                ..
            }
        )));
        // Links not asked in round 1 come first: two rounds ask every link, or as many
        // distinct ones as they can.
        let links = d.links().len();
        assert!(links > QUERY_FANOUT, "{links} links");
        let unasked = d
            .links()
            .iter()
            .filter(|l| !queries.iter().any(|(q, _)| q == *l))
            .count();
        assert_eq!(unasked, links - QUERY_FANOUT);
        let asked = d
            .links()
            .iter()
            .filter(|l| queries.iter().chain(second.iter()).any(|(q, _)| q == *l))
            .count();
        assert_eq!(asked, links.min(2 * QUERY_FANOUT));
        let out = d.handle(2 * ROUND_TIMEOUT_MS, Input::Tick).unwrap();
        assert_eq!(sends(&out).len(), QUERY_FANOUT);
        let out = d.handle(3 * ROUND_TIMEOUT_MS, Input::Tick).unwrap();
        let outcome = done(&out).unwrap();
        assert_eq!(outcome.found, None);
        assert_eq!(outcome.rounds, MAX_QUERY_ROUNDS);
        assert_eq!(outcome.queries_sent, 3 * QUERY_FANOUT as u32);
        // With answers that keep coming but never match, the lookup timeout ends it.
        let mut d = Directory::new(r[0]);
        d.handle(0, Input::Members(r.clone())).unwrap();
        let (id, _) = d.lookup(0, Constraint::default()).unwrap();
        let out = d.handle(LOOKUP_TIMEOUT_MS, Input::Tick).unwrap();
        assert_eq!(done(&out).map(|o| o.id), Some(id));
    }

    #[test]
    fn answers_queries_and_forwards_when_empty_handed() {
        let r = ring(40);
        let me = r[0];
        let origin = r[20];
        let mut d = Directory::new(me);
        d.handle(0, Input::Members(r.clone())).unwrap();
        d.handle(0, Input::LocalStatus(cap(8, 1))).unwrap();
        let q = |ttl, constraint| Msg::Query {
            origin,
            lookup: LookupId(7),
            round: 1 + ttl,
            ttl,
            nonce: 99,
            constraint,
        };
        // It matches itself: answers with its own status, forwards nothing.
        let out = d
            .handle(
                1,
                Input::Message {
                    from: origin,
                    msg: q(1, Constraint::default()),
                },
            )
            .unwrap();
        let s = sends(&out);
        assert_eq!(s.len(), 1);
        assert!(
            matches!(&s[0], (to, Msg::QueryReply { forwarded: 0, candidates, .. }) if *to == origin && candidates.len() == 1 && candidates[0].node == me)
        );
        // Nothing matches: forwards to FORWARD_FANOUT links (never back), who answer the
        // origin directly.
        let gpu2 = Constraint {
            min_free_gpus: 2,
            ..Constraint::default()
        };
        let from = d.links()[0];
        let out = d
            .handle(
                2,
                Input::Message {
                    from,
                    msg: q(2, gpu2),
                },
            )
            .unwrap();
        let s = sends(&out);
        let fwd: Vec<&NodeId> = s
            .iter()
            .filter(|(_, m)| matches!(m, Msg::Query { ttl: 1, origin: o, .. } if *o == origin))
            .map(|(to, _)| to)
            .collect();
        assert_eq!(fwd.len(), FORWARD_FANOUT);
        assert!(fwd.iter().all(|t| **t != from && **t != origin));
        assert!(s.iter().any(|(to, m)| *to == origin
            && matches!(m, Msg::QueryReply { forwarded, candidates, .. } if usize::from(*forwarded) == FORWARD_FANOUT && candidates.is_empty())));
        // The same query again (reached by another path): an empty answer, no forwarding.
        let out = d
            .handle(
                3,
                Input::Message {
                    from: d.links()[1],
                    msg: q(2, gpu2),
                },
            )
            .unwrap();
        assert_eq!(sends(&out).len(), 1);
    }

    /// A little network: every directory, messages delivered after `LATENCY_MS`.
    struct Net {
        dirs: BTreeMap<NodeId, Directory>,
        /// (time, sequence number, receiver); the payload is in `pending`.
        queue: BinaryHeap<std::cmp::Reverse<(u64, u64, NodeId)>>,
        /// By sequence number: the sender and message, or `None` for a wake-up.
        pending: BTreeMap<u64, Option<(NodeId, Msg)>>,
        seq: u64,
        done: Vec<(NodeId, LookupOutcome)>,
        messages: u64,
    }

    impl Net {
        const LATENCY_MS: u64 = 1;

        fn new(r: &Arc<[NodeId]>, capacity: impl Fn(usize) -> Capacity) -> Net {
            let mut net = Net {
                dirs: BTreeMap::new(),
                queue: BinaryHeap::new(),
                pending: BTreeMap::new(),
                seq: 0,
                done: Vec::new(),
                messages: 0,
            };
            for (k, n) in r.iter().enumerate() {
                let mut d = Directory::new(*n);
                let mut out = d.handle(0, Input::LocalStatus(capacity(k))).unwrap();
                out.extend(d.handle(0, Input::Members(r.clone())).unwrap());
                net.dirs.insert(*n, d);
                net.apply(0, *n, out);
            }
            net
        }

        fn apply(&mut self, now: u64, at: NodeId, out: Vec<Output>) {
            for o in out {
                self.seq += 1;
                match o {
                    Output::Send { to, msg } => {
                        self.messages += 1;
                        self.pending.insert(self.seq, Some((at, msg)));
                        self.queue
                            .push(std::cmp::Reverse((now + Self::LATENCY_MS, self.seq, to)));
                    }
                    Output::Wake { at_ms } => {
                        self.pending.insert(self.seq, None);
                        self.queue.push(std::cmp::Reverse((at_ms, self.seq, at)));
                    }
                    Output::Done(d) => self.done.push((at, d)),
                }
            }
        }

        fn run_until(&mut self, end: u64) {
            while let Some(std::cmp::Reverse((t, _, _))) = self.queue.peek() {
                if *t > end {
                    break;
                }
                let std::cmp::Reverse((t, seq, to)) = self.queue.pop().unwrap();
                let input = match self.pending.remove(&seq).unwrap() {
                    Some((from, msg)) => Input::Message { from, msg },
                    None => Input::Tick,
                };
                let out = self.dirs.get_mut(&to).unwrap().handle(t, input).unwrap();
                self.apply(t, to, out);
            }
        }

        fn lookup(&mut self, now: u64, at: NodeId, c: Constraint) -> LookupId {
            let (id, out) = self.dirs.get_mut(&at).unwrap().lookup(now, c).unwrap();
            self.apply(now, at, out);
            id
        }
    }

    #[test]
    fn finds_rare_nodes_across_the_overlay() {
        let n = 256u64;
        let r = ring(n);
        // Two labelled nodes, far apart on the ring; everyone else busy.
        let labelled = [r[10], r[200]];
        let mut net = Net::new(&r, |k| {
            let mut c = cap(1, 0);
            if labelled.contains(&r[k]) {
                c.labels = LabelSet(1);
            }
            c
        });
        net.run_until(10);
        let want = Constraint {
            labels: LabelSet(1),
            ..Constraint::default()
        };
        let mut rounds = Vec::new();
        for k in (0..n as usize).step_by(7) {
            let origin = r[k];
            if labelled.contains(&origin) {
                continue;
            }
            let start = net.messages;
            let id = net.lookup(100, origin, want);
            net.run_until(100 + LOOKUP_TIMEOUT_MS);
            let (_, o) = net
                .done
                .iter()
                .find(|(at, o)| *at == origin && o.id == id)
                .unwrap();
            let found = o.found.unwrap();
            assert!(labelled.contains(&found.node), "found {found:?}");
            // Bounded cost: at most the three rounds' queries and answers and the verifies.
            assert!(
                net.messages - start < 600,
                "{} messages",
                net.messages - start
            );
            rounds.push(o.rounds);
        }
        assert!(
            rounds.iter().any(|r| *r >= 2),
            "some lookups needed forwarding"
        );
        // Nothing matches: every lookup gives up within the bounds.
        let nothing = Constraint {
            labels: LabelSet(2),
            ..Constraint::default()
        };
        let id = net.lookup(5_000, r[3], nothing);
        net.run_until(5_000 + LOOKUP_TIMEOUT_MS + 1);
        let (_, o) = net
            .done
            .iter()
            .find(|(at, o)| *at == r[3] && o.id == id)
            .unwrap();
        assert_eq!(o.found, None);
        assert!(o.elapsed_ms <= LOOKUP_TIMEOUT_MS);
    }
}
