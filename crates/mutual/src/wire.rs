//! What nodes say to each other, and how it is framed on an iroh QUIC stream.
//!
//! Every connection carries one unidirectional stream from the connecting node: a
//! [`Msg::Hello`] first (the cluster-secret proof), then any number of messages. Answers
//! travel on the other node's own connection, so every exchange is one-way and a slow or
//! dead peer never blocks a sender. Frames are a 4-byte big-endian length and a postcard
//! body; anything longer than [`MAX_FRAME_BYTES`] is refused and the connection dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use mutual_core::{JobId, NodeId, Resources};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The ALPN of the node protocol. The number is the protocol's version: it changes with
/// any change to [`Msg`] that an older node would decode wrongly or not at all (2 added
/// [`Msg::Changes`]`::sent`; 3 added [`Msg::Held`] and `reply` 3; 4 gave [`Bcast::Down`]
/// a version, dropped `Bcast::Up`, added the dead to [`Msg::Members`] and added
/// [`Msg::Judged`]). Nodes of different versions do not talk: an older node that
/// dials this one is refused with [`version_refusal`], and this node's dial to an older
/// one fails in the handshake (no common protocol), which the link logs.
pub const ALPN: &[u8] = b"mutual/node/4";
/// Earlier versions of [`ALPN`] that this node still accepts, only to refuse them with a
/// reason the older node logs (it understands the refusal's close code).
pub const OLD_ALPNS: &[&[u8]] = &[b"mutual/node/1", b"mutual/node/2", b"mutual/node/3"];

/// Why a connection of an older node-protocol version is refused.
pub fn version_refusal(theirs: &[u8]) -> String {
    format!(
        "this node speaks {}, the dialling node {}: every member must run the same mutual \
         version (upgrade the older nodes)",
        String::from_utf8_lossy(ALPN),
        String::from_utf8_lossy(theirs)
    )
}
/// Largest frame accepted.
pub const MAX_FRAME_BYTES: usize = 8 << 20;
/// Most job documents in one [`Msg::Docs`] (large answers are split).
pub const MAX_DOCS_PER_MSG: usize = 512;
/// Most bytes of documents in one [`Msg::Docs`] before it is split.
pub const DOCS_MSG_BYTES: usize = 2 << 20;
/// Most entries in one anti-entropy digest.
pub const MAX_DIGEST_JOBS: usize = 200_000;
/// Most members in one [`Msg::Members`].
pub const MAX_MEMBERS: usize = 4_096;
/// Most running jobs a node lists in its [`NodeInfo`].
pub const MAX_RUNNING_LISTED: usize = 256;

/// What a node tells everyone about itself (resources, load), disseminated on change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node (stable across restarts).
    pub id: NodeId,
    /// Its iroh endpoint id for this boot. A node takes a fresh endpoint key every time it
    /// starts: iroh 1.4 keeps per-endpoint-id path state, and dials to an endpoint id that
    /// came back at a new address hung until the process was restarted (seen here).
    pub endpoint: [u8; 32],
    /// Where it listens for peers.
    pub addrs: Vec<SocketAddr>,
    /// Its HTTP API, if it serves one.
    pub http: Option<String>,
    /// Orders updates from the same node: (boot time in ms, counter).
    pub version: (u64, u64),
    /// What it offers.
    pub capacity: Resources,
    /// Free resources now.
    pub free: Resources,
    /// Execution slots.
    pub slots: u32,
    /// Free execution slots now.
    pub free_slots: u32,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Whether it can run container jobs.
    pub containers: bool,
    /// Its GPUs.
    pub gpus: Vec<crate::gpu::Gpu>,
    /// Jobs it runs now (at most [`MAX_RUNNING_LISTED`]).
    pub running: Vec<JobId>,
    /// Its cluster's replication setting: 0 when every node holds every job document,
    /// else the `k` of `mutual_core::placement` (`--replicas`). Every member must agree.
    pub replicas: u32,
}

/// One message between nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Msg {
    /// First frame of every connection: who I am, and proof that I hold the cluster secret.
    Hello {
        /// `ticket::hello_proof(secret, from, to)`.
        proof: [u8; 32],
        /// The sender.
        info: Box<NodeInfo>,
    },
    /// The members the sender knows (on join, and when membership anti-entropy found the
    /// two views differ), and those it believes dead, each with the version of its info
    /// it was judged dead at (see [`Bcast::Down`]).
    Members {
        /// Every member's info, the sender's own included.
        list: Vec<NodeInfo>,
        /// Members believed dead, as of a version of their info.
        dead: Vec<(NodeId, (u64, u64))>,
    },
    /// The receiver is believed dead by the sender, as of this version of its info: sent
    /// when a member believed dead shows a sign of life (a probe, an answer, a hello, a
    /// record), so that it refutes the judgement if it is alive (see [`Bcast::Down`]).
    Judged((u64, u64)),
    /// Membership anti-entropy: a hash of the (member, version, believed dead as of which
    /// version) terms the sender knows.
    /// Only a receiver whose hash differs answers, with its whole list: sending every
    /// member's info every round cost each node O(N) per second, O(N²) in the cluster
    /// (9 % of an idle 200-node host's CPU in a profile, and nearly all of its bytes).
    MemberDigest {
        /// The wrapping sum of [`member_hash_term`] over the sender's view, itself included.
        hash: u64,
        /// Whether a receiver that differs should send its own digest back too, so the
        /// sender learns whether it holds something newer (one level only: no loops).
        reply: bool,
    },
    /// A broadcast on its way down the overlay's tree (`mutual_core::overlay`): the
    /// receiver handles `body` and forwards it to its fingers before `limit`.
    Tree {
        /// The receiver covers the live nodes after it and before this one.
        limit: NodeId,
        /// What is broadcast.
        body: Bcast,
    },
    /// Failure-detector probe.
    Probe,
    /// Answer to a probe.
    Ack,
    /// Anti-entropy: the sender's fingerprint of every job it holds.
    Digest {
        /// (job, fingerprint of its record set).
        jobs: Vec<(JobId, u64)>,
        /// Whether the receiver should answer with its own digest if it lacks anything.
        reply: bool,
        /// The sender is restarting and waits to catch up: send every document that
        /// differs, recently changed ones included.
        catching_up: bool,
    },
    /// New changes of one job document, sent straight to the nodes that hold it (the
    /// placed scheme, `--replicas`; under full replication they go down the broadcast
    /// tree as [`Bcast::Changes`]).
    Changes {
        /// The job.
        job: JobId,
        /// Encoded automerge changes (or a whole saved document), in order.
        changes: Vec<Vec<u8>>,
        /// The fingerprint of the sender's record set once these were in it.
        fingerprint: u64,
        /// 2: sent by the records' writer; the receiver relays them once to the holders
        /// in its view, and if its record set then differs, answers with its whole
        /// document (so the writer learns, within a round trip, any record it lacked: a
        /// concurrent claim, above all). 1: such an answer; a writer whose set still
        /// differs sends its whole document back (a holder handed the job late lacks its
        /// history). 0: neither (relays, hand-offs, that second answer). 3
        /// (`mutual_core::submit::CONFIRM_REPLY`): a submission, sent by its submitter;
        /// as 2, and the receiver answers [`Msg::Held`] once its copy is durable.
        reply: u8,
        /// With `reply` 2: the holders the writer sent these to. A holder relays only to
        /// holders of its own view not among them (`placement::relay_targets`); a list
        /// longer than [`MAX_SENT_TO`] counts as empty (relay to every holder).
        sent: Vec<NodeId>,
    },
    /// Anti-entropy: whole saved documents the receiver lacks or differs on.
    Docs {
        /// (job, saved automerge document).
        docs: Vec<(JobId, Vec<u8>)>,
        /// The sender is caught up (not restarting); a restarted node may go active.
        caught_up: bool,
    },
    /// Under placement: the sender holds `job` durably (the answer to a submission's
    /// [`Msg::Changes`] with `reply` 3). Its submitter acknowledges the job to the client
    /// on the first one (`mutual_core::submit`).
    Held {
        /// The job.
        job: JobId,
    },
}

impl Msg {
    /// Whether this message is the failure detector's (a probe, its answer, or the news
    /// that its receiver is believed dead, which it must refute quickly). These travel
    /// on a stream of their own and skip the node's event queue (`net` module doc), so a
    /// backlog of job traffic does not read as a silent node.
    pub fn is_liveness(&self) -> bool {
        matches!(self, Msg::Probe | Msg::Ack | Msg::Judged(_))
    }
}

/// What goes to every member, down the overlay's broadcast tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Bcast {
    /// A node's updated info (its own, or a new member's, announced by the member it
    /// joined through).
    Info(Box<NodeInfo>),
    /// New automerge changes of one job document, pushed as soon as they are durable.
    Changes {
        /// The job.
        job: JobId,
        /// Encoded automerge changes, in order.
        changes: Vec<Vec<u8>>,
    },
    /// Someone judged `node` dead as of this version of its info. It holds until newer
    /// info from `node` comes (its refutation: `node` bumps its version and broadcasts
    /// [`Bcast::Info`]). A version orders a judgement and a refutation however they
    /// travel, which an unversioned "up" did not: a stale one, relayed after a real death,
    /// could revive the dead member everywhere for good (E3 at 100 placed agents once left
    /// a dead holder believed alive by all but its judges, its jobs never taken over).
    Down(NodeId, (u64, u64)),
}

/// Longest `Msg::Changes::sent` list a receiver reads: the holders of a job are at most
/// `node::MAX_REPLICAS` replicas and its writers.
pub const MAX_SENT_TO: usize = 256;

/// One member's share of [`Msg::MemberDigest`]'s hash: order-free (summed), so two views
/// holding the same (member, version) pairs hash alike however they were built.
pub fn member_hash_term(id: &NodeId, version: (u64, u64)) -> u64 {
    hash_term("mutual-cloud member digest v1", id, version)
}

/// A dead belief's share of [`Msg::MemberDigest`]'s hash (added to the member's own):
/// two views that disagree only on who is alive differ, so the anti-entropy that repairs
/// missed member info repairs a missed death judgement too.
pub fn member_dead_term(id: &NodeId, dead_at: (u64, u64)) -> u64 {
    hash_term("mutual-cloud member dead v1", id, dead_at)
}

fn hash_term(context: &str, id: &NodeId, version: (u64, u64)) -> u64 {
    let mut h = blake3::Hasher::new_derive_key(context);
    h.update(&id.0);
    h.update(&version.0.to_le_bytes());
    h.update(&version.1.to_le_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// Longer than [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    /// Not a message.
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
}

/// Encodes one frame.
pub fn encode(msg: &Msg) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(msg)?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Writes pre-encoded frames.
pub async fn write_frames<W: AsyncWrite + Unpin>(w: &mut W, frames: &[u8]) -> std::io::Result<()> {
    w.write_all(frames).await
}

/// Reads one frame; `Ok(None)` at a clean end of stream. Returns the message and its
/// size on the wire.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(Msg, usize)>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(n));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await?;
    Ok(Some((postcard::from_bytes(&body)?, n + 4)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_digests_agree_on_equal_views_and_differ_on_any_newer_info() {
        let (a, b, c) = (NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32]));
        let sum = |v: &[(NodeId, (u64, u64))]| {
            v.iter().fold(0u64, |s, (id, ver)| {
                s.wrapping_add(member_hash_term(id, *ver))
            })
        };
        let view = [(a, (5, 1)), (b, (7, 0)), (c, (9, 3))];
        let reordered = [(c, (9, 3)), (a, (5, 1)), (b, (7, 0))];
        assert_eq!(sum(&view), sum(&reordered));
        // One newer counter, a new boot, or a member missing: the digests differ.
        assert_ne!(sum(&view), sum(&[(a, (5, 2)), (b, (7, 0)), (c, (9, 3))]));
        assert_ne!(sum(&view), sum(&[(a, (6, 0)), (b, (7, 0)), (c, (9, 3))]));
        assert_ne!(sum(&view), sum(&view[..2]));
        // Swapping two members' versions is not the same view either.
        assert_ne!(sum(&view), sum(&[(a, (7, 0)), (b, (5, 1)), (c, (9, 3))]));
        // Believing one member dead (as of its version, or of an older one) is not either.
        let dead_b = sum(&view).wrapping_add(member_dead_term(&b, (7, 0)));
        assert_ne!(sum(&view), dead_b);
        assert_ne!(
            dead_b,
            sum(&view).wrapping_add(member_dead_term(&b, (6, 0)))
        );
    }

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let msg = Msg::Tree {
            limit: NodeId::from_index(4),
            body: Bcast::Down(NodeId::from_index(3), (7, 1)),
        };
        let mut bytes = encode(&msg).expect("encode");
        bytes.extend(encode(&Msg::Probe).expect("encode"));
        let mut r = &bytes[..];
        assert!(
            matches!(read_frame(&mut r).await, Ok(Some((Msg::Tree { body: Bcast::Down(n, (7, 1)), .. }, _))) if n == NodeId::from_index(3))
        );
        assert!(matches!(
            read_frame(&mut r).await,
            Ok(Some((Msg::Probe, _)))
        ));
        assert!(matches!(read_frame(&mut r).await, Ok(None)));
        let huge = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..]).await,
            Err(FrameError::TooLarge(_))
        ));
        let garbage = [0, 0, 0, 2, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut &garbage[..]).await,
            Err(FrameError::Decode(_))
        ));
    }
}
