//! Shared helpers of the benchmark drivers: where results go, and what machine made them.

pub mod plot;

use std::path::PathBuf;

use serde::Serialize;

/// The release `mutual` binary next to the running driver.
pub fn mutual_bin() -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join("mutual");
    if !bin.exists() {
        anyhow::bail!(
            "{} is missing: run `cargo build --release -p mutual` first",
            bin.display()
        );
    }
    Ok(bin)
}

/// `bench/results/`.
pub fn results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results")
}

/// Facts about the machine a result was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Total memory.
    pub memory_gib: f64,
}

/// Reads the machine facts from `/proc` (best effort).
pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: (proc_number("/proc/meminfo", "MemTotal:").unwrap_or(0.0) / 1024.0 / 1024.0
            * 10.0)
            .round()
            / 10.0,
    }
}

/// The number on a `Key:   1234 kB` line of a `/proc` file (KiB for memory lines, a count
/// for lines such as `voluntary_ctxt_switches:`).
pub fn proc_number(path: &str, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Memory the kernel says is available, in bytes.
pub fn mem_available_bytes() -> u64 {
    proc_number("/proc/meminfo", "MemAvailable:").map_or(0, |k| (k * 1024.0) as u64)
}

/// This process's peak resident memory (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    proc_number("/proc/self/status", "VmHWM:").map_or(f64::NAN, |k| k / 1024.0)
}

/// Another process's peak resident memory (VmHWM), in MiB, if it is still running.
pub fn process_peak_rss_mib(pid: u32) -> Option<f64> {
    proc_number(&format!("/proc/{pid}/status"), "VmHWM:").map(|k| k / 1024.0)
}

/// CPU time another process has used so far (user + system), in seconds, if it is
/// still running.
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    mutual::exec::process_cpu_s(i32::try_from(pid).ok()?)
}

/// Sync messages a node sent and received so far, from its `/metrics` text.
pub fn sync_messages(metrics: &str) -> u64 {
    mutual::client::metric(metrics, "mutual_sync_messages_sent")
        + mutual::client::metric(metrics, "mutual_sync_messages_received")
}

/// A Prometheus histogram's cumulative bucket counts in a `/metrics` text: (upper bound,
/// count at or below it), in the text's order (ascending, `+Inf` last).
pub fn histogram_buckets(metrics: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// The observations counted in `after` but not in `before` (cumulative buckets of one
/// histogram, taken at two moments).
pub fn bucket_diff(before: &[(f64, u64)], after: &[(f64, u64)]) -> Vec<(f64, u64)> {
    after
        .iter()
        .map(|(le, n)| {
            let then = before.iter().find(|(b, _)| b == le).map_or(0, |(_, n)| *n);
            (*le, n.saturating_sub(then))
        })
        .collect()
}

/// The bucket bound at quantile `q` of a histogram's cumulative buckets; `None` if it
/// counted nothing.
pub fn histogram_quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil() as u64;
    buckets.iter().find(|(_, n)| *n >= want).map(|(le, _)| *le)
}

/// Sums histograms' cumulative buckets bound by bound (nodes share the buckets).
pub fn sum_buckets(all: impl IntoIterator<Item = Vec<(f64, u64)>>) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = Vec::new();
    for h in all {
        for (le, n) in h {
            match out.iter_mut().find(|(b, _)| *b == le) {
                Some(slot) => slot.1 += n,
                None => out.push((le, n)),
            }
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// Another process's current resident memory (VmRSS), in MiB, if it is still running.
pub fn process_rss_mib(pid: u32) -> Option<f64> {
    proc_number(&format!("/proc/{pid}/status"), "VmRSS:").map(|k| k / 1024.0)
}

/// The distinct OS processes that host `nodes` (one per `mutual host`).
pub fn host_pids(nodes: &[mutual::harness::LocalNode]) -> Vec<u32> {
    let mut pids: Vec<u32> = nodes.iter().filter_map(|n| Some(n.process()?.0)).collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The options every driver of hosted nodes (`idle`, `load`) shares: how to start the nodes,
/// and where its result goes.
#[derive(clap::Args)]
pub struct HostedArgs {
    /// An extra argument for every hosted node (repeatable), e.g.
    /// `--node-arg=--probe-interval=1s`.
    #[arg(long, allow_hyphen_values = true)]
    pub node_arg: Vec<String>,
    /// The `mutual` binary [default: the one next to this driver].
    #[arg(long)]
    pub mutual: Option<PathBuf>,
    /// Names the result file: `<out>/<driver>-<label>.json`, or `<driver>.json` without one.
    #[arg(long)]
    pub label: Option<String>,
    /// Where the JSON goes.
    #[arg(long, default_value_os_t = results_dir())]
    pub out: PathBuf,
}

impl HostedArgs {
    /// The `mutual` binary to run: `--mutual`, or the release one next to this driver.
    pub fn bin(&self) -> anyhow::Result<PathBuf> {
        match &self.mutual {
            Some(p) => Ok(p.clone()),
            None => mutual_bin(),
        }
    }

    /// Writes the fields of the object `results` to `<out>/<driver>[-<label>].json`, after
    /// the command, date, machine, binary and node arguments that made them.
    pub fn write(
        &self,
        driver: &str,
        bin: &std::path::Path,
        results: serde_json::Value,
    ) -> anyhow::Result<()> {
        let name = match &self.label {
            Some(l) => format!("{driver}-{l}.json"),
            None => format!("{driver}.json"),
        };
        let mut out = serde_json::json!({
            "command": command_line(),
            "date": today(),
            "machine": machine(),
            "mutual": bin.display().to_string(),
            "node_args": self.node_arg,
        });
        if let (Some(o), serde_json::Value::Object(fields)) = (out.as_object_mut(), results) {
            o.extend(fields);
        }
        std::fs::create_dir_all(&self.out)?;
        let path = self.out.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")?;
        eprintln!("wrote {}", path.display());
        Ok(())
    }
}

/// The command line that ran this program, for the results file.
pub fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bin = std::env::args()
        .next()
        .and_then(|a| a.rsplit('/').next().map(str::to_string))
        .unwrap_or_default();
    format!(
        "cargo run --release -p mutual-bench --bin {bin}{}{}",
        if args.is_empty() { "" } else { " -- " },
        args.join(" ")
    )
}

/// Today's date (UTC) as `YYYY-MM-DD`, from the system clock.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{:02}-{:02}", if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two scrapes of one node's histogram, as `prometheus-client` writes them.
    const BEFORE: &str = "# TYPE mutual_x_milliseconds histogram\n\
        mutual_x_milliseconds_sum 30.0\n\
        mutual_x_milliseconds_count 3\n\
        mutual_x_milliseconds_bucket{le=\"10.0\"} 2\n\
        mutual_x_milliseconds_bucket{le=\"100.0\"} 3\n\
        mutual_x_milliseconds_bucket{le=\"+Inf\"} 3\n\
        mutual_y_milliseconds_bucket{le=\"10.0\"} 7\n";
    const AFTER: &str = "mutual_x_milliseconds_bucket{le=\"10.0\"} 4\n\
        mutual_x_milliseconds_bucket{le=\"100.0\"} 12\n\
        mutual_x_milliseconds_bucket{le=\"+Inf\"} 13\n";

    #[test]
    fn histogram_quantiles_count_only_what_came_between_two_scrapes() {
        let before = histogram_buckets(BEFORE, "mutual_x_milliseconds");
        assert_eq!(before, vec![(10.0, 2), (100.0, 3), (f64::INFINITY, 3)]);
        let after = histogram_buckets(AFTER, "mutual_x_milliseconds");
        let between = bucket_diff(&before, &after);
        assert_eq!(between, vec![(10.0, 2), (100.0, 9), (f64::INFINITY, 10)]);
        assert_eq!(histogram_quantile(&between, 0.2), Some(10.0));
        assert_eq!(histogram_quantile(&between, 0.5), Some(100.0));
        assert_eq!(histogram_quantile(&between, 0.99), Some(f64::INFINITY));
        assert_eq!(histogram_quantile(&bucket_diff(&after, &after), 0.5), None);
        // Two nodes' histograms add bound by bound.
        let both = sum_buckets([before.clone(), after]);
        assert_eq!(both, vec![(10.0, 6), (100.0, 15), (f64::INFINITY, 16)]);
        assert!(histogram_buckets(BEFORE, "mutual_z").is_empty());
    }
}
