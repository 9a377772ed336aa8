//! Join tickets: how a new node finds a cluster and proves it belongs to it.
//!
//! A ticket carries one member's endpoint id and socket addresses, and the cluster secret.
//! Any member's ticket works. The secret never travels in the clear between nodes: a
//! joining node proves it knows it with a keyed BLAKE3 hash over both endpoint ids
//! ([`hello_proof`]), which iroh's TLS has already authenticated. A ticket *is* a
//! credential: whoever holds it can join.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Every ticket starts with this, so a pasted string is recognisable.
pub const TICKET_PREFIX: &str = "mutual1";
/// Most socket addresses one ticket carries.
pub const MAX_TICKET_ADDRS: usize = 16;
/// Longest relay URL accepted in a ticket.
pub const MAX_RELAY_URL_LEN: usize = 512;

/// The 32-byte cluster secret.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSecret(pub [u8; 32]);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// A fresh random secret (for a new cluster).
    pub fn generate() -> ClusterSecret {
        use rand::RngCore;
        let mut b = [0u8; 32];
        rand::rng().fill_bytes(&mut b);
        ClusterSecret(b)
    }
}

/// What a ticket says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The cluster secret.
    pub secret: ClusterSecret,
    /// The member's iroh endpoint id (its public key).
    pub endpoint: [u8; 32],
    /// Where it listens.
    pub addrs: Vec<SocketAddr>,
    /// Optional relay URL, for clusters across the internet.
    pub relay: Option<String>,
}

/// Why a ticket string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    /// Does not start with [`TICKET_PREFIX`].
    #[error(
        "not a mutual ticket (it must start with `{TICKET_PREFIX}`; print one with `mutual ticket`)"
    )]
    Prefix,
    /// Not valid base32, or not a ticket once decoded.
    #[error("the ticket is damaged ({0}); copy it again")]
    Damaged(String),
    /// Decoded, but carries nothing to connect to, or too much.
    #[error("the ticket is invalid: {0}")]
    Invalid(&'static str),
}

impl Ticket {
    /// Checks the limits.
    fn validate(self) -> Result<Ticket, TicketError> {
        if self.addrs.is_empty() && self.relay.is_none() {
            return Err(TicketError::Invalid("it names no address"));
        }
        if self.addrs.len() > MAX_TICKET_ADDRS {
            return Err(TicketError::Invalid("it names too many addresses"));
        }
        if self
            .relay
            .as_ref()
            .is_some_and(|r| r.len() > MAX_RELAY_URL_LEN)
        {
            return Err(TicketError::Invalid("its relay URL is too long"));
        }
        Ok(self)
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = postcard::to_stdvec(self).map_err(|_| fmt::Error)?;
        write!(
            f,
            "{TICKET_PREFIX}{}",
            data_encoding::BASE32_NOPAD
                .encode(&bytes)
                .to_ascii_lowercase()
        )
    }
}

impl FromStr for Ticket {
    type Err = TicketError;
    fn from_str(s: &str) -> Result<Ticket, TicketError> {
        let body = s
            .trim()
            .strip_prefix(TICKET_PREFIX)
            .ok_or(TicketError::Prefix)?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|e| TicketError::Damaged(e.to_string()))?;
        let t: Ticket =
            postcard::from_bytes(&bytes).map_err(|e| TicketError::Damaged(e.to_string()))?;
        t.validate()
    }
}

/// The proof a node sends when it opens a connection: keyed by the cluster secret, bound to
/// both endpoint ids so it cannot be replayed to another node or by another node.
pub fn hello_proof(secret: &ClusterSecret, from: &[u8; 32], to: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&secret.0);
    h.update(b"mutual/hello/v1");
    h.update(from);
    h.update(to);
    *h.finalize().as_bytes()
}

fn log_mac(secret: &ClusterSecret, job: &[u8; 16], expires_ms: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&secret.0);
    h.update(b"mutual/logs/v1");
    h.update(job);
    h.update(&expires_ms.to_le_bytes());
    *h.finalize().as_bytes()
}

/// A token that opens one job's logs on any agent of the cluster until `expires_ms`:
/// `EXPIRY.MAC`, the MAC keyed by the cluster secret and bound to the job.
pub fn log_token(secret: &ClusterSecret, job: &[u8; 16], expires_ms: u64) -> String {
    let mac = data_encoding::HEXLOWER.encode(&log_mac(secret, job, expires_ms));
    format!("{expires_ms}.{mac}")
}

/// Whether `token` opens `job`'s logs at `now_ms`.
pub fn log_token_opens(secret: &ClusterSecret, job: &[u8; 16], token: &str, now_ms: u64) -> bool {
    let Some((expiry, mac)) = token.split_once('.') else {
        return false;
    };
    let (Ok(expires_ms), Ok(mac)) = (
        expiry.parse::<u64>(),
        data_encoding::HEXLOWER.decode(mac.as_bytes()),
    ) else {
        return false;
    };
    let Ok(mac) = <[u8; 32]>::try_from(mac) else {
        return false;
    };
    expires_ms >= now_ms && proof_matches(&mac, &log_mac(secret, job, expires_ms))
}

/// Constant-time comparison of two proofs.
pub fn proof_matches(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::Hash::from(*a) == blake3::Hash::from(*b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_token_opens_one_job_until_it_expires() {
        let s = ClusterSecret([7; 32]);
        let t = log_token(&s, &[1; 16], 1_000);
        assert!(log_token_opens(&s, &[1; 16], &t, 999));
        assert!(log_token_opens(&s, &[1; 16], &t, 1_000));
        assert!(!log_token_opens(&s, &[1; 16], &t, 1_001), "expired");
        assert!(!log_token_opens(&s, &[2; 16], &t, 999), "another job");
        assert!(!log_token_opens(&ClusterSecret([8; 32]), &[1; 16], &t, 999));
        let forged = t.replacen("1000.", "2000.", 1);
        assert!(
            !log_token_opens(&s, &[1; 16], &forged, 999),
            "a later expiry"
        );
        for junk in ["", ".", "x.y", "5", "5.00"] {
            assert!(!log_token_opens(&s, &[1; 16], junk, 0));
        }
    }

    fn ticket() -> Ticket {
        Ticket {
            secret: ClusterSecret([7; 32]),
            endpoint: [3; 32],
            addrs: vec!["127.0.0.1:4000".parse().expect("addr")],
            relay: None,
        }
    }

    #[test]
    fn round_trips() {
        let t = ticket();
        let s = t.to_string();
        assert!(s.starts_with(TICKET_PREFIX));
        assert_eq!(s.parse::<Ticket>(), Ok(t));
    }

    #[test]
    fn damaged_tickets_are_refused() {
        let s = ticket().to_string();
        assert_eq!("hello".parse::<Ticket>(), Err(TicketError::Prefix));
        assert!(matches!(
            s[..s.len() - 5].parse::<Ticket>(),
            Err(TicketError::Damaged(_))
        ));
        let mut empty = ticket();
        empty.addrs.clear();
        assert!(matches!(
            empty.to_string().parse::<Ticket>(),
            Err(TicketError::Invalid(_))
        ));
    }

    #[test]
    fn proofs_bind_secret_and_both_ends() {
        let s = ClusterSecret([1; 32]);
        let p = hello_proof(&s, &[1; 32], &[2; 32]);
        assert!(proof_matches(&p, &hello_proof(&s, &[1; 32], &[2; 32])));
        assert!(!proof_matches(&p, &hello_proof(&s, &[2; 32], &[1; 32])));
        assert!(!proof_matches(
            &p,
            &hello_proof(&ClusterSecret([9; 32]), &[1; 32], &[2; 32])
        ));
    }
}
