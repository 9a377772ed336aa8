//! The node's iroh transport: one outbound link task per peer, one reader task per
//! unidirectional stream a peer opens.
//!
//! **One connection per pair of nodes.** A link sends on the connection its peer dialled
//! to this node if one is up ([`Conns`]), and dials only if none is; streams go both ways
//! on it. Each direction used to dial its own connection, so two nodes that talked both
//! ways (a probe and its ack, a push and its answer) held two: twice the QUIC handshakes,
//! and about 105 KiB per connection end (`bench/results/conn-memory.json`) that no
//! transport setting lowers. Two nodes that dial each other at once keep both
//! connections; each is used until it goes idle.
//!
//! A link opens one unidirectional stream on its connection, sends the [`Msg::Hello`]
//! proof and then whatever the node queues for that peer, batching what is queued
//! together into one write. It never blocks the node: the queue is bounded and a
//! full queue drops the message (anti-entropy repairs lost pushes; probes are periodic). A
//! broken connection is re-established with backoff. If the peer closes the connection
//! with [`REFUSED`], our proof was wrong: the link reports it and stops.
//!
//! **Liveness has a lane of its own.** Probes and their answers ([`Msg::is_liveness`]) go
//! on a second stream of the same connection, and a reader hands them to the node on a
//! separate queue ([`Transport::live`]) that the node serves first. On one stream a probe
//! waited behind every job message queued before it: in the link's queue, in QUIC's flow
//! control, and in the peer's event queue (up to `node::NET_QUEUE` events), which its
//! reader fills before it reads on. A node with seconds of job traffic to work through
//! then answered probes seconds late, was judged dead by nodes with less to do, and its
//! jobs were taken over, which made the survivors' backlog longer still: at 500 hosted
//! agents, hundreds of false death judgements a minute after a kill (`docs/experiments.md`,
//! E2). Slow is not dead; a node that stops taking events stops answering. The lane never
//! dials: with no connection up, a liveness frame goes on the data queue, whose link dials.
//!
//! An inbound connection must start with a valid `Hello` from the endpoint iroh
//! authenticated; otherwise it is closed with [`REFUSED`] before anything is sent, so a
//! node with the wrong secret learns nothing.
//!
//! [`Faults`] lets an experiment cut this node off from chosen peers (`mutual node
//! --fault-injection`, then `POST /v1/debug/partition`): their connections, of every
//! protocol, are closed on arrival and their messages ignored, as if the network between
//! the two had failed. Set on both sides, that is a partition.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use iroh::endpoint::{Connection, VarInt};
use iroh::{Endpoint, EndpointAddr, PublicKey};
use mutual_core::NodeId;
use tokio::sync::mpsc;

use crate::ticket::{ClusterSecret, hello_proof, proof_matches};
use crate::wire::{self, Msg, NodeInfo};

/// Close code for a refused hello.
pub const REFUSED: u32 = 1;
/// Frames queued per peer before new ones are dropped.
pub const LINK_QUEUE_FRAMES: usize = 4_096;
/// Liveness frames (probes and answers) queued per peer before new ones are dropped: a
/// few probe periods' worth. Probes are periodic, so an old one lost costs nothing.
pub const LIVE_QUEUE_FRAMES: usize = 16;
/// Most bytes written to a peer in one batch.
pub const LINK_BATCH_BYTES: usize = 256 * 1024;
/// Capacity a link's batch buffer keeps between batches. The buffer grows to a burst's
/// size and gives the excess back once it is written, instead of holding
/// [`LINK_BATCH_BYTES`] for the connection's whole life: after one burst that much stayed
/// resident per connection, and a hosted node under placement talks to dozens of peers.
pub const LINK_BATCH_KEEP_BYTES: usize = 16 * 1024;
/// A link to a node outside the overlay (see [`Link::set_keep`]) with nothing to send for
/// this long, on a connection nothing arrived on for as long, closes the connection, and
/// dials again on the next message (unless the peer dialled meanwhile). Links to overlay
/// neighbours stay up: redialling them costs a QUIC handshake each time a burst starts,
/// which on 100 nodes sharing two cores was most of the cost of the first job.
pub const LINK_IDLE: Duration = Duration::from_secs(15);
/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an inbound connection has to present its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Backoff between reconnection attempts: first and largest.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// See [`BACKOFF_MIN`].
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Traffic counters, shared by every link and reader.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Bytes written to peers.
    pub bytes_out: AtomicU64,
    /// Bytes read from peers.
    pub bytes_in: AtomicU64,
    /// Messages queued to peers.
    pub msgs_out: AtomicU64,
    /// Messages read from peers.
    pub msgs_in: AtomicU64,
    /// Messages dropped because a peer's queue was full.
    pub dropped: AtomicU64,
    /// Liveness messages dropped (a full lane either way, or no stream to send them on).
    pub live_dropped: AtomicU64,
    /// Inbound connections refused (bad hello).
    pub refused: AtomicU64,
    /// Connections this node dialled (each a QUIC handshake: under load with many
    /// peers, redialling idle links is a large share of the CPU).
    pub dialled: AtomicU64,
    /// Connections this node dialled that are up now.
    pub dialled_open: AtomicU64,
    /// Inbound connections (of every protocol) being served now.
    pub accepted_open: AtomicU64,
}

/// Counts one open connection in a [`NetStats`] gauge for as long as it lives.
pub struct OpenConn<'a>(&'a AtomicU64);

impl<'a> OpenConn<'a> {
    /// Counts one more in `gauge`.
    pub fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        OpenConn(gauge)
    }
}

impl Drop for OpenConn<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Close code for a connection from a peer this node is partitioned from.
pub const PARTITIONED: u32 = 3;

/// Faults injected for experiments: the endpoints this node refuses to hear from. Blocks
/// are by endpoint key, which is fresh on every start: a blocked member that restarts is
/// heard again (as after a real network repair) until it is named again.
#[derive(Debug, Default)]
pub struct Faults {
    /// Whether `blocked` is non-empty: every inbound frame asks, so a node without an
    /// injected partition answers without taking the lock.
    active: AtomicBool,
    blocked: RwLock<HashSet<[u8; 32]>>,
}

impl Faults {
    /// Replaces the set of endpoints whose traffic is refused (empty heals).
    pub fn block(&self, endpoints: impl IntoIterator<Item = [u8; 32]>) {
        let mut b = self.blocked.write().unwrap_or_else(|p| p.into_inner());
        *b = endpoints.into_iter().collect();
        self.active.store(!b.is_empty(), Ordering::Relaxed);
    }

    /// Whether traffic from `endpoint` is refused.
    pub fn blocks(&self, endpoint: &[u8; 32]) -> bool {
        self.active.load(Ordering::Relaxed)
            && self
                .blocked
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(endpoint)
    }
}

/// What the transport tells the node.
#[derive(Debug)]
pub enum NetEvent {
    /// An authenticated peer said hello.
    Hello {
        /// Who.
        info: NodeInfo,
        /// Whether the hello waited behind the node's event queue (it is then no evidence
        /// that the peer is alive now: it may have died while the hello waited).
        late: bool,
    },
    /// A message from an authenticated peer.
    Msg {
        /// The sender.
        from: NodeId,
        /// The message.
        msg: Msg,
    },
    /// A peer refused our hello (wrong cluster secret).
    Refused {
        /// The peer.
        peer: NodeId,
        /// What it said.
        reason: String,
    },
}

/// The sending half of a link to one peer.
#[derive(Debug, Clone)]
pub struct Link {
    tx: mpsc::Sender<Arc<Vec<u8>>>,
    live: mpsc::Sender<Arc<Vec<u8>>>,
    keep: Arc<AtomicBool>,
}

impl Link {
    /// Whether the connection stays up while idle (the peer is an overlay neighbour).
    pub fn set_keep(&self, keep: bool) {
        self.keep.store(keep, Ordering::Relaxed);
    }

    /// Queues an encoded frame; drops it (and counts) if the queue is full.
    pub fn send(&self, frame: Arc<Vec<u8>>, stats: &NetStats) {
        queue(&self.tx, frame, stats, &stats.dropped);
    }

    /// Queues an encoded liveness frame on the liveness lane (see the module doc); drops it
    /// (and counts) if the lane is full.
    pub fn send_live(&self, frame: Arc<Vec<u8>>, stats: &NetStats) {
        queue(&self.live, frame, stats, &stats.live_dropped);
    }
}

/// Queues `frame` on `tx`, counting it sent, or dropped in `dropped` if `tx` is full.
fn queue(
    tx: &mpsc::Sender<Arc<Vec<u8>>>,
    frame: Arc<Vec<u8>>,
    stats: &NetStats,
    dropped: &AtomicU64,
) {
    if tx.try_send(frame).is_ok() {
        stats.msgs_out.fetch_add(1, Ordering::Relaxed);
    } else {
        dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// The address to dial a peer at.
pub fn endpoint_addr(key: PublicKey, addrs: &[SocketAddr]) -> EndpointAddr {
    addrs
        .iter()
        .fold(EndpointAddr::new(key), |a, s| a.with_ip_addr(*s))
}

/// A peer connection links may send on, and when a frame last arrived on it.
#[derive(Clone)]
struct Shared {
    conn: Connection,
    /// Milliseconds since [`Conns`]' epoch.
    last_in_ms: Arc<AtomicU64>,
}

/// The open connections to authenticated peers, by peer endpoint, whichever side dialled
/// them: a link sends on its peer's entry instead of dialling (see the module doc). At
/// most one entry per member; an entry leaves when its connection closes.
#[derive(Clone)]
pub struct Conns {
    map: Arc<Mutex<HashMap<[u8; 32], Shared>>>,
    epoch: Instant,
}

impl Default for Conns {
    fn default() -> Self {
        Conns {
            map: Arc::default(),
            epoch: Instant::now(),
        }
    }
}

impl Conns {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Shared>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open connection to `endpoint`, if any.
    fn get(&self, endpoint: &[u8; 32]) -> Option<Shared> {
        self.lock()
            .get(endpoint)
            .filter(|s| s.conn.close_reason().is_none())
            .cloned()
    }

    /// Offers `conn` to `endpoint` for links to use; kept unless an open one is there.
    fn offer(&self, endpoint: [u8; 32], shared: &Shared) {
        let mut map = self.lock();
        if map
            .get(&endpoint)
            .is_none_or(|s| s.conn.close_reason().is_some())
        {
            map.insert(endpoint, shared.clone());
        }
    }

    /// Forgets `conn` (closed, or closing), if it is `endpoint`'s entry.
    fn forget(&self, endpoint: &[u8; 32], conn: &Connection) {
        let mut map = self.lock();
        if map
            .get(endpoint)
            .is_some_and(|s| s.conn.stable_id() == conn.stable_id())
        {
            map.remove(endpoint);
        }
    }
}

/// Everything a link or reader needs.
#[derive(Clone)]
pub struct Transport {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// The cluster secret.
    pub secret: ClusterSecret,
    /// Where events go.
    pub events: mpsc::Sender<NetEvent>,
    /// Where liveness messages go ([`NetEvent::Msg`] of [`Msg::is_liveness`]): a short
    /// queue the node serves before [`Transport::events`]. A full one drops them.
    pub live: mpsc::Sender<NetEvent>,
    /// Counters.
    pub stats: Arc<NetStats>,
    /// Injected faults.
    pub faults: Arc<Faults>,
    /// This cluster's replication setting ([`wire::NodeInfo::replicas`]): a peer with
    /// another is refused, as one with the wrong secret is.
    pub replicas: u32,
    /// Open peer connections, for links to share.
    pub conns: Conns,
}

impl Transport {
    fn me(&self) -> [u8; 32] {
        *self.endpoint.id().as_bytes()
    }

    /// Closes `conn` if its peer is on the other side of an injected partition.
    pub fn partitioned(&self, conn: &Connection) -> bool {
        let cut = self.faults.blocks(conn.remote_id().as_bytes());
        if cut {
            conn.close(VarInt::from_u32(PARTITIONED), b"partitioned");
        }
        cut
    }

    /// Starts a link to `peer`, whose endpoint (this boot) is `endpoint` at `addrs`;
    /// `hello` is our current info.
    pub fn link(
        &self,
        peer: NodeId,
        endpoint: [u8; 32],
        addrs: Vec<SocketAddr>,
        hello: NodeInfo,
    ) -> Link {
        let (tx, rx) = mpsc::channel(LINK_QUEUE_FRAMES);
        let (live, live_rx) = mpsc::channel(LIVE_QUEUE_FRAMES);
        let keep = Arc::new(AtomicBool::new(false));
        let link = Link { tx, live, keep };
        // A peer with a malformed endpoint key, or a hello that cannot be encoded, gets a
        // link whose queues nobody reads: every frame to it is dropped and counted.
        let Ok(key) = PublicKey::from_bytes(&endpoint) else {
            return link;
        };
        let proof = hello_proof(&self.secret, &self.me(), &endpoint);
        let Ok(hello) = wire::encode(&Msg::Hello {
            proof,
            info: Box::new(hello),
        }) else {
            return link;
        };
        let hello = Arc::new(hello);
        let addr = endpoint_addr(key, &addrs);
        let t = self.clone();
        let (h, k) = (hello.clone(), link.keep.clone());
        tokio::spawn(async move { t.run_link(peer, endpoint, addr, &h, rx, k).await });
        let t = self.clone();
        let data = link.tx.clone();
        tokio::spawn(async move { t.run_live(endpoint, &hello, live_rx, data).await });
        link
    }

    /// The liveness lane of a link (see the module doc): sends on a stream of its own on
    /// the connection the data link uses, opened when first needed and again after that
    /// connection is replaced. It ends when the node drops the link.
    async fn run_live(
        self,
        endpoint: [u8; 32],
        hello: &[u8],
        mut rx: mpsc::Receiver<Arc<Vec<u8>>>,
        data: mpsc::Sender<Arc<Vec<u8>>>,
    ) {
        let mut stream: Option<(usize, iroh::endpoint::SendStream)> = None;
        let mut buf = Vec::new();
        while let Some(frame) = rx.recv().await {
            let Some(shared) = self.conns.get(&endpoint) else {
                // No connection: the data link dials one for this frame.
                stream = None;
                if data.try_send(frame).is_err() {
                    self.stats.live_dropped.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            };
            let id = shared.conn.stable_id();
            if stream.as_ref().is_none_or(|(on, _)| *on != id) {
                stream = None;
                if let Ok(mut send) = shared.conn.open_uni().await
                    && send.write_all(hello).await.is_ok()
                {
                    stream = Some((id, send));
                }
            }
            let Some((_, send)) = stream.as_mut() else {
                self.stats.live_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            buf.clear();
            buf.extend_from_slice(&frame);
            while let Ok(f) = rx.try_recv() {
                buf.extend_from_slice(&f);
            }
            if send.write_all(&buf).await.is_ok() {
                self.stats
                    .bytes_out
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
            } else {
                stream = None;
                self.stats.live_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn run_link(
        self,
        peer: NodeId,
        endpoint: [u8; 32],
        addr: EndpointAddr,
        hello: &[u8],
        mut rx: mpsc::Receiver<Arc<Vec<u8>>>,
        keep: Arc<AtomicBool>,
    ) {
        let mut backoff = BACKOFF_MIN;
        // A link holds a connection only while it has something to send: the frame that
        // woke it waits here until a connection is up.
        let mut pending: Option<Arc<Vec<u8>>> = None;
        let mut told_version = false;
        loop {
            if pending.is_none() {
                match rx.recv().await {
                    Some(f) => pending = Some(f),
                    None => return,
                }
            }
            let shared = match self.conns.get(&endpoint) {
                Some(shared) => shared,
                None => match self.dial(&addr).await {
                    Ok(shared) => {
                        backoff = BACKOFF_MIN;
                        self.conns.offer(endpoint, &shared);
                        shared
                    }
                    Err(failed) => {
                        // A peer of another protocol version fails the handshake: there
                        // is no common ALPN. Say so once; other failures are a dead or
                        // moved peer.
                        if let Some(e) = failed
                            && !told_version
                            && e.contains("protocol")
                        {
                            told_version = true;
                            tracing::warn!(
                                %peer,
                                "cannot connect: {e} (does it run another mutual version? \
                                 this node speaks {})",
                                String::from_utf8_lossy(wire::ALPN)
                            );
                        }
                        // The node dropped this link (the peer moved, or we shut down).
                        if rx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                },
            };
            let conn = &shared.conn;
            match self
                .pump(&shared, hello, &mut rx, &mut pending, &keep)
                .await
            {
                Pump::Closed => return,
                Pump::Refused(reason) => {
                    let _ = self.events.send(NetEvent::Refused { peer, reason }).await;
                    return;
                }
                Pump::Idle => {
                    self.conns.forget(&endpoint, conn);
                    conn.close(VarInt::from_u32(0), b"idle");
                }
                Pump::Broken => {
                    // Closed explicitly: its reader holds a handle, so dropping ours would
                    // not close it, and keep-alives would hold it open for good.
                    self.conns.forget(&endpoint, conn);
                    conn.close(VarInt::from_u32(0), b"broken");
                    tokio::time::sleep(BACKOFF_MIN).await;
                }
            }
        }
    }

    /// Dials the peer at `addr` and starts reading the streams it opens on the new
    /// connection, for as long as it is up. An error says why the handshake failed
    /// (`None`: it timed out).
    async fn dial(&self, addr: &EndpointAddr) -> Result<Shared, Option<String>> {
        let conn = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.endpoint.connect(addr.clone(), wire::ALPN),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(Some(e.to_string())),
            Err(_) => return Err(None),
        };
        self.stats.dialled.fetch_add(1, Ordering::Relaxed);
        let shared = Shared {
            conn,
            last_in_ms: Arc::new(AtomicU64::new(self.conns.now_ms())),
        };
        let t = self.clone();
        let s = shared.clone();
        tokio::spawn(async move {
            let stats = t.stats.clone();
            let _open = OpenConn::new(&stats.dialled_open);
            t.serve_streams(s, None).await;
        });
        Ok(shared)
    }

    async fn pump(
        &self,
        shared: &Shared,
        hello: &[u8],
        rx: &mut mpsc::Receiver<Arc<Vec<u8>>>,
        pending: &mut Option<Arc<Vec<u8>>>,
        keep: &AtomicBool,
    ) -> Pump {
        let conn = &shared.conn;
        let Ok(mut send) = conn.open_uni().await else {
            return Pump::Broken;
        };
        let mut buf = hello.to_vec();
        loop {
            if let Some(f) = pending.take() {
                buf.extend_from_slice(&f);
            }
            while buf.len() < LINK_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(f) => buf.extend_from_slice(&f),
                    Err(_) => break,
                }
            }
            if !buf.is_empty() {
                if send.write_all(&buf).await.is_err() {
                    return refused_or_broken(conn).await;
                }
                self.stats
                    .bytes_out
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                buf.clear();
                buf.shrink_to(LINK_BATCH_KEEP_BYTES);
            }
            tokio::select! {
                frame = rx.recv() => {
                    // The node dropped this link (a stand-in replaced by the member's
                    // real id, say): the connection stays for the next link to the same
                    // endpoint, or for the peer's; its idle end or the peer's death
                    // closes it.
                    let Some(frame) = frame else {
                        return Pump::Closed;
                    };
                    *pending = Some(frame);
                }
                reason = conn.closed() => {
                    return classify(reason);
                }
                _ = tokio::time::sleep(LINK_IDLE) => {
                    let quiet_ms = self
                        .conns
                        .now_ms()
                        .saturating_sub(shared.last_in_ms.load(Ordering::Relaxed));
                    if !keep.load(Ordering::Relaxed) && quiet_ms >= LINK_IDLE.as_millis() as u64 {
                        return Pump::Idle;
                    }
                }
            }
        }
    }

    /// Refuses an inbound connection of an older node-protocol version
    /// ([`wire::OLD_ALPNS`]) with the reason, which the older node logs.
    pub fn refuse_version(&self, conn: Connection) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        let why = wire::version_refusal(conn.alpn());
        tracing::warn!(peer = %conn.remote_id(), "refused a connection: {why}");
        conn.close(VarInt::from_u32(REFUSED), why.as_bytes());
    }

    /// Serves one inbound connection of the job protocol ([`wire::ALPN`]): its first
    /// stream must come within [`HELLO_TIMEOUT`]; once one said a valid hello, links
    /// here may send on the connection too.
    pub async fn serve(self, conn: Connection) {
        let shared = Shared {
            conn,
            last_in_ms: Arc::new(AtomicU64::new(self.conns.now_ms())),
        };
        self.serve_streams(shared, Some(HELLO_TIMEOUT)).await;
    }

    /// Reads every unidirectional stream the peer opens on `shared`'s connection until it
    /// closes (the first within `first_within`, if given), then forgets the connection.
    async fn serve_streams(self, shared: Shared, mut first_within: Option<Duration>) {
        let remote = *shared.conn.remote_id().as_bytes();
        loop {
            let next = match first_within.take() {
                Some(t) => match tokio::time::timeout(t, shared.conn.accept_uni()).await {
                    Ok(r) => r,
                    Err(_) => break,
                },
                None => shared.conn.accept_uni().await,
            };
            let Ok(recv) = next else { break };
            let (t, s) = (self.clone(), shared.clone());
            tokio::spawn(async move { t.serve_stream(s, recv).await });
        }
        self.conns.forget(&remote, &shared.conn);
    }

    /// Serves one stream: a valid hello first, then frames until it ends.
    async fn serve_stream(self, shared: Shared, mut recv: iroh::endpoint::RecvStream) {
        let conn = &shared.conn;
        let remote = conn.remote_id();
        let first = tokio::time::timeout(HELLO_TIMEOUT, wire::read_frame(&mut recv)).await;
        let info = match first {
            Ok(Ok(Some((Msg::Hello { proof, info }, _))))
                if &info.endpoint == remote.as_bytes()
                    && proof_matches(
                        &proof,
                        &hello_proof(&self.secret, remote.as_bytes(), &self.me()),
                    ) =>
            {
                *info
            }
            _ => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %remote, "refused a connection: wrong cluster secret or no hello");
                conn.close(VarInt::from_u32(REFUSED), b"wrong cluster secret");
                return;
            }
        };
        if info.replicas != self.replicas {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            let why = format!(
                "this cluster runs with --replicas {}, the joining node with --replicas {}: \
                 every member must use the same setting",
                self.replicas, info.replicas
            );
            tracing::warn!(peer = %remote, "refused a connection: {why}");
            conn.close(VarInt::from_u32(REFUSED), why.as_bytes());
            return;
        }
        let from = info.id;
        if self.partitioned(conn) {
            return;
        }
        // Offered before the node hears the hello: its first message back to a joining
        // node then goes on this connection instead of a second one.
        self.conns.offer(*remote.as_bytes(), &shared);
        // The hello goes to the node now if its queue has room, else just before the
        // stream's first job message: a liveness stream carries none, and its reader
        // must not wait behind the queue (the module doc). The node ignores messages
        // from a member it has not heard of, and liveness ones are repeated.
        let mut hello = match self.events.try_send(NetEvent::Hello { info, late: false }) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(NetEvent::Hello { info, .. })) => {
                Some(NetEvent::Hello { info, late: true })
            }
            Err(mpsc::error::TrySendError::Full(_)) => None,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        };
        loop {
            match wire::read_frame(&mut recv).await {
                Ok(Some(_)) if self.partitioned(conn) => return,
                Ok(Some((msg, n))) => {
                    shared
                        .last_in_ms
                        .store(self.conns.now_ms(), Ordering::Relaxed);
                    self.stats.msgs_in.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    if msg.is_liveness() {
                        // Never waits: a liveness message late is as good as lost.
                        match self.live.try_send(NetEvent::Msg { from, msg }) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                self.stats.live_dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                        }
                        continue;
                    }
                    if let Some(h) = hello.take()
                        && self.events.send(h).await.is_err()
                    {
                        return;
                    }
                    if self.events.send(NetEvent::Msg { from, msg }).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    if !matches!(e, wire::FrameError::Io(_)) {
                        tracing::warn!(peer = %from, "dropping the connection: {e}");
                        conn.close(VarInt::from_u32(2), b"bad frame");
                    }
                    return;
                }
            }
        }
    }
}

enum Pump {
    Closed,
    Idle,
    Broken,
    Refused(String),
}

async fn refused_or_broken(conn: &Connection) -> Pump {
    match tokio::time::timeout(Duration::from_millis(500), conn.closed()).await {
        Ok(reason) => classify(reason),
        Err(_) => Pump::Broken,
    }
}

fn classify(reason: iroh::endpoint::ConnectionError) -> Pump {
    match reason {
        iroh::endpoint::ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(REFUSED) =>
        {
            Pump::Refused(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => Pump::Broken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ticket::ClusterSecret;

    async fn endpoint() -> Endpoint {
        Endpoint::builder(iroh::endpoint::presets::Minimal)
            .secret_key(iroh::SecretKey::generate())
            .alpns(vec![wire::ALPN.to_vec()])
            .relay_mode(iroh::RelayMode::Disabled)
            .clear_ip_transports()
            .bind_addr("127.0.0.1:0".parse::<SocketAddr>().expect("addr"))
            .expect("bind address")
            .bind()
            .await
            .expect("bind")
    }

    fn info(id: NodeId, endpoint: &Endpoint) -> NodeInfo {
        NodeInfo {
            id,
            endpoint: *endpoint.id().as_bytes(),
            addrs: endpoint.bound_sockets(),
            http: None,
            version: (1, 1),
            capacity: Default::default(),
            free: Default::default(),
            slots: 1,
            free_slots: 1,
            labels: Default::default(),
            containers: false,
            gpus: Vec::new(),
            running: Vec::new(),
            replicas: 0,
        }
    }

    /// A transport with an event queue of `events` and a liveness queue of 16, serving
    /// the connections its endpoint accepts.
    fn transport(
        endpoint: &Endpoint,
        secret: &ClusterSecret,
        events: usize,
    ) -> (
        Transport,
        mpsc::Receiver<NetEvent>,
        mpsc::Receiver<NetEvent>,
    ) {
        let (events, events_rx) = mpsc::channel(events);
        let (live, live_rx) = mpsc::channel(16);
        let t = Transport {
            endpoint: endpoint.clone(),
            secret: *secret,
            events,
            live,
            stats: Arc::default(),
            faults: Arc::default(),
            replicas: 0,
            conns: Conns::default(),
        };
        let served = t.clone();
        tokio::spawn(async move {
            while let Some(incoming) = served.endpoint.accept().await {
                let t = served.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        t.serve(conn).await;
                    }
                });
            }
        });
        (t, events_rx, live_rx)
    }

    async fn next_live(rx: &mut mpsc::Receiver<NetEvent>) -> (NodeId, Msg) {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(NetEvent::Msg { from, msg })) => (from, msg),
            other => panic!("expected a liveness message, got {other:?}"),
        }
    }

    fn frame(msg: &Msg) -> Arc<Vec<u8>> {
        Arc::new(wire::encode(msg).expect("encode"))
    }

    /// The receiver's event queue is full and nobody reads it (a node with a backlog of
    /// job messages): a probe sent after a burst of job messages still arrives at once,
    /// on the liveness queue, and the burst is delivered in full once the node reads on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_probe_overtakes_a_backlog_of_job_messages() {
        let secret = ClusterSecret::generate();
        let (ep_a, ep_b) = (endpoint().await, endpoint().await);
        let (a, b) = (NodeId::from_index(1), NodeId::from_index(2));
        let (_ta, mut events, mut live) = transport(&ep_a, &secret, 1);
        let (tb, _events_b, _live_b) = transport(&ep_b, &secret, 16);
        let link = tb.link(
            a,
            *ep_a.id().as_bytes(),
            ep_a.bound_sockets(),
            info(b, &ep_b),
        );

        // No connection yet: the probe goes on the data link, which dials.
        link.send_live(frame(&Msg::Probe), &tb.stats);
        assert!(matches!(next_live(&mut live).await, (from, Msg::Probe) if from == b));
        match events.recv().await {
            Some(NetEvent::Hello { info, late }) => assert!(info.id == b && !late),
            other => panic!("expected the hello, got {other:?}"),
        }

        // A burst the receiver does not read: its one-slot queue fills, its reader waits.
        const BURST: u64 = 50;
        for hash in 0..BURST {
            link.send(frame(&Msg::MemberDigest { hash, reply: false }), &tb.stats);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        link.send_live(frame(&Msg::Ack), &tb.stats);
        assert!(matches!(next_live(&mut live).await, (from, Msg::Ack) if from == b));

        // Nothing of the burst was lost, and it arrives in order.
        let mut want = 0;
        while want < BURST {
            match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
                Ok(Some(NetEvent::Msg {
                    msg: Msg::MemberDigest { hash, .. },
                    ..
                })) => {
                    assert_eq!(hash, want);
                    want += 1;
                }
                Ok(Some(NetEvent::Hello { .. })) => {} // the liveness stream's, had it room
                other => panic!("expected job message {want}, got {other:?}"),
            }
        }
        assert_eq!(tb.stats.live_dropped.load(Ordering::Relaxed), 0);
    }
}
