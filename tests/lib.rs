//! Shared helpers of the integration tests.

use std::path::PathBuf;

/// The repository's `fixtures/` directory.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fixtures")
}

/// The `mutual` binary the cluster tests run: `$MUTUAL_BIN`, else the one cargo built
/// next to this test executable (`cargo test --workspace` builds it, because the `mutual`
/// package has integration tests of its own).
pub fn mutual_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MUTUAL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let bin = dir.join("mutual");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p mutual` (cargo test --workspace builds it) or set MUTUAL_BIN",
        bin.display()
    );
    bin
}
