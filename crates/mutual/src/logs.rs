//! `mutual logs`: a job's output, streamed over WebSocket straight from the node that runs
//! it (any node says which one, and hands out a token for that job only).
//!
//! With `--follow` the command keeps going until the job ends: if the stream breaks (the
//! agent died, or the node first asked did), it asks any live node again — the one it was
//! given, then the others it learned of — and resumes where it was, by byte offset, so
//! nothing is printed twice. A takeover starts a new attempt, whose output follows a marker
//! line on stderr.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mutual::api::{LOG_END, LOG_STDERR, LOG_STDOUT};
use mutual::client::Client;
use mutual::types::LogsReply;

/// How long `--follow` keeps trying when no node can say where the logs are.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
/// Pause between attempts to find the logs again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

pub fn run(first: &Client, job: &str, follow: bool) -> anyhow::Result<ExitCode> {
    // Every node it may ask: the given one first, then the members it knows of now.
    let mut nodes = vec![first.clone()];
    if let Ok(list) = first.nodes() {
        nodes.extend(
            list.iter()
                .filter(|n| !n.is_self)
                .filter_map(|n| n.http.as_deref())
                .map(|h| Client::new(h, first.token().map(str::to_owned))),
        );
    }
    let mut attempt = 0u64;
    let (mut out, mut err) = (0u64, 0u64);
    let mut stuck_since = Instant::now();
    loop {
        let src = nodes.iter().find_map(|c| match c.logs(job) {
            Ok(s) => Some(Ok((c, s))),
            // Unknown job, bad id: the same answer everywhere; say it now. Not started yet
            // (409): wait for it when following, say it otherwise.
            Err(e @ mutual::client::ClientError::Api { status, .. })
                if matches!(status, 400 | 404) || (status == 409 && !follow) =>
            {
                Some(Err(e))
            }
            Err(_) => None,
        });
        let (client, src) = match src {
            Some(Ok(s)) => s,
            Some(Err(e)) => return Err(e.into()),
            None if !follow => bail!("no node could say where the logs of job {job} are"),
            None => {
                if stuck_since.elapsed() > GIVE_UP_AFTER {
                    bail!(
                        "no node could say where the logs of job {job} are for {} s",
                        GIVE_UP_AFTER.as_secs()
                    );
                }
                std::thread::sleep(RETRY_PAUSE);
                continue;
            }
        };
        if src.attempt != attempt {
            if attempt != 0 {
                eprintln!(
                    "--- attempt {} on node {} ---",
                    src.attempt,
                    &src.node[..10.min(src.node.len())]
                );
            }
            attempt = src.attempt;
            (out, err) = (0, 0);
        }
        let terminal = matches!(src.state.as_str(), "succeeded" | "failed" | "cancelled");
        if src.ended && (src.stored.is_some() || src.agent.is_none()) {
            // The attempt is over: its log is a blob any node serves (or it wrote nothing).
            if let Some(stored) = &src.stored {
                let mut o = Skip::new(std::io::stdout(), out);
                let mut e = Skip::new(std::io::stderr(), err);
                mutual::transfer::download_logs(client, stored, &mut o, &mut e)
                    .context("reading the stored logs")?;
                (out, err) = (o.seen, e.seen);
            }
            if terminal || !follow {
                return Ok(ExitCode::SUCCESS);
            }
            stuck_since = Instant::now();
            std::thread::sleep(RETRY_PAUSE);
            continue;
        }
        let ended = stream(&src, follow, &mut out, &mut err);
        match ended {
            Ok(true) if !follow || terminal => return Ok(ExitCode::SUCCESS),
            Ok(false) | Err(_) if !follow => {
                return ended
                    .and_then(|_| bail!("the log stream of job {job} broke off"))
                    .context("reading the logs from the agent");
            }
            // The execution ended but the job did not (yet): look again.
            Ok(_) | Err(_) => {
                stuck_since = Instant::now();
                std::thread::sleep(RETRY_PAUSE);
            }
        }
    }
}

/// Streams one attempt's logs; `Ok(true)` when the agent said the end.
fn stream(src: &LogsReply, follow: bool, out: &mut u64, err: &mut u64) -> anyhow::Result<bool> {
    let base = src
        .agent
        .as_deref()
        .unwrap_or_default()
        .strip_prefix("http://")
        .map(|rest| format!("ws://{rest}"))
        .with_context(|| format!("the agent's address {:?} is not http://", src.agent))?;
    let url = format!(
        "{base}/v1/jobs/{}/logs/stream?token={}&attempt={}&follow={follow}&out={out}&err={err}",
        src.id, src.token, src.attempt
    );
    let (mut ws, _) = tungstenite::connect(url.as_str()).context("connecting to the agent")?;
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    loop {
        match ws.read().context("reading the log stream")? {
            tungstenite::Message::Binary(b) => {
                let Some((&tag, bytes)) = b.split_first() else {
                    continue;
                };
                if tag == LOG_STDOUT {
                    stdout.write_all(bytes)?;
                    stdout.flush()?;
                    *out += bytes.len() as u64;
                } else if tag == LOG_STDERR {
                    stderr.write_all(bytes)?;
                    *err += bytes.len() as u64;
                }
            }
            tungstenite::Message::Text(t) if t.as_str() == LOG_END => return Ok(true),
            tungstenite::Message::Close(_) => return Ok(false),
            _ => {}
        }
    }
}

/// Writes through what comes after the first `skip` bytes (already printed from the
/// live stream), counting everything in `seen`.
struct Skip<W> {
    inner: W,
    skip: u64,
    seen: u64,
}

impl<W: Write> Skip<W> {
    fn new(inner: W, skip: u64) -> Self {
        Skip {
            inner,
            skip,
            seen: 0,
        }
    }
}

impl<W: Write> Write for Skip<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let start = self.skip.saturating_sub(self.seen).min(buf.len() as u64) as usize;
        self.inner.write_all(&buf[start..])?;
        self.seen += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
