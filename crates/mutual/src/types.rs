//! The HTTP API's JSON shapes, shared by the server and the CLI client.

use std::collections::BTreeMap;

use mutual_core::derive::derive_state;
use mutual_core::{BlobRef, JobState, JobView, NodeId, Resources};
use serde::{Deserialize, Serialize};

/// One execution attempt of a job, from its records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The epoch (attempt number, from 1).
    pub epoch: u64,
    /// The winning node of the epoch.
    pub node: String,
    /// The fencing token handed to the execution.
    pub fencing_token: String,
    /// When it claimed (HLC, ms since the Unix epoch).
    pub claimed_at_ms: u64,
    /// When it started, if it did.
    pub started_at_ms: Option<u64>,
    /// When its result was written, if it was.
    pub finished_at_ms: Option<u64>,
    /// Its exit code, if it finished.
    pub exit_code: Option<i32>,
    /// It was killed at the timeout.
    pub timed_out: bool,
    /// Why its epoch was closed, if it was (`failed`, `holder_dead`, `gave_up`).
    pub expired: Option<String>,
    /// When its epoch was first closed (HLC, ms): for a holder that died, the moment a
    /// node first judged it dead and acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at_ms: Option<u64>,
    /// The node that first closed it: for a holder that died, the first to judge it dead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_by: Option<String>,
    /// What it used (wall time, average CPU in thousandths of a core, peak memory, bytes
    /// read and written), if it finished.
    pub metrics: Option<mutual_core::view::ExecMetrics>,
    /// What it left in `MUTUAL_OUTPUT_DIR` (the key wrapped), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<BlobRef>,
    /// Its stdout and stderr (the key wrapped), if it wrote any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<BlobRef>,
    /// Checkpoints it recorded.
    #[serde(default)]
    pub checkpoints: u64,
}

/// A blob as a client needs it to download and decrypt it: the key in the clear. Only
/// sent to a client that passed the API's authentication; never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobAccess {
    /// BLAKE3 of the encrypted bytes.
    pub cid: String,
    /// The data key (hex).
    pub key: String,
    /// Encrypted size.
    pub bytes: u64,
    /// Nodes known to hold it.
    pub holders: Vec<NodeId>,
}

/// Answer to `PUT /v1/blobs`: the stored blob and the nodes that hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobStored {
    /// BLAKE3 of the bytes received.
    pub cid: String,
    /// Their number.
    pub bytes: u64,
    /// The receiving node first, then those that confirmed a copy.
    pub holders: Vec<NodeId>,
}

/// `GET /v1/jobs/{id}/logs`: where to stream a job's logs from, and the token to do it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsReply {
    /// The job.
    pub id: String,
    /// The attempt whose logs these are.
    pub attempt: u64,
    /// The node that runs (or ran) it.
    pub node: String,
    /// That node's API, if it is reachable; stream from
    /// `{agent}/v1/jobs/{id}/logs/stream` over WebSocket.
    pub agent: Option<String>,
    /// Once the attempt has ended: its logs as stored in the data plane (download from
    /// any node with `GET /v1/blobs/{cid}`). `None` also when it wrote nothing.
    #[serde(default)]
    pub stored: Option<BlobAccess>,
    /// Whether the attempt has ended.
    #[serde(default)]
    pub ended: bool,
    /// Opens this job's logs (and no other's) on any node until `expires_at_ms`.
    pub token: String,
    /// When the token stops working (ms since the Unix epoch).
    pub expires_at_ms: u64,
    /// The job's state.
    pub state: String,
}

/// A job as `GET /v1/jobs/{id}` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// The current or accepted attempt's epoch (0 before the first claim).
    pub attempt: u64,
    /// The node running it, or that produced the accepted result.
    pub node: Option<String>,
    /// The accepted result's exit code.
    pub exit_code: Option<i32>,
    /// The fencing token of the current or accepted execution.
    pub fencing_token: Option<String>,
    /// Failed attempts counted against `max_attempts`.
    pub attempts_used: u32,
    /// Allowed failed attempts.
    pub max_attempts: u32,
    /// The command.
    pub command: Vec<String>,
    /// The container image, for a container job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Resources asked for.
    pub resources: Resources,
    /// Required labels.
    pub labels: BTreeMap<String, String>,
    /// Timeout, if any.
    pub timeout_ms: Option<u64>,
    /// When it was accepted (ms since the Unix epoch).
    pub submitted_at_ms: u64,
    /// The node that accepted it.
    pub submitter: String,
    /// Every attempt, oldest first.
    pub attempts: Vec<Attempt>,
    /// Its inputs (keys wrapped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<BlobRef>,
    /// The outputs of the accepted (or last, once the job ended) execution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<BlobRef>,
    /// Only in the answer to a submission (HTTP 202 then, not 201): why the job is not
    /// yet known to be held by more than the node that took it (under `--replicas`, no
    /// holder confirmed it within the wait). The job stands and reaches its holders when
    /// they are reachable, but until then losing that node loses the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// What every replica must report alike for a job once it ended: state, attempt, node,
/// exit code, fencing token.
pub type Outcome = (String, u64, Option<String>, Option<i32>, Option<String>);

impl JobStatus {
    /// Its [`Outcome`], to compare replicas.
    pub fn outcome(&self) -> Outcome {
        (
            self.state.clone(),
            self.attempt,
            self.node.clone(),
            self.exit_code,
            self.fencing_token.clone(),
        )
    }
}

/// Builds the status of a job from its view; `None` before its spec arrived.
pub fn job_status(view: &JobView) -> Option<JobStatus> {
    let spec = view.spec.as_ref()?;
    let d = derive_state(view);
    let current = match &d.state {
        JobState::Claimed { token } | JobState::Running { token } => Some(*token),
        JobState::Succeeded { token } => Some(*token),
        JobState::Failed { token } => *token,
        _ => d.winners.values().next_back().copied(),
    };
    let state = match d.state {
        JobState::Queued { .. } | JobState::Claimed { .. } => "queued",
        other => other.name(),
    };
    let final_result = d.accepted.as_ref().map(|(_, r)| r).or_else(|| {
        current
            .filter(|_| d.state.is_terminal())
            .and_then(|t| view.results.get(&(t.epoch, t.node)))
            .map(|r| &**r)
    });
    let outputs = final_result.and_then(|r| r.outputs.clone());
    let exit_code = d
        .accepted
        .as_ref()
        .map(|(_, r)| r.outcome.exit_code)
        .or_else(|| {
            current
                .filter(|_| d.state.is_terminal())
                .and_then(|t| view.results.get(&(t.epoch, t.node)))
                .map(|r| r.outcome.exit_code)
        });
    let attempts = d
        .winners
        .iter()
        .map(|(epoch, token)| {
            let result = view.results.get(&(*epoch, token.node));
            let first_expiry = view
                .expiries
                .iter()
                .filter(|((e, _), _)| e == epoch)
                .min_by_key(|(_, r)| r.hlc);
            let expired = first_expiry.map(|(_, r)| {
                serde_json::to_value(r.reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            });
            Attempt {
                epoch: u64::from(epoch.0),
                node: token.node.to_string(),
                fencing_token: token.to_string(),
                claimed_at_ms: token.hlc.as_millis(),
                started_at_ms: view
                    .starts
                    .get(&(*epoch, token.node))
                    .map(|h| h.as_millis()),
                finished_at_ms: result.map(|r| r.hlc.as_millis()),
                exit_code: result.map(|r| r.outcome.exit_code),
                timed_out: result.is_some_and(|r| r.outcome.timed_out),
                expired,
                expired_at_ms: first_expiry.map(|(_, r)| r.hlc.as_millis()),
                expired_by: first_expiry.map(|((_, by), _)| by.to_string()),
                metrics: result.map(|r| r.metrics),
                outputs: result.and_then(|r| r.outputs.clone()),
                logs: result.and_then(|r| r.logs.clone()),
                checkpoints: view
                    .checkpoints
                    .keys()
                    .filter(|(e, n, _)| e == epoch && *n == token.node)
                    .count() as u64,
            }
        })
        .collect();
    Some(JobStatus {
        id: spec.id.to_string(),
        name: spec.name.clone(),
        namespace: spec.namespace.clone(),
        state: state.to_string(),
        attempt: current.map_or(0, |t| u64::from(t.epoch.0)),
        node: current
            .filter(|_| state != "queued")
            .map(|t| t.node.to_string()),
        exit_code,
        fencing_token: current.map(|t| t.to_string()),
        attempts_used: d.attempts_used,
        max_attempts: spec.max_attempts,
        command: spec.command.clone(),
        image: spec.image.clone(),
        resources: spec.resources,
        labels: spec.labels.clone(),
        timeout_ms: spec.timeout_ms,
        submitted_at_ms: spec.submitted_at.as_millis(),
        submitter: spec.submitter.to_string(),
        attempts,
        inputs: spec.inputs.clone(),
        outputs,
        warning: None,
    })
}

/// A node as `GET /v1/nodes` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node id.
    pub id: String,
    /// Whether the answering node believes it alive.
    pub alive: bool,
    /// Its HTTP API.
    pub http: Option<String>,
    /// Its peer addresses.
    pub addrs: Vec<String>,
    /// What it offers.
    pub capacity: Resources,
    /// What is free: now for the answering node, else as the node last announced it (a
    /// node announces its load at most once per second per live member, so at 100 members
    /// it may be 100 s old).
    pub free: Resources,
    /// Execution slots.
    pub slots: u32,
    /// Free slots (as `free`: current only for the answering node).
    pub free_slots: u32,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Whether it runs containers.
    pub containers: bool,
    /// Its GPUs (index, model, memory).
    pub gpus: Vec<crate::gpu::Gpu>,
    /// Jobs it runs (as `free`: current only for the answering node).
    pub running: Vec<String>,
    /// True for the node that answered.
    #[serde(rename = "self")]
    pub is_self: bool,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// Details of an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable machine-readable code (`invalid_request`, `not_found`, …).
    pub code: String,
    /// A sentence for people.
    pub message: String,
    /// The request field at fault, if one is.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub field: Option<String>,
}

/// Answer to `DELETE /v1/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReply {
    /// The job.
    pub id: String,
    /// `cancelled` if a cancel was recorded; `already_<state>` if it had ended.
    pub outcome: String,
    /// The job's state after the request.
    pub state: String,
}

/// Body of `POST /v1/debug/partition`, and its answer: the members whose traffic the
/// node refuses (empty heals).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionRequest {
    /// Node ids.
    pub block: Vec<String>,
}

/// Answer to `POST /v1/debug/crash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashReply {
    /// Always true: the node dies right after answering.
    pub crashing: bool,
}

/// Answer to `GET /v1/ticket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketReply {
    /// A ticket to join this node's cluster.
    pub ticket: String,
}
