//! The agent's side of the data plane: what an execution reads and what it leaves.
//!
//! Before an execution starts, its inputs and the checkpoint it resumes from are fetched
//! (from the nodes that hold them), verified, decrypted and unpacked into its own
//! directories, which it finds in `MUTUAL_INPUT_DIR` and `MUTUAL_CHECKPOINT_DIR`. While it
//! runs, the checkpoint directory is snapshotted whenever it changed. When it ends, the
//! output directory (`MUTUAL_OUTPUT_DIR`) and its stdout and stderr become blobs. Every
//! blob written here is packed ([`crate::seal::pack_dir_contents`]), sealed under a fresh
//! data key, stored, and copied to at least one more live node before the record that
//! names it is written, so no single death loses it. The data key goes into the record
//! only wrapped under the cluster's key.
//!
//! Packing, sealing and unpacking are blocking file work: they run on the blocking pool.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mutual_core::{BlobRef, JobId, NodeId};

use crate::blobs::{BlobError, Blobs, parse_cid};
use crate::seal::{self, BlobKey, Opener, Sealer};
use crate::ticket::ClusterSecret;

/// Where a job's directories appear inside a container.
pub const CONTAINER_IO_ROOT: &str = "/mutual";
/// How long a node keeps asking peers for a copy of a new blob before it records the blob
/// with itself as the only holder (it says so in its log).
pub const COPY_PATIENCE: Duration = Duration::from_secs(10);

/// An execution's own directories: `<data>/io/<job>-<epoch>/{input,output,checkpoint}`.
#[derive(Debug, Clone)]
pub struct ExecDirs {
    /// The parent of the three.
    pub root: PathBuf,
    /// Decrypted inputs (`MUTUAL_INPUT_DIR`).
    pub input: PathBuf,
    /// What the job leaves (`MUTUAL_OUTPUT_DIR`).
    pub output: PathBuf,
    /// What the job wants to resume from (`MUTUAL_CHECKPOINT_DIR`).
    pub checkpoint: PathBuf,
}

impl ExecDirs {
    /// The directories of `job`'s attempt `epoch` (not created).
    pub fn new(data_dir: &Path, job: JobId, epoch: u64) -> ExecDirs {
        let root = data_dir.join("io").join(format!("{job}-{epoch}"));
        ExecDirs {
            input: root.join("input"),
            output: root.join("output"),
            checkpoint: root.join("checkpoint"),
            root,
        }
    }

    /// Creates them (empty).
    pub fn create(&self) -> std::io::Result<()> {
        for d in [&self.input, &self.output, &self.checkpoint] {
            std::fs::create_dir_all(d)?;
        }
        Ok(())
    }

    /// The variables that point the job at them, as a process sees them.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("MUTUAL_INPUT_DIR".into(), self.input.display().to_string()),
            (
                "MUTUAL_OUTPUT_DIR".into(),
                self.output.display().to_string(),
            ),
            (
                "MUTUAL_CHECKPOINT_DIR".into(),
                self.checkpoint.display().to_string(),
            ),
        ]
    }

    /// The variables as a container sees them, and the bind mounts that make them true
    /// (inputs read-only).
    pub fn container_env_and_binds(&self) -> (Vec<(String, String)>, Vec<String>) {
        let mut env = Vec::new();
        let mut binds = Vec::new();
        for (var, host, name, mode) in [
            ("MUTUAL_INPUT_DIR", &self.input, "input", "ro"),
            ("MUTUAL_OUTPUT_DIR", &self.output, "output", "rw"),
            (
                "MUTUAL_CHECKPOINT_DIR",
                &self.checkpoint,
                "checkpoint",
                "rw",
            ),
        ] {
            let inside = format!("{CONTAINER_IO_ROOT}/{name}");
            binds.push(format!("{}:{inside}:{mode}", host.display()));
            env.push((var.to_string(), inside));
        }
        (env, binds)
    }

    /// Removes them and everything in them.
    pub async fn remove(&self) {
        let _ = tokio::fs::remove_dir_all(&self.root).await;
    }
}

/// Why a blob could not be restored into a directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// No holder could provide it (all dead, unreachable, or without it).
    #[error("{0}")]
    Unavailable(String),
    /// It arrived but is not what was recorded: tampered, a bad key or a bad archive.
    #[error("{0}")]
    Content(String),
}

/// The agent's data-plane handle: the store, the cluster key and the copy policy.
#[derive(Clone, Debug)]
pub struct JobIo {
    /// The node's blob store.
    pub blobs: Blobs,
    /// Wraps and unwraps data keys.
    pub secret: ClusterSecret,
    /// Where temporary files go (`<data>/tmp`).
    pub tmp_dir: PathBuf,
    /// This node.
    pub me: NodeId,
    /// Copies on other nodes each new blob needs before it is recorded.
    pub copies: usize,
}

/// Chunks queued between the transfer and the decryption (each up to 16 KiB or so).
pub const STREAM_QUEUE_CHUNKS: usize = 256;

/// Reads what the transfer sends; the end of the channel is the end of the blob (a
/// truncated blob then fails to open: its last segment is missing).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

/// Hashes what passes through (to tell whether a checkpoint changed).
struct Tee<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// What to pack into a blob.
enum Source {
    /// A directory's contents.
    Dir(PathBuf),
    /// Some files, each under its given name (missing ones are skipped).
    Files(Vec<(String, PathBuf)>),
}

fn pack_files<W: Write>(files: &[(String, PathBuf)], out: W) -> Result<W, seal::SealError> {
    let mut b = tar::Builder::new(out);
    for (name, path) in files {
        let Ok(mut f) = std::fs::File::open(path) else {
            continue;
        };
        b.append_file(name, &mut f)?;
    }
    Ok(b.into_inner()?)
}

impl JobIo {
    /// Fetches `blob` (from its holders first), then decrypts and unpacks it into `dest`.
    pub async fn restore(
        &self,
        blob: &BlobRef,
        dest: &Path,
    ) -> Result<seal::UnpackStats, RestoreError> {
        let bad = RestoreError::Content;
        let hash = parse_cid(&blob.cid).map_err(|e| bad(e.to_string()))?;
        let key = seal::unwrap_key(&self.secret.0, &blob.key)
            .map_err(|e| bad(format!("blob {}: cannot unwrap its key: {e}", blob.cid)))?;
        // Transfer, verification, decryption and unpacking run at once, as a pipeline.
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_QUEUE_CHUNKS);
        let dest = dest.to_path_buf();
        let cid = blob.cid.clone();
        let unpacking =
            tokio::task::spawn_blocking(move || -> Result<seal::UnpackStats, String> {
                let reader = ChannelReader {
                    rx,
                    cur: bytes::Bytes::new(),
                };
                let opener = Opener::new(std::io::BufReader::with_capacity(1 << 20, reader), &key)
                    .map_err(|e| format!("blob {cid}: {e}"))?;
                seal::unpack(opener, &dest).map_err(|e| format!("blob {cid}: {e}"))
            });
        let streamed = self.blobs.stream(hash, &blob.holders, &tx).await;
        drop(tx);
        let unpacked = unpacking
            .await
            .map_err(|e| bad(format!("unpacking: {e}")))?;
        match streamed {
            // The transfer failed: the unpacking only saw the stream end early.
            Err(e) if !matches!(e, BlobError::ReaderStopped) => {
                Err(RestoreError::Unavailable(e.to_string()))
            }
            // Otherwise an unpacking error (tampering, a bad archive) is the cause.
            _ => unpacked.map_err(bad),
        }
    }

    /// The digest [`JobIo::snapshot`] compares against, of `dir`'s contents now.
    pub fn dir_digest(dir: &Path) -> Result<[u8; 32], String> {
        let tee = Tee {
            inner: std::io::sink(),
            hasher: blake3::Hasher::new(),
        };
        let tee = seal::pack_dir_contents(dir, tee).map_err(|e| format!("packing: {e}"))?;
        Ok(*tee.hasher.finalize().as_bytes())
    }

    /// Packs and seals `src` into a new blob, stores it and has it copied. `skip_if`:
    /// when the packed plaintext hashes to this, nothing is stored and `None` comes back
    /// (the directory did not change). Returns the reference and the plaintext hash.
    async fn store(
        &self,
        src: Source,
        skip_if: Option<[u8; 32]>,
    ) -> Result<Option<(BlobRef, [u8; 32])>, String> {
        std::fs::create_dir_all(&self.tmp_dir).map_err(|e| format!("tmp dir: {e}"))?;
        let tmp = tempfile::NamedTempFile::new_in(&self.tmp_dir)
            .map_err(|e| format!("temporary file: {e}"))?;
        let key = BlobKey::generate();
        let (tmp, digest) = {
            let key = key.clone();
            tokio::task::spawn_blocking(move || -> Result<_, String> {
                let file = std::io::BufWriter::with_capacity(
                    1 << 20,
                    tmp.reopen().map_err(|e| e.to_string())?,
                );
                let sealer = Sealer::new(file, &key).map_err(|e| e.to_string())?;
                let tee = Tee {
                    inner: sealer,
                    hasher: blake3::Hasher::new(),
                };
                let tee = match &src {
                    Source::Dir(d) => seal::pack_dir_contents(d, tee),
                    Source::Files(f) => pack_files(f, tee),
                }
                .map_err(|e| format!("packing: {e}"))?;
                let digest = *tee.hasher.finalize().as_bytes();
                let mut file = tee.inner.finish().map_err(|e| e.to_string())?;
                file.flush().map_err(|e| e.to_string())?;
                Ok((tmp, digest))
            })
            .await
            .map_err(|e| e.to_string())??
        };
        if skip_if == Some(digest) {
            return Ok(None);
        }
        let (hash, bytes) = self
            .blobs
            .add_file(tmp.path())
            .await
            .map_err(|e| e.to_string())?;
        drop(tmp);
        let holders = self.copy(hash).await;
        Ok(Some((
            BlobRef {
                cid: hash.to_hex(),
                key: seal::wrap_key(&self.secret.0, &key),
                bytes,
                holders,
            },
            digest,
        )))
    }

    /// Has a new blob copied to [`JobIo::copies`] other nodes; returns the holders (this
    /// node first).
    pub async fn copy(&self, hash: iroh_blobs::Hash) -> Vec<NodeId> {
        let mut holders = vec![self.me];
        let deadline = tokio::time::Instant::now() + COPY_PATIENCE;
        let mut wait = Duration::from_millis(100);
        loop {
            let need = self.copies.saturating_sub(holders.len() - 1);
            if need == 0 {
                break;
            }
            for n in self.blobs.replicate(hash, need, &holders).await {
                if !holders.contains(&n) {
                    holders.push(n);
                }
            }
            if holders.len() > self.copies || tokio::time::Instant::now() >= deadline {
                break;
            }
            if !self.blobs.has_peers() {
                break;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
        if holders.len() <= self.copies {
            tracing::warn!(
                cid = %hash.to_hex(),
                "blob has {} copies on other nodes, wanted {}: no more live nodes took one",
                holders.len() - 1,
                self.copies
            );
        }
        holders
    }

    /// Snapshots a checkpoint directory if its contents changed since `last` (the hash
    /// of the previous snapshot's plaintext).
    pub async fn snapshot(
        &self,
        dir: &Path,
        last: Option<[u8; 32]>,
    ) -> Result<Option<(BlobRef, [u8; 32])>, String> {
        self.store(Source::Dir(dir.to_path_buf()), last).await
    }

    /// The output directory as a blob, or `None` when the job left it empty.
    pub async fn outputs(&self, dir: &Path) -> Result<Option<BlobRef>, String> {
        let empty = std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none());
        if empty {
            return Ok(None);
        }
        Ok(self
            .store(Source::Dir(dir.to_path_buf()), None)
            .await?
            .map(|(b, _)| b))
    }

    /// An execution's stdout and stderr as one blob (`stdout` and `stderr` in it), or
    /// `None` when both are empty.
    pub async fn logs(&self, stdout: &Path, stderr: &Path) -> Result<Option<BlobRef>, String> {
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        if len(stdout) == 0 && len(stderr) == 0 {
            return Ok(None);
        }
        let files = vec![
            ("stdout".to_string(), stdout.to_path_buf()),
            ("stderr".to_string(), stderr.to_path_buf()),
        ];
        Ok(self
            .store(Source::Files(files), None)
            .await?
            .map(|(b, _)| b))
    }
}
