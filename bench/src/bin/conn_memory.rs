//! Memory per peer connection: what one QUIC connection costs, both ends together, with
//! the transport settings `mutual node` uses and with smaller variants of them.
//!
//! Why: at 100–200 hosted nodes most of a busy cluster's memory is QUIC connection state
//! (a heap profile), about 200 KiB per connection end, and each node has tens of
//! connections open. If a transport setting drives that, it is the cheapest lever.
//!
//! Each variant runs in a fresh child process (so one variant's freed pages do not
//! flatter the next): iroh endpoints on loopback, relay off, as a node binds them;
//! `--connections` connections to one server endpoint, each carrying one unidirectional
//! stream with one small frame, as a node's link does. The child reads its resident
//! memory (VmRSS) before and after, with every connection and stream still held. The
//! transport variants open every connection from one client endpoint; `distinct-remotes`
//! (the node's settings) opens each from an endpoint of its own, bound before the first
//! reading, as in a cluster where each connection links two different nodes: the
//! difference is what iroh keeps per remote endpoint on top of the connection.
//!
//! `cargo run --release -p mutual-bench --bin conn_memory` writes
//! `bench/results/conn-memory.json`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use iroh::endpoint::{QuicTransportConfigBuilder, VarInt};
use mutual_bench::{command_line, machine, process_rss_mib, results_dir, today};
use serde_json::json;

/// The protocol the bench speaks (its own: nothing else listens).
const ALPN: &[u8] = b"mutual-bench/conn-memory";
/// The variants, in order: each adds to `node`'s settings.
const VARIANTS: [&str; 6] = [
    "node",
    "few-streams",
    "small-buffers",
    "no-mtu-discovery",
    "all",
    "distinct-remotes",
];
/// How long the connections get to settle before memory is read.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(about = "Memory per QUIC peer connection, by transport setting")]
struct Args {
    /// Connections opened per variant.
    #[arg(long, default_value_t = 1_000)]
    connections: usize,
    /// Where `conn-memory.json` goes.
    #[arg(long, default_value_os_t = results_dir())]
    out: PathBuf,
    /// Run one variant and print its result as JSON (what the parent runs).
    #[arg(long, hide = true)]
    child: Option<String>,
}

fn variant(name: &str) -> Result<QuicTransportConfigBuilder> {
    let node = mutual::node::quic_transport()?;
    let few_streams = |b: QuicTransportConfigBuilder| {
        b.max_concurrent_bidi_streams(VarInt::from_u32(16))
            .max_concurrent_uni_streams(VarInt::from_u32(16))
    };
    let small_buffers = |b: QuicTransportConfigBuilder| {
        b.datagram_receive_buffer_size(None)
            .datagram_send_buffer_size(0)
            .crypto_buffer_size(4 << 10)
            .stream_receive_window(VarInt::from_u32(256 << 10))
            .send_window(1 << 20)
    };
    let no_mtu = |b: QuicTransportConfigBuilder| b.mtu_discovery_config(None);
    Ok(match name {
        "node" | "distinct-remotes" => node,
        "few-streams" => few_streams(node),
        "small-buffers" => small_buffers(node),
        "no-mtu-discovery" => no_mtu(node),
        "all" => no_mtu(small_buffers(few_streams(node))),
        other => bail!("unknown variant {other:?}; one of {VARIANTS:?}"),
    })
}

async fn endpoint(name: &str) -> Result<iroh::Endpoint> {
    iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
        .relay_mode(iroh::RelayMode::Disabled)
        .alpns(vec![ALPN.to_vec()])
        .transport_config(variant(name)?.build())
        .clear_ip_transports()
        .bind_addr((std::net::Ipv4Addr::LOCALHOST, 0))?
        .bind()
        .await
        .context("binding an endpoint")
}

async fn child(name: &str, n: usize) -> Result<serde_json::Value> {
    let server = endpoint(name).await?;
    let clients = if name == "distinct-remotes" { n } else { 1 };
    let mut client = Vec::with_capacity(clients);
    for _ in 0..clients {
        client.push(endpoint(name).await?);
    }
    let pid = std::process::id();
    tokio::time::sleep(SETTLE).await;
    let before = process_rss_mib(pid).context("memory")?;
    // The server holds every connection and the stream it accepted on it.
    let held = Arc::new(Mutex::new(Vec::new()));
    let accepting = {
        let (server, held) = (server.clone(), held.clone());
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let held = held.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let Ok(mut recv) = conn.accept_uni().await else {
                        return;
                    };
                    let mut frame = [0u8; 4];
                    if recv.read_exact(&mut frame).await.is_ok()
                        && let Ok(mut h) = held.lock()
                    {
                        h.push((conn, recv));
                    }
                });
            }
        })
    };
    let addr = mutual::net::endpoint_addr(server.id(), &server.bound_sockets());
    let began = Instant::now();
    let mut mine = Vec::with_capacity(n);
    for i in 0..n {
        let conn = client[i % clients]
            .connect(addr.clone(), ALPN)
            .await
            .with_context(|| format!("connection {i}"))?;
        let mut send = conn.open_uni().await.context("stream")?;
        send.write_all(&[1, 2, 3, 4]).await.context("frame")?;
        mine.push((conn, send));
    }
    let open_s = began.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    while held.lock().map(|h| h.len()).unwrap_or(0) < n {
        if Instant::now() > deadline {
            bail!(
                "the server accepted only {} connections",
                held.lock().map(|h| h.len()).unwrap_or(0)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(SETTLE).await;
    let after = process_rss_mib(pid).context("memory")?;
    accepting.abort();
    drop(mine);
    for c in client {
        c.close().await;
    }
    server.close().await;
    Ok(json!({
        "variant": name,
        "connections": n,
        "rss_before_mib": before,
        "rss_after_mib": after,
        "kib_per_connection_both_ends": (after - before) * 1024.0 / n as f64,
        "open_s": open_s,
    }))
}

fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(name) = &a.child {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let v = rt.block_on(child(name, a.connections))?;
        println!("{v}");
        return Ok(());
    }
    let me = std::env::current_exe()?;
    let mut rows = Vec::new();
    for name in VARIANTS {
        let out = std::process::Command::new(&me)
            .args(["--child", name, "--connections", &a.connections.to_string()])
            .output()
            .with_context(|| format!("running variant {name}"))?;
        if !out.status.success() {
            bail!(
                "variant {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let row: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("variant {name}'s output"))?;
        eprintln!(
            "{name:>18}: {:.1} KiB per connection (both ends)",
            row["kib_per_connection_both_ends"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
        rows.push(row);
    }
    std::fs::create_dir_all(&a.out)?;
    let path = a.out.join("conn-memory.json");
    let doc = json!({
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "results": rows,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n")?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
