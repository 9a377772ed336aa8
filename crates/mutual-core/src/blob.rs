//! References to data-plane blobs: job inputs, outputs, logs and checkpoints.
//!
//! The core never touches blob contents; it only carries these references in job
//! documents. A reference names the content (the BLAKE3 hash of the *encrypted* bytes, as
//! iroh-blobs addresses them), the data key *wrapped* under the cluster's key (never the
//! plain key: documents are replicated to every node and stored on disk), the size, and the
//! nodes known to hold a copy, which a fetching agent asks first.

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// Longest wrapped key, in hex digits.
pub const MAX_KEY_HEX: usize = 256;
/// Most holders named in one reference.
pub const MAX_HOLDERS: usize = 8;
/// Largest blob: 1 TiB.
pub const MAX_BLOB_BYTES: u64 = 1 << 40;

/// A reference to one encrypted blob.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    /// BLAKE3 hash of the encrypted bytes, 64 hex digits.
    pub cid: String,
    /// The data key, wrapped (hex). What "wrapped" means is the node's business.
    pub key: String,
    /// Size of the encrypted bytes.
    pub bytes: u64,
    /// Nodes that held a copy when the reference was written.
    #[serde(default)]
    pub holders: Vec<NodeId>,
}

impl BlobRef {
    /// Checks sizes and formats; returns what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.cid.len() != 64 || !self.cid.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("cid must be a 64-digit hex BLAKE3 content id".into());
        }
        if self.key.is_empty()
            || self.key.len() > MAX_KEY_HEX
            || !self.key.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(format!("key must be 1..={MAX_KEY_HEX} hex digits"));
        }
        if self.bytes > MAX_BLOB_BYTES {
            return Err(format!("bytes must be at most {MAX_BLOB_BYTES}"));
        }
        if self.holders.len() > MAX_HOLDERS {
            return Err(format!("holders: at most {MAX_HOLDERS}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> BlobRef {
        BlobRef {
            cid: "ab".repeat(32),
            key: "cd".repeat(72),
            bytes: 10,
            holders: vec![NodeId::from_index(1)],
        }
    }

    #[test]
    fn checks_every_field() {
        assert_eq!(ok().check(), Ok(()));
        let mut b = ok();
        b.cid.pop();
        assert!(b.check().is_err());
        let mut b = ok();
        b.key = "zz".into();
        assert!(b.check().is_err());
        let mut b = ok();
        b.key = "a".repeat(MAX_KEY_HEX + 1);
        assert!(b.check().is_err());
        let mut b = ok();
        b.bytes = MAX_BLOB_BYTES + 1;
        assert!(b.check().is_err());
        let mut b = ok();
        b.holders = (0..=MAX_HOLDERS as u64).map(NodeId::from_index).collect();
        assert!(b.check().is_err());
    }
}
