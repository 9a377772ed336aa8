//! # mutual: the Mutual Cloud node and its CLI client
//!
//! `mutual node` runs a node — HTTP API, agent and replica of the job documents — over iroh;
//! every other subcommand is a thin client of a node's HTTP API. See `docs/ARCHITECTURE.md`.

pub mod api;
pub mod blobs;
pub mod client;
pub mod container;
pub mod exec;
pub mod gpu;
pub mod harness;
pub mod jobio;
pub mod net;
pub mod node;
pub mod seal;
pub mod store;
pub mod ticket;
pub mod transfer;
pub mod types;
pub mod units;
pub mod wire;
