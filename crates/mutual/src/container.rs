//! The container executor: runs a job in a Docker container through bollard.
//!
//! Docker enforces the job's cpu and memory (`nano_cpus`, `memory` with no extra swap) and a
//! process limit; the container never runs privileged, runs under the node's configured OCI
//! runtime (`runc` unless `--container-runtime` names another that Docker knows, e.g.
//! `kata-runtime` or `runsc`), and is removed when it ends. Its stdout and stderr stream to
//! the same log files a process job writes. A kill (fence, cancel, timeout) is `SIGKILL`
//! through the Docker API, sent at once.
//!
//! Nodes cannot pull images (the cluster may be offline): an image that is not present
//! fails the execution at once with exit code 125 — Docker's own code for "the container
//! could not be run" — and says so in the job's stderr log, rather than hanging.
//!
//! A node that dies would leave its containers running (Docker, not the node, is their
//! parent) beside the takeover. So every container carries the node's id as a label, and
//! a small reaper process (`mutual container-reaper`) that the kernel signals when the node
//! dies (`PR_SET_PDEATHSIG`) removes them at once; a starting node removes any left over.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StatsOptionsBuilder,
};
use futures_util::StreamExt;
use mutual_core::view::ExecMetrics;
use mutual_core::{FencingToken, JobSpec, NodeId};
use tokio::io::AsyncWriteExt;

use crate::exec::{Finished, Kill, Running, cpu_avg_millis, job_env, log_dir, log_paths};

/// Exit code when the container could not be created or started (Docker's convention).
pub const EXIT_CONTAINER_FAILED: i32 = 125;
/// Exit code of a container killed before it started (as a SIGKILL reads).
pub const KILLED_BEFORE_START: i32 = 128 + 9;
/// Most processes one container may hold.
pub const PIDS_LIMIT: i64 = 4_096;
/// Label carrying the node id on every container the node starts.
pub const NODE_LABEL: &str = "io.mutual.node";
/// Label carrying the job id.
pub const JOB_LABEL: &str = "io.mutual.job";

/// Why containers cannot be used on this node.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// Docker did not answer.
    #[error("Docker is not reachable: {0}")]
    Unreachable(DockerError),
    /// The configured runtime is unknown to Docker.
    #[error("Docker has no runtime {runtime:?} (it has: {known})")]
    NoRuntime {
        /// The runtime asked for.
        runtime: String,
        /// Those Docker has.
        known: String,
    },
}

async fn remove_one(docker: &Docker, name: &str) -> bool {
    let opts = RemoveContainerOptionsBuilder::new().force(true).build();
    docker.remove_container(name, Some(opts)).await.is_ok()
}

/// Force-removes every container labelled with `node`; returns how many.
async fn remove_labelled(docker: &Docker, node: NodeId) -> usize {
    let filters = HashMap::from([("label".to_string(), vec![format!("{NODE_LABEL}={node}")])]);
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let Ok(list) = docker.list_containers(Some(opts)).await else {
        return 0;
    };
    let mut removed = 0;
    for c in list {
        if let Some(id) = c.id
            && remove_one(docker, &id).await
        {
            removed += 1;
        }
    }
    removed
}

/// The `mutual container-reaper` side: waits until the node (`parent`) dies — the kernel
/// sends SIGTERM then — and removes the node's containers. Returns the exit code.
pub fn run_reaper(parent: i32, node: NodeId) -> i32 {
    use nix::sys::signal::Signal;
    if nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).is_err() {
        eprintln!("mutual container-reaper: cannot ask to be told of the node's death");
        return 1;
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return 1;
    };
    rt.block_on(async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return 1;
        };
        // The node may have died before the request took effect: check its pid too.
        while nix::unistd::getppid().as_raw() == parent {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
        match Docker::connect_with_local_defaults() {
            Ok(d) => match d.negotiate_version().await {
                Ok(d) => {
                    remove_labelled(&d, node).await;
                    0
                }
                Err(_) => 1,
            },
            Err(_) => 1,
        }
    })
}

/// A container's usage, as Docker's stats report it (maxima over the samples).
#[derive(Debug, Default, Clone, Copy)]
pub struct Used {
    /// CPU time, ns.
    pub cpu_ns: u64,
    /// Peak memory, bytes.
    pub memory_peak: u64,
    /// Network bytes received.
    pub rx_bytes: u64,
    /// Network bytes sent.
    pub tx_bytes: u64,
}

impl Used {
    fn metrics(&self, wall_ms: u64) -> ExecMetrics {
        let cpu_ms = self.cpu_ns / 1_000_000;
        ExecMetrics {
            wall_ms,
            cpu_avg_millis: cpu_avg_millis(cpu_ms, wall_ms),
            memory_peak_bytes: self.memory_peak,
            bytes_in: self.rx_bytes,
            bytes_out: self.tx_bytes,
        }
    }
}

/// A connection to the local Docker Engine and the runtime jobs run under.
#[derive(Debug, Clone)]
pub struct Containers {
    docker: Docker,
    runtime: String,
    node: NodeId,
    /// Containers asked to die. A kill can come while the container is still being
    /// created (the node records the start first): the creator checks this before and
    /// after starting it, so such a container never runs on.
    killed: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Containers {
    /// Connects to the local Docker Engine (negotiating the API version, so older engines
    /// work) and checks that it knows `runtime`.
    pub async fn connect(runtime: &str, node: NodeId) -> Result<Containers, ContainerError> {
        let docker = Docker::connect_with_local_defaults().map_err(ContainerError::Unreachable)?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(ContainerError::Unreachable)?;
        let info = docker.info().await.map_err(ContainerError::Unreachable)?;
        let runtimes = info.runtimes.unwrap_or_default();
        if !runtimes.contains_key(runtime) {
            let mut known: Vec<&String> = runtimes.keys().collect();
            known.sort();
            return Err(ContainerError::NoRuntime {
                runtime: runtime.to_string(),
                known: known
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(Containers {
            docker,
            runtime: runtime.to_string(),
            node,
            killed: Default::default(),
        })
    }

    /// Removes the containers an earlier run of this node left behind.
    pub async fn remove_leftovers(&self) -> usize {
        remove_labelled(&self.docker, self.node).await
    }

    /// Kills the container now (the waiter reports the end).
    pub fn kill(&self, name: &str) {
        if let Ok(mut k) = self.killed.lock() {
            k.insert(name.to_string());
        }
        let docker = self.docker.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let opts = KillContainerOptionsBuilder::new().signal("KILL").build();
            // Already gone is fine: the waiter reports the end either way.
            let _ = docker.kill_container(&name, Some(opts)).await;
        });
    }

    /// Runs `spec` (which names an image) under `token`; `done` is called once with how
    /// it ended. `gpus` are the device indices the job gets.
    pub fn start(
        &self,
        data_dir: &Path,
        spec: Arc<JobSpec>,
        token: FencingToken,
        gpus: Vec<u32>,
        dirs: &crate::jobio::ExecDirs,
        done: impl FnOnce(Finished) + Send + 'static,
    ) -> Running {
        let (dir_env, binds) = dirs.container_env_and_binds();
        let job = spec.id;
        let epoch = u64::from(token.epoch.0);
        let (out_path, err_path) = log_paths(data_dir, job, epoch);
        let log_dir = log_dir(data_dir, job);
        // Two nodes of one machine may run the same attempt (a duplicate, later fenced):
        // the node id keeps their names apart.
        let name = format!("mutual-{job}-{epoch}-{:?}", self.node);
        let this = self.clone();
        let n = name.clone();
        tokio::spawn(async move {
            let began = Instant::now();
            let mut used = Used::default();
            let (exit_code, start_error) = match this
                .run(
                    &spec,
                    token,
                    &gpus,
                    (dir_env, binds),
                    &n,
                    (&out_path, &err_path),
                    &mut used,
                )
                .await
            {
                Ok(code) => (code, None),
                Err(msg) => {
                    if let Ok(mut f) = tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&err_path)
                        .await
                    {
                        let _ = f.write_all(format!("mutual: {msg}\n").as_bytes()).await;
                    }
                    (EXIT_CONTAINER_FAILED, Some(msg))
                }
            };
            remove_one(&this.docker, &n).await;
            if let Ok(mut k) = this.killed.lock() {
                k.remove(&n);
            }
            done(Finished {
                job,
                token,
                exit_code,
                metrics: used.metrics(began.elapsed().as_millis() as u64),
                start_error,
            });
        });
        Running {
            kill: Kill::Container {
                containers: self.clone(),
                name,
            },
            token,
            log_dir,
        }
    }

    fn was_killed(&self, name: &str) -> bool {
        self.killed.lock().is_ok_and(|k| k.contains(name))
    }

    /// One stats sample of a running container, folded into `used`.
    async fn sample(&self, name: &str, used: &mut Used) {
        let opts = StatsOptionsBuilder::new()
            .stream(false)
            .one_shot(true)
            .build();
        let Some(Ok(s)) = self.docker.stats(name, Some(opts)).next().await else {
            return;
        };
        let cpu = s
            .cpu_stats
            .and_then(|c| c.cpu_usage)
            .and_then(|u| u.total_usage)
            .unwrap_or(0);
        let mem = s
            .memory_stats
            .map(|m| m.max_usage.unwrap_or(0).max(m.usage.unwrap_or(0)))
            .unwrap_or(0);
        let (rx, tx) = s
            .networks
            .unwrap_or_default()
            .values()
            .fold((0, 0), |(r, t), n| {
                (r + n.rx_bytes.unwrap_or(0), t + n.tx_bytes.unwrap_or(0))
            });
        used.cpu_ns = used.cpu_ns.max(cpu);
        used.memory_peak = used.memory_peak.max(mem);
        used.rx_bytes = used.rx_bytes.max(rx);
        used.tx_bytes = used.tx_bytes.max(tx);
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        spec: &JobSpec,
        token: FencingToken,
        gpus: &[u32],
        (dir_env, binds): (Vec<(String, String)>, Vec<String>),
        name: &str,
        (out_path, err_path): (&Path, &Path),
        used: &mut Used,
    ) -> Result<i32, String> {
        let image = spec.image.clone().unwrap_or_default();
        if let Some(dir) = out_path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| format!("cannot create the log directory: {e}"))?;
        }
        let mut out = tokio::fs::File::create(out_path)
            .await
            .map_err(|e| format!("cannot create the stdout log: {e}"))?;
        let mut err = tokio::fs::File::create(err_path)
            .await
            .map_err(|e| format!("cannot create the stderr log: {e}"))?;
        let env: Vec<String> = job_env(spec, token, dir_env)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let r = &spec.resources;
        let memory =
            (r.memory_bytes > 0).then(|| i64::try_from(r.memory_bytes).unwrap_or(i64::MAX));
        let host = HostConfig {
            nano_cpus: (r.cpu_millis > 0).then(|| i64::from(r.cpu_millis) * 1_000_000),
            memory,
            // The same as `memory`: no swap on top, so the limit really holds.
            memory_swap: memory,
            pids_limit: Some(PIDS_LIMIT),
            runtime: Some(self.runtime.clone()),
            privileged: Some(false),
            binds: Some(binds),
            device_requests: (!gpus.is_empty()).then(|| {
                vec![DeviceRequest {
                    driver: Some("nvidia".to_string()),
                    device_ids: Some(gpus.iter().map(u32::to_string).collect()),
                    capabilities: Some(vec![vec!["gpu".to_string()]]),
                    ..DeviceRequest::default()
                }]
            }),
            ..HostConfig::default()
        };
        let labels = HashMap::from([
            (NODE_LABEL.to_string(), self.node.to_string()),
            (JOB_LABEL.to_string(), spec.id.to_string()),
        ]);
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: Some(env),
            labels: Some(labels),
            host_config: Some(host),
            ..ContainerCreateBody::default()
        };
        let opts = CreateContainerOptionsBuilder::new().name(name).build();
        match self.docker.create_container(Some(opts), body).await {
            Ok(_) => {}
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                return Err(format!(
                    "image {image:?} is not on this node (nodes do not pull images: \
                     load it with `docker load` or `docker import`)"
                ));
            }
            Err(e) => return Err(format!("cannot create the container: {e}")),
        }
        if self.was_killed(name) {
            return Ok(KILLED_BEFORE_START);
        }
        self.docker
            .start_container(name, None)
            .await
            .map_err(|e| format!("cannot start the container: {e}"))?;
        if self.was_killed(name) {
            // The kill may have reached Docker before the container existed.
            self.kill(name);
        }
        let logs = LogsOptionsBuilder::new()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .build();
        let mut stream = self.docker.logs(name, Some(logs));
        // Docker's stats, sampled while the logs stream: early samples come quickly (50,
        // 100, 200 ms …) so short jobs are seen too.
        let mut pause = std::time::Duration::from_millis(50);
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(bollard::container::LogOutput::StdOut { message })) => {
                        let _ = out.write_all(&message).await;
                    }
                    Some(Ok(bollard::container::LogOutput::StdErr { message })) => {
                        let _ = err.write_all(&message).await;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
                _ = tokio::time::sleep(pause) => {
                    self.sample(name, used).await;
                    pause = (pause * 2).min(crate::exec::SAMPLE_INTERVAL);
                }
            }
        }
        let _ = out.flush().await;
        let _ = err.flush().await;
        let mut wait = self.docker.wait_container(name, None);
        let code = match wait.next().await {
            Some(Ok(r)) => r.status_code,
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => return Err(format!("lost the container: {e}")),
            None => return Err("lost the container".to_string()),
        };
        Ok(i32::try_from(code).unwrap_or(EXIT_CONTAINER_FAILED))
    }
}
