//! The `mutual-sim` binary as a user runs it.

use std::process::Command;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mutual-sim"))
        .args(args)
        .output()
        .expect("run mutual-sim")
}

#[test]
fn json_output_is_deterministic() {
    let args = [
        "--nodes",
        "15",
        "--jobs",
        "60",
        "--seed",
        "4",
        "--json",
        "--submit-window-ms",
        "2000",
        "--fault-ms",
        "4000",
    ];
    let a = sim(&args);
    let b = sim(&args);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    let v: serde_json::Value = serde_json::from_slice(&a.stdout).expect("json");
    for key in [
        "violations",
        "jobs",
        "succeeded",
        "duplicate_results",
        "duplicate_executions",
        "mttr_p50_ms",
        "mttr_p95_ms",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["violations"], 0);
}

#[test]
fn a_failing_seed_prints_the_command_that_reproduces_it() {
    let args = [
        "--nodes",
        "20",
        "--jobs",
        "100",
        "--seeds",
        "0..3",
        "--buggify",
        "rogue-results",
        "--json",
    ];
    let out = sim(&args);
    assert_eq!(out.status.code(), Some(1), "violations must exit 1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .skip_while(|l| !l.contains("reproduce with:"))
        .nth(1)
        .expect("a reproduce line")
        .trim()
        .to_string();
    assert!(line.starts_with("mutual-sim "), "{line}");
    // Running the printed command gives the same summary as the seed had in the range.
    let mut words: Vec<&str> = line.split_whitespace().skip(1).collect();
    words.push("--json");
    let again = sim(&words);
    assert_eq!(again.status.code(), Some(1));
    let seed: u64 = line
        .split("--seed ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("seed");
    let first_run = String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(seed as usize)
        .expect("line")
        .to_string();
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        first_run.trim()
    );
}

#[test]
fn bad_flags_exit_2_with_a_clear_message() {
    let out = sim(&["--nodes", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nodes"));
    let out = sim(&["--kill-percent", "140"]);
    assert_eq!(out.status.code(), Some(2));
    let out = sim(&["--seeds", "5..5"]);
    assert_eq!(out.status.code(), Some(2));
    let out = sim(&["--bogus"]);
    assert_eq!(out.status.code(), Some(2));
}
