//! # mutual-core
//!
//! The sans-IO core of Mutual Cloud. Nothing here does IO, reads a clock or draws
//! randomness: time and seeds are inputs. The real node (`mutual node`) and the
//! deterministic simulator (`mutual-sim`) drive the same [`engine::Engine`].
//!
//! - [`ids`], [`hlc`], [`token`]: identities, hybrid logical clocks, fencing tokens.
//! - [`spec`]: job requests and their validation; [`blob`]: references to data-plane blobs.
//! - [`view`]: a job document as a set of typed records; [`doc`]: its automerge encoding.
//! - [`derive`]: `derive_state`, the job's state as a pure function of its records.
//! - [`engine`]: the per-node claim engine (`handle(now, event) -> commands`).
//! - [`rank`]: rendezvous ranking and the failure-detection ring.
//! - [`membership`]: the failure detector's decisions (whom to probe, who is judged dead).
//! - [`overlay`]: the sparse overlay (fingers on the live ring) and its broadcast tree.
//! - [`discovery`]: finding a node that matches a constraint via per-node directories of
//!   the overlay neighbours' statuses, at O(log N) messages per node instead of O(N).
//! - [`placement`]: which nodes hold a job's document — all of them, or beyond a thousand
//!   nodes its `k` XOR-closest — and the hand-off when the live set changes.
//! - [`propagation`]: how long other nodes' records take to arrive, for the settle window.
//! - [`invariants`]: one checker per invariant of `docs/invariants.md`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod anti_entropy;
pub mod blob;
pub mod derive;
pub mod discovery;
pub mod doc;
pub mod doc_cache;
pub mod engine;
pub mod hlc;
pub mod ids;
pub mod invariants;
pub mod membership;
pub mod overlay;
pub mod placement;
pub mod propagation;
pub mod rank;
pub mod spec;
pub mod submit;
pub mod token;
pub mod view;

pub use blob::BlobRef;
pub use derive::{Derived, JobState, derive_state};
pub use hlc::{Hlc, HlcClock};
pub use ids::{JobId, NodeId};
pub use spec::{JobRequest, JobSpec, Resources};
pub use token::{Epoch, FencingToken};
pub use view::{JobView, Record};
