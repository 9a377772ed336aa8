//! The data plane: input transfer through the product against plain iroh-blobs, and the
//! work a checkpointed job loses when its holder is SIGKILLed.
//!
//! **Transfer.** A 256 MiB file of random bytes. *Plain iroh-blobs*: two endpoints and two
//! `FsStore`s in this process on loopback, one fetches the blob from the other (verified
//! as it streams; the baseline a user of iroh-blobs alone would get). *Product*: real
//! release nodes; the file is uploaded with the CLI's own code (sealed on the client,
//! stored on one node, copied to another), then a job runs on the third node, which holds
//! no copy: its agent fetches the blob from a holder, verifies, decrypts and unpacks it
//! before the command starts. The transfer time is from the attempt's start record to the
//! job's first instruction (`date`), so it includes all of that. Runs alternate, three
//! each, and the medians are compared (one machine, one run: a ratio).
//!
//! **Checkpoints.** A job accumulates "work" (wall-clock ms spent working, in 50 ms steps)
//! in `MUTUAL_CHECKPOINT_DIR`; the node snapshots it every second. Its holder is SIGKILLed
//! at a random moment; the work it had done is read from its checkpoint file on disk at
//! that moment; the takeover prints where it resumed. Lost work is the difference.
//!
//! `cargo build --release -p mutual && cargo run --release -p mutual-bench --bin data`
//! (`-- --quick`: 64 MiB and three kills).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mutual::harness::{LocalNode, start_cluster};
use mutual_bench::{command_line, machine, mutual_bin, results_dir, today};
use mutual_core::{JobRequest, Resources};
use rand::RngCore;
use serde_json::json;

const RUNS: usize = 3;
const CHECKPOINT_INTERVAL_MS: u64 = 1_000;

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let mib: usize = if quick { 64 } else { 256 };
    let kills = if quick { 3 } else { 8 };
    let bin = mutual_bin()?;
    let root = tempfile::tempdir()?;
    let file = root.path().join("input.bin");
    write_random(&file, mib << 20)?;

    let rt = tokio::runtime::Runtime::new()?;
    let mut plain_s = Vec::new();
    let mut product_s = Vec::new();
    let mut upload_s = Vec::new();
    let nodes = named_cluster(&bin, &root.path().join("transfer"))?;
    for run in 0..RUNS {
        plain_s.push(rt.block_on(plain_transfer(
            &file,
            &root.path().join(format!("plain{run}")),
        ))?);
        let (up, fetch) = product_transfer(&nodes, &file)?;
        upload_s.push(up);
        product_s.push(fetch);
        eprintln!(
            "run {run}: plain {:.2} s, product {:.2} s (upload {:.2} s)",
            plain_s[run], product_s[run], upload_s[run]
        );
    }
    drop(nodes);
    let bytes = (mib << 20) as f64;
    let mibps = |s: f64| bytes / s / (1 << 20) as f64;
    let plain = mibps(median(&plain_s));
    let product = mibps(median(&product_s));
    let upload = mibps(median(&upload_s));

    let mut lost_ms = Vec::new();
    for k in 0..kills {
        let lost = checkpoint_trial(&bin, &root.path().join(format!("ckpt{k}")), k)?;
        eprintln!("kill {k}: lost {lost} ms of work");
        lost_ms.push(lost);
    }
    lost_ms.sort_unstable();

    let out = json!({
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "input_mib": mib,
        "runs": RUNS,
        "plain_iroh_blobs_fetch_mib_per_s": round1(plain),
        "product_input_transfer_mib_per_s": round1(product),
        "product_vs_plain_ratio": (product / plain * 1000.0).round() / 1000.0,
        "product_upload_mib_per_s": round1(upload),
        "plain_seconds": plain_s,
        "product_seconds": product_s,
        "upload_seconds": upload_s,
        "checkpoint_interval_ms": CHECKPOINT_INTERVAL_MS,
        "checkpoint_kills": kills,
        "work_lost_ms": lost_ms,
        "work_lost_max_ms": lost_ms.last(),
        "work_lost_median_ms": lost_ms.get(lost_ms.len() / 2),
        "note": "transfer: 3 release nodes on loopback; product = fetch from a holder + verify + XChaCha20-Poly1305 decrypt + unpack to disk, timed from the attempt's start record to the job's first instruction; plain = iroh-blobs fetch between two FsStores in one process. Checkpoints: 3 nodes, work counted in 50 ms steps, holder SIGKILLed 2-5 s into the job.",
    });
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    let name = if quick {
        "data-quick.json"
    } else {
        "data.json"
    };
    std::fs::write(results_dir().join(name), format!("{text}\n"))?;
    Ok(())
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn write_random(path: &Path, len: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut rng = rand::rng();
    for _ in 0..len / buf.len() {
        rng.fill_bytes(&mut buf);
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(())
}

async fn endpoint() -> anyhow::Result<iroh::Endpoint> {
    Ok(iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
        .secret_key(iroh::SecretKey::generate())
        .alpns(vec![iroh_blobs::ALPN.to_vec()])
        .relay_mode(iroh::RelayMode::Disabled)
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0".parse::<std::net::SocketAddr>()?)?
        .bind()
        .await?)
}

/// Seconds for one plain iroh-blobs fetch of `file` between two fresh stores.
async fn plain_transfer(file: &Path, dir: &Path) -> anyhow::Result<f64> {
    use iroh::protocol::ProtocolHandler;
    let a = endpoint().await?;
    let b = endpoint().await?;
    let store_a = iroh_blobs::store::fs::FsStore::load(dir.join("a")).await?;
    let store_b = iroh_blobs::store::fs::FsStore::load(dir.join("b")).await?;
    let tag = store_a.blobs().add_path(file).await?;
    let proto = iroh_blobs::BlobsProtocol::new(&store_a, None);
    let server = a.clone();
    let serve = tokio::spawn(async move {
        while let Some(inc) = server.accept().await {
            if let Ok(conn) = inc.await {
                let p = proto.clone();
                tokio::spawn(async move { p.accept(conn).await });
            }
        }
    });
    let addr = a
        .bound_sockets()
        .into_iter()
        .fold(iroh::EndpointAddr::new(a.id()), |x, s| x.with_ip_addr(s));
    let began = Instant::now();
    let conn = b.connect(addr, iroh_blobs::ALPN).await?;
    store_b.remote().fetch(conn, tag.hash).complete().await?;
    let secs = began.elapsed().as_secs_f64();
    serve.abort();
    store_a.shutdown().await?;
    store_b.shutdown().await?;
    a.close().await;
    b.close().await;
    let _ = std::fs::remove_dir_all(dir);
    Ok(secs)
}

/// Uploads `file` through the CLI's code, then runs a job on the node without a copy.
/// Returns (upload seconds, input transfer seconds).
fn product_transfer(nodes: &[LocalNode], file: &Path) -> anyhow::Result<(f64, f64)> {
    let c = nodes[0].client();
    let began = Instant::now();
    let input = mutual::transfer::upload(&c, file, &indicatif::ProgressBar::hidden())?;
    let upload = began.elapsed().as_secs_f64();
    let ids: Vec<String> = input.holders.iter().map(ToString::to_string).collect();
    let far = (0..nodes.len())
        .find(|i| nodes[*i].id().is_some_and(|id| !ids.contains(&id)))
        .context("a node without a copy")?;
    let mut req = JobRequest {
        command: vec!["sh".into(), "-c".into(), "date +%s%3N".into()],
        resources: Some(Resources {
            cpu_millis: 100,
            memory_bytes: 16 << 20,
            gpus: 0,
        }),
        inputs: vec![input],
        ..JobRequest::default()
    };
    // Only the far node may take it: it has to fetch.
    req.labels.insert("name".into(), format!("n{far}"));
    let id = c.submit(&req)?.id;
    let done = wait_terminal(&c, &id, 300)?;
    if done.state != "succeeded" {
        bail!("the transfer job ended {}: {done:?}", done.state);
    }
    let started = done
        .attempts
        .last()
        .and_then(|a| a.started_at_ms)
        .context("start")?;
    let out = stdout_of(&c, &id)?;
    let first: u64 = out.trim().parse().context("the job's clock")?;
    Ok((upload, first.saturating_sub(started) as f64 / 1000.0))
}

/// Three nodes labelled `name=n0`, `n1`, `n2`, formed.
fn named_cluster(bin: &Path, root: &Path) -> anyhow::Result<Vec<LocalNode>> {
    let flags = |i: usize| {
        vec![
            "--containers".to_string(),
            "off".into(),
            "--label".into(),
            format!("name=n{i}"),
        ]
    };
    let args0 = flags(0);
    let a0: Vec<&str> = args0.iter().map(String::as_str).collect();
    let mut nodes = vec![LocalNode::start(bin, &root.join("n0"), None, &a0)?];
    let ticket = nodes[0].ticket.clone();
    for i in 1..3 {
        let args = flags(i);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        nodes.push(LocalNode::start(
            bin,
            &root.join(format!("n{i}")),
            Some(&ticket),
            &a,
        )?);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes.iter().any(|n| {
        n.client()
            .nodes()
            .map_or(true, |l| l.iter().filter(|m| m.alive).count() < 3)
    }) {
        if Instant::now() > deadline {
            bail!("the cluster did not form");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(nodes)
}

fn wait_terminal(
    c: &mutual::client::Client,
    id: &str,
    secs: u64,
) -> anyhow::Result<mutual::types::JobStatus> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(s) = c.job(id)
            && matches!(s.state.as_str(), "succeeded" | "failed" | "cancelled")
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("job {id} did not end in {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A finished job's stdout, from its stored log.
fn stdout_of(c: &mutual::client::Client, id: &str) -> anyhow::Result<String> {
    let src = c.logs(id)?;
    let stored = src.stored.context("no stored log")?;
    let mut out = Vec::new();
    mutual::transfer::download_logs(c, &stored, &mut out, &mut std::io::sink())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// One kill: returns the work (ms) the job had done at the kill minus where it resumed.
fn checkpoint_trial(bin: &Path, root: &Path, trial: usize) -> anyhow::Result<u64> {
    let mut nodes = start_cluster(bin, root, 3, &["--containers", "off"])?;
    let c = nodes[0].client();
    // Work is wall-clock ms spent in the loop, kept in the checkpoint directory.
    let script = r#"c="$MUTUAL_CHECKPOINT_DIR/work"; w=0
[ -f "$c" ] && w=$(cat "$c"); echo "start $w"
while [ "$w" -lt 20000 ]; do
  a=$(date +%s%3N); sleep 0.05; b=$(date +%s%3N); w=$((w + b - a))
  echo "$w" > "$c.tmp"; mv "$c.tmp" "$c"
done; echo "done $w""#;
    let req = JobRequest {
        command: vec!["sh".into(), "-c".into(), script.into()],
        resources: Some(Resources {
            cpu_millis: 100,
            memory_bytes: 16 << 20,
            gpus: 0,
        }),
        checkpoint_interval_ms: Some(CHECKPOINT_INTERVAL_MS),
        ..JobRequest::default()
    };
    let id = c.submit(&req)?.id;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (holder, epoch) = loop {
        let s = c.job(&id)?;
        if s.state == "running"
            && let Some(n) = s.node
        {
            break (n, s.attempt);
        }
        if Instant::now() > deadline {
            bail!("the job did not start");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Kill somewhere 2-5 s in, at a different phase each trial.
    let wait_ms = 2_000 + (trial as u64 * 2_654_435_761 % 3_000);
    std::thread::sleep(Duration::from_millis(wait_ms));
    let k = nodes
        .iter()
        .position(|n| n.id().as_deref() == Some(holder.as_str()))
        .context("holder")?;
    let work_file = nodes[k]
        .dir
        .join("io")
        .join(format!("{id}-{epoch}"))
        .join("checkpoint")
        .join("work");
    let at_kill: u64 = std::fs::read_to_string(&work_file)
        .with_context(|| format!("reading {}", work_file.display()))?
        .trim()
        .parse()?;
    nodes[k].kill();
    let other = nodes[(k + 1) % 3].client();
    let done = wait_terminal(&other, &id, 120)?;
    if done.state != "succeeded" || done.attempt < 2 {
        bail!("the job ended {} in attempt {}", done.state, done.attempt);
    }
    let out = stdout_of(&other, &id)?;
    let resumed: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("start "))
        .context("a start line")?
        .trim()
        .parse()?;
    Ok(at_kill.saturating_sub(resumed))
}
