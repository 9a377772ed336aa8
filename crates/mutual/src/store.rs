//! Durable storage of a node's job documents: a write-ahead log with group commit.
//!
//! Every automerge change a node makes or receives is appended to `wal.log` as a checksummed
//! frame; one writer thread batches whatever is queued, writes it and calls `fdatasync`
//! once, then runs each batch's continuation (push to peers, answer the client). So nothing
//! is acknowledged or pushed before it is on disk, and a burst of writes costs one sync.
//! When the log grows past [`WAL_COMPACT_BYTES`] the node hands over every document saved
//! whole; the thread writes them to `docs.snap` (temporary file, sync, rename, sync the
//! directory) and truncates the log. Replaying a snapshot and a log that overlap is
//! harmless: applying an automerge change twice is a no-op.
//!
//! A torn last frame (a crash in the middle of a write) fails its checksum; loading stops
//! there, reports it, and the log is truncated to the last good frame.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};

use mutual_core::JobId;

/// The log is compacted into a snapshot once it is larger than this.
pub const WAL_COMPACT_BYTES: u64 = 64 << 20;
/// Largest frame payload accepted when loading (a corrupt length is not an allocation).
pub const MAX_STORED_FRAME_BYTES: usize = 64 << 20;
const CHECKSUM_BYTES: usize = 8;
const HEADER_BYTES: usize = 4 + 1 + 16;

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One encoded automerge change.
    Change = 1,
    /// A whole saved document.
    Doc = 2,
}

/// One stored frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it holds.
    pub kind: Kind,
    /// The job.
    pub job: JobId,
    /// The bytes.
    pub bytes: Vec<u8>,
}

type Done = Box<dyn FnOnce() + Send>;

enum Req {
    Append {
        frames: Vec<Frame>,
        /// `None`: written but not synced on its own (see [`Store::append_unsynced`]).
        done: Option<Done>,
    },
    Compact {
        docs: Vec<Frame>,
    },
}

/// Handle to the writer thread.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Req>,
}

/// What loading found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every frame, snapshot first, in write order.
    pub frames: Vec<Frame>,
    /// Bytes of the log after loading (to decide when to compact).
    pub wal_bytes: u64,
    /// A damaged tail was cut off the log (bytes dropped).
    pub truncated_bytes: u64,
}

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Disk IO failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn checksum(kind: u8, job: &[u8; 16], bytes: &[u8]) -> [u8; CHECKSUM_BYTES] {
    let mut h = blake3::Hasher::new();
    h.update(&[kind]);
    h.update(job);
    h.update(bytes);
    let mut out = [0u8; CHECKSUM_BYTES];
    out.copy_from_slice(&h.finalize().as_bytes()[..CHECKSUM_BYTES]);
    out
}

fn encode_frame(f: &Frame, out: &mut Vec<u8>) {
    let len = 1 + 16 + f.bytes.len() + CHECKSUM_BYTES;
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(f.kind as u8);
    out.extend_from_slice(f.job.as_bytes());
    out.extend_from_slice(&f.bytes);
    out.extend_from_slice(&checksum(f.kind as u8, f.job.as_bytes(), &f.bytes));
}

/// Reads frames until the end or the first damaged frame; returns them and the offset of
/// the end of the last good one.
fn read_frames(path: &Path) -> Result<(Vec<Frame>, u64, u64), StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0, 0)),
        Err(e) => return Err(io_err(path)(e)),
    };
    let total = file.metadata().map_err(io_err(path))?.len();
    let mut r = BufReader::new(file);
    let mut frames = Vec::new();
    let mut good = 0u64;
    loop {
        let mut head = [0u8; HEADER_BYTES];
        if r.read_exact(&mut head).is_err() {
            break;
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if !(1 + 16 + CHECKSUM_BYTES..=MAX_STORED_FRAME_BYTES).contains(&len) {
            break;
        }
        let mut rest = vec![0u8; len - 17];
        if r.read_exact(&mut rest).is_err() {
            break;
        }
        let (bytes, sum) = rest.split_at(len - 17 - CHECKSUM_BYTES);
        let mut job = [0u8; 16];
        job.copy_from_slice(&head[5..21]);
        if checksum(head[4], &job, bytes) != sum {
            break;
        }
        let kind = match head[4] {
            1 => Kind::Change,
            2 => Kind::Doc,
            _ => break,
        };
        frames.push(Frame {
            kind,
            job: JobId(job),
            bytes: bytes.to_vec(),
        });
        good += 4 + len as u64;
    }
    Ok((frames, good, total - good))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    /// Opens (or creates) the store in `dir`, loads what it holds, and starts the writer.
    pub fn open(dir: &Path) -> Result<(Store, Loaded), StoreError> {
        Store::open_with_halt(dir, Arc::new(AtomicBool::new(false)))
    }

    /// [`Store::open`], with a switch that stops the writer at once: once `halt` is set it
    /// writes nothing more, not even what is queued, and runs no continuation, as a
    /// SIGKILLed process would. `mutual host` crashes a hosted node this way.
    pub fn open_with_halt(
        dir: &Path,
        halt: Arc<AtomicBool>,
    ) -> Result<(Store, Loaded), StoreError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let snap = dir.join("docs.snap");
        let wal = dir.join("wal.log");
        let (mut frames, _, _) = read_frames(&snap)?;
        let (wal_frames, good, dropped) = read_frames(&wal)?;
        frames.extend(wal_frames);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&wal)
            .map_err(io_err(&wal))?;
        if dropped > 0 {
            file.set_len(good).map_err(io_err(&wal))?;
            file.sync_all().map_err(io_err(&wal))?;
        }
        let (tx, rx) = mpsc::channel();
        let d = dir.to_owned();
        std::thread::Builder::new()
            .name("mutual-store".into())
            .spawn(move || writer(d, file, rx, halt))
            .map_err(io_err(dir))?;
        Ok((
            Store { tx },
            Loaded {
                frames,
                wal_bytes: good,
                truncated_bytes: dropped,
            },
        ))
    }

    /// Appends frames; `done` runs once they are durable. Returns the encoded size.
    pub fn append(&self, frames: Vec<Frame>, done: impl FnOnce() + Send + 'static) -> u64 {
        let size = frames
            .iter()
            .map(|f| (4 + 17 + f.bytes.len() + CHECKSUM_BYTES) as u64)
            .sum();
        // The thread only stops when every handle is gone, so this cannot fail while we
        // hold one; if it somehow did, the continuation would never run and the client
        // would time out rather than be told a lie.
        let _ = self.tx.send(Req::Append {
            frames,
            done: Some(Box::new(done)),
        });
        size
    }

    /// Appends frames without waiting for them to reach the disk: for what peers sent,
    /// which they hold durably already. The frames are written in order with everything
    /// else, so they become durable at the next synced append at the latest, and a
    /// process kill (not a machine crash) loses none of them; what a machine crash loses,
    /// anti-entropy brings back. Skipping the sync spares every replica an fsync for
    /// every change any node makes. Returns the encoded size.
    pub fn append_unsynced(&self, frames: Vec<Frame>) -> u64 {
        let size = frames
            .iter()
            .map(|f| (4 + 17 + f.bytes.len() + CHECKSUM_BYTES) as u64)
            .sum();
        let _ = self.tx.send(Req::Append { frames, done: None });
        size
    }

    /// Replaces the snapshot with `docs` (every document, saved whole) and empties the log.
    pub fn compact(&self, docs: Vec<Frame>) {
        let _ = self.tx.send(Req::Compact { docs });
    }
}

fn writer(dir: PathBuf, mut wal: File, rx: mpsc::Receiver<Req>, halt: Arc<AtomicBool>) {
    let wal_path = dir.join("wal.log");
    let mut buf = Vec::new();
    while let Ok(first) = rx.recv() {
        if halt.load(Ordering::Relaxed) {
            return;
        }
        let mut reqs = vec![first];
        while let Ok(r) = rx.try_recv() {
            reqs.push(r);
        }
        let mut dones = Vec::new();
        for req in reqs {
            match req {
                Req::Append { frames, done } => {
                    for f in &frames {
                        encode_frame(f, &mut buf);
                    }
                    dones.extend(done);
                }
                Req::Compact { docs } => {
                    // Everything appended so far is in `docs` (the node saved them after
                    // making those changes); flush it first so ordering holds either way.
                    flush(&mut wal, &mut buf, &wal_path, true);
                    if let Err(e) = write_snapshot(&dir, &docs).and_then(|()| {
                        wal.set_len(0)?;
                        wal.sync_all()
                    }) {
                        tracing::error!("compaction failed (the log keeps growing): {e}");
                    }
                }
            }
        }
        flush(&mut wal, &mut buf, &wal_path, !dones.is_empty());
        for d in dones {
            d();
        }
    }
}

fn flush(wal: &mut File, buf: &mut Vec<u8>, path: &Path, sync: bool) {
    if buf.is_empty() && !sync {
        return;
    }
    // A node that cannot write its log must not acknowledge anything: stop the process
    // rather than go on with state that a restart would lose.
    if let Err(e) = wal
        .write_all(buf)
        .and_then(|()| if sync { wal.sync_data() } else { Ok(()) })
    {
        tracing::error!("{}: write failed: {e}; stopping the node", path.display());
        std::process::exit(70);
    }
    buf.clear();
}

fn write_snapshot(dir: &Path, docs: &[Frame]) -> io::Result<()> {
    let tmp = dir.join("docs.snap.tmp");
    let mut buf = Vec::new();
    for f in docs {
        encode_frame(f, &mut buf);
    }
    let mut file = File::create(&tmp)?;
    file.write_all(&buf)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join("docs.snap"))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(i: u8, n: usize) -> Frame {
        Frame {
            kind: Kind::Change,
            job: JobId([i; 16]),
            bytes: vec![i; n],
        }
    }

    fn append_sync(store: &Store, frames: Vec<Frame>) {
        let (tx, rx) = mpsc::channel();
        store.append(frames, move || {
            let _ = tx.send(());
        });
        rx.recv().expect("durable");
    }

    #[test]
    fn reloads_what_was_acknowledged_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, loaded) = Store::open(dir.path()).expect("open");
        assert!(loaded.frames.is_empty());
        append_sync(&store, vec![frame(1, 10), frame(2, 300)]);
        append_sync(&store, vec![frame(3, 0)]);
        drop(store);
        // A torn write: half a frame at the end.
        let mut half = Vec::new();
        encode_frame(&frame(4, 100), &mut half);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("wal.log"))
            .expect("open wal");
        f.write_all(&half[..half.len() / 2]).expect("write");
        drop(f);
        let (store, loaded) = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            loaded.frames,
            vec![frame(1, 10), frame(2, 300), frame(3, 0)]
        );
        assert_eq!(loaded.truncated_bytes, (half.len() / 2) as u64);
        // Appending after the cut works and the cut stays cut.
        append_sync(&store, vec![frame(5, 5)]);
        drop(store);
        let (_s, loaded) = Store::open(dir.path()).expect("reopen");
        assert_eq!(loaded.frames.len(), 4);
        assert_eq!(loaded.truncated_bytes, 0);
    }

    #[test]
    fn compaction_keeps_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        append_sync(&store, vec![frame(1, 10)]);
        store.compact(vec![Frame {
            kind: Kind::Doc,
            job: JobId([1; 16]),
            bytes: vec![9; 20],
        }]);
        append_sync(&store, vec![frame(2, 10)]);
        drop(store);
        let (_s, loaded) = Store::open(dir.path()).expect("reopen");
        assert_eq!(loaded.frames.len(), 2);
        assert_eq!(loaded.frames[0].kind, Kind::Doc);
        assert_eq!(loaded.frames[1], frame(2, 10));
    }

    #[test]
    fn unsynced_frames_keep_their_place_in_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        store.append_unsynced(vec![frame(1, 10)]);
        append_sync(&store, vec![frame(2, 20)]);
        store.append_unsynced(vec![frame(3, 30)]);
        // An empty synced append returns once everything queued before it is written.
        append_sync(&store, Vec::new());
        drop(store);
        let (_s, loaded) = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            loaded.frames,
            vec![frame(1, 10), frame(2, 20), frame(3, 30)]
        );
    }

    #[test]
    fn a_halted_writer_writes_nothing_more_and_acknowledges_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let halt = Arc::new(AtomicBool::new(false));
        let (store, _) = Store::open_with_halt(dir.path(), halt.clone()).expect("open");
        append_sync(&store, vec![frame(1, 10)]);
        halt.store(true, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        store.append(vec![frame(2, 10)], move || {
            let _ = tx.send(());
        });
        // The writer stops without running the continuation: its sender is dropped.
        assert!(rx.recv().is_err(), "a halted store acknowledged a write");
        drop(store);
        let (_s, loaded) = Store::open(dir.path()).expect("reopen");
        assert_eq!(loaded.frames, vec![frame(1, 10)]);
    }
}
