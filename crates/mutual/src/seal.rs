//! Client-side encryption and archives for the data plane.
//!
//! # Why
//!
//! Job inputs, outputs, checkpoints and logs travel and rest as content-addressed blobs
//! (iroh-blobs) on machines the owner does not control: replicas, relays' neighbours,
//! other members' disks. Everything is therefore sealed with XChaCha20-Poly1305 before it
//! leaves the client or agent, under a fresh random [`BlobKey`] per blob. The data key
//! travels in the replicated job documents only wrapped ([`wrap_key`]) under a key derived
//! from the cluster secret, so a blob hash alone gives nothing away, and a node that holds
//! the blob but not the secret cannot read or undetectably alter it.
//!
//! # Sealed blob format (version `MUTUALB1`)
//!
//! ```text
//! header   = MAGIC (8 bytes, "MUTUALB1") || nonce prefix P (19 random bytes)     27 bytes
//! segment i = XChaCha20-Poly1305(key, nonce_i, aad = header, plaintext_i) || tag (16 bytes)
//! nonce_i  = P || i as u32 big-endian || last (1 for the final segment, else 0)
//! blob     = header || segment 0 || segment 1 || ... || final segment
//! ```
//!
//! This is the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár ("Online
//! authenticated-encryption and its nonce-reuse misuse-resistance", CRYPTO 2015): every
//! segment is authenticated on its own, its position is bound into the nonce (reordering
//! fails), and the final segment is marked (truncation at a segment boundary fails; so does
//! anything appended). The header is the associated data of every segment, so the format
//! version and the nonce prefix are authenticated too.
//!
//! Every segment except the last carries exactly [`SEGMENT_BYTES`] of plaintext; the last
//! carries `0..SEGMENT_BYTES` (strictly less than a full segment, so it is empty when the
//! plaintext is an exact multiple of [`SEGMENT_BYTES`]). A reader thus knows a segment is
//! the last one by its length alone, and [`sealed_len`] is exact:
//! `27 + n + 16 * (n / SEGMENT_BYTES + 1)`. Segment indices must fit a `u32`, which caps a
//! blob at about 4 PiB ([`SealError::TooLarge`] beyond).
//!
//! [`Sealer`] and [`Opener`] stream: each holds one reusable segment buffer and
//! encrypts or decrypts in place, so memory stays at about one MiB whatever the blob size.
//! An [`Opener`] only ever returns plaintext from segments that have authenticated; any
//! tampering, reordering, truncation or trailing data is a read error.
//!
//! # Archives
//!
//! Directories (inputs, outputs, checkpoints) are sealed as tar archives written straight
//! into a [`Sealer`]: [`pack_path`] and [`pack_dir_contents`] write them deterministically
//! (sorted entries, fixed owner and time, modes reduced to 0644/0755), so the same tree
//! packs to the same bytes and a BLAKE3 of the archive says whether a checkpoint changed.
//! [`unpack`] is safe against hostile archives: no absolute paths, no `..`, no links out of
//! the destination, no device files, a bounded number of entries.

use std::collections::HashSet;
use std::error::Error as StdError;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use chacha20poly1305::aead::inout::InOutBuf;
use chacha20poly1305::aead::{AeadInOut, Generate, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use data_encoding::{HEXLOWER, HEXLOWER_PERMISSIVE};

/// Bytes in a [`BlobKey`] (and in the cluster secret that wraps it).
pub const KEY_BYTES: usize = 32;
/// Plaintext bytes per sealed segment (every segment but the last is exactly this long).
pub const SEGMENT_BYTES: usize = 1 << 20;
/// The first eight bytes of every sealed blob: format and version.
pub const MAGIC: &[u8; 8] = b"MUTUALB1";
/// Random bytes of the per-blob nonce prefix, after [`MAGIC`] in the header.
pub const NONCE_PREFIX_BYTES: usize = 19;
/// Header length: [`MAGIC`] and the nonce prefix.
pub const HEADER_BYTES: usize = MAGIC.len() + NONCE_PREFIX_BYTES;
/// Poly1305 tag bytes after each segment.
pub const TAG_BYTES: usize = 16;
/// Length of [`wrap_key`]'s output: hex of a 24-byte nonce, the 32-byte key and a 16-byte tag.
pub const WRAPPED_KEY_HEX: usize = 2 * (24 + KEY_BYTES + TAG_BYTES);
/// Most entries [`unpack`] accepts (and [`pack_path`] / [`pack_dir_contents`] write).
pub const MAX_ARCHIVE_ENTRIES: u64 = 1_000_000;

/// A sealed segment on the wire: plaintext and tag.
const SEALED_SEGMENT_BYTES: usize = SEGMENT_BYTES + TAG_BYTES;
/// BLAKE3 key-derivation context of the key-encryption key.
const KEY_WRAP_CONTEXT: &str = "mutual-cloud 2026 blob key wrap v1";

/// A per-blob random data key.
#[derive(Clone, PartialEq, Eq)]
pub struct BlobKey(pub [u8; KEY_BYTES]);

impl BlobKey {
    /// A fresh key from the operating system's random number generator.
    ///
    /// # Panics
    /// If the operating system's random number generator fails (it does not on supported
    /// systems).
    #[must_use]
    pub fn generate() -> Self {
        Self(<[u8; KEY_BYTES]>::generate())
    }

    /// The key as 64 lowercase hex characters.
    #[must_use]
    pub fn to_hex(&self) -> String {
        HEXLOWER.encode(&self.0)
    }

    /// Parses [`BlobKey::to_hex`]'s output (either case).
    ///
    /// # Errors
    /// [`SealError::BadKey`] unless `s` is exactly 64 hex characters.
    pub fn from_hex(s: &str) -> Result<Self, SealError> {
        if s.len() != 2 * KEY_BYTES {
            return Err(SealError::BadKey);
        }
        let bytes = HEXLOWER_PERMISSIVE
            .decode(s.as_bytes())
            .map_err(|_| SealError::BadKey)?;
        let key: [u8; KEY_BYTES] = bytes.try_into().map_err(|_| SealError::BadKey)?;
        Ok(Self(key))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&Key::from(self.0))
    }
}

impl fmt::Debug for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlobKey(..)")
    }
}

/// Why sealing, opening, wrapping or (un)packing failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A key or wrapped key is not the hex it should be (wrong length or characters).
    #[error("malformed key: not the expected hex")]
    BadKey,
    /// A wrapped key did not authenticate: another cluster's secret, or altered.
    #[error("wrapped key does not open under this cluster secret")]
    WrongSecret,
    /// The data does not start with a sealed-blob header (bad magic or too short).
    #[error("not a sealed blob (bad magic or short header)")]
    NotSealed,
    /// A segment failed authentication: tampered, reordered, truncated mid-segment,
    /// followed by trailing data, or sealed under another key.
    #[error(
        "sealed blob segment {segment} failed authentication (tampered, reordered, truncated, trailing data or wrong key)"
    )]
    Tampered {
        /// Index of the segment that failed.
        segment: u64,
    },
    /// The blob ends at a segment boundary without its final segment.
    #[error("sealed blob is truncated (final segment missing)")]
    Truncated,
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// An archive could not be written or holds an entry that is refused.
    #[error("archive: {0}")]
    Archive(String),
    /// Past a format limit (segment count, archive entries).
    #[error("too large: {0}")]
    TooLarge(&'static str),
}

impl SealError {
    /// Recovers the [`SealError`] an [`Opener`] (or [`Sealer`]) reported through an
    /// `io::Error`, also when a reader in between (such as `tar`) wrapped it again; any other
    /// error comes back as [`SealError::Io`].
    #[must_use]
    pub fn from_io(err: io::Error) -> Self {
        let mut current: Option<&(dyn StdError + 'static)> = Some(&err);
        while let Some(e) = current {
            if let Some(found) = e.downcast_ref::<SealError>().and_then(SealError::replay) {
                return found;
            }
            current = match e.downcast_ref::<io::Error>() {
                Some(io_err) => io_err
                    .get_ref()
                    .map(|inner| inner as &(dyn StdError + 'static)),
                None => e.source(),
            };
        }
        SealError::Io(err)
    }

    /// A copy of this error, for every variant but `Io`.
    fn replay(&self) -> Option<SealError> {
        Some(match self {
            SealError::BadKey => SealError::BadKey,
            SealError::WrongSecret => SealError::WrongSecret,
            SealError::NotSealed => SealError::NotSealed,
            SealError::Tampered { segment } => SealError::Tampered { segment: *segment },
            SealError::Truncated => SealError::Truncated,
            SealError::Archive(msg) => SealError::Archive(msg.clone()),
            SealError::TooLarge(what) => SealError::TooLarge(what),
            SealError::Io(_) => return None,
        })
    }
}

const TOO_MANY_SEGMENTS: &str = "sealed blob needs more than 2^32 segments (about 4 PiB)";

/// Nonce of segment `index`: the blob's prefix, the big-endian index and the last flag.
fn segment_nonce(prefix: &[u8], index: u32, last: bool) -> XNonce {
    let mut nonce = [0u8; 24];
    nonce[..NONCE_PREFIX_BYTES].copy_from_slice(prefix);
    nonce[NONCE_PREFIX_BYTES..NONCE_PREFIX_BYTES + 4].copy_from_slice(&index.to_be_bytes());
    nonce[23] = u8::from(last);
    XNonce::from(nonce)
}

/// Exact sealed length of `plain_len` bytes of plaintext: header, plaintext and one tag per
/// segment (saturating at `u64::MAX`, far beyond the format's limit).
#[must_use]
pub fn sealed_len(plain_len: u64) -> u64 {
    let segments = plain_len / SEGMENT_BYTES as u64 + 1;
    (HEADER_BYTES as u64)
        .saturating_add(plain_len)
        .saturating_add(segments.saturating_mul(TAG_BYTES as u64))
}

/// Streaming encryptor: writes the header (magic and a random 19-byte nonce prefix) at
/// once, then one sealed segment per [`SEGMENT_BYTES`] of plaintext written, and the final
/// (possibly empty) segment at [`Sealer::finish`].
///
/// A `Sealer` dropped without `finish` leaves a blob that fails to open (truncated). After
/// an error every further call fails.
pub struct Sealer<W: Write> {
    inner: W,
    cipher: XChaCha20Poly1305,
    header: [u8; HEADER_BYTES],
    /// One segment: plaintext being gathered, then its ciphertext and tag.
    buf: Box<[u8]>,
    /// Plaintext bytes gathered in `buf`.
    filled: usize,
    /// Index of the next segment to seal.
    index: u64,
    plain: u64,
    failed: bool,
}

impl<W: Write> Sealer<W> {
    /// Starts a sealed blob under `key`, writing its header to `inner`.
    ///
    /// # Errors
    /// Writing the header failed.
    pub fn new(mut inner: W, key: &BlobKey) -> io::Result<Self> {
        let mut header = [0u8; HEADER_BYTES];
        header[..MAGIC.len()].copy_from_slice(MAGIC);
        header[MAGIC.len()..].copy_from_slice(&<[u8; NONCE_PREFIX_BYTES]>::generate());
        inner.write_all(&header)?;
        Ok(Self {
            inner,
            cipher: key.cipher(),
            header,
            buf: vec![0u8; SEALED_SEGMENT_BYTES].into_boxed_slice(),
            filled: 0,
            index: 0,
            plain: 0,
            failed: false,
        })
    }

    /// Plaintext bytes written so far.
    #[must_use]
    pub fn plain_bytes(&self) -> u64 {
        self.plain
    }

    /// Seals the final segment (whatever plaintext is pending, possibly none), flushes and
    /// returns the inner writer.
    ///
    /// # Errors
    /// Writing failed, or an earlier call failed.
    pub fn finish(mut self) -> io::Result<W> {
        self.check()?;
        self.seal(None, self.filled, true)?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    fn check(&self) -> io::Result<()> {
        if self.failed {
            Err(io::Error::other("sealer failed earlier"))
        } else {
            Ok(())
        }
    }

    /// Seals `len` bytes, from `src` when given (then `len == src.len()`) or else from the
    /// buffer in place, and writes segment and tag.
    fn seal(&mut self, src: Option<&[u8]>, len: usize, last: bool) -> io::Result<()> {
        let result = self.seal_inner(src, len, last);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn seal_inner(&mut self, src: Option<&[u8]>, len: usize, last: bool) -> io::Result<()> {
        // A non-final segment needs room for the final one after it.
        let index = u32::try_from(self.index)
            .ok()
            .filter(|&i| last || i < u32::MAX)
            .ok_or_else(|| io::Error::other(SealError::TooLarge(TOO_MANY_SEGMENTS)))?;
        let nonce = segment_nonce(&self.header[MAGIC.len()..], index, last);
        let (body, rest) = self.buf.split_at_mut(len);
        let inout = match src {
            Some(src) => InOutBuf::new(src, body).map_err(io::Error::other)?,
            None => InOutBuf::from(body),
        };
        let tag = self
            .cipher
            .encrypt_inout_detached(&nonce, &self.header, inout)
            .map_err(|_| {
                io::Error::other(SealError::TooLarge("segment too long for the cipher"))
            })?;
        rest[..TAG_BYTES].copy_from_slice(&tag);
        self.inner.write_all(&self.buf[..len + TAG_BYTES])?;
        self.index += 1;
        self.filled = 0;
        Ok(())
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.check()?;
        let mut rest = data;
        while !rest.is_empty() {
            if self.filled == 0 && rest.len() >= SEGMENT_BYTES {
                // A whole segment at hand: encrypt straight from the caller's slice.
                let (segment, tail) = rest.split_at(SEGMENT_BYTES);
                self.seal(Some(segment), SEGMENT_BYTES, false)?;
                rest = tail;
            } else {
                let n = rest.len().min(SEGMENT_BYTES - self.filled);
                self.buf[self.filled..self.filled + n].copy_from_slice(&rest[..n]);
                self.filled += n;
                rest = &rest[n..];
                if self.filled == SEGMENT_BYTES {
                    self.seal(None, SEGMENT_BYTES, false)?;
                }
            }
        }
        self.plain += data.len() as u64;
        Ok(data.len())
    }

    /// Flushes the inner writer. Pending plaintext stays buffered: only full segments (and
    /// the final one, at [`Sealer::finish`]) can be sealed.
    fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        self.inner.flush()
    }
}

/// Streaming decryptor of a [`Sealer`]'s output.
///
/// Reads yield only authenticated plaintext. Tampering, reordering, truncation (a missing
/// final segment) or trailing data make a read fail with `io::ErrorKind::InvalidData`
/// wrapping a [`SealError`] (see [`SealError::from_io`]); once failed, every further read
/// fails. Plaintext of segments before the damaged one has been returned by then, so a
/// consumer must not act on the data until reading has reached the end.
pub struct Opener<R: Read> {
    inner: R,
    cipher: XChaCha20Poly1305,
    header: [u8; HEADER_BYTES],
    /// One segment: ciphertext and tag as read, then its plaintext.
    buf: Box<[u8]>,
    /// Unread plaintext is `buf[pos..end]`.
    pos: usize,
    end: usize,
    /// Index of the next segment to read.
    index: u64,
    /// The final segment has been opened (and the inner reader is at its end).
    done: bool,
    failed: Option<Failure>,
}

/// What a failed [`Opener`] keeps reporting.
#[derive(Clone, Copy)]
enum Failure {
    Tampered(u64),
    Truncated,
    TooLarge,
    Io,
}

impl Failure {
    fn error(self) -> io::Error {
        let err = match self {
            Failure::Tampered(segment) => SealError::Tampered { segment },
            Failure::Truncated => SealError::Truncated,
            Failure::TooLarge => SealError::TooLarge(TOO_MANY_SEGMENTS),
            Failure::Io => return io::Error::other("sealed blob: an earlier read failed"),
        };
        io::Error::new(io::ErrorKind::InvalidData, err)
    }
}

impl<R: Read> Opener<R> {
    /// Reads and checks the header of a sealed blob to be opened with `key`.
    ///
    /// # Errors
    /// [`SealError::NotSealed`] on a short header or bad magic, [`SealError::Io`] if
    /// reading failed. A wrong key shows only at the first read.
    pub fn new(mut inner: R, key: &BlobKey) -> Result<Self, SealError> {
        let mut header = [0u8; HEADER_BYTES];
        inner.read_exact(&mut header).map_err(|err| {
            if err.kind() == io::ErrorKind::UnexpectedEof {
                SealError::NotSealed
            } else {
                SealError::Io(err)
            }
        })?;
        if &header[..MAGIC.len()] != MAGIC {
            return Err(SealError::NotSealed);
        }
        Ok(Self {
            inner,
            cipher: key.cipher(),
            header,
            buf: vec![0u8; SEALED_SEGMENT_BYTES].into_boxed_slice(),
            pos: 0,
            end: 0,
            index: 0,
            done: false,
            failed: None,
        })
    }

    /// Reads, authenticates and decrypts the next segment into `buf`.
    fn next_segment(&mut self) -> Result<(), (Failure, io::Error)> {
        let n = read_full(&mut self.inner, &mut self.buf).map_err(|e| (Failure::Io, e))?;
        // Only the final segment is shorter than a full one (see the module docs).
        let last = n < SEALED_SEGMENT_BYTES;
        if n < TAG_BYTES {
            return Err((Failure::Truncated, Failure::Truncated.error()));
        }
        let index = u32::try_from(self.index)
            .map_err(|_| (Failure::TooLarge, Failure::TooLarge.error()))?;
        let tampered = Failure::Tampered(self.index);
        let nonce = segment_nonce(&self.header[MAGIC.len()..], index, last);
        let len = n - TAG_BYTES;
        let (body, tag) = self.buf[..n].split_at_mut(len);
        let tag = Tag::try_from(&*tag).map_err(|_| (tampered, tampered.error()))?;
        self.cipher
            .decrypt_inout_detached(&nonce, &self.header, InOutBuf::from(body), &tag)
            .map_err(|_| (tampered, tampered.error()))?;
        self.pos = 0;
        self.end = len;
        self.index += 1;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for Opener<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(failure) = self.failed {
                return Err(failure.error());
            }
            if self.pos < self.end {
                let n = out.len().min(self.end - self.pos);
                out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.done || out.is_empty() {
                return Ok(0);
            }
            if let Err((failure, err)) = self.next_segment() {
                self.failed = Some(failure);
                self.pos = 0;
                self.end = 0;
                return Err(err);
            }
        }
    }
}

/// Reads until `buf` is full or the reader is at its end; returns the bytes read.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Wraps a data key under the cluster secret so it can sit in replicated documents.
///
/// The key-encryption key is `blake3::derive_key("mutual-cloud 2026 blob key wrap v1",
/// secret)`; the output is lowercase hex of a random 24-byte nonce followed by the
/// XChaCha20-Poly1305 ciphertext and tag of the key (no associated data):
/// [`WRAPPED_KEY_HEX`] characters.
#[must_use]
pub fn wrap_key(secret: &[u8; KEY_BYTES], key: &BlobKey) -> String {
    let cipher = XChaCha20Poly1305::new(&Key::from(blake3::derive_key(KEY_WRAP_CONTEXT, secret)));
    let nonce = XNonce::generate();
    let mut out = [0u8; WRAPPED_KEY_HEX / 2];
    let (nonce_out, rest) = out.split_at_mut(24);
    let (body, tag_out) = rest.split_at_mut(KEY_BYTES);
    nonce_out.copy_from_slice(&nonce);
    body.copy_from_slice(&key.0);
    let tag = cipher
        .encrypt_inout_detached(&nonce, &[], InOutBuf::from(body))
        .expect("a 32-byte message is within XChaCha20-Poly1305's limits");
    tag_out.copy_from_slice(&tag);
    HEXLOWER.encode(&out)
}

/// Opens [`wrap_key`]'s output with the same cluster secret.
///
/// # Errors
/// [`SealError::BadKey`] unless `wrapped` is [`WRAPPED_KEY_HEX`] hex characters,
/// [`SealError::WrongSecret`] if it does not authenticate under `secret`.
pub fn unwrap_key(secret: &[u8; KEY_BYTES], wrapped: &str) -> Result<BlobKey, SealError> {
    if wrapped.len() != WRAPPED_KEY_HEX {
        return Err(SealError::BadKey);
    }
    let mut bytes = HEXLOWER_PERMISSIVE
        .decode(wrapped.as_bytes())
        .map_err(|_| SealError::BadKey)?;
    if bytes.len() != WRAPPED_KEY_HEX / 2 {
        return Err(SealError::BadKey);
    }
    let (nonce, rest) = bytes.split_at_mut(24);
    let (body, tag) = rest.split_at_mut(KEY_BYTES);
    let nonce = XNonce::try_from(&*nonce).map_err(|_| SealError::BadKey)?;
    let tag = Tag::try_from(&*tag).map_err(|_| SealError::BadKey)?;
    let cipher = XChaCha20Poly1305::new(&Key::from(blake3::derive_key(KEY_WRAP_CONTEXT, secret)));
    cipher
        .decrypt_inout_detached(&nonce, &[], InOutBuf::from(&mut *body), &tag)
        .map_err(|_| SealError::WrongSecret)?;
    let key: [u8; KEY_BYTES] = (&*body).try_into().map_err(|_| SealError::BadKey)?;
    Ok(BlobKey(key))
}

// ---------------------------------------------------------------------------------------
// Archives
// ---------------------------------------------------------------------------------------

/// Packs a file or directory (recursively) into a tar archive written to `out`, stored
/// under its own base name, and returns `out`.
///
/// `path` itself is followed if it is a symlink (packing a link to a data set packs the data
/// set); inside a directory, symlinks are stored as symlinks, not followed. Sockets and
/// other special files are skipped. Entries are written as by [`pack_dir_contents`]:
/// sorted, deterministic metadata.
///
/// # Errors
/// Reading the tree or writing `out` failed; `path` has no base name; more than
/// [`MAX_ARCHIVE_ENTRIES`] entries.
pub fn pack_path<W: Write>(path: &Path, out: W) -> Result<W, SealError> {
    let resolved;
    let name = match path.file_name() {
        Some(name) => name,
        None => {
            resolved = fs::canonicalize(path)?;
            resolved.file_name().ok_or_else(|| {
                SealError::Archive(format!("{} has no base name to store", path.display()))
            })?
        }
    };
    let mut builder = tar::Builder::new(out);
    let meta = fs::metadata(path)?;
    let mut packer = Packer::default();
    packer.append(&mut builder, path, Path::new(name), &meta)?;
    packer.run(&mut builder)?;
    Ok(builder.into_inner()?)
}

/// Packs the contents of directory `dir` (followed if it is a symlink) into a tar archive
/// written to `out`, with paths relative to `dir`, and returns `out`. For outputs and
/// checkpoints.
///
/// Deterministic: entries come depth-first in byte order of their names, every entry has
/// owner 0:0 and the fixed time [`tar::DETERMINISTIC_TIMESTAMP`], directories mode 0755,
/// files 0755 if any executable bit is set and 0644 otherwise, symlinks 0777; so packing an
/// unchanged tree twice gives the same bytes. Symlinks are stored as symlinks; sockets and
/// other special files are skipped.
///
/// # Errors
/// Reading the tree or writing `out` failed; `dir` is not a directory; more than
/// [`MAX_ARCHIVE_ENTRIES`] entries.
pub fn pack_dir_contents<W: Write>(dir: &Path, out: W) -> Result<W, SealError> {
    if !fs::metadata(dir)?.is_dir() {
        return Err(SealError::Archive(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let mut builder = tar::Builder::new(out);
    let mut packer = Packer::default();
    packer.push_children(dir, Path::new(""))?;
    packer.run(&mut builder)?;
    Ok(builder.into_inner()?)
}

/// Depth-first, sorted walk of a tree into a tar builder (an explicit stack, so deep trees
/// cannot overflow the call stack).
#[derive(Default)]
struct Packer {
    /// (source path, archive path), popped from the end.
    stack: Vec<(PathBuf, PathBuf)>,
    entries: u64,
}

impl Packer {
    fn run<W: Write>(&mut self, builder: &mut tar::Builder<W>) -> Result<(), SealError> {
        while let Some((src, name)) = self.stack.pop() {
            let meta = fs::symlink_metadata(&src)?;
            self.append(builder, &src, &name, &meta)?;
        }
        Ok(())
    }

    /// Queues the children of directory `src`, to be visited in byte order of their names.
    fn push_children(&mut self, src: &Path, name: &Path) -> Result<(), SealError> {
        let mut children = fs::read_dir(src)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<io::Result<Vec<OsString>>>()?;
        children.sort_unstable();
        self.stack.extend(
            children
                .into_iter()
                .rev()
                .map(|child| (src.join(&child), name.join(&child))),
        );
        Ok(())
    }

    fn append<W: Write>(
        &mut self,
        builder: &mut tar::Builder<W>,
        src: &Path,
        name: &Path,
        meta: &fs::Metadata,
    ) -> Result<(), SealError> {
        let file_type = meta.file_type();
        let kind = if file_type.is_dir() {
            tar::EntryType::Directory
        } else if file_type.is_file() {
            tar::EntryType::Regular
        } else if file_type.is_symlink() {
            tar::EntryType::Symlink
        } else {
            return Ok(()); // sockets, fifos, devices: not job data
        };
        self.entries += 1;
        if self.entries > MAX_ARCHIVE_ENTRIES {
            return Err(SealError::TooLarge("more than 1000000 archive entries"));
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(tar::DETERMINISTIC_TIMESTAMP);
        header.set_size(0);
        match kind {
            tar::EntryType::Directory => {
                header.set_mode(0o755);
                builder.append_data(&mut header, name, io::empty())?;
                self.push_children(src, name)?;
            }
            tar::EntryType::Symlink => {
                header.set_mode(0o777);
                let target = fs::read_link(src)?;
                builder.append_link(&mut header, name, target)?;
            }
            _ => {
                let executable = meta.permissions().mode() & 0o111 != 0;
                header.set_mode(if executable { 0o755 } else { 0o644 });
                let size = meta.len();
                header.set_size(size);
                let file = fs::File::open(src)?;
                let data = ExactReader {
                    inner: file.take(size),
                    remaining: size,
                    path: src,
                };
                builder.append_data(&mut header, name, data)?;
            }
        }
        Ok(())
    }
}

/// Reads exactly the size recorded in a tar header: a file that shrank while being packed
/// is an error rather than a corrupt archive (one that grew is cut at the recorded size).
struct ExactReader<'a> {
    inner: io::Take<fs::File>,
    remaining: u64,
    path: &'a Path,
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while being packed", self.path.display()),
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// What [`unpack`] wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    /// Regular files written.
    pub files: u64,
    /// Bytes in them.
    pub bytes: u64,
}

/// Unpacks a tar archive (such as an [`Opener`] over [`pack_path`]'s sealed output) into
/// `dest`, creating it if missing.
///
/// Refuses, with [`SealError::Archive`]: absolute paths and `..` components; paths through
/// a symlink the archive created; symlinks that are absolute or could resolve outside
/// `dest` (a relative target may only begin with `..` components, no more of them than the
/// link's depth); hard links out of the archive; device files, fifos and unknown entry
/// types. More than [`MAX_ARCHIVE_ENTRIES`] entries is [`SealError::TooLarge`]. Files get
/// modes 0644/0755 as stored (no set-id bits) and the current time. After the last entry
/// the input is read to its end, so an [`Opener`] checks the final segment.
///
/// On error, what was unpacked so far stays in `dest`, all of it inside `dest`.
///
/// # Errors
/// As above; reading the input (a sealed blob's [`SealError`] comes back as itself, see
/// [`SealError::from_io`]) or writing files failed.
pub fn unpack<R: Read>(input: R, dest: &Path) -> Result<UnpackStats, SealError> {
    fs::create_dir_all(dest)?;
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(false);
    archive.set_preserve_mtime(false);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut stats = UnpackStats::default();
    let mut links: HashSet<PathBuf> = HashSet::new();
    let mut count = 0u64;
    for entry in archive.entries().map_err(SealError::from_io)? {
        let mut entry = entry.map_err(SealError::from_io)?;
        count += 1;
        if count > MAX_ARCHIVE_ENTRIES {
            return Err(SealError::TooLarge("more than 1000000 archive entries"));
        }
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let raw_path = entry.path().map_err(SealError::from_io)?.into_owned();
        let Some(rel) = safe_relative(&raw_path) else {
            return Err(refused("unsafe path", &raw_path));
        };
        if rel.as_os_str().is_empty() {
            continue; // "." or "./": dest itself
        }
        if rel.ancestors().skip(1).any(|a| links.contains(a)) {
            return Err(refused("path through a symlink", &raw_path));
        }
        let is_file = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                true
            }
            tar::EntryType::Directory => false,
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(SealError::from_io)?
                    .ok_or_else(|| refused("link without a target", &raw_path))?
                    .into_owned();
                let ok = if kind == tar::EntryType::Symlink {
                    symlink_stays_inside(&rel, &target)
                } else {
                    safe_relative(&target).is_some_and(|t| {
                        !t.as_os_str().is_empty()
                            && !t.ancestors().skip(1).any(|a| links.contains(a))
                    })
                };
                if !ok {
                    return Err(SealError::Archive(format!(
                        "refused link {} -> {}: points outside the destination",
                        raw_path.display(),
                        target.display()
                    )));
                }
                false
            }
            _ => return Err(refused("device, fifo or unknown entry type", &raw_path)),
        };
        let size = entry.size();
        if !entry.unpack_in(dest).map_err(SealError::from_io)? {
            return Err(refused("unsafe path", &raw_path));
        }
        if kind == tar::EntryType::Symlink {
            links.insert(rel);
        }
        if is_file {
            stats.files += 1;
            stats.bytes += size;
        }
    }
    // Read to the end: a sealed blob's final segment is only checked there.
    let mut input = archive.into_inner();
    io::copy(&mut input, &mut io::sink()).map_err(SealError::from_io)?;
    Ok(stats)
}

fn refused(why: &str, path: &Path) -> SealError {
    SealError::Archive(format!("refused entry {}: {why}", path.display()))
}

/// `path` without `.` components, if it is relative and has no `..`.
fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut rel = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(rel)
}

/// Whether a symlink at `link` (relative to the destination, through real directories only)
/// to `target` resolves inside the destination, whatever other links inside it point to:
/// the target must be relative, and its `..` components must all lead and not climb above
/// the destination.
fn symlink_stays_inside(link: &Path, target: &Path) -> bool {
    let mut depth = link.components().count().saturating_sub(1);
    let mut descended = false;
    for component in target.components() {
        match component {
            Component::CurDir => {}
            Component::Normal(_) => descended = true,
            Component::ParentDir => {
                if descended || depth == 0 {
                    return false;
                }
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Sum of regular-file sizes under `path` (for progress bars): `path` itself is followed if
/// it is a symlink, as [`pack_path`] does; symlinks below it are not.
///
/// # Errors
/// Reading the tree failed.
pub fn tree_bytes(path: &Path) -> io::Result<u64> {
    let meta = fs::metadata(path)?;
    if !meta.is_dir() {
        return Ok(if meta.is_file() { meta.len() } else { 0 });
    }
    let mut total = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                stack.push(entry.path());
            } else if file_type.is_file() {
                total += entry.metadata()?.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn data(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x1234_5678;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn seal(plain: &[u8], key: &BlobKey, chunk: usize) -> Vec<u8> {
        let mut sealer = Sealer::new(Vec::new(), key).unwrap();
        for part in plain.chunks(chunk) {
            sealer.write_all(part).unwrap();
        }
        assert_eq!(sealer.plain_bytes(), plain.len() as u64);
        sealer.finish().unwrap()
    }

    fn open(sealed: &[u8], key: &BlobKey, chunk: usize) -> Result<Vec<u8>, SealError> {
        let mut opener = Opener::new(sealed, key)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            match opener.read(&mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => {
                    // Sticky: the next read fails too.
                    assert!(opener.read(&mut buf).is_err());
                    return Err(SealError::from_io(e));
                }
            }
        }
    }

    const LENGTHS: [usize; 6] = [
        0,
        1,
        SEGMENT_BYTES - 1,
        SEGMENT_BYTES,
        SEGMENT_BYTES + 1,
        3 * SEGMENT_BYTES + 17,
    ];

    #[test]
    fn seal_round_trips() {
        let key = BlobKey::generate();
        for len in LENGTHS {
            let plain = data(len);
            let sealed = seal(&plain, &key, 4093);
            assert_eq!(sealed.len() as u64, sealed_len(len as u64), "len {len}");
            assert_eq!(&sealed[..8], MAGIC);
            assert_eq!(open(&sealed, &key, 777).unwrap(), plain, "len {len}");
            // One big write and one big read take the direct paths.
            let sealed = seal(&plain, &key, usize::MAX);
            assert_eq!(sealed.len() as u64, sealed_len(len as u64));
            let mut out = Vec::new();
            Opener::new(&sealed[..], &key)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, plain);
        }
    }

    #[test]
    fn sealed_len_formula() {
        let h = HEADER_BYTES as u64;
        let s = SEGMENT_BYTES as u64;
        assert_eq!(sealed_len(0), h + 16);
        assert_eq!(sealed_len(s - 1), h + s - 1 + 16);
        assert_eq!(sealed_len(s), h + s + 32);
        assert_eq!(sealed_len(u64::MAX), u64::MAX);
    }

    #[test]
    fn same_plaintext_seals_differently() {
        let key = BlobKey::generate();
        assert_ne!(seal(b"hello", &key, 5), seal(b"hello", &key, 5));
    }

    fn assert_fails(sealed: &[u8], key: &BlobKey) -> SealError {
        match open(sealed, key, 4096) {
            Ok(_) => panic!("opened damaged ciphertext"),
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        SealError::Tampered { .. } | SealError::Truncated | SealError::NotSealed
                    ),
                    "{e:?}"
                );
                e
            }
        }
    }

    #[test]
    fn tampering_fails() {
        let key = BlobKey::generate();
        let plain = data(3 * SEGMENT_BYTES + 17);
        let sealed = seal(&plain, &key, 65536);
        let seg = SEALED_SEGMENT_BYTES;
        let cases = [
            (0, "magic"),
            (10, "nonce prefix"),
            (HEADER_BYTES - 1, "nonce prefix end"),
            (HEADER_BYTES, "first byte"),
            (HEADER_BYTES + seg + 1000, "middle segment"),
            (HEADER_BYTES + 2 * seg - 1, "tag of segment 1"),
            (HEADER_BYTES + 3 * seg + 3, "final segment body"),
            (sealed.len() - 1, "tag of the final segment"),
        ];
        for (at, what) in cases {
            for bit in [0x01u8, 0x80] {
                let mut bad = sealed.clone();
                bad[at] ^= bit;
                let err = assert_fails(&bad, &key);
                if at < 8 {
                    assert!(matches!(err, SealError::NotSealed), "{what}: {err:?}");
                } else {
                    assert!(matches!(err, SealError::Tampered { .. }), "{what}: {err:?}");
                }
            }
        }
        let mut bad = sealed.clone();
        bad[HEADER_BYTES + seg + 5] ^= 4;
        assert!(matches!(
            assert_fails(&bad, &key),
            SealError::Tampered { segment: 1 }
        ));
    }

    #[test]
    fn truncation_fails() {
        let key = BlobKey::generate();
        let seg = SEALED_SEGMENT_BYTES;
        let sealed = seal(&data(3 * SEGMENT_BYTES + 17), &key, 100_000);
        for cut in [
            HEADER_BYTES,
            HEADER_BYTES + seg,
            HEADER_BYTES + 2 * seg,
            HEADER_BYTES + 3 * seg, // final segment dropped
        ] {
            assert!(matches!(
                assert_fails(&sealed[..cut], &key),
                SealError::Truncated
            ));
        }
        for cut in [
            HEADER_BYTES + 5,
            HEADER_BYTES + seg + 5000,
            HEADER_BYTES + 3 * seg + 15,
            sealed.len() - 1,
        ] {
            assert_fails(&sealed[..cut], &key);
        }
        for cut in [0, 5, HEADER_BYTES - 1] {
            assert!(matches!(
                assert_fails(&sealed[..cut], &key),
                SealError::NotSealed
            ));
        }
        // An exact multiple ends in an empty final segment: dropping it is caught too.
        let sealed = seal(&data(SEGMENT_BYTES), &key, 100_000);
        assert_eq!(sealed.len(), HEADER_BYTES + seg + TAG_BYTES);
        assert!(matches!(
            assert_fails(&sealed[..HEADER_BYTES + seg], &key),
            SealError::Truncated
        ));
        // And an empty blob is a header and a tag.
        let sealed = seal(b"", &key, 1);
        assert!(matches!(
            assert_fails(&sealed[..HEADER_BYTES], &key),
            SealError::Truncated
        ));
    }

    #[test]
    fn appended_bytes_fail() {
        let key = BlobKey::generate();
        for len in [0, 100, SEGMENT_BYTES, 2 * SEGMENT_BYTES + 3] {
            let sealed = seal(&data(len), &key, 100_000);
            for extra in [1, TAG_BYTES, 1000, SEALED_SEGMENT_BYTES] {
                let mut bad = sealed.clone();
                bad.extend(std::iter::repeat_n(0u8, extra));
                assert_fails(&bad, &key);
            }
            // Appending a whole copy of the final segment.
            let last = (sealed.len() - HEADER_BYTES) % SEALED_SEGMENT_BYTES;
            let mut bad = sealed.clone();
            bad.extend_from_slice(&sealed[sealed.len() - last..]);
            assert_fails(&bad, &key);
        }
    }

    #[test]
    fn reordered_segments_fail() {
        let key = BlobKey::generate();
        let seg = SEALED_SEGMENT_BYTES;
        let sealed = seal(&data(3 * SEGMENT_BYTES + 17), &key, 100_000);
        let mut bad = sealed.clone();
        let (a, b) = (HEADER_BYTES, HEADER_BYTES + seg);
        bad[a..a + seg].copy_from_slice(&sealed[b..b + seg]);
        bad[b..b + seg].copy_from_slice(&sealed[a..a + seg]);
        assert!(matches!(
            assert_fails(&bad, &key),
            SealError::Tampered { segment: 0 }
        ));
        // Dropping a middle segment.
        let mut bad = sealed[..b].to_vec();
        bad.extend_from_slice(&sealed[b + seg..]);
        assert!(matches!(
            assert_fails(&bad, &key),
            SealError::Tampered { segment: 1 }
        ));
        // Splicing a segment from another blob under the same key.
        let other = seal(&data(3 * SEGMENT_BYTES + 17), &key, 100_000);
        let mut bad = sealed.clone();
        bad[b..b + seg].copy_from_slice(&other[b..b + seg]);
        assert!(matches!(
            assert_fails(&bad, &key),
            SealError::Tampered { segment: 1 }
        ));
    }

    #[test]
    fn wrong_key_fails() {
        let sealed = seal(&data(1000), &BlobKey::generate(), 100);
        assert!(matches!(
            assert_fails(&sealed, &BlobKey::generate()),
            SealError::Tampered { segment: 0 }
        ));
    }

    #[test]
    fn segment_limit() {
        let key = BlobKey::generate();
        let mut sealer = Sealer::new(Vec::new(), &key).unwrap();
        sealer.index = u64::from(u32::MAX);
        let err = sealer.write_all(&data(SEGMENT_BYTES)).unwrap_err();
        assert!(matches!(SealError::from_io(err), SealError::TooLarge(_)));
        assert!(sealer.write_all(b"x").is_err());
        assert!(sealer.finish().is_err());
        // The final segment may still take the last index.
        let mut sealer = Sealer::new(Vec::new(), &key).unwrap();
        sealer.index = u64::from(u32::MAX);
        sealer.write_all(b"tail").unwrap();
        sealer.finish().unwrap();
    }

    #[test]
    fn blob_key_hex_and_debug() {
        let key = BlobKey::generate();
        let hex = key.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, hex.to_lowercase());
        assert_eq!(BlobKey::from_hex(&hex).unwrap(), key);
        assert_eq!(BlobKey::from_hex(&hex.to_uppercase()).unwrap(), key);
        assert_eq!(format!("{key:?}"), "BlobKey(..)");
        assert_ne!(BlobKey::generate(), key);
        for bad in [
            "",
            "00",
            &hex[..62],
            &format!("{hex}00"),
            &"zz".repeat(32),
            &"é".repeat(32),
        ] {
            assert!(
                matches!(BlobKey::from_hex(bad), Err(SealError::BadKey)),
                "{bad}"
            );
        }
    }

    #[test]
    fn key_wrapping() {
        let secret = [7u8; 32];
        let key = BlobKey::generate();
        let wrapped = wrap_key(&secret, &key);
        assert_eq!(wrapped.len(), WRAPPED_KEY_HEX);
        assert_eq!(wrapped, wrapped.to_lowercase());
        assert!(!wrapped.contains(&key.to_hex()));
        assert_ne!(wrap_key(&secret, &key), wrapped, "random nonce");
        assert_eq!(unwrap_key(&secret, &wrapped).unwrap(), key);
        assert!(matches!(
            unwrap_key(&[8u8; 32], &wrapped),
            Err(SealError::WrongSecret)
        ));
        // Any changed character fails to authenticate.
        for at in [0, 47, 48, 100, WRAPPED_KEY_HEX - 1] {
            let mut bad = wrapped.clone().into_bytes();
            bad[at] = if bad[at] == b'0' { b'1' } else { b'0' };
            let bad = String::from_utf8(bad).unwrap();
            assert!(matches!(
                unwrap_key(&secret, &bad),
                Err(SealError::WrongSecret)
            ));
        }
        let garbage = [
            String::new(),
            "00".to_string(),
            wrapped[..WRAPPED_KEY_HEX - 2].to_string(),
            format!("{wrapped}00"),
            "zz".repeat(72),
            "é".repeat(72),
            format!("{}g", &wrapped[..WRAPPED_KEY_HEX - 1]),
            key.to_hex(),
        ];
        for bad in &garbage {
            assert!(
                matches!(unwrap_key(&secret, bad), Err(SealError::BadKey)),
                "{bad}"
            );
        }
    }

    fn write_file(path: &Path, contents: &[u8], mode: u32) {
        fs::write(path, contents).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A tree with nested files, an executable, an empty directory and an inner symlink.
    fn sample_tree(root: &Path) {
        fs::create_dir_all(root.join("sub/deeper")).unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        write_file(&root.join("a.txt"), b"alpha\n", 0o644);
        write_file(&root.join("run.sh"), b"#!/bin/sh\necho hi\n", 0o750);
        write_file(
            &root.join("sub/big.bin"),
            &data(SEGMENT_BYTES + 12345),
            0o600,
        );
        write_file(&root.join("sub/deeper/c"), b"", 0o644);
        let long = "n".repeat(150);
        write_file(&root.join("sub").join(&long), b"long name", 0o644);
        symlink("../a.txt", root.join("sub/link")).unwrap();
    }

    /// Asserts two trees have the same names, kinds, contents, executable bits and links.
    fn assert_same_tree(a: &Path, b: &Path) {
        let list = |dir: &Path| {
            let mut names: Vec<OsString> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            names
        };
        assert_eq!(list(a), list(b), "{}", a.display());
        for name in list(a) {
            let (pa, pb) = (a.join(&name), b.join(&name));
            let (ma, mb) = (
                fs::symlink_metadata(&pa).unwrap(),
                fs::symlink_metadata(&pb).unwrap(),
            );
            assert_eq!(ma.file_type(), mb.file_type(), "{}", pa.display());
            if ma.is_dir() {
                assert_same_tree(&pa, &pb);
            } else if ma.is_symlink() {
                assert_eq!(fs::read_link(&pa).unwrap(), fs::read_link(&pb).unwrap());
            } else {
                assert_eq!(fs::read(&pa).unwrap(), fs::read(&pb).unwrap());
                assert_eq!(
                    ma.permissions().mode() & 0o100 != 0,
                    mb.permissions().mode() & 0o100 != 0,
                    "{}",
                    pa.display()
                );
            }
        }
    }

    #[test]
    fn pack_path_round_trips_sealed() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("data");
        sample_tree(&src);
        let key = BlobKey::generate();
        let sealer = pack_path(&src, Sealer::new(Vec::new(), &key).unwrap()).unwrap();
        let plain_len = sealer.plain_bytes();
        let sealed = sealer.finish().unwrap();
        assert_eq!(sealed.len() as u64, sealed_len(plain_len));

        let dest = tmp.path().join("out/nested");
        let stats = unpack(Opener::new(&sealed[..], &key).unwrap(), &dest).unwrap();
        assert_same_tree(&src, &dest.join("data"));
        assert_eq!(
            stats,
            UnpackStats {
                files: 5,
                bytes: tree_bytes(&src).unwrap()
            }
        );
        assert_eq!(
            tree_bytes(&src).unwrap(),
            6 + 18 + SEGMENT_BYTES as u64 + 12345 + 9
        );
        let mode = fs::metadata(dest.join("data/run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);

        // A single file is stored under its base name; a trailing "." resolves.
        let archive = pack_path(&src.join("a.txt"), Vec::new()).unwrap();
        let dest2 = tmp.path().join("single");
        assert_eq!(unpack(&archive[..], &dest2).unwrap().files, 1);
        assert_eq!(fs::read(dest2.join("a.txt")).unwrap(), b"alpha\n");
        let archive = pack_path(&src.join("sub/."), Vec::new()).unwrap();
        let dest3 = tmp.path().join("dot");
        unpack(&archive[..], &dest3).unwrap();
        assert_same_tree(&src.join("sub"), &dest3.join("sub"));
    }

    #[test]
    fn pack_dir_contents_is_deterministic() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("ckpt");
        sample_tree(&src);
        let first = pack_dir_contents(&src, Vec::new()).unwrap();
        let second = pack_dir_contents(&src, Vec::new()).unwrap();
        assert_eq!(first, second);
        // Paths are relative to the directory.
        let dest = tmp.path().join("restored");
        unpack(&first[..], &dest).unwrap();
        assert_same_tree(&src, &dest);
        // Same tree, other times and permissions that are not executable bits: same bytes.
        let copy_packed = pack_dir_contents(&dest, Vec::new()).unwrap();
        assert_eq!(copy_packed, first);
        // Same size, other contents.
        write_file(&src.join("a.txt"), b"alphA\n", 0o644);
        let changed = pack_dir_contents(&src, Vec::new()).unwrap();
        assert_ne!(changed, first);
        // The executable bit counts.
        write_file(&src.join("a.txt"), b"alpha\n", 0o644);
        assert_eq!(pack_dir_contents(&src, Vec::new()).unwrap(), first);
        fs::set_permissions(src.join("a.txt"), fs::Permissions::from_mode(0o744)).unwrap();
        assert_ne!(pack_dir_contents(&src, Vec::new()).unwrap(), first);
        // A new empty directory counts.
        fs::set_permissions(src.join("a.txt"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::create_dir(src.join("empty/new")).unwrap();
        assert_ne!(pack_dir_contents(&src, Vec::new()).unwrap(), first);
        assert!(pack_dir_contents(&src.join("a.txt"), Vec::new()).is_err());
    }

    /// A raw archive entry, its name written straight into the header (no path checks).
    fn raw_entry(
        builder: &mut tar::Builder<Vec<u8>>,
        name: &[u8],
        kind: tar::EntryType,
        link: &[u8],
        contents: &[u8],
    ) {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_size(contents.len() as u64);
        header.set_cksum();
        builder.append(&header, contents).unwrap();
    }

    /// Name, type and link target of a hand-made archive entry.
    type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8]);

    fn archive(entries: &[RawEntry<'_>]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        raw_entry(
            &mut builder,
            b"ok.txt",
            tar::EntryType::Regular,
            b"",
            b"fine",
        );
        for (name, kind, link) in entries {
            raw_entry(&mut builder, name, *kind, link, b"evil");
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn unpack_refuses_escapes() {
        use tar::EntryType::{Block, Char, Directory, Fifo, Link, Regular, Symlink};
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let abs = outside.join("abs_evil");
        let abs_bytes = abs.to_str().unwrap().as_bytes().to_vec();
        let outside_bytes = outside.to_str().unwrap().as_bytes().to_vec();
        let cases: Vec<Vec<RawEntry<'_>>> = vec![
            vec![(b"../evil", Regular, b"")],
            vec![(b"sub/../../evil", Regular, b"")],
            vec![(b"../outside/evil", Regular, b"")],
            vec![(&abs_bytes, Regular, b"")],
            vec![(b"/evil_at_root", Regular, b"")],
            vec![(b"../evil_dir", Directory, b"")],
            vec![(b"link", Symlink, &outside_bytes)],
            vec![(b"link", Symlink, b"../outside")],
            vec![(b"sub/link", Symlink, b"../../outside")],
            vec![(b"sub/link", Symlink, b"x/../../..")],
            // Each link alone stays inside; together they would climb out.
            vec![(b"sub/s", Symlink, b".."), (b"sub/t", Symlink, b"s/../..")],
            // A file written through a symlink the archive made.
            vec![(b"l", Symlink, b"sub"), (b"l/evil", Regular, b"")],
            vec![(b"hard", Link, b"../outside/x")],
            vec![(b"hard", Link, &abs_bytes)],
            vec![(b"dev", Char, b"")],
            vec![(b"blk", Block, b"")],
            vec![(b"fifo", Fifo, b"")],
        ];
        for (i, entries) in cases.iter().enumerate() {
            let dest = tmp.path().join(format!("dest{i}"));
            let err = unpack(&archive(entries)[..], &dest).unwrap_err();
            assert!(matches!(err, SealError::Archive(_)), "case {i}: {err:?}");
            assert_eq!(fs::read(dest.join("ok.txt")).unwrap(), b"fine");
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!tmp.path().join("evil").exists());
        assert!(!tmp.path().join("evil_dir").exists());
        assert!(!Path::new("/evil_at_root").exists());

        // Links that stay inside are fine.
        let dest = tmp.path().join("fine");
        let ok = archive(&[
            (b"sub/", Directory, b""),
            (b"sub/deep/", Directory, b""),
            (b"sub/deep/up", Symlink, b"../../ok.txt"),
            (b"sub/here", Symlink, b"./deep"),
            (b"hard", Link, b"ok.txt"),
        ]);
        let stats = unpack(&ok[..], &dest).unwrap();
        assert_eq!(stats, UnpackStats { files: 1, bytes: 4 });
        assert_eq!(fs::read(dest.join("sub/deep/up")).unwrap(), b"fine");
        assert_eq!(fs::read(dest.join("hard")).unwrap(), b"fine");
    }

    #[test]
    fn unpack_reads_sealed_blob_to_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("src")).unwrap();
        write_file(&tmp.path().join("src/f"), b"x", 0o644);
        // Pad the archive with zero blocks to a whole segment, so the tar ends in a full
        // segment and only the empty final segment follows.
        let mut plain = pack_dir_contents(&tmp.path().join("src"), Vec::new()).unwrap();
        plain.resize(SEGMENT_BYTES, 0);
        let key = BlobKey::generate();
        let sealed = seal(&plain, &key, SEGMENT_BYTES);
        let dest = tmp.path().join("ok");
        assert_eq!(
            unpack(Opener::new(&sealed[..], &key).unwrap(), &dest)
                .unwrap()
                .files,
            1
        );
        let cut = &sealed[..sealed.len() - TAG_BYTES];
        let err = unpack(Opener::new(cut, &key).unwrap(), &tmp.path().join("cut")).unwrap_err();
        assert!(matches!(err, SealError::Truncated), "{err:?}");
        // Damage inside the archive surfaces as Tampered through tar.
        let mut bad = sealed.clone();
        bad[HEADER_BYTES + 700] ^= 1;
        let err = unpack(
            Opener::new(&bad[..], &key).unwrap(),
            &tmp.path().join("bad"),
        )
        .unwrap_err();
        assert!(matches!(err, SealError::Tampered { segment: 0 }), "{err:?}");
    }
}
