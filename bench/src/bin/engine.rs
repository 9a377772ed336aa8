//! Engine micro-benchmarks: events handled per second on one core, `derive_state` time for
//! jobs with 1 and 10 epochs, and the saved automerge document size of a finished job.
//!
//! `cargo run --release -p mutual-bench --bin engine` writes `bench/results/engine.json`.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use mutual_bench::{command_line, machine, results_dir, today};
use mutual_core::derive::derive_state;
use mutual_core::doc::JobDoc;
use mutual_core::engine::{Command, Engine, EngineConfig, Event, Timer};
use mutual_core::view::{ExecMetrics, ExpiryReason, ExpiryRec, Outcome, Record, ResultRec};
use mutual_core::{Epoch, FencingToken, Hlc, JobId, JobRequest, JobSpec, JobView, NodeId};
use serde_json::json;

const JOBS: usize = 20_000;
const DERIVE_ITERS: u32 = 200_000;
const T0_MS: u64 = 1_000_000_000;

fn spec(id: JobId, submitter: NodeId) -> JobSpec {
    JobRequest {
        command: vec![
            "python3".into(),
            "train.py".into(),
            "--epochs".into(),
            "10".into(),
        ],
        ..Default::default()
    }
    .validate(id, Hlc::from_millis(T0_MS), submitter)
    .expect("valid spec")
}

/// A realistic blob reference: a content id, a wrapped key, two holders.
fn blob(c: char) -> mutual_core::BlobRef {
    mutual_core::BlobRef {
        cid: c.to_string().repeat(64),
        key: "c".repeat(144),
        bytes: 1 << 20,
        holders: vec![NodeId::from_index(1), NodeId::from_index(2)],
    }
}

fn result(epoch: u32, claim_ms: u64, seen: BTreeSet<FencingToken>) -> Arc<ResultRec> {
    Arc::new(ResultRec {
        claim_hlc: Hlc::from_millis(claim_ms),
        outcome: Outcome {
            exit_code: 0,
            timed_out: false,
        },
        outputs: Some(blob('a')),
        logs: Some(blob('b')),
        metrics: ExecMetrics {
            wall_ms: 31_000,
            cpu_avg_millis: 950,
            memory_peak_bytes: 1 << 30,
            bytes_in: 1 << 20,
            bytes_out: 1 << 20,
        },
        hlc: Hlc::from_millis(claim_ms + 31_000),
        seen: seen.into_iter().filter(|t| t.epoch.0 >= epoch).collect(),
    })
}

/// The records of a job that took `epochs` attempts: every epoch but the last has two
/// concurrent claims and an expiry (holder judged dead); the last succeeds.
fn finished_job(epochs: u32) -> (Arc<JobSpec>, Vec<Record>) {
    let a = NodeId::from_index(1);
    let b = NodeId::from_index(2);
    let id = JobId([9; 16]);
    let spec = Arc::new(spec(id, a));
    let mut recs = vec![Record::Spec(spec.clone())];
    let mut seen = BTreeSet::new();
    for e in 1..=epochs {
        let base = T0_MS + u64::from(e) * 1_000;
        for (k, node) in [a, b].into_iter().enumerate() {
            let hlc = Hlc::from_millis(base + k as u64);
            recs.push(Record::Claim {
                epoch: Epoch(e),
                node,
                hlc,
            });
            seen.insert(FencingToken {
                epoch: Epoch(e),
                hlc,
                node,
            });
        }
        recs.push(Record::Start {
            epoch: Epoch(e),
            node: a,
            hlc: Hlc::from_millis(base + 30),
        });
        if e < epochs {
            let rec = ExpiryRec {
                hlc: Hlc::from_millis(base + 900),
                reason: ExpiryReason::HolderDead,
            };
            recs.push(Record::Expiry {
                epoch: Epoch(e),
                observer: b,
                rec,
            });
        } else {
            recs.push(Record::Result {
                epoch: Epoch(e),
                node: a,
                rec: result(e, base, seen.clone()),
            });
        }
    }
    (spec, recs)
}

fn derive_ns(epochs: u32) -> f64 {
    let (_, recs) = finished_job(epochs);
    let mut view = JobView::default();
    for r in recs {
        view.insert(r);
    }
    assert!(derive_state(&view).state.is_terminal());
    let t = Instant::now();
    for _ in 0..DERIVE_ITERS {
        black_box(derive_state(black_box(&view)));
    }
    t.elapsed().as_nanos() as f64 / f64::from(DERIVE_ITERS)
}

fn doc_bytes(epochs: u32) -> Result<usize> {
    let (spec, recs) = finished_job(epochs);
    let a = NodeId::from_index(1);
    let mut doc = JobDoc::create(&spec, a)?;
    for r in &recs[1..] {
        doc.write(r)?;
    }
    let bytes = doc.save();
    let back = JobDoc::load(&bytes, a)?.view()?;
    let mut expect = JobView::default();
    for r in recs {
        expect.insert(r);
    }
    anyhow::ensure!(back == expect, "document round trip changed the records");
    Ok(bytes.len())
}

/// `docs` copies of one job's history as `writer` commits it: the creation change, then one
/// change per record after the spec.
fn job_changes(
    docs: usize,
    spec: &JobSpec,
    recs: &[Record],
    writer: NodeId,
) -> Result<Vec<Vec<Vec<u8>>>> {
    (0..docs)
        .map(|_| {
            let mut doc = JobDoc::create(spec, writer)?;
            let mut c = vec![doc.last_change().context("create change")?];
            for r in &recs[1..] {
                doc.write(r)?;
                c.push(doc.last_change().context("change")?);
            }
            Ok(c)
        })
        .collect()
}

/// Per-record cost of writing (one automerge change each, as a holder does) and of applying
/// those changes on another replica (as every other node does), over many documents.
fn doc_write_apply_us() -> Result<(f64, f64)> {
    const DOCS: usize = 500;
    let (spec, recs) = finished_job(10);
    let (a, b) = (NodeId::from_index(1), NodeId::from_index(2));
    let t = Instant::now();
    let changes = job_changes(DOCS, &spec, &recs, a)?;
    let n = (DOCS * recs.len()) as f64;
    let write_us = t.elapsed().as_secs_f64() * 1e6 / n;
    let t = Instant::now();
    for c in &changes {
        let mut doc = JobDoc::empty(b);
        for bytes in c {
            doc.apply(bytes)?;
        }
        black_box(&doc);
    }
    let apply_us = t.elapsed().as_secs_f64() * 1e6 / n;
    Ok((write_us, apply_us))
}

/// What a replica pays per change a peer pushes, to learn the records it brings: apply it,
/// then decode the whole view (what `mutual node` did) or only the keys the change touched
/// (`JobDoc::records_since`, what it does now), over the changes of many 10-epoch jobs.
fn receive_decode_us() -> Result<(f64, f64)> {
    const DOCS: usize = 300;
    let (spec, recs) = finished_job(10);
    let (a, b) = (NodeId::from_index(1), NodeId::from_index(2));
    let changes = job_changes(DOCS, &spec, &recs, a)?;
    let n = (DOCS * (recs.len() - 1)) as f64;
    let mut found = [0usize; 2];
    let mut us = [0f64; 2];
    for (k, delta) in [false, true].into_iter().enumerate() {
        let t = Instant::now();
        for c in &changes {
            let mut doc = JobDoc::empty(b);
            doc.apply(&c[0])?;
            for bytes in &c[1..] {
                let before = doc.heads();
                doc.apply(bytes)?;
                found[k] += if delta {
                    doc.records_since(&before)?.len()
                } else {
                    black_box(doc.view()?).len()
                };
            }
        }
        us[k] = t.elapsed().as_secs_f64() * 1e6 / n;
    }
    anyhow::ensure!(found[1] as f64 == n, "records_since missed records");
    Ok((us[0], us[1]))
}

/// An observer node: every job is submitted, claimed twice, started and finished by others.
fn observer_events_per_s() -> Result<f64> {
    let me = NodeId::from_index(0);
    let cfg = EngineConfig {
        slots: 0,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(me, cfg, T0_MS);
    let mut events: Vec<Event> = Vec::with_capacity(JOBS * 5);
    let (a, b) = (NodeId::from_index(1), NodeId::from_index(2));
    for j in 0..JOBS {
        let mut idb = [0u8; 16];
        idb[..8].copy_from_slice(&(j as u64).to_le_bytes());
        let id = JobId(idb);
        let base = T0_MS + j as u64;
        let s = Arc::new(
            JobRequest {
                command: vec!["true".into()],
                ..Default::default()
            }
            .validate(id, Hlc::from_millis(base), a)
            .context("spec")?,
        );
        let ta = FencingToken {
            epoch: Epoch(1),
            hlc: Hlc::from_millis(base + 1),
            node: a,
        };
        let tb = FencingToken {
            epoch: Epoch(1),
            hlc: Hlc::from_millis(base + 2),
            node: b,
        };
        events.push(Event::Remote {
            job: id,
            records: vec![Record::Spec(s)],
        });
        events.push(Event::Remote {
            job: id,
            records: vec![Record::Claim {
                epoch: Epoch(1),
                node: a,
                hlc: ta.hlc,
            }],
        });
        events.push(Event::Remote {
            job: id,
            records: vec![Record::Claim {
                epoch: Epoch(1),
                node: b,
                hlc: tb.hlc,
            }],
        });
        events.push(Event::Remote {
            job: id,
            records: vec![Record::Start {
                epoch: Epoch(1),
                node: a,
                hlc: Hlc::from_millis(base + 20),
            }],
        });
        let seen: BTreeSet<FencingToken> = [ta, tb].into_iter().collect();
        events.push(Event::Remote {
            job: id,
            records: vec![Record::Result {
                epoch: Epoch(1),
                node: a,
                rec: result(1, base + 1, seen),
            }],
        });
    }
    let n = events.len();
    let t = Instant::now();
    for e in events {
        black_box(engine.handle(T0_MS + 100_000, e)?);
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let done = engine
        .views()
        .filter(|(id, _)| engine.state(id).is_some_and(|s| s.is_terminal()))
        .count();
    anyhow::ensure!(done == JOBS, "observer finished {done} of {JOBS} jobs");
    Ok(rate)
}

/// A holder node: submits each job itself, claims it, starts it, finishes it.
fn holder_events_per_s() -> Result<f64> {
    let me = NodeId::from_index(0);
    let cfg = EngineConfig {
        slots: 1,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(me, cfg, T0_MS);
    let mut now = T0_MS;
    let mut events = 0usize;
    let t = Instant::now();
    for _ in 0..JOBS {
        now += 100;
        let (id, cmds) = engine.submit(
            now,
            JobRequest {
                command: vec!["true".into()],
                ..Default::default()
            },
        )?;
        let mut queue: Vec<Command> = cmds;
        let mut started = None;
        while let Some(c) = queue.pop() {
            match c {
                Command::SetTimer {
                    at_ms,
                    timer: timer @ (Timer::Claim { .. } | Timer::Settle { .. }),
                } => {
                    now = now.max(at_ms);
                    events += 1;
                    queue.extend(engine.handle(now, Event::Timer(timer))?);
                }
                Command::Start { token, .. } => started = Some(token),
                _ => {}
            }
        }
        let token = started.context("job did not start")?;
        events += 1;
        let fin = Event::ExecutionFinished {
            job: id,
            token,
            outcome: Outcome {
                exit_code: 0,
                timed_out: false,
            },
            metrics: ExecMetrics::default(),
            outputs: None,
            logs: None,
        };
        black_box(engine.handle(now, fin)?);
        events += 1; // the submit
    }
    Ok(events as f64 / t.elapsed().as_secs_f64())
}
/// What `DocCache` pays per eviction and per load back: saving a finished job's live
/// document and loading it again, over many documents.
fn doc_save_load_us() -> Result<(f64, f64)> {
    const DOCS: usize = 2_000;
    let (spec, recs) = finished_job(1);
    let a = NodeId::from_index(1);
    let mut docs = Vec::with_capacity(DOCS);
    for _ in 0..DOCS {
        let mut doc = JobDoc::create(&spec, a)?;
        for r in &recs[1..] {
            doc.write(r)?;
        }
        docs.push(doc);
    }
    let t = Instant::now();
    let saved: Vec<Vec<u8>> = docs.iter_mut().map(JobDoc::save).collect();
    let save_us = t.elapsed().as_secs_f64() * 1e6 / DOCS as f64;
    let t = Instant::now();
    for bytes in &saved {
        black_box(JobDoc::load(bytes, a)?);
    }
    let load_us = t.elapsed().as_secs_f64() * 1e6 / DOCS as f64;
    Ok((save_us, load_us))
}

fn main() -> Result<()> {
    let observer = observer_events_per_s()?;
    let holder = holder_events_per_s()?;
    let d1 = derive_ns(1);
    let d10 = derive_ns(10);
    let doc1 = doc_bytes(1)?;
    let doc10 = doc_bytes(10)?;
    let (write_us, apply_us) = doc_write_apply_us()?;
    let (save_us, load_us) = doc_save_load_us()?;
    let (full_view_us, delta_us) = receive_decode_us()?;
    let out = json!({
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "engine_events_per_s_observer": observer.round(),
        "engine_events_per_s_holder": holder.round(),
        "derive_state_ns_1_epoch": d1.round(),
        "derive_state_ns_10_epochs": d10.round(),
        "finished_job_doc_bytes_1_epoch": doc1,
        "finished_job_doc_bytes_10_epochs": doc10,
        "automerge_write_us_per_record": (write_us * 10.0).round() / 10.0,
        "automerge_apply_us_per_record": (apply_us * 10.0).round() / 10.0,
        "finished_job_doc_save_us": (save_us * 10.0).round() / 10.0,
        "finished_job_doc_load_us": (load_us * 10.0).round() / 10.0,
        "receive_change_full_view_us": (full_view_us * 10.0).round() / 10.0,
        "receive_change_records_since_us": (delta_us * 10.0).round() / 10.0,
        "notes": "One core, release build. Observer: a node that only replicates (spec, two concurrent claims, start, result per job). Holder: a node that submits, claims, settles, starts and finishes each job itself. Documents hold a 64-hex outputs and logs id and full metrics. Automerge costs are per record over 500 documents of a 10-epoch job: write = one change committed by the holder (the spec's creation included); apply = the same changes applied one by one on another replica. Save and load: a finished one-epoch job's live document saved whole and loaded back, over 2,000 documents (what a node pays to evict a document beyond --live-docs and to load it again). Receive: per change pushed by a peer, over 300 documents of a 10-epoch job, applying it and then decoding the whole view (full_view, before) or only the keys it changed (records_since, now).",
    });
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    std::fs::create_dir_all(results_dir())?;
    std::fs::write(results_dir().join("engine.json"), text + "\n")?;
    Ok(())
}
