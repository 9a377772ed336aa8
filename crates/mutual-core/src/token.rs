//! Epochs and fencing tokens.
//!
//! A fencing token is `(epoch, hlc, node)`, ordered by epoch first. Within an epoch the
//! winner is the claim with the smallest `(hlc, node)`. Never fence on the HLC alone: a
//! claim lost with a crashed node lets a later epoch's winner carry a smaller HLC
//! (`shared/protocol-model/REPORT.md`, invariant 4).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::ids::NodeId;

/// One attempt at running a job. Epochs start at 1; 0 means "none yet".
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Epoch(pub u32);

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Epoch {
    /// A job's first attempt.
    pub const FIRST: Epoch = Epoch(1);

    /// The next epoch (saturating: the takeover cap stops jobs long before).
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

/// A claim's fencing token. The derived order is the fencing order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FencingToken {
    /// The attempt this claim is for.
    pub epoch: Epoch,
    /// When the claimant wrote it.
    pub hlc: Hlc,
    /// Who claimed.
    pub node: NodeId,
}

impl fmt::Debug for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({:?},{:?},{:?})", self.epoch, self.hlc, self.node)
    }
}

impl fmt::Display for FencingToken {
    /// `epoch.hlc.node`: the form handed to jobs in `MUTUAL_FENCING_TOKEN`. Its text
    /// order is *not* the token order; compare parsed tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.epoch.0, self.hlc.0, self.node)
    }
}

/// Text that is not a fencing token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a fencing token (expected EPOCH.HLC.NODE): {0}")]
pub struct TokenParseError(pub String);

impl FromStr for FencingToken {
    type Err = TokenParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || TokenParseError(s.chars().take(200).collect());
        let mut parts = s.splitn(3, '.');
        let epoch = parts.next().and_then(|p| p.parse().ok()).ok_or_else(err)?;
        let hlc = parts.next().and_then(|p| p.parse().ok()).ok_or_else(err)?;
        let node = parts.next().and_then(|p| p.parse().ok()).ok_or_else(err)?;
        Ok(FencingToken {
            epoch: Epoch(epoch),
            hlc: Hlc(hlc),
            node,
        })
    }
}

/// True iff a writer holding `token`, having seen the claims in `seen`, was still the
/// winner as far as it knew: no smaller claim of its own epoch and no claim of a later one.
/// This is the "counted" rule for results and checkpoints (`design.md` §2); it depends only
/// on the record, so nothing that arrives later can change it.
pub fn unfenced_by<'a>(
    token: &FencingToken,
    seen: impl IntoIterator<Item = &'a FencingToken>,
) -> bool {
    seen.into_iter()
        .all(|s| !(s.epoch > token.epoch || (s.epoch == token.epoch && s < token)))
}
