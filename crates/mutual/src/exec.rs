//! The process executor: runs a job's command as a real child process.
//!
//! Each execution gets its own process group (so a kill reaches everything the job
//! started), its own working directory, and its stdout and stderr captured to files under
//! the node's data directory. A kill is `SIGKILL` to the whole group, sent at once: when
//! the node learns it was fenced, when the job is cancelled, and at its timeout. A command
//! that cannot be started ends like a shell reports it: exit code 127.
//!
//! When the node has a launcher ([`Launcher`], the `mutual` binary itself), the job is
//! started through `mutual job-shim`, which asks the kernel to SIGKILL it if the node dies
//! (`PR_SET_PDEATHSIG`) and then `exec`s the command: a SIGKILLed node leaves no orphaned
//! execution running beside the takeover. (Children the job forks itself are not covered.)

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mutual_core::view::{ExecMetrics, Outcome};
use mutual_core::{FencingToken, JobId, JobSpec};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Exit code reported when the command could not be started.
pub const EXIT_CANNOT_START: i32 = 127;

/// How an execution ended, as the executor saw it.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The job.
    pub job: JobId,
    /// The token it ran under.
    pub token: FencingToken,
    /// Exit code (`128 + signal` when killed by a signal).
    pub exit_code: i32,
    /// Measurements.
    pub metrics: ExecMetrics,
    /// Why it could not start, if it could not.
    pub start_error: Option<String>,
}

/// A running execution.
#[derive(Debug)]
pub struct Running {
    /// How to kill it.
    pub kill: Kill,
    /// Its token.
    pub token: FencingToken,
    /// Where its output goes.
    pub log_dir: PathBuf,
}

/// How an execution is killed.
#[derive(Debug)]
pub enum Kill {
    /// A process group (`None`: it never started).
    Process(Option<i32>),
    /// Not started yet: its data is being fetched; notifying ends that.
    Staging(std::sync::Arc<tokio::sync::Notify>),
    /// A container.
    Container {
        /// The Docker connection.
        containers: crate::container::Containers,
        /// The container's name.
        name: String,
    },
}

impl Running {
    /// Kills the execution now (the whole process group, or the container). The waiter
    /// reports the end.
    pub fn kill(&self) {
        match &self.kill {
            // ESRCH (already gone) is fine: the waiter reports the exit either way.
            Kill::Process(Some(pgid)) => {
                let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
            }
            Kill::Process(None) => {}
            Kill::Staging(stop) => stop.notify_one(),
            Kill::Container { containers, name } => containers.kill(name),
        }
    }
}

/// The environment a job sees: its own variables, then the `MUTUAL_*` ones (which win).
pub fn job_env(
    spec: &JobSpec,
    token: FencingToken,
    dirs: Vec<(String, String)>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.push(("MUTUAL_JOB_ID".into(), spec.id.to_string()));
    env.push(("MUTUAL_ATTEMPT".into(), token.epoch.0.to_string()));
    env.push(("MUTUAL_FENCING_TOKEN".into(), token.to_string()));
    env.extend(dirs);
    env
}

/// How the node starts job processes: directly, or through `mutual job-shim`.
#[derive(Debug, Clone, Default)]
pub struct Launcher {
    /// The `mutual` binary, whose `job-shim` subcommand starts the command.
    pub shim: Option<PathBuf>,
}

/// The `mutual job-shim` side: dies with `parent`, then becomes `command`. Returns only on
/// failure, with the exit code to use.
pub fn run_shim(parent: i32, command: &[String]) -> i32 {
    use std::ffi::CString;
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() {
        eprintln!("mutual job-shim: cannot ask to die with the node");
        return EXIT_CANNOT_START;
    }
    // The node may have died before the request took effect.
    if nix::unistd::getppid().as_raw() != parent {
        return 128 + Signal::SIGKILL as i32;
    }
    let args: Result<Vec<CString>, _> =
        command.iter().map(|a| CString::new(a.as_bytes())).collect();
    let Ok(args) = args else {
        eprintln!("mutual: the command contains a NUL byte");
        return EXIT_CANNOT_START;
    };
    let Some(program) = args.first() else {
        eprintln!("mutual: the job has no command");
        return EXIT_CANNOT_START;
    };
    let err = nix::unistd::execvp(program, &args);
    eprintln!("mutual: cannot start {:?}: {err:?}", command.first());
    EXIT_CANNOT_START
}

/// The directory of a job's logs: `<data>/logs/<job>`.
pub fn log_dir(data_dir: &Path, job: JobId) -> PathBuf {
    data_dir.join("logs").join(job.to_string())
}

/// Average CPU use in thousandths of a core, from CPU time and wall time.
pub fn cpu_avg_millis(cpu_ms: u64, wall_ms: u64) -> u32 {
    u32::try_from(cpu_ms.saturating_mul(1000) / wall_ms.max(1)).unwrap_or(u32::MAX)
}

/// Where an execution's logs live: `<data>/logs/<job>/<epoch>.{stdout,stderr}`.
pub fn log_paths(data_dir: &Path, job: JobId, epoch: u64) -> (PathBuf, PathBuf) {
    let d = log_dir(data_dir, job);
    (
        d.join(format!("{epoch}.stdout")),
        d.join(format!("{epoch}.stderr")),
    )
}

/// Starts `spec`'s command under `token`; `done` is called once with how it ended.
pub fn start(
    data_dir: &Path,
    launcher: &Launcher,
    spec: Arc<JobSpec>,
    token: FencingToken,
    gpus: &[u32],
    dirs: &crate::jobio::ExecDirs,
    done: impl FnOnce(Finished) + Send + 'static,
) -> Running {
    let job = spec.id;
    let mut dir_env = dirs.env();
    let cuda = gpus
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let epoch = u64::from(token.epoch.0);
    let (out_path, err_path) = log_paths(data_dir, job, epoch);
    let log_dir = log_dir(data_dir, job);
    let work = data_dir.join("work").join(format!("{job}-{epoch}"));
    let began = Instant::now();
    let fail = move |msg: String| Finished {
        job,
        token,
        exit_code: EXIT_CANNOT_START,
        metrics: ExecMetrics::default(),
        start_error: Some(msg),
    };
    let spawned = (|| -> std::io::Result<tokio::process::Child> {
        std::fs::create_dir_all(&log_dir)?;
        std::fs::create_dir_all(&work)?;
        let stdout = std::fs::File::create(&out_path)?;
        let stderr = std::fs::File::create(&err_path)?;
        let (program, args) = spec
            .command
            .split_first()
            .ok_or_else(|| std::io::Error::other("the job has no command"))?;
        let mut cmd = match &launcher.shim {
            Some(shim) => {
                let mut c = tokio::process::Command::new(shim);
                c.arg("job-shim")
                    .arg("--parent")
                    .arg(std::process::id().to_string())
                    .arg("--")
                    .arg(program);
                c
            }
            None => tokio::process::Command::new(program),
        };
        dir_env.push(("MUTUAL_WORK_DIR".into(), work.display().to_string()));
        cmd.args(args).envs(job_env(&spec, token, dir_env));
        if !cuda.is_empty() {
            // The devices this execution got, and only those.
            cmd.env("CUDA_VISIBLE_DEVICES", &cuda);
        }
        cmd.current_dir(&work)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(false);
        cmd.spawn()
    })();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("cannot start {:?}: {e}", spec.command.first());
            let _ = std::fs::write(&err_path, format!("mutual: {msg}\n"));
            let _ = std::fs::remove_dir_all(&work);
            tokio::spawn(async move { done(fail(msg)) });
            return Running {
                kill: Kill::Process(None),
                token,
                log_dir,
            };
        }
    };
    let pgid = child.id().map(|p| p as i32);
    tokio::spawn(async move {
        let usage = match pgid {
            Some(pid) => measure(pid).await,
            None => Usage::default(),
        };
        let status = child.wait().await;
        let exit_code = match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
            }
            Err(_) => EXIT_CANNOT_START,
        };
        // Most jobs leave their directory empty: remove it in place (cheap); only a
        // non-empty one goes to the blocking pool for a recursive removal.
        if std::fs::remove_dir(&work).is_err() {
            let _ = tokio::fs::remove_dir_all(&work).await;
        }
        done(Finished {
            job,
            token,
            exit_code,
            metrics: usage.metrics(began.elapsed().as_millis() as u64),
            start_error: None,
        });
    });
    Running {
        kill: Kill::Process(pgid),
        token,
        log_dir,
    }
}

/// How often a running job's peak memory is sampled, at most (the first samples come
/// sooner). CPU time and bytes are read once, when the process has exited.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// What `/proc` says about a job's process: CPU time (its own and its waited-for
/// children's), peak resident memory, and bytes read and written through system calls.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// CPU time in clock ticks.
    pub cpu_ticks: u64,
    /// Peak resident set, KiB.
    pub rss_peak_kib: u64,
    /// Bytes read (`rchar`).
    pub read_bytes: u64,
    /// Bytes written (`wchar`).
    pub written_bytes: u64,
}

impl Usage {
    fn max(self, o: Usage) -> Usage {
        Usage {
            cpu_ticks: self.cpu_ticks.max(o.cpu_ticks),
            rss_peak_kib: self.rss_peak_kib.max(o.rss_peak_kib),
            read_bytes: self.read_bytes.max(o.read_bytes),
            written_bytes: self.written_bytes.max(o.written_bytes),
        }
    }

    /// The measurements recorded with the result.
    pub fn metrics(&self, wall_ms: u64) -> ExecMetrics {
        let tick_ms = 1000 / clock_ticks_per_second().max(1);
        let cpu_ms = self.cpu_ticks.saturating_mul(tick_ms);
        ExecMetrics {
            wall_ms,
            cpu_avg_millis: cpu_avg_millis(cpu_ms, wall_ms),
            memory_peak_bytes: self.rss_peak_kib.saturating_mul(1024),
            bytes_in: self.read_bytes,
            bytes_out: self.written_bytes,
        }
    }
}

/// The kernel's clock ticks per second (`USER_HZ`), the unit of `/proc/<pid>/stat` times.
pub fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .unwrap_or(100)
}

/// Reads `/proc/<pid>/{stat,status,io}`; what cannot be read counts as zero.
pub fn read_usage(pid: i32) -> Usage {
    let proc = Path::new("/proc").join(pid.to_string());
    let mut u = Usage::default();
    if let Some(f) = read_stat(pid) {
        // utime, stime, cutime, cstime are fields 14–17 of stat(5).
        u.cpu_ticks = f.get(11..15).map_or(0, |t| t.iter().sum());
    }
    u.rss_peak_kib = read_rss_peak_kib(pid);
    if let Ok(io) = std::fs::read_to_string(proc.join("io")) {
        u.read_bytes = proc_field(&io, "rchar:");
        u.written_bytes = proc_field(&io, "wchar:");
    }
    u
}

/// The numeric fields of `/proc/<pid>/stat` from the third (the state, read as 0) on;
/// `None` if the process is gone.
fn read_stat(pid: i32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing paren.
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(
        rest.split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect(),
    )
}

/// CPU time the process itself has used so far (user + system, without its children), in
/// seconds; `None` if it is gone.
pub fn process_cpu_s(pid: i32) -> Option<f64> {
    let f = read_stat(pid)?;
    // utime and stime are fields 14 and 15 of stat(5).
    let ticks: u64 = f.get(11..13)?.iter().sum();
    Some(ticks as f64 / clock_ticks_per_second().max(1) as f64)
}

/// The process's peak resident memory so far (`VmHWM`), in KiB; 0 once it has exited.
pub fn read_rss_peak_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_or(0, |status| proc_field(&status, "VmHWM:"))
}

fn proc_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Samples the process until it exits, then reads its final CPU time from the zombie
/// (waiting without reaping it, so `/proc` still has it; the caller reaps).
async fn measure(pid: i32) -> Usage {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let mut exited = tokio::task::spawn_blocking(move || {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
        while let Err(nix::errno::Errno::EINTR) = waitid(Id::Pid(Pid::from_raw(pid)), flags) {}
    });
    // Early samples come quickly (10, 20, 40 … ms) so short jobs are seen too.
    let mut pause = Duration::from_millis(10);
    let mut usage = Usage::default();
    loop {
        tokio::select! {
            _ = &mut exited => break,
            _ = tokio::time::sleep(pause) => {
                // CPU time and bytes only grow and are read from the zombie at the end;
                // the peak memory is not kept after exit, so it is what gets sampled.
                usage.rss_peak_kib = usage.rss_peak_kib.max(read_rss_peak_kib(pid));
                pause = (pause * 2).min(SAMPLE_INTERVAL);
            }
        }
    }
    usage.max(read_usage(pid))
}

/// Ends an execution that cannot run here at once, with exit code 125 and the reason in
/// its stderr log.
pub fn refuse(
    data_dir: &Path,
    spec: &JobSpec,
    token: FencingToken,
    reason: &str,
    done: impl FnOnce(Finished) + Send + 'static,
) -> Running {
    let (_, err_path) = log_paths(data_dir, spec.id, u64::from(token.epoch.0));
    let log_dir = log_dir(data_dir, spec.id);
    let _ = std::fs::create_dir_all(&log_dir);
    let _ = std::fs::write(&err_path, format!("mutual: {reason}\n"));
    let f = Finished {
        job: spec.id,
        token,
        exit_code: crate::container::EXIT_CONTAINER_FAILED,
        metrics: ExecMetrics::default(),
        start_error: Some(reason.to_string()),
    };
    tokio::spawn(async move { done(f) });
    Running {
        kill: Kill::Process(None),
        token,
        log_dir,
    }
}

/// The outcome the engine records for a finished execution.
pub fn outcome(exit_code: i32, timed_out: bool) -> Outcome {
    Outcome {
        exit_code,
        timed_out,
    }
}
