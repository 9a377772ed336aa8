//! The job document on automerge: the replication and storage encoding of a [`JobView`].
//!
//! Schema (version 1), all keys flat so that no two writers ever create the same nested
//! object concurrently (two concurrent `put_object`s at one key would hide one of them):
//!
//! ```text
//! { "v": 1,
//!   "spec": "<JSON of JobSpec>",                      // written once, by the creator
//!   "claims":      { "<epoch>/<node>": uint hlc },
//!   "starts":      { "<epoch>/<node>": uint hlc },
//!   "expired":     { "<epoch>/<observer>": "<JSON ExpiryRec>" },
//!   "checkpoints": { "<epoch>/<node>/<seq>": "<JSON CheckpointRec>" },
//!   "results":     { "<epoch>/<node>": "<JSON ResultRec>" },
//!   "cancel":      { "<node>": uint hlc } }
//! ```
//!
//! Epochs and sequence numbers are zero-padded so that text order is numeric order. The
//! creator makes all six maps in its first change; every other writer only puts scalars
//! under its own node id. Immutable records are stored as one JSON string each: one
//! automerge op per record keeps documents small (a finished job is about 1 KiB).
//!
//! Decoding never trusts the document: every key and value is parsed and a malformed one
//! is a [`DocError`] naming it. Concurrent values under one key (only a bug or a hostile
//! peer makes them) are all decoded and the view keeps the smallest, so replicas converge.

use std::sync::Arc;

use automerge::{
    AutoCommit, ChangeHash, ObjId, ObjType, PatchAction, Prop, ROOT, ReadDoc, ScalarValue, Value,
    transaction::Transactable,
};

use crate::hlc::Hlc;
use crate::ids::{JobId, NodeId};
use crate::spec::JobSpec;
use crate::token::Epoch;
use crate::view::{JobView, Record};

/// Schema version written in `v`.
pub const SCHEMA_VERSION: u64 = 1;
/// Largest saved document accepted from a peer or the disk.
pub const MAX_DOC_BYTES: usize = 4 << 20;
/// Most records one job document may hold.
pub const MAX_RECORDS_PER_JOB: usize = 20_000;

const MAPS: [&str; 6] = [
    "claims",
    "starts",
    "expired",
    "checkpoints",
    "results",
    "cancel",
];

/// Why a document could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    /// automerge refused the bytes or the operation.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// A field is missing or of the wrong type.
    #[error("document field {0}: missing or of the wrong type")]
    Field(String),
    /// A key or value failed to parse.
    #[error("document field {field}: {problem}")]
    Malformed {
        /// Where.
        field: String,
        /// What.
        problem: String,
    },
    /// The document is larger than a limit.
    #[error("document too large: {what} is {got}, the limit is {limit}")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// Found.
        got: usize,
        /// Limit.
        limit: usize,
    },
    /// The document was written by a newer schema.
    #[error("document schema version {0} is not supported (this build reads {SCHEMA_VERSION})")]
    Version(u64),
    /// The document is for another job.
    #[error("document is for job {found}, expected {expected}")]
    WrongJob {
        /// Expected.
        expected: JobId,
        /// Found.
        found: JobId,
    },
}

fn malformed(field: impl Into<String>, problem: impl ToString) -> DocError {
    DocError::Malformed {
        field: field.into(),
        problem: problem.to_string(),
    }
}

/// One job's automerge document.
#[derive(Debug, Clone)]
pub struct JobDoc {
    doc: AutoCommit,
}

fn epoch_key(e: Epoch) -> String {
    format!("{:010}", e.0)
}

impl JobDoc {
    /// Creates the document for a new job, written by `actor` (the accepting node).
    pub fn create(spec: &JobSpec, actor: NodeId) -> Result<JobDoc, DocError> {
        let mut doc = AutoCommit::new().with_actor(automerge::ActorId::from(&actor.0[..]));
        doc.put(ROOT, "v", SCHEMA_VERSION)?;
        let json = serde_json::to_string(spec).map_err(|e| malformed("spec", e))?;
        doc.put(ROOT, "spec", json)?;
        for m in MAPS {
            doc.put_object(ROOT, m, ObjType::Map)?;
        }
        doc.commit();
        Ok(JobDoc { doc })
    }

    /// Loads a saved document; `actor` is the local node (for later writes).
    pub fn load(bytes: &[u8], actor: NodeId) -> Result<JobDoc, DocError> {
        if bytes.len() > MAX_DOC_BYTES {
            return Err(DocError::TooLarge {
                what: "saved document bytes",
                got: bytes.len(),
                limit: MAX_DOC_BYTES,
            });
        }
        let doc = AutoCommit::load(bytes)?.with_actor(automerge::ActorId::from(&actor.0[..]));
        Ok(JobDoc { doc })
    }

    /// A replica that has not seen the job yet: changes from peers are applied to it with
    /// [`JobDoc::apply`]; it decodes once the creator's first change has arrived.
    pub fn empty(actor: NodeId) -> JobDoc {
        JobDoc {
            doc: AutoCommit::new().with_actor(automerge::ActorId::from(&actor.0[..])),
        }
    }

    /// Applies changes or a saved document from a peer. Changes whose dependencies have
    /// not arrived yet are held by automerge until they do.
    pub fn apply(&mut self, bytes: &[u8]) -> Result<(), DocError> {
        if bytes.len() > MAX_DOC_BYTES {
            return Err(DocError::TooLarge {
                what: "bytes from a peer",
                got: bytes.len(),
                limit: MAX_DOC_BYTES,
            });
        }
        self.doc.load_incremental(bytes)?;
        Ok(())
    }

    /// The encoded last change this replica made (what [`JobDoc::create`] or
    /// [`JobDoc::write`] just committed), to push to peers.
    pub fn last_change(&mut self) -> Option<Vec<u8>> {
        self.doc
            .get_last_local_change()
            .map(|c| c.raw_bytes().to_vec())
    }

    /// Saves the whole document (compacted).
    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    /// Merges another replica of the same job into this one.
    pub fn merge(&mut self, other: &mut JobDoc) -> Result<(), DocError> {
        self.doc.merge(&mut other.doc)?;
        Ok(())
    }

    /// The underlying automerge document (for the sync protocol).
    pub fn automerge(&mut self) -> &mut AutoCommit {
        &mut self.doc
    }

    fn map(&self, name: &str) -> Result<ObjId, DocError> {
        match self.doc.get(ROOT, name)? {
            Some((Value::Object(ObjType::Map), id)) => Ok(id),
            _ => Err(DocError::Field(name.to_string())),
        }
    }

    /// Writes one record under its key (one automerge change). Writing a record already
    /// present is a no-op, so retries are harmless.
    pub fn write(&mut self, record: &Record) -> Result<(), DocError> {
        let (map, key, value): (&str, String, ScalarValue) = match record {
            Record::Spec(_) => {
                return Err(malformed("spec", "the spec is written only at creation"));
            }
            Record::Claim { epoch, node, hlc } => (
                "claims",
                format!("{}/{node}", epoch_key(*epoch)),
                hlc.0.into(),
            ),
            Record::Start { epoch, node, hlc } => (
                "starts",
                format!("{}/{node}", epoch_key(*epoch)),
                hlc.0.into(),
            ),
            Record::Expiry {
                epoch,
                observer,
                rec,
            } => (
                "expired",
                format!("{}/{observer}", epoch_key(*epoch)),
                json(rec, "expired")?.into(),
            ),
            Record::Checkpoint {
                epoch,
                node,
                seq,
                rec,
            } => (
                "checkpoints",
                format!("{}/{node}/{seq:020}", epoch_key(*epoch)),
                json(&**rec, "checkpoints")?.into(),
            ),
            Record::Result { epoch, node, rec } => (
                "results",
                format!("{}/{node}", epoch_key(*epoch)),
                json(&**rec, "results")?.into(),
            ),
            Record::Cancel { node, hlc } => ("cancel", node.to_string(), hlc.0.into()),
        };
        let obj = self.map(map)?;
        if let Some((Value::Scalar(existing), _)) = self.doc.get(&obj, key.as_str())?
            && *existing == value
        {
            return Ok(());
        }
        if self.doc.length(&obj) >= MAX_RECORDS_PER_JOB {
            return Err(DocError::TooLarge {
                what: map,
                got: self.doc.length(&obj),
                limit: MAX_RECORDS_PER_JOB,
            });
        }
        self.doc.put(&obj, key, value)?;
        self.doc.commit();
        Ok(())
    }

    /// Decodes the typed view, checking every key and value.
    pub fn view(&self) -> Result<JobView, DocError> {
        let mut view = JobView::default();
        match self.doc.get(ROOT, "v")? {
            Some((Value::Scalar(v), _)) => match v.as_ref() {
                ScalarValue::Uint(SCHEMA_VERSION) | ScalarValue::Int(1) => {}
                ScalarValue::Uint(n) => return Err(DocError::Version(*n)),
                _ => return Err(DocError::Field("v".into())),
            },
            _ => return Err(DocError::Field("v".into())),
        }
        let spec_text = match self.doc.get(ROOT, "spec")? {
            Some((Value::Scalar(s), _)) => match s.as_ref() {
                ScalarValue::Str(t) => t.to_string(),
                _ => return Err(DocError::Field("spec".into())),
            },
            _ => return Err(DocError::Field("spec".into())),
        };
        let spec: JobSpec = serde_json::from_str(&spec_text).map_err(|e| malformed("spec", e))?;
        view.insert(Record::Spec(Arc::new(spec)));

        let mut total = 0usize;
        for m in MAPS {
            let obj = self.map(m)?;
            for key in self.doc.keys(&obj) {
                total += 1;
                if total > MAX_RECORDS_PER_JOB {
                    return Err(DocError::TooLarge {
                        what: "records",
                        got: total,
                        limit: MAX_RECORDS_PER_JOB,
                    });
                }
                for (value, _) in self.doc.get_all(&obj, key.as_str())? {
                    let Value::Scalar(v) = value else {
                        return Err(malformed(format!("{m}.{key}"), "not a scalar"));
                    };
                    view.insert(decode_record(m, &key, v.as_ref())?);
                }
            }
        }
        Ok(view)
    }

    /// The document's heads: take them before [`JobDoc::apply`] to ask
    /// [`JobDoc::records_since`] what it brought.
    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The records under every record key whose values changed since `before` (heads of
    /// this document), every value under such a key included, checked as [`JobDoc::view`]
    /// checks them. A replica that already holds the rest uses this instead of decoding the
    /// whole document for each change a peer sends: decoding the view (the spec's JSON
    /// above all) for every change was 12 % of a busy node's CPU. Top-level fields (the
    /// spec, the schema version) are written once at creation and are not looked at: decode
    /// the whole view until the spec is known.
    pub fn records_since(&mut self, before: &[ChangeHash]) -> Result<Vec<Record>, DocError> {
        let after = self.doc.get_heads();
        let mut out = Vec::new();
        for patch in self.doc.diff(before, &after) {
            let key = match patch.action {
                PatchAction::PutMap { key, .. } => key,
                PatchAction::Conflict {
                    prop: Prop::Map(key),
                } => key,
                _ => continue,
            };
            let Some((_, Prop::Map(map))) = patch.path.last() else {
                continue;
            };
            let Some(map) = MAPS.iter().find(|m| **m == map.as_str()) else {
                continue;
            };
            for (value, _) in self.doc.get_all(&patch.obj, key.as_str())? {
                let Value::Scalar(v) = value else {
                    return Err(malformed(format!("{map}.{key}"), "not a scalar"));
                };
                out.push(decode_record(map, &key, v.as_ref())?);
                if out.len() > MAX_RECORDS_PER_JOB {
                    return Err(DocError::TooLarge {
                        what: "records",
                        got: out.len(),
                        limit: MAX_RECORDS_PER_JOB,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The job id from the spec.
    pub fn job_id(&self) -> Result<JobId, DocError> {
        self.view()?
            .spec
            .map(|s| s.id)
            .ok_or_else(|| DocError::Field("spec".into()))
    }
}

fn json<T: serde::Serialize>(value: &T, field: &str) -> Result<String, DocError> {
    serde_json::to_string(value).map_err(|e| malformed(field, e))
}

fn decode_record(map: &str, key: &str, value: &ScalarValue) -> Result<Record, DocError> {
    let field = || format!("{map}.{key}");
    let parts: Vec<&str> = key.split('/').collect();
    let epoch = |i: usize| -> Result<Epoch, DocError> {
        parts
            .get(i)
            .and_then(|p| p.parse::<u32>().ok())
            .map(Epoch)
            .ok_or_else(|| malformed(field(), "bad epoch"))
    };
    let node = |i: usize| -> Result<NodeId, DocError> {
        parts
            .get(i)
            .ok_or_else(|| malformed(field(), "missing node"))?
            .parse()
            .map_err(|e| malformed(field(), e))
    };
    let uint = || match value {
        ScalarValue::Uint(u) => Ok(Hlc(*u)),
        _ => Err(malformed(field(), "expected an unsigned integer")),
    };
    let text = || match value {
        ScalarValue::Str(s) => Ok(s.to_string()),
        _ => Err(malformed(field(), "expected a string")),
    };
    let want = |n: usize| {
        if parts.len() == n {
            Ok(())
        } else {
            Err(malformed(field(), format!("expected {n} key parts")))
        }
    };
    Ok(match map {
        "claims" => {
            want(2)?;
            Record::Claim {
                epoch: epoch(0)?,
                node: node(1)?,
                hlc: uint()?,
            }
        }
        "starts" => {
            want(2)?;
            Record::Start {
                epoch: epoch(0)?,
                node: node(1)?,
                hlc: uint()?,
            }
        }
        "expired" => {
            want(2)?;
            let rec = serde_json::from_str(&text()?).map_err(|e| malformed(field(), e))?;
            Record::Expiry {
                epoch: epoch(0)?,
                observer: node(1)?,
                rec,
            }
        }
        "checkpoints" => {
            want(3)?;
            let seq = parts[2].parse::<u64>().map_err(|e| malformed(field(), e))?;
            let rec = serde_json::from_str(&text()?).map_err(|e| malformed(field(), e))?;
            Record::Checkpoint {
                epoch: epoch(0)?,
                node: node(1)?,
                seq,
                rec: Arc::new(rec),
            }
        }
        "results" => {
            want(2)?;
            let rec = serde_json::from_str(&text()?).map_err(|e| malformed(field(), e))?;
            Record::Result {
                epoch: epoch(0)?,
                node: node(1)?,
                rec: Arc::new(rec),
            }
        }
        "cancel" => {
            want(1)?;
            Record::Cancel {
                node: node(0)?,
                hlc: uint()?,
            }
        }
        _ => return Err(malformed(field(), "unknown map")),
    })
}
