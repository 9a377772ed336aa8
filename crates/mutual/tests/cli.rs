//! The CLI as a user runs it: help, usage errors and exit codes.

use std::process::Command;

fn mutual(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mutual"))
        .args(args)
        .env_remove("MUTUAL_NODE")
        .env_remove("MUTUAL_API_TOKEN")
        .output()
        .expect("run mutual")
}

#[test]
fn help_teaches_and_lists_exit_codes() {
    let out = mutual(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "node",
        "submit",
        "status",
        "jobs",
        "nodes",
        "cancel",
        "wait",
        "demo",
        "Exit codes",
    ] {
        assert!(text.contains(word), "--help lacks {word}: {text}");
    }
    let out = mutual(&["submit", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--memory"));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(mutual(&["submit"]).status.code(), Some(2));
    assert_eq!(
        mutual(&["submit", "--memory", "lots", "--", "true"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        mutual(&["wait", "x", "--timeout", "soon"]).status.code(),
        Some(2)
    );
    assert_eq!(
        mutual(&["jobs", "--state", "sleeping"]).status.code(),
        Some(2)
    );
}

#[test]
fn an_unreachable_node_exits_3_with_a_clear_message() {
    let out = mutual(&["status", "abc", "--node", "http://127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the node at http://127.0.0.1:9"),
        "{err}"
    );
}

#[test]
fn a_bad_join_ticket_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = mutual(&[
        "node",
        "--data-dir",
        &dir.path().display().to_string(),
        "--join",
        "mutual1notaticket",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ticket"));
}
