//! Raw images by name: import, export, write-image.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use thinvol_engine::format::human_bytes;
use thinvol_ops::image::{self, ImageReport};

use crate::common::{name, print_json, read_pool, with_pool};
use crate::progress::Bar;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Copy a raw image into POOL/VOL, creating it (sized to the image) when missing.
    ///
    /// Zero blocks and holes are not stored; blocks already equal are not rewritten.
    Import {
        name: String,
        file: PathBuf,
        /// No progress bar or summary.
        #[arg(long, short)]
        quiet: bool,
        #[arg(long)]
        json: bool,
    },
    /// Copy a volume or snapshot to FILE (sparse) or - for stdout.
    ///
    /// The copy has the catalog size of the volume or snapshot.
    Export {
        name: String,
        file: PathBuf,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Bring POOL/VOL to an image's content, writing only the blocks that differ.
    ///
    /// Reports how many bytes changed. Snapshot first to roll back or compare (the
    /// A/B update technique); blocks left equal stay shared with snapshots.
    WriteImage {
        name: String,
        file: PathBuf,
        #[arg(long, short)]
        quiet: bool,
        #[arg(long)]
        json: bool,
    },
}

fn summary(verb: &str, r: &ImageReport) {
    println!(
        "{verb} {}: {} image, {} changed in {} block(s) of {}; {} written, {} already equal, {} zero or hole",
        r.name,
        human_bytes(r.bytes),
        human_bytes(r.bytes_changed),
        r.blocks_changed,
        human_bytes(r.block_size),
        human_bytes(r.bytes_written),
        human_bytes(r.bytes_unchanged),
        human_bytes(r.bytes_skipped)
    );
}

pub fn run(cmd: ImageCmd) -> Result<ExitCode> {
    match cmd {
        ImageCmd::Import {
            name: n,
            file,
            quiet,
            json: as_json,
        } => {
            let n = name(&n)?;
            let mut bar = Bar::new(quiet || as_json);
            let r = with_pool(&n.pool, |h| Ok(image::import(h, &n, &file, &mut bar)?))?;
            if as_json {
                print_json(&r)?;
            } else if !quiet {
                if r.created {
                    println!("created {} ({})", r.name, human_bytes(r.size));
                }
                summary("imported into", &r);
            }
        }
        ImageCmd::Export {
            name: n,
            file,
            quiet,
        } => {
            let n = name(&n)?;
            let mut bar = Bar::new(quiet);
            let st = read_pool(&n.pool, |h| {
                Ok(if file.as_os_str() == "-" {
                    image::export_to_writer(h, &n, &mut std::io::stdout().lock(), &mut bar)?
                } else {
                    image::export_to_file(h, &n, &file, &mut bar)?
                })
            })?;
            if !quiet && file.as_os_str() != "-" {
                eprintln!(
                    "exported {n} to {}: {}, {} data, {} holes",
                    file.display(),
                    human_bytes(st.bytes),
                    human_bytes(st.bytes_written),
                    human_bytes(st.bytes_skipped)
                );
            }
        }
        ImageCmd::WriteImage {
            name: n,
            file,
            quiet,
            json: as_json,
        } => {
            let n = name(&n)?;
            let mut bar = Bar::new(quiet || as_json);
            let r = with_pool(&n.pool, |h| Ok(image::write_image(h, &n, &file, &mut bar)?))?;
            if as_json {
                print_json(&r)?;
            } else if !quiet {
                summary("wrote", &r);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
