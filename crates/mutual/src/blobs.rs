//! The data plane: this node's iroh-blobs store and the transfers between nodes.
//!
//! Every node keeps a persistent [`FsStore`] in `<data>/blobs`. Blobs are encrypted
//! archives (see [`crate::seal`]) addressed by the BLAKE3 hash of their encrypted bytes,
//! so nodes store and move them without being able to read them and any corruption or
//! tampering is caught by iroh-blobs' verified streaming before a byte is used.
//!
//! Two protocols run on the node's iroh endpoint beside the job protocol, and both serve
//! only endpoints that are members of this cluster (they are known only after a hello
//! proved the cluster secret):
//!
//! - iroh-blobs' own (`iroh_blobs::ALPN`): a node fetches a blob from any node that has it.
//! - [`COPY_ALPN`]: "fetch this blob, and say when you have all of it". A node that must
//!   not be the only holder of a blob (an upload before the submit returns; outputs, logs
//!   and checkpoints before they are recorded) asks peers to copy it, and counts a copy
//!   only once the peer has confirmed it holds the complete, verified blob.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use iroh::endpoint::{Connection, VarInt};
use iroh::protocol::ProtocolHandler;
use iroh::{Endpoint, EndpointAddr, PublicKey};
use iroh_blobs::api::proto::BlobStatus;
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::{BlobsProtocol, Hash};
use mutual_core::NodeId;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

/// ALPN of the copy-request protocol.
pub const COPY_ALPN: &[u8] = b"mutual/copy/1";
/// How long dialling a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A fetch that makes no progress for this long is abandoned (the next holder is tried).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(600);
/// Most peers asked, in turn, for one copy or one fetch.
pub const MAX_TRIES: usize = 8;
/// Most copy requests a node serves at once; more wait.
pub const MAX_COPIES_SERVED: usize = 4;
/// Largest copy request or reply on the wire.
pub const MAX_COPY_MSG_BYTES: usize = 4096;
/// Close code for a connection from an endpoint that is not a member.
pub const NOT_A_MEMBER: u32 = 3;

/// A data-plane failure.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The content id is not a BLAKE3 hash.
    #[error("{0:?} is not a content id (64 hex digits)")]
    BadCid(String),
    /// No node could provide the blob.
    #[error("no node could provide blob {cid}: {tried}")]
    Unavailable {
        /// The blob.
        cid: String,
        /// Who was tried and what each said.
        tried: String,
    },
    /// Whoever consumed a streamed blob stopped reading.
    #[error("the reader stopped")]
    ReaderStopped,
    /// The local store failed.
    #[error("blob store: {0}")]
    Store(String),
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Parses a content id.
pub fn parse_cid(cid: &str) -> Result<Hash, BlobError> {
    if cid.len() != 64 {
        return Err(BlobError::BadCid(cid.to_string()));
    }
    cid.parse::<Hash>()
        .map_err(|_| BlobError::BadCid(cid.to_string()))
}

/// No holder could provide `hash`; `tried` says what each one answered.
fn unavailable(hash: Hash, tried: &[String]) -> BlobError {
    BlobError::Unavailable {
        cid: hash.to_hex(),
        tried: if tried.is_empty() {
            "no live member to ask".into()
        } else {
            tried.join("; ")
        },
    }
}

/// Who the data plane may ask. Kept in two parts so that a membership change costs the
/// node one shared slice, not a new address for every member: at 300 nodes rebuilding the
/// whole address list on every join was one of the costs a profile of joining showed.
#[derive(Default)]
struct Peers {
    /// Live members, this node included, sorted by id (the overlay's live ring); they are
    /// asked in ring order from this node.
    ring: Arc<[NodeId]>,
    /// Addresses of every member learned, live or not.
    addrs: HashMap<NodeId, EndpointAddr>,
    /// Endpoint keys of every member ever learned (a restarted member's old key included:
    /// it proved the secret once).
    members: HashSet<PublicKey>,
}

struct Inner {
    store: FsStore,
    protocol: BlobsProtocol,
    endpoint: Endpoint,
    me: NodeId,
    peers: RwLock<Peers>,
    conns: tokio::sync::Mutex<HashMap<(NodeId, &'static [u8]), Connection>>,
    serving: tokio::sync::Semaphore,
}

/// This node's blob store and its transfers. Cheap to clone.
#[derive(Clone)]
pub struct Blobs {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobs").field("me", &self.inner.me).finish()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct CopyRequest {
    hash: [u8; 32],
    /// Nodes that hold it (the asker first).
    holders: Vec<NodeId>,
}

impl Blobs {
    /// Opens (or creates) the store in `dir`.
    pub async fn open(dir: &Path, endpoint: Endpoint, me: NodeId) -> Result<Blobs, BlobError> {
        std::fs::create_dir_all(dir)?;
        let store = FsStore::load(dir)
            .await
            .map_err(|e| BlobError::Store(format!("opening {}: {e}", dir.display())))?;
        let protocol = BlobsProtocol::new(&store, None);
        Ok(Blobs {
            inner: Arc::new(Inner {
                store,
                protocol,
                endpoint,
                me,
                peers: RwLock::new(Peers::default()),
                conns: tokio::sync::Mutex::new(HashMap::new()),
                serving: tokio::sync::Semaphore::new(MAX_COPIES_SERVED),
            }),
        })
    }

    /// The ALPNs the endpoint must offer for the data plane.
    pub fn alpns() -> [Vec<u8>; 2] {
        [iroh_blobs::ALPN.to_vec(), COPY_ALPN.to_vec()]
    }

    /// The live members (this node included, sorted by id): who is asked, in ring order
    /// from this node, among those with an address.
    pub fn set_live(&self, ring: Arc<[NodeId]>) {
        if let Ok(mut p) = self.inner.peers.write() {
            p.ring = ring;
        }
    }

    /// A member's endpoint address (new, or moved); its key may connect from now on.
    pub fn set_addr(&self, node: NodeId, addr: EndpointAddr) {
        if let Ok(mut p) = self.inner.peers.write() {
            p.members.insert(addr.id);
            p.addrs.insert(node, addr);
        }
    }

    /// Forgets a member's address (it was never a member: a stand-in for a join ticket).
    pub fn forget(&self, node: &NodeId) {
        if let Ok(mut p) = self.inner.peers.write() {
            p.addrs.remove(node);
        }
    }

    /// The address of `node` if it is a live member other than this node.
    fn live_addr(&self, node: &NodeId) -> Option<EndpointAddr> {
        let p = self.inner.peers.read().ok()?;
        if *node == self.inner.me || p.ring.binary_search(node).is_err() {
            return None;
        }
        p.addrs.get(node).cloned()
    }

    fn is_member(&self, key: &PublicKey) -> bool {
        self.inner
            .peers
            .read()
            .is_ok_and(|p| p.members.contains(key))
    }

    /// Whether any other live member is known.
    pub fn has_peers(&self) -> bool {
        self.inner.peers.read().is_ok_and(|p| {
            p.ring
                .iter()
                .any(|n| *n != self.inner.me && p.addrs.contains_key(n))
        })
    }

    /// Live members other than this node with an address, in ring order from this node.
    fn peer_order(&self) -> Vec<NodeId> {
        let Ok(p) = self.inner.peers.read() else {
            return Vec::new();
        };
        let me = self.inner.me;
        let start = p.ring.partition_point(|n| *n <= me);
        p.ring[start..]
            .iter()
            .chain(&p.ring[..start])
            .filter(|n| **n != me && p.addrs.contains_key(n))
            .copied()
            .collect()
    }

    /// Serves an inbound data-plane connection (either ALPN), members only.
    pub async fn accept(&self, conn: Connection) {
        if !self.is_member(&conn.remote_id()) {
            tracing::warn!(peer = %conn.remote_id(), "refused a data-plane connection from a non-member");
            conn.close(VarInt::from_u32(NOT_A_MEMBER), b"not a member");
            return;
        }
        if conn.alpn() == iroh_blobs::ALPN {
            let _ = self.inner.protocol.accept(conn).await;
        } else {
            self.serve_copies(conn).await;
        }
    }

    async fn serve_copies(&self, conn: Connection) {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let this = self.clone();
            tokio::spawn(async move {
                let reply = match recv.read_to_end(MAX_COPY_MSG_BYTES).await {
                    Ok(bytes) => match postcard::from_bytes::<CopyRequest>(&bytes) {
                        Ok(req) => {
                            let _permit = this.inner.serving.acquire().await;
                            let holders: Vec<NodeId> =
                                req.holders.into_iter().take(MAX_TRIES).collect();
                            match this.fetch(Hash::from_bytes(req.hash), &holders).await {
                                Ok(()) => String::new(),
                                Err(e) => e.to_string(),
                            }
                        }
                        Err(e) => format!("bad copy request: {e}"),
                    },
                    Err(e) => format!("reading the copy request: {e}"),
                };
                let mut reply = reply.into_bytes();
                reply.truncate(MAX_COPY_MSG_BYTES);
                let _ = send.write_all(&reply).await;
                let _ = send.finish();
            });
        }
    }

    async fn connect(&self, node: NodeId, alpn: &'static [u8]) -> Result<Connection, String> {
        let mut conns = self.inner.conns.lock().await;
        if let Some(c) = conns.get(&(node, alpn)) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
            conns.remove(&(node, alpn));
        }
        let addr = self
            .live_addr(&node)
            .ok_or_else(|| "not a live member".to_string())?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, self.inner.endpoint.connect(addr, alpn))
            .await
            .map_err(|_| "connection timed out".to_string())?
            .map_err(|e| format!("cannot connect: {e}"))?;
        conns.insert((node, alpn), conn.clone());
        Ok(conn)
    }

    /// Whether this node holds all of `hash`; its size if so.
    pub async fn complete_size(&self, hash: Hash) -> Option<u64> {
        match self.inner.store.blobs().status(hash).await {
            Ok(BlobStatus::Complete { size }) => Some(size),
            _ => None,
        }
    }

    /// Makes sure this node holds all of `hash`: fetches it from `holders` first, then
    /// from other live members. Every byte is verified against the hash as it arrives.
    pub async fn fetch(&self, hash: Hash, holders: &[NodeId]) -> Result<(), BlobError> {
        if self.complete_size(hash).await.is_some() {
            return Ok(());
        }
        let mut tried = Vec::new();
        for node in self.fetch_order(holders).into_iter().take(MAX_TRIES) {
            let conn = match self.connect(node, iroh_blobs::ALPN).await {
                Ok(c) => c,
                Err(e) => {
                    tried.push(format!("{node:?}: {e}"));
                    continue;
                }
            };
            let got = tokio::time::timeout(
                FETCH_TIMEOUT,
                self.inner.store.remote().fetch(conn, hash).complete(),
            )
            .await;
            match got {
                Ok(Ok(_)) if self.complete_size(hash).await.is_some() => return Ok(()),
                Ok(Ok(_)) => tried.push(format!("{node:?}: incomplete")),
                Ok(Err(e)) => tried.push(format!("{node:?}: {e}")),
                Err(_) => tried.push(format!("{node:?}: timed out")),
            }
        }
        Err(unavailable(hash, &tried))
    }

    /// Streams the blob's bytes, in order, into `tx`: from this node's store when it
    /// holds all of it, else straight from a holder as they arrive, each one verified
    /// against the hash before it is sent on (so the consumer, decryption, works while the
    /// transfer runs). If a holder fails midway, the rest is fetched into the store from
    /// the others and streamed from there, from where it stopped.
    pub async fn stream(
        &self,
        hash: Hash,
        holders: &[NodeId],
        tx: &tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> Result<(), BlobError> {
        use futures_util::StreamExt;
        use iroh_blobs::get::request::{GetBlobItem, get_blob};
        if self.complete_size(hash).await.is_some() {
            return self.stream_local(hash, 0, tx).await;
        }
        let mut sent = 0u64;
        let mut tried = Vec::new();
        for node in self.fetch_order(holders).into_iter().take(MAX_TRIES) {
            let conn = match self.connect(node, iroh_blobs::ALPN).await {
                Ok(c) => c,
                Err(e) => {
                    tried.push(format!("{node:?}: {e}"));
                    continue;
                }
            };
            let mut items = get_blob(conn, hash);
            loop {
                let item = tokio::time::timeout(FETCH_TIMEOUT, items.next()).await;
                match item {
                    Ok(Some(GetBlobItem::Item(bao_tree::io::BaoContentItem::Leaf(leaf)))) => {
                        if leaf.offset != sent {
                            tried.push(format!("{node:?}: out of order"));
                            break;
                        }
                        sent += leaf.data.len() as u64;
                        tx.send(leaf.data)
                            .await
                            .map_err(|_| BlobError::ReaderStopped)?;
                    }
                    Ok(Some(GetBlobItem::Item(_))) => {}
                    Ok(Some(GetBlobItem::Done(_))) => return Ok(()),
                    Ok(Some(GetBlobItem::Error(e))) => {
                        tried.push(format!("{node:?}: {e}"));
                        break;
                    }
                    Ok(None) => {
                        tried.push(format!("{node:?}: ended early"));
                        break;
                    }
                    Err(_) => {
                        tried.push(format!("{node:?}: stalled"));
                        break;
                    }
                }
            }
            if sent > 0 {
                self.fetch(hash, holders).await?;
                return self.stream_local(hash, sent, tx).await;
            }
        }
        Err(unavailable(hash, &tried))
    }

    async fn stream_local(
        &self,
        hash: Hash,
        from: u64,
        tx: &tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> Result<(), BlobError> {
        use futures_util::StreamExt;
        use iroh_blobs::api::proto::ExportRangesItem;
        let mut items = self
            .inner
            .store
            .blobs()
            .export_ranges(hash, from..u64::MAX)
            .stream();
        while let Some(item) = items.next().await {
            match item {
                ExportRangesItem::Data(leaf) => tx
                    .send(leaf.data)
                    .await
                    .map_err(|_| BlobError::ReaderStopped)?,
                ExportRangesItem::Size(_) => {}
                ExportRangesItem::Error(e) => return Err(BlobError::Store(e.to_string())),
            }
        }
        Ok(())
    }

    /// Holders first (not this node), then the other live members in ring order.
    fn fetch_order(&self, holders: &[NodeId]) -> Vec<NodeId> {
        let mut order: Vec<NodeId> = holders
            .iter()
            .copied()
            .filter(|n| *n != self.inner.me)
            .collect();
        for p in self.peer_order() {
            if !order.contains(&p) {
                order.push(p);
            }
        }
        order
    }

    /// Asks live members not in `skip`, in order, to copy `hash` (which this node holds)
    /// until `copies` of them confirm they hold all of it. Returns those that confirmed
    /// (fewer than `copies` when not enough members could).
    pub async fn replicate(&self, hash: Hash, copies: usize, skip: &[NodeId]) -> Vec<NodeId> {
        let mut done = Vec::new();
        if copies == 0 {
            return done;
        }
        let req = CopyRequest {
            hash: *hash.as_bytes(),
            holders: vec![self.inner.me],
        };
        let Ok(bytes) = postcard::to_stdvec(&req) else {
            return done;
        };
        let candidates = self.peer_order().into_iter().filter(|n| !skip.contains(n));
        for node in candidates.take(MAX_TRIES) {
            match self.ask_copy(node, &bytes).await {
                Ok(()) => {
                    done.push(node);
                    if done.len() >= copies {
                        break;
                    }
                }
                Err(e) => tracing::info!(peer = ?node, cid = %hash.to_hex(), "copy refused: {e}"),
            }
        }
        done
    }

    async fn ask_copy(&self, node: NodeId, req: &[u8]) -> Result<(), String> {
        let conn = self.connect(node, COPY_ALPN).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(req).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let reply = tokio::time::timeout(FETCH_TIMEOUT, recv.read_to_end(MAX_COPY_MSG_BYTES))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        if reply.is_empty() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&reply).into_owned())
        }
    }

    /// Adds a file to the store (copied in); returns its hash and size.
    pub async fn add_file(&self, path: &Path) -> Result<(Hash, u64), BlobError> {
        let tag = self
            .inner
            .store
            .blobs()
            .add_path(path)
            .await
            .map_err(|e| BlobError::Store(format!("adding {}: {e}", path.display())))?;
        let size = self
            .complete_size(tag.hash)
            .await
            .ok_or_else(|| BlobError::Store("an added blob is not complete".into()))?;
        Ok((tag.hash, size))
    }

    /// A reader of a blob this node holds.
    pub fn reader(&self, hash: Hash) -> iroh_blobs::api::blobs::BlobReader {
        self.inner.store.blobs().reader(hash)
    }

    /// Writes a blob this node holds to `path`.
    pub async fn export(&self, hash: Hash, path: &Path) -> Result<(), BlobError> {
        let mut reader = self.reader(hash);
        let mut file = tokio::fs::File::create(path).await?;
        tokio::io::copy(&mut reader, &mut file).await?;
        file.flush().await?;
        Ok(())
    }

    /// Closes the store (flushes its database).
    pub async fn shutdown(&self) {
        let _ = self.inner.store.shutdown().await;
    }
}
