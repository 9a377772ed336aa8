//! The client's side of the data plane: `submit --input`, `get` and stored logs.
//!
//! An upload packs a file or directory ([`seal::pack_path`]), seals it under a fresh data
//! key as it streams, and sends only the ciphertext: nothing readable leaves the client.
//! The client hashes what it sent and checks the node stored exactly that (the content
//! id), so a corrupted upload is caught before a job depends on it. A download streams the
//! ciphertext from any node (which fetches it from the holders if it lacks it), opens it
//! (every segment authenticated) and unpacks it. Progress goes to a bar on stderr, drawn
//! only when stderr is a terminal.

use std::io::{Read, Write};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use mutual_core::BlobRef;

use crate::client::{Client, ClientError};
use crate::seal::{self, BlobKey, Opener, Sealer};
use crate::types::BlobAccess;

/// What can go wrong moving data.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The node refused or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Sealing, opening or (un)packing failed.
    #[error(transparent)]
    Seal(#[from] seal::SealError),
    /// A local file could not be read or written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The node stored something other than what was sent.
    #[error("the node stored {stored}, but {sent} was sent: the upload was corrupted")]
    Mismatch {
        /// Content id of the bytes sent.
        sent: String,
        /// What the node reported.
        stored: String,
    },
}

/// A byte-progress bar on stderr (hidden when stderr is not a terminal).
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_message(what.to_string());
    b
}

/// Counts the bytes that pass on a progress bar.
struct Counting<T> {
    inner: T,
    bar: ProgressBar,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// Packs, seals and uploads `path` (a file or a directory, which the job finds under its
/// own name in `MUTUAL_INPUT_DIR`). Returns the input as a submit names it: the data key
/// in the clear, for the node to wrap.
pub fn upload(client: &Client, path: &Path, bar: &ProgressBar) -> Result<BlobRef, TransferError> {
    std::fs::symlink_metadata(path)?;
    let key = BlobKey::generate();
    let (reader, writer) = std::io::pipe()?;
    let packer = {
        let (path, key, bar) = (path.to_path_buf(), key.clone(), bar.clone());
        std::thread::spawn(move || -> Result<(), TransferError> {
            let sealer = Sealer::new(std::io::BufWriter::with_capacity(1 << 20, writer), &key)?;
            let counting = Counting { inner: sealer, bar };
            let counting = seal::pack_path(&path, counting)?;
            counting.inner.finish()?.flush()?;
            Ok(())
        })
    };
    let hasher = std::sync::Arc::new(std::sync::Mutex::new(None));
    let body = Hashing {
        inner: reader,
        hasher: Some(blake3::Hasher::new()),
        out: hasher.clone(),
    };
    let stored = client.put_blob(body);
    let packed = packer
        .join()
        .map_err(|_| std::io::Error::other("the packing thread panicked"))?;
    // A packing error is the cause of any upload error it led to.
    packed?;
    let stored = stored?;
    let sent = hasher
        .lock()
        .ok()
        .and_then(|mut h| h.take())
        .map(|h: blake3::Hash| h.to_hex().to_string())
        .unwrap_or_default();
    if sent != stored.cid {
        return Err(TransferError::Mismatch {
            sent,
            stored: stored.cid,
        });
    }
    Ok(BlobRef {
        cid: stored.cid,
        key: key.to_hex(),
        bytes: stored.bytes,
        holders: stored.holders,
    })
}

/// A reader that hashes what passes and leaves the hash in `out` at the end of input.
struct Hashing<R> {
    inner: R,
    hasher: Option<blake3::Hasher>,
    out: std::sync::Arc<std::sync::Mutex<Option<blake3::Hash>>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            if let (Some(h), Ok(mut out)) = (self.hasher.take(), self.out.lock()) {
                *out = Some(h.finalize());
            }
        } else if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

fn open(
    client: &Client,
    access: &BlobAccess,
    bar: &ProgressBar,
) -> Result<Opener<impl Read + use<>>, TransferError> {
    let key = BlobKey::from_hex(&access.key)?;
    let body = client.get_blob(&access.cid, &access.holders)?;
    let counting = Counting {
        inner: std::io::BufReader::with_capacity(1 << 20, body),
        bar: bar.clone(),
    };
    Ok(Opener::new(counting, &key)?)
}

/// Downloads a blob and unpacks it into `dest`.
pub fn download(
    client: &Client,
    access: &BlobAccess,
    dest: &Path,
    bar: &ProgressBar,
) -> Result<seal::UnpackStats, TransferError> {
    let opener = open(client, access, bar)?;
    Ok(seal::unpack(opener, dest)?)
}

/// Downloads a stored log and writes its `stdout` and `stderr` to the two writers.
pub fn download_logs(
    client: &Client,
    access: &BlobAccess,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<(), TransferError> {
    let opener = open(client, access, &ProgressBar::hidden())?;
    let mut archive = tar::Archive::new(opener);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        match name.as_str() {
            "stdout" => std::io::copy(&mut entry, stdout)?,
            "stderr" => std::io::copy(&mut entry, stderr)?,
            _ => 0,
        };
    }
    Ok(())
}
