//! Whole-system simulations: many real engines over a faulty simulated network, checked by
//! the invariant checkers after every step and at the end (see `docs/invariants.md`).

use mutual_core::invariants::Invariant;
use mutual_sim::{Buggify, SimConfig, Summary, load_scenarios, run};
use mutual_tests::fixtures_dir;

fn small(seed: u64) -> SimConfig {
    SimConfig {
        nodes: 30,
        jobs: 150,
        seed,
        submit_window_ms: 4_000,
        fault_ms: 8_000,
        ..SimConfig::default()
    }
}

fn assert_clean(s: &Summary) {
    assert_eq!(
        s.violations, 0,
        "violations: {:#?}\nreproduce: {}",
        s.violation_details, s.reproduce
    );
    assert_eq!(s.duplicate_results, 0, "{}", s.reproduce);
    assert!(
        s.liveness_done_ms.is_some(),
        "liveness phase did not finish: {}",
        s.reproduce
    );
    // Every job ends, but one never promised to its client (its submitter crashed before
    // a holder confirmed it) may be lost with no holder left.
    assert_eq!(
        s.succeeded + s.failed + s.cancelled + s.unpromised_lost,
        s.jobs,
        "{}",
        s.reproduce
    );
}

#[test]
fn same_seed_same_summary_byte_for_byte() {
    let a = serde_json::to_string(&run(small(11))).expect("json");
    let b = serde_json::to_string(&run(small(11))).expect("json");
    assert_eq!(a, b);
    let c = serde_json::to_string(&run(small(12))).expect("json");
    assert_ne!(a, c, "a different seed should give a different run");
}

#[test]
fn seeds_with_faults_have_no_violations_and_every_job_succeeds() {
    for seed in 0..6 {
        let s = run(small(seed));
        assert_clean(&s);
        // No execution fails in this workload, so every job must succeed, kills included.
        assert_eq!(s.succeeded, s.jobs, "{}", s.reproduce);
        assert!(s.killed_nodes > 0, "the default workload kills nodes");
    }
}

#[test]
fn without_faults_there_are_no_duplicate_executions() {
    let cfg = SimConfig {
        kill_percent: 0.0,
        restart_percent: 0.0,
        loss_percent: 0.0,
        dup_percent: 0.0,
        partitions: 0,
        ..small(3)
    };
    let s = run(cfg);
    assert_clean(&s);
    assert_eq!(s.duplicate_executions, 0, "{s:#?}");
    assert_eq!(s.executions, s.jobs);
}

#[test]
fn killed_holders_are_taken_over() {
    let cfg = SimConfig {
        kill_percent: 30.0,
        restart_percent: 0.0,
        partitions: 0,
        ..small(5)
    };
    let s = run(cfg);
    assert_clean(&s);
    assert!(s.takeovers > 0, "{s:#?}");
    assert!(
        s.mttr_p50_ms > 0 && s.mttr_p95_ms >= s.mttr_p50_ms,
        "{s:#?}"
    );
    assert_eq!(s.succeeded, s.jobs);
}

/// 40 % of the nodes die at one moment, so some die next to each other on the watch ring,
/// and the nodes watching a dead node are dead too. The first live node before such a run
/// has timed the next ones while looking ahead at them, and judges them all in one probe
/// period: every takeover starts within about one failure timeout of the kill. Before the
/// lookahead, the second node of a run was found a whole timeout later (MTTR max over
/// these seeds: 612, 1,211, 614, 615, 1,107, 627, 1,151 and 1,221 ms; after: 569–626 ms).
#[test]
fn a_run_of_nodes_killed_together_is_found_in_one_timeout() {
    for seed in 0..8 {
        let cfg = SimConfig {
            nodes: 20,
            jobs: 200,
            seed,
            kill_percent: 40.0,
            kill_together: true,
            restart_percent: 0.0,
            partitions: 0,
            loss_percent: 0.0,
            ..SimConfig::default()
        };
        let bound_ms = cfg.fd_timeout_ms + 2 * cfg.probe_interval_ms + 100;
        let s = run(cfg);
        assert_clean(&s);
        assert_eq!(s.succeeded, s.jobs, "{}", s.reproduce);
        assert_eq!(s.killed_nodes, 8, "{}", s.reproduce);
        assert!(
            s.mttr_max_ms < bound_ms,
            "MTTR max {} ms, more than {bound_ms} ms: {}",
            s.mttr_max_ms,
            s.reproduce
        );
    }
}

#[test]
fn every_fixture_scenario_is_clean() {
    let text =
        std::fs::read_to_string(fixtures_dir().join("sim/scenarios.json")).expect("scenarios");
    let scenarios = load_scenarios(&text).expect("parse scenarios");
    assert!(scenarios.len() >= 5);
    for sc in scenarios {
        let cfg = SimConfig {
            seed: 1,
            submit_window_ms: 4_000,
            fault_ms: 8_000,
            ..sc.config
        };
        let s = run(cfg);
        assert_clean(&s);
        if sc.name == "failures" {
            assert!(s.failed > 0 || s.succeeded == s.jobs, "{}", sc.name);
        } else {
            assert_eq!(s.succeeded, s.jobs, "scenario {}: {}", sc.name, s.reproduce);
        }
    }
}

#[test]
fn a_lying_fenced_holder_is_caught() {
    // Show that the simulator's checkers can fail: fenced holders write results anyway.
    let mut caught = 0;
    for seed in 0..4 {
        let cfg = SimConfig {
            buggify: Some(Buggify::RogueResults),
            ..small(seed)
        };
        let s = run(cfg);
        if s.violations > 0 {
            caught += 1;
            assert!(
                s.violation_details
                    .iter()
                    .any(|d| d.contains(&format!("{:?}", Invariant::Fencing))),
                "{:#?}",
                s.violation_details
            );
            assert!(s.reproduce.contains("--buggify rogue-results"));
        }
    }
    assert!(caught > 0, "no seed exposed the rogue results");
}

#[test]
fn bad_scenario_files_are_refused() {
    assert!(load_scenarios(r#"{"scenarios":[{"name":"x","nodez":3}]}"#).is_err());
    assert!(load_scenarios("not json").is_err());
}

#[test]
fn real_automerge_documents_end_to_end() {
    // Pushes carry automerge changes, anti-entropy carries saved documents, crashes keep
    // the documents; at the end every live document must decode to its node's replica.
    for seed in 0..2 {
        let cfg = SimConfig {
            nodes: 12,
            jobs: 60,
            automerge: true,
            ..small(seed)
        };
        let a = run(cfg.clone());
        assert_clean(&a);
        assert_eq!(a.succeeded, a.jobs, "{}", a.reproduce);
        assert!(a.reproduce.contains("--automerge"));
        let b = run(cfg);
        assert_eq!(
            serde_json::to_string(&a).expect("json"),
            serde_json::to_string(&b).expect("json")
        );
    }
}

#[test]
fn seeds_that_once_failed_stay_fixed() {
    let text =
        std::fs::read_to_string(fixtures_dir().join("sim/regressions.json")).expect("regressions");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let list = v["regressions"].as_array().expect("array");
    assert!(!list.is_empty());
    for r in list {
        let cfg = SimConfig {
            seed: r["seed"].as_u64().expect("seed"),
            nodes: r["nodes"].as_u64().expect("nodes") as usize,
            jobs: r["jobs"].as_u64().expect("jobs") as usize,
            ..SimConfig::default()
        };
        let s = run(cfg);
        assert_clean(&s);
        assert_eq!(s.succeeded, s.jobs, "{}: {}", s.reproduce, r["why"]);
    }
}

#[test]
fn placed_jobs_are_safe_under_faults_and_end_on_their_replicas() {
    // `--replicas 5`: records go only to each job's holders (its replicas in the writer's
    // view and the nodes that wrote to it), with the default kills, restarts, loss,
    // duplication, partitions and skew. Every invariant holds after every step; at the end
    // every job is terminal, every live replica of it holds it (`missing_holders`) and all
    // its holders agree. (Not asserted: that every job succeeds. Under placement a job
    // may use up its attempts where full replication would not have: seed 5 of this
    // workload ends with one job failed.)
    for seed in 0..6 {
        let s = run(SimConfig {
            replicas: 5,
            ..small(seed)
        });
        assert_clean(&s);
        assert!(s.killed_nodes > 0 && s.takeovers > 0, "{s:#?}");
        assert!(s.reproduce.contains("--replicas 5"));
    }
    // And with real automerge documents: saved documents for hand-offs and answers.
    let s = run(SimConfig {
        replicas: 5,
        nodes: 12,
        jobs: 60,
        automerge: true,
        ..small(1)
    });
    assert_clean(&s);
    assert_eq!(s.succeeded, s.jobs, "{}", s.reproduce);
}

#[test]
fn a_node_asks_for_a_document_it_holds_but_cannot_read() {
    // Under placement a relayed change can reach a node whose copy lacks the job's spec,
    // so the document does not decode and the engine never learns the job: nobody else
    // knows the node lacks it. Before it asked (`anti_entropy::FarQueue`, fingerprint 0
    // in its digest), these seeds ended with such a document for good: "automerge
    // document and replica differ" (6 of 30 seeds of this workload).
    for seed in [0, 4] {
        let s = run(SimConfig {
            replicas: 5,
            nodes: 12,
            jobs: 60,
            automerge: true,
            ..small(seed)
        });
        assert_clean(&s);
    }
}

#[test]
fn a_placed_submission_cut_off_from_its_holders_is_not_lost() {
    // Under placement a job goes only to its holders. Acknowledged as soon as its
    // submitter had written it, this seed lost one: a partition put all five holders on
    // the far side and the submitter then died for good. A submission now waits for a
    // holder's confirmation (`mutual_core::submit`), resending to the holders of the
    // submitter's current view, which move to its side once the far side is judged dead.
    let s = run(SimConfig {
        replicas: 5,
        nodes: 50,
        jobs: 300,
        kill_percent: 20.0,
        partitions: 6,
        partition_max_ms: 3_000,
        ..small(5)
    });
    assert_clean(&s);
    // Every promised job succeeds. One submission of this seed is lost, legitimately: its
    // submitter crashed while waiting for a confirmation (its client's request failed)
    // and no holder had it.
    assert_eq!(s.succeeded + s.unpromised_lost, s.jobs, "{}", s.reproduce);
    assert!(s.unpromised_lost <= 1, "{}", s.reproduce);
    // Some submission waited for its holders to move: at least one failure timeout.
    assert!(
        s.submit_confirm_max_ms >= SimConfig::default().fd_timeout_ms,
        "no submission waited through a partition ({} ms): {}",
        s.submit_confirm_max_ms,
        s.reproduce
    );
}
