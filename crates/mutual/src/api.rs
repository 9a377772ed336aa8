//! The HTTP API every node serves (axum, JSON, `/v1`).
//!
//! Handlers never touch node state: they send a request to the node's actor and await its
//! answer, so the API sees exactly what the replica holds. Bodies are parsed here, not by
//! axum's extractors, so that every refusal is a JSON error naming the field at fault.

// Helpers return `Result<_, Response>` so a handler can `?`-style bail with the finished
// error response; the response's size is irrelevant next to an HTTP round trip.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use mutual_core::{JobId, JobRequest};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::node::{ApiError, ApiReq};
use crate::types::{BlobAccess, BlobStored, ErrorBody, ErrorDetail, PartitionRequest, TicketReply};

/// Default and largest page of `GET /v1/jobs`.
pub const DEFAULT_LIST_LIMIT: usize = 1_000;

/// Shared by every handler.
#[derive(Clone)]
pub struct ApiState {
    /// The node's actor.
    pub node: mpsc::Sender<ApiReq>,
    /// Bearer token, if required.
    pub token: Option<Arc<str>>,
    /// This node's ticket, as text.
    pub ticket: Arc<str>,
    /// The cluster secret (log tokens are keyed by it).
    pub secret: crate::ticket::ClusterSecret,
    /// The node's data directory (where the logs are).
    pub data_dir: Arc<std::path::Path>,
    /// The data plane (uploads, downloads, key wrapping).
    pub io: crate::jobio::JobIo,
    /// How `POST /v1/debug/crash` kills this node; `None` unless fault injection is on.
    pub crash: Option<Crash>,
}

/// Kills a node at once, as SIGKILL would: no goodbye to peers, no flush. A node in its own
/// process SIGKILLs the process ([`crash_process`]); a node hosted with others
/// (`mutual host`) has its runtime dropped and its log writer halted.
pub type Crash = Arc<dyn Fn() + Send + Sync>;

/// The [`Crash`] of a node that is alone in its process.
pub fn crash_process() -> Crash {
    Arc::new(|| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGKILL);
    })
}

/// How long `POST /v1/debug/crash` waits before the crash, so its answer can leave.
pub const CRASH_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// How long a log token works.
pub const LOG_TOKEN_TTL_MS: u64 = 60_000;
/// How often a followed log is polled for new bytes.
pub const LOG_POLL: std::time::Duration = std::time::Duration::from_millis(20);
/// Most bytes sent in one WebSocket message.
pub const LOG_CHUNK_BYTES: usize = 64 * 1024;
/// First byte of a log message: which stream the rest came from.
pub const LOG_STDOUT: u8 = 1;
/// See [`LOG_STDOUT`].
pub const LOG_STDERR: u8 = 2;
/// The text message that ends a log stream: the execution is over (or, without
/// `follow`, everything written so far was sent).
pub const LOG_END: &str = "end";

/// A JSON error response.
pub fn error(
    status: StatusCode,
    code: &str,
    message: impl Into<String>,
    field: Option<String>,
) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.to_string(),
            message: message.into(),
            field,
        },
    };
    (status, axum::Json(body)).into_response()
}

fn api_error(e: ApiError) -> Response {
    match e {
        ApiError::Invalid { field, message } => {
            error(StatusCode::BAD_REQUEST, "invalid_request", message, field)
        }
        ApiError::NotFound(id) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no job {id} on this node"),
            None,
        ),
        e @ ApiError::Elsewhere { .. } => {
            error(StatusCode::NOT_FOUND, "not_found", e.to_string(), None)
        }
        ApiError::Unschedulable(m) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, "unschedulable", m, None)
        }
        ApiError::Full(m) => error(StatusCode::SERVICE_UNAVAILABLE, "full", m, None),
        ApiError::NoLogs(m) => error(StatusCode::CONFLICT, "no_logs", m, None),
        ApiError::Disabled(m) => error(StatusCode::FORBIDDEN, "disabled", m, None),
    }
}

fn unavailable() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the node is shutting down",
        None,
    )
}

async fn ask<T>(
    state: &ApiState,
    make: impl FnOnce(oneshot::Sender<T>) -> ApiReq,
) -> Result<T, Response> {
    let (tx, rx) = oneshot::channel();
    state.node.send(make(tx)).await.map_err(|_| unavailable())?;
    rx.await.map_err(|_| unavailable())
}

fn parse_id(id: &str) -> Result<JobId, Response> {
    id.parse().map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_job_id",
            format!("{id:?} is not a job id: {e}"),
            Some("id".into()),
        )
    })
}

async fn submit(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let Ok(body) = body else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            format!(
                "the body is over the limit of {} bytes",
                mutual_core::spec::MAX_REQUEST_BYTES
            ),
            Some("(body)".into()),
        );
    };
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("application/json"));
    if !json {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the job as application/json",
            None,
        );
    }
    let mut request = match JobRequest::from_json(&body) {
        Ok(r) => r,
        Err(e) => {
            let status = if body.len() > mutual_core::spec::MAX_REQUEST_BYTES {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return error(
                status,
                "invalid_request",
                e.to_string(),
                Some(e.field.clone()),
            );
        }
    };
    // Clients send inputs' data keys in the clear (to this node only); the job document,
    // which every node replicates and stores, gets them wrapped under the cluster key.
    for (i, input) in request.inputs.iter_mut().enumerate() {
        match crate::seal::BlobKey::from_hex(&input.key) {
            Ok(k) => input.key = crate::seal::wrap_key(&state.secret.0, &k),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "an input's key must be its 32-byte data key in hex (64 digits)",
                    Some(format!("inputs[{i}].key")),
                );
            }
        }
    }
    match ask(&state, |tx| ApiReq::Submit(Box::new(request), tx)).await {
        // 202: taken, but not yet confirmed by another holder (`JobStatus::warning`).
        Ok(Ok(st)) if st.warning.is_some() => {
            (StatusCode::ACCEPTED, axum::Json(st)).into_response()
        }
        Ok(Ok(st)) => (StatusCode::CREATED, axum::Json(st)).into_response(),
        Ok(Err(e)) => api_error(e),
        Err(r) => r,
    }
}

async fn get_job(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(i) => i,
        Err(r) => return r,
    };
    match ask(&state, |tx| ApiReq::Get(id, tx)).await {
        Ok(Ok(st)) => axum::Json(st).into_response(),
        Ok(Err(e)) => api_error(e),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<usize>,
}

const STATES: [&str; 5] = ["queued", "running", "succeeded", "failed", "cancelled"];

async fn list_jobs(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "the query takes `state` (queued, running, succeeded, failed, cancelled) and `limit`",
            None,
        );
    };
    if let Some(s) = &q.state
        && !STATES.contains(&s.as_str())
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("unknown state {s:?}: use one of {}", STATES.join(", ")),
            Some("state".into()),
        );
    }
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    match ask(&state, |tx| ApiReq::List(q.state, limit, tx)).await {
        Ok(list) => axum::Json(list).into_response(),
        Err(r) => r,
    }
}

async fn cancel_job(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(i) => i,
        Err(r) => return r,
    };
    match ask(&state, |tx| ApiReq::Cancel(id, tx)).await {
        Ok(Ok(r)) => axum::Json(r).into_response(),
        Ok(Err(e)) => api_error(e),
        Err(r) => r,
    }
}

async fn nodes(State(state): State<ApiState>) -> Response {
    match ask(&state, ApiReq::Nodes).await {
        Ok(list) => axum::Json(list).into_response(),
        Err(r) => r,
    }
}

/// `POST /v1/debug/partition {"block": [node ids]}`: an injected partition (experiments).
async fn partition(
    State(state): State<ApiState>,
    body: Result<axum::Json<PartitionRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let req = match body {
        Ok(axum::Json(r)) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                e.body_text(),
                None,
            );
        }
    };
    match ask(&state, |tx| ApiReq::Partition(req.block, tx)).await {
        Ok(Ok(block)) => axum::Json(PartitionRequest { block }).into_response(),
        Ok(Err(e)) => api_error(e),
        Err(r) => r,
    }
}

/// `POST /v1/debug/crash`: the node dies [`CRASH_DELAY`] after answering (experiments).
async fn crash(State(state): State<ApiState>) -> Response {
    let Some(crash) = state.crash.clone() else {
        return api_error(ApiError::Disabled(
            "fault injection is off: start the node with --fault-injection".into(),
        ));
    };
    tracing::warn!("crashing on request (POST /v1/debug/crash)");
    tokio::spawn(async move {
        tokio::time::sleep(CRASH_DELAY).await;
        crash();
    });
    (
        StatusCode::ACCEPTED,
        axum::Json(crate::types::CrashReply { crashing: true }),
    )
        .into_response()
}

async fn ticket(State(state): State<ApiState>) -> Response {
    axum::Json(TicketReply {
        ticket: state.ticket.to_string(),
    })
    .into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    match ask(&state, ApiReq::Metrics).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(r) => r,
    }
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no_such_route",
        "no such endpoint; the API is under /v1 (jobs, nodes, ticket), plus /healthz and /metrics",
        None,
    )
}

async fn auth(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok =
            given.is_some_and(|g| blake3::hash(g.as_bytes()) == blake3::hash(token.as_bytes()));
        // A log stream carries its own job-scoped token instead (the agent may be another
        // node than the one the user holds a bearer token for).
        let own_token = req.uri().path().ends_with("/logs/stream");
        if !ok && req.uri().path() != "/healthz" && !own_token {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this node requires `Authorization: Bearer <token>` (the CLI: --api-token or MUTUAL_API_TOKEN)",
                None,
            );
        }
    }
    next.run(req).await
}

async fn logs(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let job = match parse_id(&id) {
        Ok(j) => j,
        Err(r) => return r,
    };
    match ask(&state, |tx| ApiReq::LogSource(job, tx)).await {
        Ok(Ok(src)) => {
            let expires_at_ms = crate::node::now_ms() + LOG_TOKEN_TTL_MS;
            let token = crate::ticket::log_token(&state.secret, job.as_bytes(), expires_at_ms);
            let stored = match src.stored.as_ref().map(|b| access(&state, b)).transpose() {
                Ok(s) => s,
                Err(r) => return r,
            };
            axum::Json(crate::types::LogsReply {
                id: src.job,
                attempt: src.attempt,
                node: src.node,
                agent: src.agent,
                stored,
                ended: src.ended,
                token,
                expires_at_ms,
                state: src.state,
            })
            .into_response()
        }
        Ok(Err(e)) => api_error(e),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    token: String,
    attempt: u64,
    #[serde(default)]
    follow: bool,
    /// Bytes of stdout (and of stderr) the reader already has.
    #[serde(default)]
    out: u64,
    #[serde(default)]
    err: u64,
}

/// The agent's side: the job's log files over WebSocket, as they grow. Binary messages
/// carry a stream tag ([`LOG_STDOUT`], [`LOG_STDERR`]) then the bytes; [`LOG_END`] ends.
async fn log_stream(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    let job = match parse_id(&id) {
        Ok(j) => j,
        Err(r) => return r,
    };
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "expected token, attempt, and optionally follow, out, err",
            None,
        );
    };
    if !crate::ticket::log_token_opens(
        &state.secret,
        job.as_bytes(),
        &q.token,
        crate::node::now_ms(),
    ) {
        return error(
            StatusCode::FORBIDDEN,
            "bad_log_token",
            "the token does not open this job's logs (or it expired)",
            Some("token".into()),
        );
    }
    ws.on_upgrade(move |socket| stream_logs(state, job, q, socket))
}

async fn stream_logs(
    state: ApiState,
    job: JobId,
    q: StreamQuery,
    mut socket: axum::extract::ws::WebSocket,
) {
    use axum::extract::ws::Message;
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let (out_path, err_path) = crate::exec::log_paths(&state.data_dir, job, q.attempt);
    let mut files = [(LOG_STDOUT, out_path, q.out), (LOG_STDERR, err_path, q.err)];
    let mut buf = vec![0u8; LOG_CHUNK_BYTES];
    let mut over = false;
    loop {
        let mut sent = false;
        for (tag, path, offset) in &mut files {
            let Ok(mut f) = tokio::fs::File::open(&*path).await else {
                continue;
            };
            if f.seek(std::io::SeekFrom::Start(*offset)).await.is_err() {
                continue;
            }
            let Ok(n) = f.read(&mut buf[1..]).await else {
                continue;
            };
            if n == 0 {
                continue;
            }
            buf[0] = *tag;
            let msg = Message::Binary(Bytes::copy_from_slice(&buf[..=n]));
            if socket.send(msg).await.is_err() {
                return;
            }
            *offset += n as u64;
            sent = true;
        }
        if sent {
            continue;
        }
        // Nothing new: the end if not following, or if the execution is over (checked
        // after a last read, so nothing written before the end is missed).
        if !q.follow || over {
            let _ = socket.send(Message::Text(LOG_END.into())).await;
            return;
        }
        over = match ask(&state, |tx| ApiReq::Get(job, tx)).await {
            Ok(Ok(st)) => {
                st.attempt != q.attempt
                    || !matches!(st.state.as_str(), "running" | "queued")
                    || st
                        .attempts
                        .iter()
                        .any(|a| a.epoch == q.attempt && a.finished_at_ms.is_some())
            }
            _ => true,
        };
        if !over {
            tokio::time::sleep(LOG_POLL).await;
        }
    }
}

/// A stored blob as a client needs it: its key unwrapped.
fn access(state: &ApiState, blob: &mutual_core::BlobRef) -> Result<BlobAccess, Response> {
    let key = crate::seal::unwrap_key(&state.secret.0, &blob.key).map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "bad_blob_key",
            format!(
                "the key of blob {} does not open under this cluster's key: {e}",
                blob.cid
            ),
            None,
        )
    })?;
    Ok(BlobAccess {
        cid: blob.cid.clone(),
        key: key.to_hex(),
        bytes: blob.bytes,
        holders: blob.holders.clone(),
    })
}

/// `GET /v1/jobs/{id}/outputs`: what the client needs to download the outputs.
async fn outputs(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let st = match ask(&state, |tx| ApiReq::Get(id, tx)).await {
        Ok(Ok(st)) => st,
        Ok(Err(e)) => return api_error(e),
        Err(r) => return r,
    };
    match &st.outputs {
        Some(b) => match access(&state, b) {
            Ok(a) => axum::Json(a).into_response(),
            Err(r) => r,
        },
        None => error(
            StatusCode::CONFLICT,
            "no_outputs",
            if matches!(st.state.as_str(), "succeeded" | "failed" | "cancelled") {
                format!(
                    "job {id} ended ({}) without writing to MUTUAL_OUTPUT_DIR",
                    st.state
                )
            } else {
                format!("job {id} has not ended yet ({})", st.state)
            },
            None,
        ),
    }
}

/// `PUT /v1/blobs`: stores the (already encrypted) body as a blob and has it copied to
/// other nodes before answering.
async fn put_blob(State(state): State<ApiState>, body: axum::body::Body) -> Response {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let io = &state.io;
    let fail = |code: StatusCode, what: &str, e: &dyn std::fmt::Display| {
        error(code, "blob_not_stored", format!("{what}: {e}"), None)
    };
    if let Err(e) = tokio::fs::create_dir_all(&io.tmp_dir).await {
        return fail(StatusCode::INTERNAL_SERVER_ERROR, "temporary directory", &e);
    }
    let tmp = match tempfile::NamedTempFile::new_in(&io.tmp_dir) {
        Ok(t) => t,
        Err(e) => return fail(StatusCode::INTERNAL_SERVER_ERROR, "temporary file", &e),
    };
    let file = match tmp.reopen() {
        Ok(f) => f,
        Err(e) => return fail(StatusCode::INTERNAL_SERVER_ERROR, "temporary file", &e),
    };
    let mut file = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(file));
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return fail(StatusCode::BAD_REQUEST, "reading the body", &e),
        };
        received += chunk.len() as u64;
        if received > mutual_core::blob::MAX_BLOB_BYTES {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "blob_too_large",
                format!(
                    "a blob may have at most {} bytes",
                    mutual_core::blob::MAX_BLOB_BYTES
                ),
                None,
            );
        }
        if let Err(e) = file.write_all(&chunk).await {
            return fail(StatusCode::INSUFFICIENT_STORAGE, "writing the blob", &e);
        }
    }
    if let Err(e) = file.flush().await {
        return fail(StatusCode::INSUFFICIENT_STORAGE, "writing the blob", &e);
    }
    drop(file);
    let (hash, bytes) = match io.blobs.add_file(tmp.path()).await {
        Ok(x) => x,
        Err(e) => return fail(StatusCode::INTERNAL_SERVER_ERROR, "storing the blob", &e),
    };
    drop(tmp);
    let holders = io.copy(hash).await;
    (
        StatusCode::CREATED,
        axum::Json(BlobStored {
            cid: hash.to_hex(),
            bytes,
            holders,
        }),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlobQuery {
    /// Nodes to fetch from first (comma-separated ids).
    #[serde(default)]
    holders: String,
}

/// `GET /v1/blobs/{cid}`: the blob's (encrypted) bytes, fetched from its holders first if
/// this node lacks it.
async fn get_blob(
    State(state): State<ApiState>,
    Path(cid): Path<String>,
    query: Result<Query<BlobQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let hash = match crate::blobs::parse_cid(&cid) {
        Ok(h) => h,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_cid",
                e.to_string(),
                Some("cid".into()),
            );
        }
    };
    let holders: Vec<mutual_core::NodeId> = match query {
        Ok(Query(q)) => q
            .holders
            .split(',')
            .filter(|s| !s.is_empty())
            .take(mutual_core::blob::MAX_HOLDERS)
            .filter_map(|s| s.parse().ok())
            .collect(),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "the query takes `holders` (comma-separated node ids)",
                None,
            );
        }
    };
    if let Err(e) = state.io.blobs.fetch(hash, &holders).await {
        return error(
            StatusCode::NOT_FOUND,
            "blob_unavailable",
            e.to_string(),
            None,
        );
    }
    let size = state.io.blobs.complete_size(hash).await.unwrap_or(0);
    let stream = tokio_util::io::ReaderStream::with_capacity(state.io.blobs.reader(hash), 1 << 20);
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/jobs", get(list_jobs).post(submit))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/logs", get(logs))
        .route("/v1/jobs/{id}/logs/stream", get(log_stream))
        .route("/v1/jobs/{id}/outputs", get(outputs))
        .route(
            "/v1/blobs",
            axum::routing::put(put_blob).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/blobs/{cid}", get(get_blob))
        .route("/v1/nodes", get(nodes))
        .route("/v1/debug/partition", post(partition))
        .route("/v1/debug/crash", post(crash))
        .route("/v1/ticket", get(ticket))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(
            mutual_core::spec::MAX_REQUEST_BYTES + 1,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}
