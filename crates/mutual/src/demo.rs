//! `mutual demo`.

use std::process::ExitCode;

/// Flags of `mutual demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Leave the cluster running and print the addresses to use.
    #[arg(long)]
    pub keep: bool,
}

pub fn run(_a: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
