//! E4, discovery at scale (simulated): the product's two ways of finding "a node that
//! matches a constraint right now" — full broadcast of every status (what a node does
//! today) and the core's discovery directory (`mutual_core::discovery`) — in the
//! deterministic simulator (`mutual_sim::e4`) at 100, 1,000 and 10,000 nodes; and where
//! the jobs' documents live — on every node, or on the k XOR-closest
//! (`mutual_core::placement`, simulated by `mutual_sim::e4_placement`) — at the same sizes.

use std::path::PathBuf;

use mutual_bench::plot::{Chart, Series, csv, line_chart};
use mutual_bench::{command_line, machine, results_dir, today};
use mutual_sim::e4::{E4Config, E4Row};
use mutual_sim::e4_placement::{PlacementConfig, PlacementRow};
use serde_json::json;

#[derive(clap::Args)]
pub struct E4Args {
    /// A small run: 100 and 1,000 nodes, 200 lookups per constraint mix.
    #[arg(long)]
    quick: bool,
    /// The simulation's seed (every random choice derives from it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the CSV, PNG and JSON go.
    #[arg(long, default_value_os_t = results_dir())]
    out: PathBuf,
}

/// The x axis of every E4 plot.
const LOG_N_AXIS: &str = "log10 N (2 = 100 nodes, 3 = 1,000, 4 = 10,000)";

/// (N, y) points on log-log axes (y floored at 1e-9, which has a logarithm).
fn log_log(pts: Vec<(usize, f64)>) -> Vec<(f64, f64)> {
    pts.into_iter()
        .map(|(n, y)| ((n as f64).log10(), y.max(1e-9).log10()))
        .collect()
}

/// How fast `y` grows from the smallest to the largest N, against log N:
/// (y(N_max) / y(N_min)) / (log N_max / log N_min). At most 1 is "no faster than log N".
fn growth_vs_log(points: &[(usize, f64)]) -> Option<f64> {
    let (&(n0, y0), &(n1, y1)) = (points.first()?, points.last()?);
    (n1 > n0 && y0 > 0.0 && n0 > 1).then(|| (y1 / y0) / ((n1 as f64).ln() / (n0 as f64).ln()))
}

pub fn run(a: E4Args) -> anyhow::Result<()> {
    let cfg = E4Config::new(a.seed, a.quick);
    let began = std::time::Instant::now();
    let rows = mutual_sim::e4::run(&cfg);
    let pcfg = PlacementConfig::new(a.seed, cfg.sizes());
    let placed_rows = mutual_sim::e4_placement::run(&pcfg);
    let wall_s = began.elapsed().as_secs_f64();
    std::fs::create_dir_all(&a.out)?;
    let placement = write_placement(&a, &pcfg, &placed_rows)?;
    let text: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.scheme.clone(),
                r.nodes.to_string(),
                r.constraint.clone(),
                r.lookups.to_string(),
                format!("{:.3}", r.lookup_mean_ms),
                format!("{:.3}", r.lookup_p99_ms),
                format!("{:.4}", r.lookup_success_rate),
                format!("{:.4}", r.lookup_feasible_rate),
                format!("{:.1}", r.lookup_msgs_mean),
                format!("{:.2}", r.status_reach_p99_ms),
                format!("{:.2}", r.status_reach_p99_tail_ms),
                format!("{:.1}", r.trackers_mean),
                format!("{:.3}", r.status_changes_per_node_per_s),
                format!("{:.1}", r.per_node_msgs_per_s_mean),
                format!("{:.1}", r.per_node_msgs_per_s_max),
            ]
        })
        .collect();
    csv(
        &a.out.join("e4.csv"),
        &[
            "scheme",
            "n",
            "constraint",
            "lookups",
            "lookup_mean_ms",
            "lookup_p99_ms",
            "lookup_success_rate",
            "lookup_feasible_rate",
            "lookup_msgs_mean",
            "status_reach_p99_ms",
            "status_reach_p99_tail_ms",
            "trackers_mean",
            "status_changes_per_node_per_s",
            "per_node_msgs_per_s_mean",
            "per_node_msgs_per_s_max",
        ],
        &text,
    )?;
    // Load and reach are per scheme and N (every mix runs at once): any one mix gives them.
    let any_mix = rows
        .first()
        .map(|r| r.constraint.clone())
        .unwrap_or_default();
    let series = |scheme: &str, constraint: Option<&str>, f: fn(&E4Row) -> f64| {
        let mix = constraint.unwrap_or(&any_mix);
        rows.iter()
            .filter(|r| r.scheme == scheme && r.constraint == mix)
            .map(|r| (r.nodes, f(r)))
            .collect::<Vec<(usize, f64)>>()
    };
    line_chart(
        &a.out.join("e4.png"),
        &Chart {
            title: "E4: per-node messages per second vs cluster size (log-log)",
            x: LOG_N_AXIS,
            y: "log10 messages sent + received per node per s",
            series: vec![
                Series {
                    label: "broadcast (today), mean".into(),
                    points: log_log(series("broadcast", None, |r| r.per_node_msgs_per_s_mean)),
                },
                Series {
                    label: "directory, mean".into(),
                    points: log_log(series("directory", None, |r| r.per_node_msgs_per_s_mean)),
                },
                Series {
                    label: "directory, busiest node".into(),
                    points: log_log(series("directory", None, |r| r.per_node_msgs_per_s_max)),
                },
            ],
            shade: None,
        },
    )?;
    let mixes: Vec<String> = rows
        .iter()
        .map(|r| r.constraint.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    line_chart(
        &a.out.join("e4-lookup.png"),
        &Chart {
            title: "E4: lookup latency p99 vs cluster size",
            x: LOG_N_AXIS,
            y: "lookup p99 (ms)",
            series: ["broadcast", "directory"]
                .iter()
                .flat_map(|s| mixes.iter().map(move |m| (*s, m.clone())))
                .map(|(s, m)| Series {
                    label: format!("{s}, {m}"),
                    points: series(s, Some(&m), |r| r.lookup_p99_ms)
                        .into_iter()
                        .map(|(n, y)| ((n as f64).log10(), y))
                        .collect(),
                })
                .collect(),
            shade: None,
        },
    )?;
    let mut growth = Vec::new();
    for scheme in ["broadcast", "directory"] {
        let load = growth_vs_log(&series(scheme, None, |r| r.per_node_msgs_per_s_mean));
        let load_max = growth_vs_log(&series(scheme, None, |r| r.per_node_msgs_per_s_max));
        let lookup: Vec<_> = mixes
            .iter()
            .map(|m| {
                json!({
                    "constraint": m,
                    "lookup_p99_growth_vs_log_n": growth_vs_log(&series(scheme, Some(m), |r| r.lookup_p99_ms)),
                })
            })
            .collect();
        let lookup_ok = mixes.iter().all(|m| {
            growth_vs_log(&series(scheme, Some(m), |r| r.lookup_p99_ms)).is_some_and(|g| g <= 1.0)
        });
        growth.push(json!({
            "scheme": scheme,
            "per_node_msgs_per_s_growth_vs_log_n": load,
            "per_node_msgs_per_s_max_growth_vs_log_n": load_max,
            "lookup_p99": lookup,
            "passes": lookup_ok && load.is_some_and(|g| g <= 1.0),
        }));
    }
    let out = json!({
        "command": command_line(),
        "date": today(),
        "machine": machine(),
        "seed": a.seed,
        "simulated": true,
        "wall_s": wall_s,
        "growth": growth,
        "placement": placement,
        "note": "growth_vs_log_n = (y at the largest N / y at the smallest N) / (ln N_max / ln N_min); <= 1 grows no faster than log N. Network model and workload: crates/mutual-sim/src/e4.rs",
        "configurations": rows,
    });
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    std::fs::write(a.out.join("e4.json"), text)?;
    Ok(())
}

/// The placement half: `e4-placement.csv`, `e4-placement.png` and the JSON summary's
/// `placement` entry (its rows and growth against log N).
fn write_placement(
    a: &E4Args,
    cfg: &PlacementConfig,
    rows: &[PlacementRow],
) -> anyhow::Result<serde_json::Value> {
    let kill_percents: Vec<u32> = rows
        .first()
        .map(|r| r.kill_loss.iter().map(|k| k.kill_percent).collect())
        .unwrap_or_default();
    let mut header: Vec<String> = [
        "scheme",
        "n",
        "product_uses",
        "jobs",
        "records_per_node_per_s",
        "per_node_msgs_per_s_mean",
        "per_node_msgs_per_s_max",
        "docs_per_node_mean",
        "docs_per_node_max",
        "membership_changes",
        "handoff_copies_per_change",
        "jobs_lost_to_churn",
        "lookup_p50_ms",
        "lookup_p99_ms",
        "lookup_hops_mean",
    ]
    .iter()
    .map(|h| h.to_string())
    .collect();
    header.extend(
        kill_percents
            .iter()
            .map(|p| format!("lost_fraction_kill_{p}pct")),
    );
    let text: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut line = vec![
                r.scheme.clone(),
                r.nodes.to_string(),
                r.product_uses.to_string(),
                r.jobs.to_string(),
                format!("{:.3}", r.records_per_node_per_s),
                format!("{:.2}", r.per_node_msgs_per_s_mean),
                format!("{:.2}", r.per_node_msgs_per_s_max),
                format!("{:.1}", r.docs_per_node_mean),
                r.docs_per_node_max.to_string(),
                r.membership_changes.to_string(),
                format!("{:.2}", r.handoff_copies_per_change),
                r.jobs_lost_to_churn.to_string(),
                format!("{:.3}", r.lookup_p50_ms),
                format!("{:.3}", r.lookup_p99_ms),
                format!("{:.3}", r.lookup_hops_mean),
            ];
            line.extend(
                r.kill_loss
                    .iter()
                    .map(|k| format!("{:.6}", k.lost_fraction)),
            );
            line
        })
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    csv(&a.out.join("e4-placement.csv"), &header, &text)?;
    let series = |scheme: &str, f: fn(&PlacementRow) -> f64| {
        rows.iter()
            .filter(|r| r.scheme == scheme)
            .map(|r| (r.nodes, f(r)))
            .collect::<Vec<(usize, f64)>>()
    };
    line_chart(
        &a.out.join("e4-placement.png"),
        &Chart {
            title: "E4: job-document replication per node vs cluster size (log-log)",
            x: LOG_N_AXIS,
            y: "log10 per node: messages per s, or documents held",
            series: vec![
                Series {
                    label: "full replication, messages per s".into(),
                    points: log_log(series("full", |r| r.per_node_msgs_per_s_mean)),
                },
                Series {
                    label: "placed (k XOR-closest), messages per s, mean".into(),
                    points: log_log(series("placed", |r| r.per_node_msgs_per_s_mean)),
                },
                Series {
                    label: "placed, messages per s, busiest node".into(),
                    points: log_log(series("placed", |r| r.per_node_msgs_per_s_max)),
                },
                Series {
                    label: "full replication, documents held".into(),
                    points: log_log(series("full", |r| r.docs_per_node_mean)),
                },
                Series {
                    label: "placed, documents held, mean".into(),
                    points: log_log(series("placed", |r| r.docs_per_node_mean)),
                },
            ],
            shade: None,
        },
    )?;
    let growth: Vec<_> = ["full", "placed"]
        .iter()
        .map(|s| {
            let load = growth_vs_log(&series(s, |r| r.per_node_msgs_per_s_mean));
            let load_max = growth_vs_log(&series(s, |r| r.per_node_msgs_per_s_max));
            let docs = growth_vs_log(&series(s, |r| r.docs_per_node_mean));
            json!({
                "scheme": s,
                "per_node_msgs_per_s_growth_vs_log_n": load,
                "per_node_msgs_per_s_max_growth_vs_log_n": load_max,
                "docs_per_node_growth_vs_log_n": docs,
                "passes": load.is_some_and(|g| g <= 1.0),
            })
        })
        .collect();
    Ok(json!({
        "config": cfg,
        "growth": growth,
        "rows": rows,
        "note": "Job documents under full replication and under placement on the k XOR-closest nodes (mutual_core::placement); model: crates/mutual-sim/src/e4_placement.rs.",
    }))
}
