//! Job specifications: what a user asks for, how it is validated, and the immutable spec
//! written into the job document.
//!
//! [`JobRequest`] is the untrusted input (HTTP body, CLI flags); [`JobRequest::validate`]
//! turns it into a [`JobSpec`] or a [`SpecError`] naming the offending field. Every size has
//! a named limit, so a spec always fits in a job document of bounded size.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::blob::BlobRef;
use crate::hlc::Hlc;
use crate::ids::{JobId, NodeId};

/// Most arguments in a command (including the program).
pub const MAX_COMMAND_ARGS: usize = 1_024;
/// Most bytes in all command arguments together.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Most environment variables.
pub const MAX_ENV_VARS: usize = 256;
/// Most bytes in all environment names and values together.
pub const MAX_ENV_BYTES: usize = 64 * 1024;
/// Longest job name, namespace, label key or label value.
pub const MAX_NAME_LEN: usize = 63;
/// Most label constraints.
pub const MAX_LABELS: usize = 32;
/// Longest image reference.
pub const MAX_IMAGE_LEN: usize = 255;
/// Most inputs.
pub const MAX_INPUTS: usize = 64;
/// Allowed checkpoint intervals: 100 ms to a day.
pub const CHECKPOINT_INTERVAL_MS: std::ops::RangeInclusive<u64> = 100..=86_400_000;
/// Largest CPU request, in millicores (1,024 cores).
pub const MAX_CPU_MILLIS: u32 = 1_024_000;
/// Largest memory request, in bytes (16 TiB).
pub const MAX_MEMORY_BYTES: u64 = 16 << 40;
/// Largest GPU request.
pub const MAX_GPUS: u32 = 64;
/// Most attempts (counted failures) a job may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;
/// Longest timeout: 30 days.
pub const MAX_TIMEOUT_MS: u64 = 30 * 24 * 3_600 * 1_000;
/// Default number of attempts.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Default namespace.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Priority bounds (inclusive).
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1_000..=1_000;

/// Resources a job needs on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU in thousandths of a core.
    pub cpu_millis: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Whole GPUs.
    #[serde(default)]
    pub gpus: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_millis: 1_000,
            memory_bytes: 256 << 20,
            gpus: 0,
        }
    }
}

impl Resources {
    /// True iff `self` fits in `available`.
    pub fn fits_in(&self, available: &Resources) -> bool {
        self.cpu_millis <= available.cpu_millis
            && self.memory_bytes <= available.memory_bytes
            && self.gpus <= available.gpus
    }
}

/// A job as a user submits it (untrusted). Unknown fields are an error.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobRequest {
    /// Namespace (defaults to `default`).
    pub namespace: Option<String>,
    /// Human name (optional).
    pub name: Option<String>,
    /// Program and arguments. Required unless `image` is set (then it may be empty and
    /// the image's entry point runs).
    pub command: Vec<String>,
    /// Container image; `None` runs `command` as a process.
    pub image: Option<String>,
    /// Non-secret environment.
    pub env: BTreeMap<String, String>,
    /// Resources needed (defaults: 1 core, 256 MiB, no GPU).
    pub resources: Option<Resources>,
    /// Node labels that must match exactly.
    pub labels: BTreeMap<String, String>,
    /// Higher runs first.
    pub priority: i32,
    /// Kill the execution after this long.
    pub timeout_ms: Option<u64>,
    /// Counted failures allowed before the job fails.
    pub max_attempts: Option<u32>,
    /// Inputs: encrypted blobs the agent presents, decrypted, in `MUTUAL_INPUT_DIR`.
    pub inputs: Vec<BlobRef>,
    /// How often the agent snapshots `MUTUAL_CHECKPOINT_DIR` (the node's default if unset).
    pub checkpoint_interval_ms: Option<u64>,
}

/// An accepted job's immutable specification, as stored in the job document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The job's id.
    pub id: JobId,
    /// Namespace.
    pub namespace: String,
    /// Human name (may be empty).
    pub name: String,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Container image, if any.
    pub image: Option<String>,
    /// Non-secret environment.
    pub env: BTreeMap<String, String>,
    /// Resources needed.
    pub resources: Resources,
    /// Required node labels.
    pub labels: BTreeMap<String, String>,
    /// Higher runs first.
    pub priority: i32,
    /// Timeout, if any.
    pub timeout_ms: Option<u64>,
    /// Counted failures allowed.
    pub max_attempts: u32,
    /// Inputs.
    pub inputs: Vec<BlobRef>,
    /// Checkpoint interval, if the submitter chose one.
    #[serde(default)]
    pub checkpoint_interval_ms: Option<u64>,
    /// When it was accepted.
    pub submitted_at: Hlc,
    /// The node that accepted it.
    pub submitter: NodeId,
}

/// A precise reason a request was refused, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job spec: {field}: {problem}")]
pub struct SpecError {
    /// The JSON path of the offending field (e.g. `env.PATH`, `resources.cpu_millis`).
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

fn err<T>(field: impl Into<String>, problem: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError {
        field: field.into(),
        problem: problem.into(),
    })
}

/// Checks a DNS-label-like name: 1..=63 of `[a-z0-9A-Z._-]`, starting with a letter or digit.
pub fn check_name(field: &str, value: &str) -> Result<(), SpecError> {
    if value.is_empty() {
        return err(field, "must not be empty");
    }
    if value.len() > MAX_NAME_LEN {
        return err(
            field,
            format!("is {} bytes long, the limit is {MAX_NAME_LEN}", value.len()),
        );
    }
    if !value.as_bytes()[0].is_ascii_alphanumeric() {
        return err(field, "must start with a letter or digit");
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return err(
            field,
            format!("contains {c:?}; allowed are letters, digits, '.', '_' and '-'"),
        );
    }
    Ok(())
}

fn check_env_name(field: &str, name: &str) -> Result<(), SpecError> {
    let ok_start = name
        .as_bytes()
        .first()
        .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_');
    if !ok_start || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return err(field, "environment names are [A-Za-z_][A-Za-z0-9_]*");
    }
    if name.starts_with("MUTUAL_") {
        return err(field, "names starting with MUTUAL_ are set by the agent");
    }
    Ok(())
}

impl JobRequest {
    /// Validates the request; the accepting node supplies the id, time and its own id.
    pub fn validate(
        self,
        id: JobId,
        submitted_at: Hlc,
        submitter: NodeId,
    ) -> Result<JobSpec, SpecError> {
        let namespace = self
            .namespace
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        check_name("namespace", &namespace)?;
        let name = self.name.unwrap_or_default();
        if !name.is_empty() {
            check_name("name", &name)?;
        }

        if self.command.is_empty() && self.image.is_none() {
            return err(
                "command",
                "must not be empty (give a program to run, or an image)",
            );
        }
        if self.command.len() > MAX_COMMAND_ARGS {
            return err(
                "command",
                format!(
                    "has {} arguments, the limit is {MAX_COMMAND_ARGS}",
                    self.command.len()
                ),
            );
        }
        if let Some(first) = self.command.first()
            && first.trim().is_empty()
        {
            return err("command[0]", "the program must not be empty");
        }
        let mut bytes = 0usize;
        for (i, arg) in self.command.iter().enumerate() {
            if arg.contains('\0') {
                return err(format!("command[{i}]"), "contains a NUL byte");
            }
            bytes += arg.len();
        }
        if bytes > MAX_COMMAND_BYTES {
            return err(
                "command",
                format!("is {bytes} bytes, the limit is {MAX_COMMAND_BYTES}"),
            );
        }

        if let Some(image) = &self.image {
            if image.is_empty() || image.len() > MAX_IMAGE_LEN {
                return err("image", format!("must be 1..={MAX_IMAGE_LEN} bytes"));
            }
            if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return err("image", "must not contain whitespace or control characters");
            }
        }

        if self.env.len() > MAX_ENV_VARS {
            return err(
                "env",
                format!(
                    "has {} variables, the limit is {MAX_ENV_VARS}",
                    self.env.len()
                ),
            );
        }
        let mut env_bytes = 0usize;
        for (k, v) in &self.env {
            check_env_name(&format!("env.{k}"), k)?;
            if v.contains('\0') {
                return err(format!("env.{k}"), "value contains a NUL byte");
            }
            env_bytes += k.len() + v.len();
        }
        if env_bytes > MAX_ENV_BYTES {
            return err(
                "env",
                format!("is {env_bytes} bytes, the limit is {MAX_ENV_BYTES}"),
            );
        }

        let resources = self.resources.unwrap_or_default();
        if resources.cpu_millis == 0 {
            return err("resources.cpu_millis", "must be at least 1");
        }
        if resources.cpu_millis > MAX_CPU_MILLIS {
            return err(
                "resources.cpu_millis",
                format!(
                    "{} exceeds the limit {MAX_CPU_MILLIS}",
                    resources.cpu_millis
                ),
            );
        }
        if resources.memory_bytes == 0 {
            return err("resources.memory_bytes", "must be at least 1");
        }
        if resources.memory_bytes > MAX_MEMORY_BYTES {
            return err(
                "resources.memory_bytes",
                format!(
                    "{} exceeds the limit {MAX_MEMORY_BYTES}",
                    resources.memory_bytes
                ),
            );
        }
        if resources.gpus > MAX_GPUS {
            return err(
                "resources.gpus",
                format!("{} exceeds the limit {MAX_GPUS}", resources.gpus),
            );
        }

        if self.labels.len() > MAX_LABELS {
            return err(
                "labels",
                format!(
                    "has {} entries, the limit is {MAX_LABELS}",
                    self.labels.len()
                ),
            );
        }
        for (k, v) in &self.labels {
            check_name(&format!("labels.{k}"), k)?;
            check_name(&format!("labels.{k}"), v)?;
        }

        if !PRIORITY_RANGE.contains(&self.priority) {
            return err("priority", format!("must be within {PRIORITY_RANGE:?}"));
        }
        if let Some(t) = self.timeout_ms
            && (t == 0 || t > MAX_TIMEOUT_MS)
        {
            return err("timeout_ms", format!("must be 1..={MAX_TIMEOUT_MS}"));
        }
        let max_attempts = self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if max_attempts == 0 || max_attempts > MAX_ATTEMPTS_LIMIT {
            return err("max_attempts", format!("must be 1..={MAX_ATTEMPTS_LIMIT}"));
        }
        if self.inputs.len() > MAX_INPUTS {
            return err(
                "inputs",
                format!(
                    "has {} entries, the limit is {MAX_INPUTS}",
                    self.inputs.len()
                ),
            );
        }
        for (i, input) in self.inputs.iter().enumerate() {
            if let Err(problem) = input.check() {
                return err(format!("inputs[{i}]"), problem);
            }
        }
        if let Some(c) = self.checkpoint_interval_ms
            && !CHECKPOINT_INTERVAL_MS.contains(&c)
        {
            return err(
                "checkpoint_interval_ms",
                format!("must be within {CHECKPOINT_INTERVAL_MS:?}"),
            );
        }

        Ok(JobSpec {
            id,
            namespace,
            name,
            command: self.command,
            image: self.image,
            env: self.env,
            resources,
            labels: self.labels,
            priority: self.priority,
            timeout_ms: self.timeout_ms,
            max_attempts,
            inputs: self.inputs,
            checkpoint_interval_ms: self.checkpoint_interval_ms,
            submitted_at,
            submitter,
        })
    }

    /// Parses a JSON request body with the limits above; errors name the field.
    pub fn from_json(body: &[u8]) -> Result<JobRequest, SpecError> {
        if body.len() > MAX_REQUEST_BYTES {
            return err(
                "(body)",
                format!("is {} bytes, the limit is {MAX_REQUEST_BYTES}", body.len()),
            );
        }
        serde_json::from_slice(body).or_else(|e| err("(body)", e.to_string()))
    }
}

/// Largest JSON request body accepted.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

impl JobSpec {
    /// True iff a node with `labels` satisfies this job's label constraints.
    pub fn labels_match(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_req() -> JobRequest {
        JobRequest {
            command: vec!["echo".into(), "hi".into()],
            ..Default::default()
        }
    }

    fn field_of(r: JobRequest) -> String {
        r.validate(JobId::default(), Hlc(1), NodeId::default())
            .unwrap_err()
            .field
    }

    #[test]
    fn good_spec_validates_with_defaults() {
        let spec = ok_req()
            .validate(JobId::default(), Hlc(1), NodeId::default())
            .unwrap();
        assert_eq!(spec.max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert_eq!(spec.namespace, "default");
    }

    #[test]
    fn bad_specs_name_their_field() {
        assert_eq!(field_of(JobRequest::default()), "command");
        let mut r = ok_req();
        r.resources = Some(Resources {
            cpu_millis: 0,
            ..Default::default()
        });
        assert_eq!(field_of(r), "resources.cpu_millis");
        let mut r = ok_req();
        r.resources = Some(Resources {
            memory_bytes: u64::MAX,
            ..Default::default()
        });
        assert_eq!(field_of(r), "resources.memory_bytes");
        let mut r = ok_req();
        r.env.insert("X".into(), "y".repeat(MAX_ENV_BYTES));
        assert_eq!(field_of(r), "env");
        let mut r = ok_req();
        r.env.insert("1BAD".into(), "y".into());
        assert_eq!(field_of(r), "env.1BAD");
        let mut r = ok_req();
        r.name = Some("has space".into());
        assert_eq!(field_of(r), "name");
        let mut r = ok_req();
        r.max_attempts = Some(0);
        assert_eq!(field_of(r), "max_attempts");
        let e = JobRequest::from_json(br#"{"command":["x"],"bogus":1}"#).unwrap_err();
        assert!(e.problem.contains("bogus"), "{e}");
    }
}
