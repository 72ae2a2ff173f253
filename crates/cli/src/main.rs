//! `thinvol` command line. Parses arguments and calls the libraries; nothing else.

mod exit;
mod progress;
mod thin;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "thinvol",
    version,
    about = "Thin-provisioned volumes with dm-thin compatible metadata"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the end-to-end demo: pool, volume, snapshot, delta, check.
    Demo {
        /// Directory for the pool (kept afterwards); a temporary one if omitted.
        dir: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Low-level pool and thin-device commands by directory and thin id.
    #[command(subcommand)]
    Thin(thin::ThinCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Demo { dir, json } => thin::demo(dir, json),
        Cmd::Thin(c) => thin::run(c),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("thinvol: {e:#}");
            exit::code_for(&e)
        }
    }
}
