//! Identifiers: node ids shaped like iroh's ed25519 public keys, and job ids.
//!
//! Both are plain byte arrays with a lowercase-hex text form, so they sort the same way
//! in memory, in automerge map keys and on disk. Parsing never panics: bad text is a
//! typed [`IdError`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of a node id in bytes (an ed25519 public key, as iroh's `EndpointId`).
pub const NODE_ID_LEN_BYTES: usize = 32;
/// Length of a job id in bytes.
pub const JOB_ID_LEN_BYTES: usize = 16;

/// Why a piece of text is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The text has the wrong number of hex digits.
    #[error("expected {expected} hex digits, got {got}")]
    Length {
        /// Hex digits expected.
        expected: usize,
        /// Characters found.
        got: usize,
    },
    /// The text holds a character that is not a lowercase or uppercase hex digit.
    #[error("invalid hex digit {0:?}")]
    Digit(char),
}

fn parse_hex<const N: usize>(text: &str) -> Result<[u8; N], IdError> {
    if text.len() != 2 * N {
        return Err(IdError::Length {
            expected: 2 * N,
            got: text.chars().count(),
        });
    }
    let mut out = [0u8; N];
    let bytes = text.as_bytes();
    for (i, slot) in out.iter_mut().enumerate() {
        let hi = hex_val(bytes[2 * i])?;
        let lo = hex_val(bytes[2 * i + 1])?;
        *slot = (hi << 4) | lo;
    }
    Ok(out)
}

fn hex_val(b: u8) -> Result<u8, IdError> {
    match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err(IdError::Digit(b as char)),
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

macro_rules! hex_id {
    ($name:ident, $len:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            /// Short form (first 5 bytes), like git's abbreviated hashes.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0[..5])
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                parse_hex::<$len>(s).map($name)
            }
        }

        /// Hex in human-readable formats (JSON: the API, files people read); the raw
        /// bytes in binary ones (the wire), where formatting ids as text once cost an
        /// idle 100-node cluster a few percent of its CPU.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                    text.parse().map_err(serde::de::Error::custom)
                } else {
                    <[u8; $len]>::deserialize(d).map($name)
                }
            }
        }
    };
}

hex_id!(
    NodeId,
    NODE_ID_LEN_BYTES,
    "A node's identity: 32 bytes, the shape of iroh's ed25519 `EndpointId`."
);
hex_id!(
    JobId,
    JOB_ID_LEN_BYTES,
    "A job's identity: 16 bytes derived from who accepted it and when."
);

impl NodeId {
    /// A deterministic node id for simulations and tests (BLAKE3 of the index).
    pub fn from_index(index: u64) -> NodeId {
        let mut h = blake3::Hasher::new_derive_key("mutual-cloud sim node id v1");
        h.update(&index.to_le_bytes());
        NodeId(*h.finalize().as_bytes())
    }
}

impl JobId {
    /// The id of a job accepted by `submitter` at `hlc`, with `nonce` separating jobs
    /// accepted in the same instant. Collision-free in practice (128 bits of BLAKE3).
    pub fn derive(submitter: NodeId, hlc: crate::hlc::Hlc, nonce: u64) -> JobId {
        let mut h = blake3::Hasher::new_derive_key("mutual-cloud job id v1");
        h.update(submitter.as_bytes());
        h.update(&hlc.0.to_le_bytes());
        h.update(&nonce.to_le_bytes());
        let mut out = [0u8; JOB_ID_LEN_BYTES];
        out.copy_from_slice(&h.finalize().as_bytes()[..JOB_ID_LEN_BYTES]);
        JobId(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let n = NodeId::from_index(7);
        let text = n.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<NodeId>(), Ok(n));
        assert_eq!(
            "abc".parse::<NodeId>(),
            Err(IdError::Length {
                expected: 64,
                got: 3
            })
        );
        let bad = format!("{}g", &text[..63]);
        assert_eq!(bad.parse::<NodeId>(), Err(IdError::Digit('g')));
        // Multi-byte characters must not panic on slicing.
        assert!("é".repeat(32).parse::<NodeId>().is_err());
    }
}
