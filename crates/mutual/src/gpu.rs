//! NVIDIA GPUs: what the node has, and which of them each job gets.
//!
//! Detection asks `nvidia-smi` (the driver's own tool, present wherever the driver is) for
//! each GPU's index, UUID, model and memory in CSV; no GPU, no driver or no tool means none.
//! A job asking for N GPUs is claimed only by a node with N free (the engine counts them),
//! and gets N specific devices: `CUDA_VISIBLE_DEVICES` for a process, a device request for
//! a container. The devices go back to the pool when the execution ends.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long `nvidia-smi` may take before the node starts without GPUs.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most GPUs one node advertises.
pub const MAX_GPUS: usize = 64;

/// One GPU as the node advertises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// Device index (what `CUDA_VISIBLE_DEVICES` names).
    pub index: u32,
    /// Model, e.g. `NVIDIA H200`.
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u64,
}

/// Why `nvidia-smi` output could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("nvidia-smi line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// Parses `nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader`
/// (with or without `nounits`; extra trailing columns are ignored).
pub fn parse_query(csv: &str) -> Result<Vec<Gpu>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in csv.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let err = |reason: &str| ParseError {
            line: i + 1,
            reason: reason.to_string(),
        };
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        if cols.len() < 4 {
            return Err(err("expected index, uuid, name, memory.total"));
        }
        let index = cols[0]
            .parse()
            .map_err(|_| err("the index is not a number"))?;
        let memory_mib = cols[3]
            .trim_end_matches("MiB")
            .trim()
            .parse()
            .map_err(|_| err("memory.total is not a number of MiB"))?;
        if cols[2].is_empty() {
            return Err(err("the name is empty"));
        }
        out.push(Gpu {
            index,
            name: cols[2].to_string(),
            memory_mib,
        });
        if out.len() >= MAX_GPUS {
            break;
        }
    }
    Ok(out)
}

/// The GPUs of this machine (none without a working `nvidia-smi`), and why none when the
/// tool ran but could not be read.
pub fn detect() -> (Vec<Gpu>, Option<String>) {
    let child = Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,uuid,name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(child) = child else {
        return (Vec::new(), None);
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DETECT_TIMEOUT) {
        Ok(Ok(out)) if out.status.success() => {
            match parse_query(&String::from_utf8_lossy(&out.stdout)) {
                Ok(g) => (g, None),
                Err(e) => (Vec::new(), Some(e.to_string())),
            }
        }
        Ok(Ok(out)) => (
            Vec::new(),
            Some(format!("nvidia-smi exited with {}", out.status)),
        ),
        Ok(Err(e)) => (Vec::new(), Some(format!("nvidia-smi: {e}"))),
        Err(_) => (Vec::new(), Some("nvidia-smi did not answer in time".into())),
    }
}

/// The node's free GPUs by index.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    free: BTreeSet<u32>,
}

impl Pool {
    /// A pool holding `gpus`.
    pub fn new(gpus: &[Gpu]) -> Pool {
        Pool {
            free: gpus.iter().map(|g| g.index).collect(),
        }
    }

    /// Takes `n` free GPUs (the lowest indices), or none if fewer are free.
    pub fn take(&mut self, n: u32) -> Option<Vec<u32>> {
        if (self.free.len() as u64) < u64::from(n) {
            return None;
        }
        let got: Vec<u32> = self.free.iter().take(n as usize).copied().collect();
        for g in &got {
            self.free.remove(g);
        }
        Some(got)
    }

    /// Returns GPUs to the pool.
    pub fn give_back(&mut self, gpus: &[u32]) {
        self.free.extend(gpus.iter().copied());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/nvidia-smi")
            .join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn reads_real_nvidia_smi_output() {
        let want = vec![Gpu {
            index: 0,
            name: "NVIDIA H200".into(),
            memory_mib: 143_771,
        }];
        // With units and extra columns, as the driver prints them.
        assert_eq!(
            parse_query(&fixture("query-gpu-noheader.csv")),
            Ok(want.clone())
        );
        let with_header = fixture("query-gpu-header.csv");
        let body: String = with_header.lines().skip(1).collect::<Vec<_>>().join("\n");
        assert_eq!(parse_query(&body), Ok(want));
    }

    #[test]
    fn refuses_garbage_with_the_line() {
        assert_eq!(parse_query("").map(|g| g.len()), Ok(0));
        let e = parse_query("0, GPU-x, NVIDIA H200, 10\nx, GPU-y, A100, 5").expect_err("line 2");
        assert_eq!(e.line, 2);
        assert!(parse_query("0, GPU-x").is_err());
        assert!(parse_query("0, GPU-x, A100, lots").is_err());
    }

    #[test]
    fn the_pool_hands_out_distinct_devices() {
        let gpus: Vec<Gpu> = (0..4)
            .map(|i| Gpu {
                index: i,
                name: "g".into(),
                memory_mib: 1,
            })
            .collect();
        let mut p = Pool::new(&gpus);
        assert_eq!(p.take(2), Some(vec![0, 1]));
        assert_eq!(p.take(3), None, "only two are left");
        assert_eq!(p.take(2), Some(vec![2, 3]));
        p.give_back(&[1]);
        assert_eq!(p.take(1), Some(vec![1]));
        assert_eq!(p.take(0), Some(vec![]));
    }
}
