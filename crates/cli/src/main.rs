//! `thinvol` command line. Parses arguments and calls the libraries; nothing else.

mod archive_cmd;
mod common;
mod exit;
mod image_cmd;
mod pool_cmd;
mod progress;
mod send_cmd;
mod send_file;
mod send_ssh;
mod serve_cmd;
mod thin;
mod vol_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "thinvol",
    version,
    about = "Thin-provisioned volumes with dm-thin compatible metadata",
    after_help = exit::HELP
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
    /// Pools by name: create, list, status, grow, destroy, import, set.
    #[command(subcommand)]
    Pool(pool_cmd::PoolCmd),
    #[command(flatten)]
    Vol(vol_cmd::VolCmd),
    #[command(flatten)]
    Image(image_cmd::ImageCmd),
    /// Check a pool: every tree and space map, and that catalog and devices agree.
    Check(pool_cmd::CheckArgs),
    /// List a pool's restore points (recorded after every change), oldest first.
    History(archive_cmd::HistoryArgs),
    /// Bring back the names and devices of a restore point (see 'thinvol history').
    ///
    /// Refuses when data blocks the point needs were freed or reused since. Blocks of
    /// writable volumes written in place since the point keep their current data.
    Restore(archive_cmd::RestoreArgs),
    /// Export volumes (read-write) and snapshots (read-only) over NBD.
    ///
    /// Other commands keep working on a served pool: they pause the server through
    /// POOLDIR/control.sock while they run. SIGTERM finishes in-flight requests,
    /// commits and exits.
    Serve(serve_cmd::ServeArgs),
    /// Write a replication stream of snapshots (full, incremental, every snapshot since
    /// a base, or a consistency group) to stdout, a file, or a receiver over ssh.
    Send(send_cmd::SendArgs),
    /// Apply a replication stream to a pool volume (or a raw file with --to-file); the
    /// new snapshot appears only when the whole stream verified.
    Receive(send_cmd::ReceiveArgs),
    /// Prove a replica equals its source snapshot (stored digests; --full re-reads).
    Verify(send_cmd::VerifyArgs),
}

fn main() -> ExitCode {
    common::default_sigpipe();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Demo { dir, json } => thin::demo(dir, json),
        Cmd::Thin(c) => thin::run(c),
        Cmd::Pool(c) => pool_cmd::run(c),
        Cmd::Vol(c) => vol_cmd::run(c),
        Cmd::Image(c) => image_cmd::run(c),
        Cmd::Check(a) => pool_cmd::check(a),
        Cmd::History(a) => archive_cmd::history(a),
        Cmd::Restore(a) => archive_cmd::restore(a),
        Cmd::Serve(a) => serve_cmd::run(a),
        Cmd::Send(a) => send_cmd::send_cmd(a),
        Cmd::Receive(a) => send_cmd::receive_cmd(a),
        Cmd::Verify(a) => send_file::verify_cmd(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("thinvol: {e:#}");
            exit::code_for(&e)
        }
    }
}
