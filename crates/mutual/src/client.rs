//! A blocking client of a node's HTTP API: what the CLI, the demo, the tests and the
//! benchmarks use.

use std::time::Duration;

use mutual_core::JobRequest;
use serde::de::DeserializeOwned;

use crate::types::{
    BlobAccess, BlobStored, CancelReply, ErrorBody, JobStatus, NodeStatus, TicketReply,
};

/// Default node URL when neither `--node` nor `MUTUAL_NODE` is given.
pub const DEFAULT_NODE: &str = "http://127.0.0.1:7070";
/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer (connection refused, timeout).
    #[error("cannot reach the node at {url}: {reason}")]
    Unreachable {
        /// The node.
        url: String,
        /// Why.
        reason: String,
    },
    /// The node answered with an error.
    #[error("{} ({status}{})", body.error.message, body.error.field.as_ref().map(|f| format!(", field `{f}`")).unwrap_or_default())]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the node: {0}")]
    Decode(String),
}

impl ClientError {
    /// The HTTP status, for API errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one node.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
    /// For blob transfers: no overall limit, only on silence.
    bulk: ureq::Agent,
}

/// A blob transfer fails after this long without a byte moving (or, for an upload, this
/// long waiting for the node to store and copy it).
pub const TRANSFER_STALL: Duration = Duration::from_secs(600);

impl Client {
    /// The bearer token it sends, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// A client of the node at `base` (e.g. `http://127.0.0.1:7070`).
    pub fn new(base: &str, token: Option<String>) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        let bulk: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(REQUEST_TIMEOUT))
            .timeout_per_read(Some(TRANSFER_STALL))
            .timeout_per_write(Some(TRANSFER_STALL))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
            bulk,
        }
    }

    /// The node's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn finish<T: DeserializeOwned>(
        &self,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut resp = r.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        if (200..300).contains(&status) {
            serde_json::from_str(&text).map_err(|e| ClientError::Decode(format!("{e}: {text}")))
        } else {
            let body = serde_json::from_str(&text)
                .map_err(|_| ClientError::Decode(format!("status {status}: {}", text.trim())))?;
            Err(ClientError::Api { status, body })
        }
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => req.header("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let req = self.auth(self.agent.get(&format!("{}{path}", self.base)));
        self.finish(req.call())
    }

    /// Submits a job.
    pub fn submit(&self, job: &JobRequest) -> Result<JobStatus, ClientError> {
        let req = self.auth(self.agent.post(&format!("{}/v1/jobs", self.base)));
        self.finish(req.send_json(job))
    }

    /// Posts raw bytes as a job (for tests of bad input).
    pub fn submit_raw(&self, body: &[u8]) -> Result<JobStatus, ClientError> {
        let req = self
            .auth(self.agent.post(&format!("{}/v1/jobs", self.base)))
            .header("Content-Type", "application/json");
        self.finish(req.send(body))
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<JobStatus, ClientError> {
        self.get(&format!("/v1/jobs/{id}"))
    }

    /// `GET /v1/jobs/{id}/logs`: where the job's logs stream from, with a token.
    pub fn logs(&self, id: &str) -> Result<crate::types::LogsReply, ClientError> {
        self.get(&format!("/v1/jobs/{id}/logs"))
    }

    /// Jobs, optionally in one state.
    pub fn jobs(&self, state: Option<&str>) -> Result<Vec<JobStatus>, ClientError> {
        match state {
            Some(s) => self.get(&format!("/v1/jobs?state={s}&limit=10000")),
            None => self.get("/v1/jobs?limit=10000"),
        }
    }

    /// Cancels a job.
    pub fn cancel(&self, id: &str) -> Result<CancelReply, ClientError> {
        let req = self.auth(self.agent.delete(&format!("{}/v1/jobs/{id}", self.base)));
        self.finish(req.call())
    }

    /// The members as this node sees them.
    pub fn nodes(&self) -> Result<Vec<NodeStatus>, ClientError> {
        self.get("/v1/nodes")
    }

    /// `POST /v1/debug/partition`: the node ignores these members until the next call
    /// (empty heals). Needs a node started with `--fault-injection`.
    pub fn partition(&self, block: &[String]) -> Result<Vec<String>, ClientError> {
        let req = self.auth(
            self.agent
                .post(&format!("{}/v1/debug/partition", self.base)),
        );
        let body = crate::types::PartitionRequest {
            block: block.to_vec(),
        };
        self.finish(req.send_json(&body))
            .map(|r: crate::types::PartitionRequest| r.block)
    }

    /// `POST /v1/debug/crash`: the node dies at once, as if SIGKILLed (no goodbye, no
    /// flush). Needs a node started with `--fault-injection`.
    pub fn crash(&self) -> Result<(), ClientError> {
        let req = self.auth(self.agent.post(&format!("{}/v1/debug/crash", self.base)));
        self.finish(req.send_empty())
            .map(|_: crate::types::CrashReply| ())
    }

    /// A join ticket.
    pub fn ticket(&self) -> Result<String, ClientError> {
        self.get::<TicketReply>("/v1/ticket").map(|t| t.ticket)
    }

    /// `PUT /v1/blobs`: stores (already encrypted) bytes as a blob; the answer comes once
    /// the node has them and other nodes confirmed copies.
    pub fn put_blob(&self, body: impl std::io::Read + 'static) -> Result<BlobStored, ClientError> {
        let req = self
            .auth(self.bulk.put(&format!("{}/v1/blobs", self.base)))
            .header("Content-Type", "application/octet-stream");
        self.finish(req.send(ureq::SendBody::from_owned_reader(body)))
    }

    /// `GET /v1/blobs/{cid}`: a reader of the blob's encrypted bytes (the node fetches it
    /// from `holders` first if it lacks it).
    pub fn get_blob(
        &self,
        cid: &str,
        holders: &[mutual_core::NodeId],
    ) -> Result<impl std::io::Read + use<>, ClientError> {
        let holders: Vec<String> = holders.iter().map(ToString::to_string).collect();
        let url = format!("{}/v1/blobs/{cid}?holders={}", self.base, holders.join(","));
        let r = self.auth(self.bulk.get(&url)).call();
        let resp = r.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(resp.into_body().into_with_config().limit(u64::MAX).reader());
        }
        self.finish::<serde_json::Value>(Ok(resp))
            .and_then(|v| Err(ClientError::Decode(format!("status {status}: {v}"))))
    }

    /// `GET /v1/jobs/{id}/outputs`: how to download a job's outputs.
    pub fn outputs(&self, id: &str) -> Result<BlobAccess, ClientError> {
        self.get(&format!("/v1/jobs/{id}/outputs"))
    }

    /// The Prometheus metrics text.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let req = self.auth(self.agent.get(&format!("{}/metrics", self.base)));
        let mut resp = req.call().map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        })?;
        resp.body_mut()
            .read_to_string()
            .map_err(|e| ClientError::Decode(e.to_string()))
    }
}

/// The sum of every sample of metric `name` (all label sets; a counter's `_total` suffix
/// may be left out) in the text [`Client::metrics`] returns; 0 if there is none.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter(|rest| rest.starts_with([' ', '{']) || rest.starts_with("_total "))
        .filter_map(|rest| rest.split_whitespace().last()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}
