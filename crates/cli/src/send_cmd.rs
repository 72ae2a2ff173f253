//! `thinvol send`, `thinvol receive`, `thinvol verify` (issue #5; docs/stream-format.md).

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use thinvol_catalog::manage::Opened;
use thinvol_catalog::{CatalogPool, Name};
use thinvol_ops::Progress;
use thinvol_stream::digest;
use thinvol_stream::format::{BEGIN_FLAG_FROM_EACH, BEGIN_FLAG_GROUP};
use thinvol_stream::plan::{self, PartDigest, PartSpec, Plan};
use thinvol_stream::receive::{self, ReceiveOptions};
use thinvol_stream::send::{self, DataSource, SendOptions};
use thinvol_stream::token::Token;
use thinvol_stream::StreamError;

use crate::common::{self, usage, with_pool};
use crate::progress::Bar;

#[derive(Args)]
pub struct SendArgs {
    /// POOL/VOL@SNAP; several snapshots of one consistency group make a group stream.
    #[arg(required = true)]
    pub snapshots: Vec<String>,
    /// Incremental from this snapshot of the same volume (@BASE).
    #[arg(long, conflicts_with = "from_each")]
    pub from: Option<String>,
    /// Incremental from @BASE, carrying every snapshot between BASE and SNAP.
    #[arg(long)]
    pub from_each: Option<String>,
    /// Write the stream here instead of stdout.
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    /// Compress the stream with zstd.
    #[arg(short = 'c', long)]
    pub compress: bool,
    /// zstd level with -c.
    #[arg(long, default_value_t = 1)]
    pub level: i32,
    /// Print the exact uncompressed stream size and send nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Continue an interrupted transfer from a receiver's resume token; with --to and
    /// no value, ask the remote receiver for it.
    #[arg(long, num_args = 0..=1, default_missing_value = "auto")]
    pub resume: Option<String>,
    /// Run the receiver over ssh: ssh://[user@]host[:port]/POOL[/VOL].
    #[arg(long)]
    pub to: Option<String>,
    /// Extra ssh option (passed as -o OPT), repeatable.
    #[arg(long = "ssh-opt")]
    pub ssh_opt: Vec<String>,
    /// thinvol on the remote host.
    #[arg(long, default_value = "thinvol")]
    pub remote_thinvol: String,
    /// With --to: pass --force to the remote receive.
    #[arg(long)]
    pub force: bool,
    #[arg(short, long)]
    pub quiet: bool,
    /// Print a JSON summary (on stdout, or stderr when the stream goes to stdout).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ReceiveArgs {
    /// POOL/VOL (or POOL for a group stream).
    pub target: Option<String>,
    /// Read the stream from this file instead of stdin.
    #[arg(short = 'i', long)]
    pub input: Option<PathBuf>,
    /// Apply to a raw image file or block device instead of a pool.
    #[arg(long)]
    pub to_file: Option<PathBuf>,
    /// Roll back a target written to since its newest snapshot.
    #[arg(long)]
    pub force: bool,
    /// Drop an unfinished receive (its hidden devices and state).
    #[arg(long)]
    pub abort: bool,
    /// Print the resume token of an unfinished receive.
    #[arg(long)]
    pub token: bool,
    /// With --to-file: finish or roll back an interrupted apply.
    #[arg(long)]
    pub recover: bool,
    #[arg(short, long)]
    pub quiet: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Source: POOL/VOL@SNAP, ssh://[user@]host[:port]/POOL/VOL@SNAP or file:PATH.
    pub a: String,
    /// Replica, same forms.
    pub b: Option<String>,
    /// Re-read and hash everything, listing differing ranges.
    #[arg(long)]
    pub full: bool,
    /// Print this side's identity and chunk hashes as JSON (used over ssh).
    #[arg(long)]
    pub emit_hashes: bool,
    #[arg(long = "ssh-opt")]
    pub ssh_opt: Vec<String>,
    #[arg(long, default_value = "thinvol")]
    pub remote_thinvol: String,
    #[arg(long)]
    pub json: bool,
}

fn snap_of(arg: &str) -> &str {
    arg.rsplit_once('@').map_or(arg, |(_, s)| s)
}

/// Planned send, with the holds it placed.
struct Planned {
    plan: Plan,
    pool_dir: PathBuf,
    held: Vec<Name>,
    desc: String,
}

const HOLD_PREFIX: &str = "send";

fn build_specs(cp: &CatalogPool, a: &SendArgs, names: &[Name]) -> Result<(Vec<PartSpec>, u32)> {
    let pool = &cp.name;
    let mut specs = Vec::new();
    let mut flags = 0;
    if names.len() > 1 {
        if a.from_each.is_some() {
            return Err(usage(
                "--from-each sends one volume's snapshots; give one POOL/VOL@SNAP",
            ));
        }
        let groups: std::collections::BTreeSet<Option<String>> = names
            .iter()
            .map(|n| Ok(cp.catalog.snapshot(pool, n.vol(), n.snap())?.group.clone()))
            .collect::<Result<_>>()?;
        if groups.len() != 1 || groups.contains(&None) {
            return Err(StreamError::Refused(
                "a group stream needs snapshots taken together ('thinvol snapshot A@s B@s'); these were not".into(),
            )
            .into());
        }
        flags |= BEGIN_FLAG_GROUP;
    }
    for n in names {
        let v = cp.catalog.volume(pool, n.vol())?;
        let s = cp.catalog.snapshot(pool, n.vol(), n.snap())?;
        let spec =
            |sn: &str,
             snap: &thinvol_catalog::Snapshot,
             base: Option<(String, thinvol_catalog::Snapshot)>| PartSpec {
                volume: n.vol().to_string(),
                volume_uuid: v.uuid.clone(),
                snapshot: sn.to_string(),
                snap: snap.clone(),
                base,
            };
        let base_name = a.from.as_deref().or(a.from_each.as_deref()).map(snap_of);
        let base = match base_name {
            Some(b) => {
                let bs = cp.catalog.snapshot(pool, n.vol(), b)?;
                if (bs.created, bs.thin_id) >= (s.created, s.thin_id) {
                    return Err(usage(format!("@{b} is not older than @{}", n.snap())));
                }
                Some((b.to_string(), bs.clone()))
            }
            None => None,
        };
        if let (Some(_), Some((bn, bs))) = (&a.from_each, &base) {
            flags |= BEGIN_FLAG_FROM_EACH;
            let mut chain: Vec<(&String, &thinvol_catalog::Snapshot)> = v
                .snapshots
                .iter()
                .filter(|(_, x)| {
                    (x.created, x.thin_id) > (bs.created, bs.thin_id)
                        && (x.created, x.thin_id) <= (s.created, s.thin_id)
                })
                .collect();
            chain.sort_by_key(|(_, x)| (x.created, x.thin_id));
            let mut prev = (bn.clone(), bs.clone());
            for (cn, cs) in chain {
                specs.push(spec(cn, cs, Some(prev.clone())));
                prev = (cn.clone(), cs.clone());
            }
        } else {
            specs.push(spec(n.snap(), s, base));
        }
    }
    Ok((specs, flags))
}

fn plan_send(a: &SendArgs, names: &[Name], hold: bool) -> Result<Planned> {
    let pool = names[0].pool.clone();
    with_pool(&pool, |h| {
        let (specs, flags) = build_specs(h, a, names)?;
        // A dry run needs only the record list (its length does not depend on the
        // digests' values): it reads no data. A send derives a missing digest while
        // streaming, from its base's (cost ∝ change, no extra pass over the data).
        let mut digests = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let v = h.catalog.volume(&pool, &s.volume)?.clone();
            let d = if !hold {
                PartDigest::Known(digest::LtHash::default().to_bytes())
            } else if let Some(d) = digest::load(&h.dir, &s.snap.uuid) {
                PartDigest::Known(d.to_bytes())
            } else {
                match &s.base {
                    None => PartDigest::FromBase(digest::LtHash::default().to_bytes()),
                    Some((_, b)) if b.size == s.snap.size => {
                        if i > 0 && specs[i - 1].snap.uuid == b.uuid {
                            PartDigest::FromPrevious
                        } else {
                            let bd = digest::snapshot_digest(&h.pool, &h.dir, &v, b)?;
                            PartDigest::FromBase(bd.to_bytes())
                        }
                    }
                    Some(_) => PartDigest::Known(
                        digest::snapshot_digest(&h.pool, &h.dir, &v, &s.snap)?.to_bytes(),
                    ),
                }
            };
            digests.push(d);
        }
        let pool_uuid = h.catalog.pool_uuid.clone();
        let plan = plan::build(&h.pool, &pool_uuid, &pool, flags, &specs, digests)?;
        let mut held = Vec::new();
        if hold {
            release_stale_holds(h, &pool)?;
            let tag = format!("{HOLD_PREFIX}.{}", std::process::id());
            // Every snapshot whose blocks the stream reads: the sent ones and their
            // bases (old contents for the digest).
            let mut names = Vec::new();
            for s in &specs {
                names.push(format!("{pool}/{}@{}", s.volume, s.snapshot));
                if let Some((b, _)) = &s.base {
                    names.push(format!("{pool}/{}@{b}", s.volume));
                }
            }
            names.sort();
            names.dedup();
            for n in names {
                let n = Name::parse_snapshot(&n)?;
                thinvol_catalog::ops::hold(h, &n, &tag)?;
                held.push(n);
            }
        }
        let desc = match (&a.from, &a.from_each) {
            (Some(b), _) => format!("{} (incremental from @{})", join(names), snap_of(b)),
            (_, Some(b)) => format!("{} (every snapshot since @{})", join(names), snap_of(b)),
            _ => format!("{} (full)", join(names)),
        };
        Ok(Planned {
            plan,
            pool_dir: h.dir.clone(),
            held,
            desc,
        })
    })
}

/// Release the holds of senders that no longer run (`send.PID` with no process PID, e.g.
/// a sender killed with SIGKILL), so that they do not keep snapshots forever. A PID
/// reused by another process keeps the stale hold: the safe side.
fn release_stale_holds(h: &mut Opened, pool: &str) -> Result<()> {
    let mut stale = Vec::new();
    for (vn, v) in &h.catalog.volumes {
        for (sn, s) in &v.snapshots {
            for tag in &s.holds {
                let pid = tag
                    .strip_prefix(HOLD_PREFIX)
                    .and_then(|r| r.strip_prefix('.'))
                    .and_then(|p| p.parse::<u32>().ok());
                if let Some(pid) = pid {
                    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                        stale.push((format!("{pool}/{vn}@{sn}"), tag.clone()));
                    }
                }
            }
        }
    }
    for (n, tag) in stale {
        let n = Name::parse_snapshot(&n)?;
        thinvol_catalog::ops::release(h, &n, &tag)?;
        eprintln!("thinvol: released {n} ({tag}): that sender no longer runs");
    }
    Ok(())
}

fn join(names: &[Name]) -> String {
    names
        .iter()
        .map(Name::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn release(held: &[Name]) -> Result<()> {
    if held.is_empty() {
        return Ok(());
    }
    let tag = format!("{HOLD_PREFIX}.{}", std::process::id());
    with_pool(&held[0].pool, |h| {
        for n in held {
            thinvol_catalog::ops::release(h, n, &tag)?;
        }
        Ok(())
    })
}

fn rate(bytes: u64, secs: f64) -> String {
    if secs <= 0.0 {
        return "-".into();
    }
    format!(
        "{}/s",
        thinvol_engine::format::human_bytes((bytes as f64 / secs) as u64)
    )
}

pub fn send_cmd(a: SendArgs) -> Result<ExitCode> {
    let names: Vec<Name> = a
        .snapshots
        .iter()
        .map(|s| common::snapshot_name(s))
        .collect::<Result<_>>()?;
    if names.iter().any(|n| n.pool != names[0].pool) {
        return Err(usage("all snapshots of one stream come from one pool"));
    }
    if a.dry_run {
        let p = plan_send(&a, &names, false)?;
        let data: u64 = p.plan.begin.data_bytes;
        let zero: u64 = p.plan.parts.iter().map(|x| x.zero_bytes).sum();
        let unmap: u64 = p.plan.parts.iter().map(|x| x.unmap_bytes).sum();
        if a.json {
            common::print_json(&serde_json::json!({
                "stream_bytes": p.plan.stream_bytes,
                "records": p.plan.begin.nr_records,
                "data_bytes": data,
                "zero_bytes": zero,
                "unmap_bytes": unmap,
                "parts": p.plan.parts.len(),
            }))?;
        } else {
            println!("{}", p.plan.stream_bytes);
            eprintln!(
                "would send {}: {} stream bytes, {} records, {} data, {} zero, {} unmapped",
                p.desc,
                p.plan.stream_bytes,
                p.plan.begin.nr_records,
                thinvol_engine::format::human_bytes(data),
                thinvol_engine::format::human_bytes(zero),
                thinvol_engine::format::human_bytes(unmap)
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let remote =
        a.to.as_deref()
            .map(crate::send_ssh::Remote::parse)
            .transpose()?;
    let resume = match (&a.resume, &remote) {
        (Some(t), Some(r)) if t == "auto" => r.query_token(&a.ssh_opt, &a.remote_thinvol)?,
        (Some(t), None) if t == "auto" => {
            return Err(usage(
                "--resume needs the receiver's token (or --to ssh://... to ask it)",
            ))
        }
        (t, _) => t.clone(),
    };
    let token = resume.as_deref().map(Token::decode).transpose()?;
    let p = plan_send(&a, &names, true)?;
    let r = stream_out(&a, &p, token.as_ref(), remote.as_ref());
    if let Ok(sum) = &r {
        for (uuid, d) in &sum.computed {
            if let Some(d) = digest::LtHash::from_bytes(d) {
                // Best effort: a missing digest is derived again next time.
                let _ = digest::store(&p.pool_dir, uuid, &d);
            }
        }
    }
    let rel = release(&p.held);
    r?;
    rel?;
    Ok(ExitCode::SUCCESS)
}

fn stream_out(
    a: &SendArgs,
    p: &Planned,
    token: Option<&Token>,
    remote: Option<&crate::send_ssh::Remote>,
) -> Result<send::SendSummary> {
    let mut start_seq = 0;
    if let Some(t) = token {
        if !p.plan.matches_id(&t.stream_id) {
            return Err(StreamError::BadToken(
                "it belongs to another stream (other snapshots, base or pool)".into(),
            )
            .into());
        }
        if t.next_seq == 0 || t.next_seq >= p.plan.begin.nr_records {
            return Err(StreamError::BadToken(format!(
                "position {} is outside this stream of {} records",
                t.next_seq, p.plan.begin.nr_records
            ))
            .into());
        }
        start_seq = t.next_seq;
    }
    let src = DataSource::open(&p.pool_dir)?;
    let opts = SendOptions {
        zstd: a.compress.then_some(a.level),
        start_seq,
    };
    let mut bar = Bar::new(a.quiet);
    bar.start("send", p.plan.stream_bytes);
    let t0 = Instant::now();
    let mut child = None;
    let stdout = std::io::stdout();
    let mut out: Box<dyn Write> = match (&a.output, remote) {
        (Some(path), _) => Box::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        (None, Some(r)) => {
            let mut c = r.spawn_receive(&a.ssh_opt, &a.remote_thinvol, a.force)?;
            let stdin = c.stdin.take().context("ssh stdin")?;
            child = Some(c);
            Box::new(std::io::BufWriter::with_capacity(1 << 20, stdin))
        }
        (None, None) => {
            if stdout.is_terminal() {
                return Err(usage(
                    "refusing to write a stream to a terminal; redirect stdout, or use -o FILE or --to",
                ));
            }
            Box::new(std::io::BufWriter::with_capacity(
                1 << 20,
                std_file(stdout.as_fd())?,
            ))
        }
    };
    if start_seq > 0 {
        // Skip the bar over what the receiver already has (approximately: data bytes).
        if let Some(t) = token {
            bar.advance(t.data_done.min(p.plan.stream_bytes));
        }
    }
    let r = send::send(&p.plan, &src, &mut out, opts, &mut |n| bar.advance(n));
    let flushed = out.flush();
    drop(out);
    bar.finish();
    if let Some(mut c) = child {
        let st = c.wait().context("waiting for ssh")?;
        if !st.success() {
            let why = match &r {
                Err(e) => format!(" ({e})"),
                Ok(_) => String::new(),
            };
            anyhow::bail!(
                "the remote receive failed{why}; resume with: thinvol send ... --to {} --resume",
                a.to.as_deref().unwrap_or("")
            );
        }
    }
    let sum = r?;
    flushed.context("writing the stream")?;
    let ret = sum.clone();
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let j = serde_json::json!({
            "sent": p.desc,
            "records": sum.records,
            "stream_bytes": sum.stream_bytes,
            "data_bytes": sum.data_bytes,
            "zero_bytes": sum.zero_bytes,
            "unmap_bytes": sum.unmap_bytes,
            "start_seq": sum.start_seq,
            "seconds": secs,
        });
        if a.output.is_some() || remote.is_some() {
            common::print_json(&j)?;
        } else {
            eprintln!("{}", serde_json::to_string(&j)?);
        }
    } else if !a.quiet {
        eprintln!(
            "sent {}: {} in {} records ({} data, {} zero, {} unmapped) in {secs:.2} s, {}",
            p.desc,
            thinvol_engine::format::human_bytes(sum.stream_bytes),
            sum.records,
            thinvol_engine::format::human_bytes(sum.data_bytes),
            thinvol_engine::format::human_bytes(sum.zero_bytes),
            thinvol_engine::format::human_bytes(sum.unmap_bytes),
            rate(sum.stream_bytes, secs)
        );
    }
    Ok(ret)
}

fn input(a: &ReceiveArgs) -> Result<Box<dyn Read>> {
    Ok(match &a.input {
        Some(p) => Box::new(std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
        )),
        None => Box::new(std::io::BufReader::with_capacity(
            1 << 20,
            std_file(std::io::stdin().as_fd())?,
        )),
    })
}

/// Standard input or output as a plain file (no line buffering or second buffer in
/// front of ours); a pipe gets a 1 MiB buffer (F_SETPIPE_SZ, best effort: the default
/// 64 KiB makes a 1 MiB record cost 16 hand-overs between sender and receiver).
fn std_file(fd: std::os::fd::BorrowedFd<'_>) -> Result<std::fs::File> {
    let f = std::fs::File::from(fd.try_clone_to_owned().context("duplicating stdio")?);
    // SAFETY: fcntl on a valid descriptor with an integer argument; failure (not a
    // pipe, above the system's limit) leaves the pipe as it was.
    unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::F_SETPIPE_SZ,
            1 << 20,
        );
    }
    Ok(f)
}

pub fn receive_cmd(a: ReceiveArgs) -> Result<ExitCode> {
    if let Some(path) = &a.to_file {
        return crate::send_file::receive_file(&a, path);
    }
    let t = a
        .target
        .as_deref()
        .ok_or_else(|| usage("give the target POOL/VOL (or POOL for a group stream)"))?;
    let n = common::name(t)?;
    if n.snapshot.is_some() {
        return Err(usage(
            "the target is a volume (POOL/VOL) or a pool; the snapshot name comes from the stream",
        ));
    }
    let vol = n.volume.clone();
    if a.token {
        return common::read_pool(&n.pool, |h| {
            match receive::current_token(h, vol.as_deref())? {
                Some(tok) => {
                    println!("{tok}");
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    Err(StreamError::NotFound(format!("an unfinished receive into '{t}'")).into())
                }
            }
        });
    }
    if a.abort {
        return with_pool(&n.pool, |h| {
            if receive::abort(h, vol.as_deref())? {
                eprintln!("thinvol: dropped the unfinished receive into '{t}'");
            } else {
                eprintln!("thinvol: no unfinished receive into '{t}'");
            }
            Ok(ExitCode::SUCCESS)
        });
    }
    let inp = input(&a)?;
    let opts = ReceiveOptions { force: a.force };
    let t0 = Instant::now();
    let mut bar = Bar::new(a.quiet);
    let mut started = false;
    let r = with_pool(&n.pool, |h| {
        let r = receive::receive(h, vol.as_deref(), inp, &opts, &mut |done, total| {
            if !started {
                bar.start("receive", total);
                bar.advance(done);
                started = true;
            } else {
                bar.set(done);
            }
        });
        Ok(r)
    })?;
    bar.finish();
    let sum = match r {
        Ok(s) => s,
        Err(StreamError::Interrupted { reason, token }) => {
            eprintln!("thinvol: receive interrupted: {reason}");
            eprintln!("thinvol: resume token: {token}");
            eprintln!("thinvol: resume with: thinvol send ... --resume {token}");
            return Ok(ExitCode::from(crate::exit::ERROR));
        }
        Err(e) => return Err(e.into()),
    };
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let mut j = serde_json::to_value(&sum)?;
        j["seconds"] = serde_json::json!(secs);
        common::print_json(&j)?;
    } else if !a.quiet {
        eprintln!(
            "received {}: {} data, {} zero, {} unmapped in {} records{} in {secs:.2} s, {}",
            sum.snapshots.join(", "),
            thinvol_engine::format::human_bytes(sum.data_bytes),
            thinvol_engine::format::human_bytes(sum.zero_bytes),
            thinvol_engine::format::human_bytes(sum.unmap_bytes),
            sum.records,
            if sum.resumed_at > 0 {
                format!(" (resumed at record {})", sum.resumed_at)
            } else {
                String::new()
            },
            rate(sum.data_bytes, secs)
        );
    }
    for n in &sum.digests_recomputed {
        eprintln!(
            "thinvol: warning: {n}: the digest derived from stored digests and the \
             content-hash cache disagreed with the stream; the received content, hashed \
             from scratch, matches it (the cache was cleared and is rebuilt as data is hashed)"
        );
    }
    Ok(ExitCode::SUCCESS)
}
