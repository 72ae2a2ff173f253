//! Drivers for the real `thin-provisioning-tools` binaries (`thin_check`,
//! `thin_dump`, `thin_restore`, `thin_delta`, `thin_ls`, `thin_metadata_size`)
//! plus a plain data model of thin metadata as `thin_dump` prints it.
//!
//! The engine's integration tests use this module as an *external oracle*:
//! metadata written by thinvol is fed to the distribution tools, and models
//! produced here are restored with `thin_restore` and read back by thinvol.
//!
//! # Facts verified against Debian's thin-provisioning-tools 0.9.0 (C++)
//!
//! All binaries are symlinks to `/usr/sbin/pdata_tools`.
//!
//! * **`thin_check` success output.** Exit status 0; stdout is exactly
//!   `TRANSACTION_ID=<n>\nMETADATA_FREE_BLOCKS=<n>\n`; stderr is exactly the
//!   four progress lines `examining superblock`, `examining devices tree`,
//!   `examining mapping tree`, `checking space map counts` (each on its own
//!   line, no indentation). `-q` suppresses everything. With `-m` the space
//!   map step (and its line) is skipped; `--skip-mappings` prints
//!   `examining top level of mapping tree` instead of `examining mapping tree`.
//! * **`thin_check` problem output.** Problems are printed on stderr *indented*
//!   (two spaces per nesting level) below the progress line that found them,
//!   e.g. `  metadata reference counts differ for block 200, expected 0, but
//!   got 1`. A metadata leak (count too high) is "non-fatal" but still exits 1;
//!   with `--ignore-non-fatal-errors` it exits **0 while still printing the
//!   message** — that is why [`CheckOutput::assert_clean`] inspects the text,
//!   not only the status.
//! * **`thin_check` 0.9.0 does NOT verify data space-map reference counts.**
//!   Its `compare_space_maps` compares the on-disk data space map with itself
//!   (upstream bug), so a mapped data block with count 0, a doubled count or a
//!   leaked data block all pass silently (verified by patching bitmaps of a
//!   restored image). Metadata space-map counts and the trees themselves are
//!   checked. A clean 0.9.0 `thin_check` therefore proves nothing about data
//!   reference counts (newer 1.x tools do check them).
//! * **`thin_check` and `needs_check`.** A superblock with flags bit 0 set
//!   (`flags="1"` in XML) passes silently with status 0.
//! * **`thin_restore` requirements.** The output must be an *existing*,
//!   non-empty file ("Output file does not exist." / "Zero size output file.")
//!   large enough for the metadata ("Output file too small."; a two-device toy
//!   model needed at least 48 KiB). Every mapped data block must be
//!   `< nr_data_blocks` of the `<superblock>` element, i.e. `nr_data_blocks`
//!   must be ≥ highest data block + 1; otherwise it fails with
//!   `mapping beyond end of data device (B >= N)`, exit 1, and leaves an invalid
//!   superblock behind. `mapped_blocks` in the XML is ignored: the tool
//!   recomputes it from the mappings. `flags` and `version` attributes are
//!   honoured when present; without them it writes flags 0 and
//!   **version 1** (the kernel writes 2). It prints nothing on success.
//! * **`thin_dump`** emits devices sorted by `dev_id`, always with `uuid=""`,
//!   `flags` and `version` attributes, and coalesces mappings into maximal
//!   `range_mapping`s: a run continues while origin and data block both
//!   advance by one **and** the time is equal (runs span btree leaves);
//!   runs of length 1 are `single_mapping`s.
//! * **`thin_delta` output rules** (see [`delta_from_maps`]): every virtual
//!   block mapped on at least one side is classified `same` (both sides map it
//!   to the same data block), `different`, `left_only` or `right_only`; times
//!   are ignored. Elements are maximal runs of *virtually contiguous* blocks of
//!   one kind: adjacent blocks of the same kind are merged even when their
//!   data blocks are not contiguous; a virtual block unmapped on both sides
//!   ends the run (two `same` runs separated by a hole are two elements);
//!   a change of kind ends the run. Elements are in increasing `begin` order.
//! * **`thin_ls`**: `MAPPED_BLOCKS` is the details-tree `mapped_blocks`;
//!   `EXCLUSIVE_BLOCKS` counts the device's mappings whose data block is mapped
//!   exactly once across all devices' mappings (not the data space map count);
//!   `SHARED_BLOCKS = MAPPED_BLOCKS - EXCLUSIVE_BLOCKS`. Rows are sorted by
//!   device id; every cell is right-justified and followed by one space.
//! * **`thin_metadata_size -b <n>b -s <n>b -m <n> -u b -n`** prints just the
//!   number of bytes and a newline.
//! * Without a metadata snapshot, `-m` makes `thin_dump`/`thin_delta`/`thin_ls`
//!   fail with `no current metadata snap` and `thin_check` with
//!   `No metadata snapshot found.` (exit 1). With a held root (tested with a
//!   hand-made one laid out as in the format doc §8) all four accept `-m`;
//!   the held copy's zeroed space-map roots make `thin_dump -m` print
//!   `nr_data_blocks="0"`, and a live `thin_delta` adds a
//!   `metadata_snap="<block>"` attribute to its `<superblock>`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};

// ---------------------------------------------------------------------------
// Data model
// ---------------------------------------------------------------------------

/// The `<superblock>` element of `thin_dump` XML.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Superblock {
    /// Pool uuid as printed by the tools (always empty in practice).
    pub uuid: String,
    /// Pool snapshot clock (`time`).
    pub time: u32,
    /// Userspace transaction id.
    pub transaction: u64,
    /// Data block size in 512-byte sectors.
    pub data_block_size: u32,
    /// Number of data blocks in the data space map.
    pub nr_data_blocks: u64,
    /// Superblock flags (`flags` attribute); `None` when absent.
    pub flags: Option<u32>,
    /// Metadata format version (`version` attribute); `None` when absent.
    pub version: Option<u32>,
}

/// A `<device>` element: one thin device and its mappings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Device {
    /// Thin device id.
    pub dev_id: u64,
    /// Number of mapped virtual blocks (details tree).
    pub mapped_blocks: u64,
    /// Pool transaction id when the device was created.
    pub transaction: u64,
    /// Pool time when the device was created.
    pub creation_time: u32,
    /// Pool time when the device was last snapshotted (or created).
    pub snap_time: u32,
    /// Mappings in increasing `origin_begin` order.
    pub mappings: Vec<Mapping>,
}

/// A run of mappings: `length` consecutive virtual blocks starting at
/// `origin_begin` map to consecutive data blocks starting at `data_begin`,
/// all written at `time`. A `<single_mapping>` has `length` 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mapping {
    /// First virtual block (in data-block units).
    pub origin_begin: u64,
    /// First data block.
    pub data_begin: u64,
    /// Number of blocks in the run (≥ 1).
    pub length: u64,
    /// Mapping time (24 bits on disk).
    pub time: u32,
}

/// Whole-pool metadata as `thin_dump` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata {
    /// The superblock element.
    pub superblock: Superblock,
    /// Devices, normally sorted by `dev_id`.
    pub devices: Vec<Device>,
}

impl Device {
    /// Expands the mappings into a map virtual block → data block.
    /// (If mappings overlap, the later one wins.)
    pub fn block_map(&self) -> BTreeMap<u64, u64> {
        let mut map = BTreeMap::new();
        for m in &self.mappings {
            for i in 0..m.length {
                map.insert(m.origin_begin + i, m.data_begin + i);
            }
        }
        map
    }

    /// Expands the mappings into a map virtual block → (data block, time).
    pub fn block_time_map(&self) -> BTreeMap<u64, (u64, u32)> {
        let mut map = BTreeMap::new();
        for m in &self.mappings {
            for i in 0..m.length {
                map.insert(m.origin_begin + i, (m.data_begin + i, m.time));
            }
        }
        map
    }

    /// Builds a device from a virtual → data block map with every mapping at
    /// `time`; `mapped_blocks` is set from the map, `transaction` is 0 and
    /// `creation_time`/`snap_time` are `time`.
    pub fn from_block_map(dev_id: u64, map: &BTreeMap<u64, u64>, time: u32) -> Device {
        let bt: BTreeMap<u64, (u64, u32)> = map.iter().map(|(&v, &d)| (v, (d, time))).collect();
        Device {
            dev_id,
            mapped_blocks: map.len() as u64,
            transaction: 0,
            creation_time: time,
            snap_time: time,
            mappings: runs_from_block_time_map(&bt),
        }
    }
}

impl Metadata {
    /// Returns the device with the given id, if present.
    pub fn device(&self, dev_id: u64) -> Option<&Device> {
        self.devices.iter().find(|d| d.dev_id == dev_id)
    }

    /// Highest mapped data block over all devices, if any block is mapped.
    pub fn max_data_block(&self) -> Option<u64> {
        self.devices
            .iter()
            .flat_map(|d| d.mappings.iter())
            .filter(|m| m.length > 0)
            .map(|m| m.data_begin + (m.length - 1))
            .max()
    }
}

/// Converts a virtual → (data block, time) map into canonical mappings, using
/// the same rule as `thin_dump`: a run continues while the virtual and data
/// block both advance by one and the time is unchanged.
pub fn runs_from_block_time_map(map: &BTreeMap<u64, (u64, u32)>) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for (&v, &(d, t)) in map {
        if let Some(last) = out.last_mut() {
            if last.time == t
                && last.origin_begin.checked_add(last.length) == Some(v)
                && last.data_begin.checked_add(last.length) == Some(d)
            {
                last.length += 1;
                continue;
            }
        }
        out.push(Mapping {
            origin_begin: v,
            data_begin: d,
            length: 1,
            time: t,
        });
    }
    out
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Failure to run one of the thin tools or to understand its output.
#[derive(Debug)]
pub enum ToolError {
    /// The named binary was not found (see [`tools_available`]).
    NotInstalled(String),
    /// The tool ran but exited unsuccessfully.
    Failed {
        /// The command line that was run.
        cmd: String,
        /// Its exit status.
        status: ExitStatus,
        /// Captured standard output.
        stdout: String,
        /// Captured standard error.
        stderr: String,
    },
    /// The tool's output could not be parsed.
    Parse(String),
    /// An I/O error (spawning, temp files, metadata file creation).
    Io(std::io::Error),
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ToolError::NotInstalled(t) => write!(
                f,
                "{t} not found (install thin-provisioning-tools, or set {TOOLS_DIR_ENV})"
            ),
            ToolError::Failed {
                cmd,
                status,
                stdout,
                stderr,
            } => write!(
                f,
                "`{cmd}` failed ({status})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            ),
            ToolError::Parse(m) => write!(f, "cannot parse thin tool output: {m}"),
            ToolError::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl std::error::Error for ToolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ToolError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for ToolError {
    fn from(e: std::io::Error) -> Self {
        ToolError::Io(e)
    }
}

// ---------------------------------------------------------------------------
// Running the tools
// ---------------------------------------------------------------------------

/// Environment variable naming a directory searched first for the tools.
pub const TOOLS_DIR_ENV: &str = "THINVOL_THIN_TOOLS_DIR";

/// The binaries this module drives.
pub const TOOL_NAMES: [&str; 6] = [
    "thin_check",
    "thin_dump",
    "thin_restore",
    "thin_delta",
    "thin_ls",
    "thin_metadata_size",
];

fn is_executable(p: &Path) -> bool {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode() & 0o111 != 0
            }
            #[cfg(not(unix))]
            {
                true
            }
        }
        _ => false,
    }
}

/// Locates a tool: `$THINVOL_THIN_TOOLS_DIR`, then `$PATH`, then the sbin
/// directories (which are often missing from a non-root `$PATH`).
pub fn tool_path(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os(TOOLS_DIR_ENV) {
        dirs.push(PathBuf::from(d));
    }
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    for d in ["/usr/sbin", "/sbin", "/usr/local/sbin"] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// True if all of [`TOOL_NAMES`] can be found.
pub fn tools_available() -> bool {
    TOOL_NAMES.iter().all(|t| tool_path(t).is_some())
}

/// Runs `thin_check -V` and returns the tools' version string (e.g.
/// `"0.9.0"` for Debian 12's C++ tools; 1.x are the Rust rewrite).
pub fn tools_version() -> Result<String, ToolError> {
    let (out, _) = run_ok("thin_check", &[os("-V")])?;
    Ok(out.trim().to_string())
}

fn command_line(tool: &str, args: &[OsString]) -> String {
    let mut s = tool.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `tool` with `args`, returning its raw output whatever the status.
fn run_raw(tool: &str, args: &[OsString]) -> Result<Output, ToolError> {
    let path = tool_path(tool).ok_or_else(|| ToolError::NotInstalled(tool.to_string()))?;
    let out = Command::new(path).args(args).env("LC_ALL", "C").output()?;
    Ok(out)
}

/// Runs `tool` and requires exit status 0; returns (stdout, stderr).
fn run_ok(tool: &str, args: &[OsString]) -> Result<(String, String), ToolError> {
    let out = run_raw(tool, args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(ToolError::Failed {
            cmd: command_line(tool, args),
            status: out.status,
            stdout,
            stderr,
        });
    }
    Ok((stdout, stderr))
}

fn os(s: &str) -> OsString {
    OsString::from(s)
}

// ---------------------------------------------------------------------------
// Tiny XML-ish reader
// ---------------------------------------------------------------------------

/// One tag of the XML stream.
#[derive(Debug)]
struct Tag {
    name: String,
    attrs: Vec<(String, String)>,
    /// `</name>`
    closing: bool,
    /// `<name .../>`
    self_closing: bool,
}

impl Tag {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn req(&self, key: &str) -> Result<&str, ToolError> {
        self.attr(key)
            .ok_or_else(|| ToolError::Parse(format!("<{}> lacks attribute `{key}`", self.name)))
    }

    fn u64(&self, key: &str) -> Result<u64, ToolError> {
        let v = self.req(key)?;
        v.trim().parse::<u64>().map_err(|_| {
            ToolError::Parse(format!(
                "<{}> attribute {key}=\"{v}\" is not a u64",
                self.name
            ))
        })
    }

    fn u32(&self, key: &str) -> Result<u32, ToolError> {
        let v = self.req(key)?;
        v.trim().parse::<u32>().map_err(|_| {
            ToolError::Parse(format!(
                "<{}> attribute {key}=\"{v}\" is not a u32",
                self.name
            ))
        })
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>, ToolError> {
        match self.attr(key) {
            None => Ok(None),
            Some(_) => self.u32(key).map(Some),
        }
    }
}

fn unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(j) = rest.find(';') else { break };
        let ent = &rest[1..j];
        let rep = match ent {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => {
                let num = if let Some(h) = ent.strip_prefix("#x").or_else(|| ent.strip_prefix("#X"))
                {
                    u32::from_str_radix(h, 16).ok()
                } else if let Some(d) = ent.strip_prefix('#') {
                    d.parse::<u32>().ok()
                } else {
                    None
                };
                num.and_then(char::from_u32)
            }
        };
        match rep {
            Some(c) => {
                out.push(c);
                rest = &rest[j + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Splits text into tags, skipping character data, comments, `<?...?>` and
/// `<!...>` declarations. Tolerant: quotes may be `"` or `'`, whitespace is
/// free, attribute values without quotes run to the next blank or `>`.
fn tokenize(text: &str) -> Result<Vec<Tag>, ToolError> {
    let b = text.as_bytes();
    let mut i = 0usize;
    let mut tags = Vec::new();
    let err = |msg: &str, at: usize| ToolError::Parse(format!("{msg} at byte {at}"));
    while i < b.len() {
        if b[i] != b'<' {
            i += 1;
            continue;
        }
        let start = i;
        if text[i..].starts_with("<!--") {
            let end = text[i..]
                .find("-->")
                .ok_or_else(|| err("unterminated comment", start))?;
            i += end + 3;
            continue;
        }
        if text[i..].starts_with("<?") || text[i..].starts_with("<!") {
            let end = text[i..]
                .find('>')
                .ok_or_else(|| err("unterminated declaration", start))?;
            i += end + 1;
            continue;
        }
        i += 1;
        let closing = i < b.len() && b[i] == b'/';
        if closing {
            i += 1;
        }
        let name_start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'>' && b[i] != b'/' {
            i += 1;
        }
        if i == name_start {
            return Err(err("empty tag name", start));
        }
        let name = text[name_start..i].to_string();
        let mut attrs = Vec::new();
        let mut self_closing = false;
        loop {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if i >= b.len() {
                return Err(err("unterminated tag", start));
            }
            if b[i] == b'>' {
                i += 1;
                break;
            }
            if b[i] == b'/' {
                self_closing = true;
                i += 1;
                continue;
            }
            let k_start = i;
            while i < b.len()
                && !b[i].is_ascii_whitespace()
                && b[i] != b'='
                && b[i] != b'>'
                && b[i] != b'/'
            {
                i += 1;
            }
            let key = text[k_start..i].to_string();
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < b.len() && b[i] == b'=' {
                i += 1;
                while i < b.len() && b[i].is_ascii_whitespace() {
                    i += 1;
                }
                if i >= b.len() {
                    return Err(err("unterminated attribute", start));
                }
                let value = if b[i] == b'"' || b[i] == b'\'' {
                    let q = b[i];
                    i += 1;
                    let v_start = i;
                    while i < b.len() && b[i] != q {
                        i += 1;
                    }
                    if i >= b.len() {
                        return Err(err("unterminated attribute value", start));
                    }
                    let v = &text[v_start..i];
                    i += 1;
                    v
                } else {
                    let v_start = i;
                    while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'>' {
                        i += 1;
                    }
                    &text[v_start..i]
                };
                attrs.push((key, unescape(value)));
            } else {
                attrs.push((key, String::new()));
            }
        }
        tags.push(Tag {
            name,
            attrs,
            closing,
            self_closing,
        });
    }
    Ok(tags)
}

/// Parses `thin_dump` XML text into a [`Metadata`].
///
/// Understands `<superblock>`, `<device>`, `<range_mapping>` and
/// `<single_mapping>`; any other element is a parse error (so nothing is
/// silently dropped).
pub fn parse_dump_xml(text: &str) -> Result<Metadata, ToolError> {
    let tags = tokenize(text)?;
    let mut sb: Option<Superblock> = None;
    let mut devices: Vec<Device> = Vec::new();
    let mut cur: Option<Device> = None;
    let mut closed_sb = false;
    for t in &tags {
        match (t.name.as_str(), t.closing) {
            ("superblock", false) => {
                if sb.is_some() {
                    return Err(ToolError::Parse("more than one <superblock>".into()));
                }
                sb = Some(Superblock {
                    uuid: t.attr("uuid").unwrap_or("").to_string(),
                    time: t.u32("time")?,
                    transaction: t.u64("transaction")?,
                    data_block_size: t.u32("data_block_size")?,
                    nr_data_blocks: t.u64("nr_data_blocks")?,
                    flags: t.opt_u32("flags")?,
                    version: t.opt_u32("version")?,
                });
                if t.self_closing {
                    closed_sb = true;
                }
            }
            ("superblock", true) => closed_sb = true,
            ("device", false) => {
                if sb.is_none() || closed_sb {
                    return Err(ToolError::Parse("<device> outside <superblock>".into()));
                }
                if cur.is_some() {
                    return Err(ToolError::Parse("nested <device>".into()));
                }
                let d = Device {
                    dev_id: t.u64("dev_id")?,
                    mapped_blocks: t.u64("mapped_blocks")?,
                    transaction: t.u64("transaction")?,
                    creation_time: t.u32("creation_time")?,
                    snap_time: t.u32("snap_time")?,
                    mappings: Vec::new(),
                };
                if t.self_closing {
                    devices.push(d);
                } else {
                    cur = Some(d);
                }
            }
            ("device", true) => match cur.take() {
                Some(d) => devices.push(d),
                None => return Err(ToolError::Parse("unbalanced </device>".into())),
            },
            ("range_mapping", false) | ("single_mapping", false) => {
                let d = cur
                    .as_mut()
                    .ok_or_else(|| ToolError::Parse(format!("<{}> outside <device>", t.name)))?;
                let m = if t.name == "range_mapping" {
                    Mapping {
                        origin_begin: t.u64("origin_begin")?,
                        data_begin: t.u64("data_begin")?,
                        length: t.u64("length")?,
                        time: t.u32("time")?,
                    }
                } else {
                    Mapping {
                        origin_begin: t.u64("origin_block")?,
                        data_begin: t.u64("data_block")?,
                        length: 1,
                        time: t.u32("time")?,
                    }
                };
                d.mappings.push(m);
            }
            ("range_mapping", true) | ("single_mapping", true) => {}
            (other, _) => {
                return Err(ToolError::Parse(format!(
                    "unexpected element <{other}> in thin_dump output"
                )))
            }
        }
    }
    if cur.is_some() {
        return Err(ToolError::Parse("unterminated <device>".into()));
    }
    let superblock = sb.ok_or_else(|| ToolError::Parse("no <superblock> element".into()))?;
    Ok(Metadata {
        superblock,
        devices,
    })
}

/// Renders a model as `thin_restore` input XML (the same layout `thin_dump`
/// prints). `flags`/`version` are written only when `Some`. Mappings of
/// length 1 become `<single_mapping>`, longer ones `<range_mapping>`;
/// zero-length mappings are skipped. Attribute values are XML-escaped.
pub fn to_xml(md: &Metadata) -> String {
    use std::fmt::Write as _;
    let sb = &md.superblock;
    let mut s = String::new();
    let _ = write!(
        s,
        "<superblock uuid=\"{}\" time=\"{}\" transaction=\"{}\"",
        escape(&sb.uuid),
        sb.time,
        sb.transaction
    );
    if let Some(f) = sb.flags {
        let _ = write!(s, " flags=\"{f}\"");
    }
    if let Some(v) = sb.version {
        let _ = write!(s, " version=\"{v}\"");
    }
    let _ = writeln!(
        s,
        " data_block_size=\"{}\" nr_data_blocks=\"{}\">",
        sb.data_block_size, sb.nr_data_blocks
    );
    for d in &md.devices {
        let _ = writeln!(
            s,
            "  <device dev_id=\"{}\" mapped_blocks=\"{}\" transaction=\"{}\" creation_time=\"{}\" snap_time=\"{}\">",
            d.dev_id, d.mapped_blocks, d.transaction, d.creation_time, d.snap_time
        );
        for m in &d.mappings {
            match m.length {
                0 => {}
                1 => {
                    let _ = writeln!(
                        s,
                        "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"{}\"/>",
                        m.origin_begin, m.data_begin, m.time
                    );
                }
                n => {
                    let _ = writeln!(
                        s,
                        "    <range_mapping origin_begin=\"{}\" data_begin=\"{}\" length=\"{}\" time=\"{}\"/>",
                        m.origin_begin, m.data_begin, n, m.time
                    );
                }
            }
        }
        s.push_str("  </device>\n");
    }
    s.push_str("</superblock>\n");
    s
}

// ---------------------------------------------------------------------------
// thin_dump / thin_restore
// ---------------------------------------------------------------------------

/// Runs `thin_dump [-m] META` and returns the raw XML text.
/// `metadata_snap` dumps the held metadata snapshot instead of the live one.
pub fn thin_dump_xml(meta: &Path, metadata_snap: bool) -> Result<String, ToolError> {
    let mut args = Vec::new();
    if metadata_snap {
        args.push(os("-m"));
    }
    args.push(meta.as_os_str().to_owned());
    run_ok("thin_dump", &args).map(|(out, _)| out)
}

/// Runs `thin_dump [-m] META` and parses the XML into a [`Metadata`].
pub fn thin_dump(meta: &Path, metadata_snap: bool) -> Result<Metadata, ToolError> {
    parse_dump_xml(&thin_dump_xml(meta, metadata_snap)?)
}

fn is_block_device(p: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata(p)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false)
    }
    #[cfg(not(unix))]
    {
        let _ = p;
        false
    }
}

/// Writes `xml` to a temporary file, (re)creates `out_meta` as a zero-filled
/// file of `meta_size_bytes` bytes (a block device is used as it is), and
/// runs `thin_restore -i XML -o OUT`.
pub fn thin_restore_xml(xml: &str, out_meta: &Path, meta_size_bytes: u64) -> Result<(), ToolError> {
    let mut tmp = tempfile::Builder::new()
        .prefix("thinvol-restore-")
        .suffix(".xml")
        .tempfile()?;
    tmp.write_all(xml.as_bytes())?;
    tmp.flush()?;
    if !is_block_device(out_meta) {
        let f = File::create(out_meta)?; // truncates any previous content
        f.set_len(meta_size_bytes)?;
        f.sync_all()?;
    }
    let args = vec![
        os("-i"),
        tmp.path().as_os_str().to_owned(),
        os("-o"),
        out_meta.as_os_str().to_owned(),
    ];
    run_ok("thin_restore", &args).map(|_| ())
}

/// Restores `xml_model` into `out_meta` (created/truncated to
/// `meta_size_bytes`, which must be large enough for the metadata) with the
/// real `thin_restore`. Remember: `superblock.nr_data_blocks` must exceed
/// every mapped data block, or the tool fails (see the module docs).
pub fn thin_restore(
    xml_model: &Metadata,
    out_meta: &Path,
    meta_size_bytes: u64,
) -> Result<(), ToolError> {
    thin_restore_xml(&to_xml(xml_model), out_meta, meta_size_bytes)
}

/// A generous metadata-file size for restoring `md`: several times the
/// number of btree nodes, bitmaps and index blocks it can need, rounded up
/// to whole MiB, at least 1 MiB.
pub fn suggested_meta_size_bytes(md: &Metadata) -> u64 {
    let mappings: u64 = md
        .devices
        .iter()
        .flat_map(|d| d.mappings.iter())
        .map(|m| m.length)
        .sum();
    let devs = md.devices.len() as u64;
    // 126 is a half-full mapping leaf (252 max), internals are cheap.
    let leaves = mappings / 126 + devs + 1;
    let data_bitmaps = md.superblock.nr_data_blocks / 16_320 + 1;
    let blocks = 16 + 2 * leaves + devs / 60 + 2 * data_bitmaps;
    let bytes = blocks * 4 * 4096;
    let mib = 1u64 << 20;
    bytes.div_ceil(mib).max(1) * mib
}

// ---------------------------------------------------------------------------
// thin_check
// ---------------------------------------------------------------------------

/// Result of one `thin_check` run (a non-zero exit is *not* an `Err`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutput {
    /// True if the tool exited with status 0.
    pub success: bool,
    /// Exit code, if the tool exited normally.
    pub code: Option<i32>,
    /// The command line that was run.
    pub cmd: String,
    /// Captured standard output.
    pub stdout: String,
    /// Captured standard error.
    pub stderr: String,
}

/// stderr lines `thin_check` prints while everything is fine (progress
/// headers, never indented).
const CHECK_PROGRESS_LINES: [&str; 5] = [
    "examining superblock",
    "examining devices tree",
    "examining mapping tree",
    "examining top level of mapping tree",
    "checking space map counts",
];

/// stdout keys `thin_check` prints on success (`KEY=<decimal>`).
const CHECK_INFO_KEYS: [&str; 2] = ["TRANSACTION_ID", "METADATA_FREE_BLOCKS"];

fn is_info_line(line: &str) -> bool {
    match line.split_once('=') {
        Some((k, v)) => {
            CHECK_INFO_KEYS.contains(&k) && !v.is_empty() && v.bytes().all(|c| c.is_ascii_digit())
        }
        None => false,
    }
}

impl CheckOutput {
    /// Every reason this run is not clean: a non-zero status, and every
    /// output line that is not one of the known benign lines (stdout
    /// `TRANSACTION_ID=<n>` / `METADATA_FREE_BLOCKS=<n>`; stderr progress
    /// headers such as `examining superblock`, unindented). Anything else —
    /// indented problem reports, leak messages, warnings — is listed.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.success {
            match self.code {
                Some(c) => p.push(format!("exit status {c}")),
                None => p.push("terminated by a signal".to_string()),
            }
        }
        for line in self.stdout.lines() {
            let l = line.trim_end();
            if !l.is_empty() && !is_info_line(l) {
                p.push(format!("stdout: {line}"));
            }
        }
        for line in self.stderr.lines() {
            let l = line.trim_end();
            if !l.is_empty() && !CHECK_PROGRESS_LINES.contains(&l) {
                p.push(format!("stderr: {line}"));
            }
        }
        p
    }

    /// True if [`CheckOutput::problems`] is empty.
    pub fn is_clean(&self) -> bool {
        self.problems().is_empty()
    }

    /// Panics, showing the full output, unless the check succeeded and
    /// printed nothing but the benign lines (no errors, no warnings, no
    /// non-fatal complaints such as leaks).
    ///
    /// With thin_check 0.9.0 this does not cover data space-map reference
    /// counts, which that version never verifies (see the module docs).
    #[track_caller]
    pub fn assert_clean(&self) {
        let p = self.problems();
        if !p.is_empty() {
            panic!(
                "thin_check is not clean: `{}`\nproblems:\n  {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.cmd,
                p.join("\n  "),
                self.stdout,
                self.stderr
            );
        }
    }

    /// Panics, showing the full output, if the check succeeded.
    #[track_caller]
    pub fn assert_failed(&self) {
        if self.success {
            panic!(
                "thin_check unexpectedly succeeded: `{}`\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.cmd, self.stdout, self.stderr
            );
        }
    }
}

/// Runs `thin_check ARGS... META` and captures the outcome.
pub fn thin_check_with_args(meta: &Path, args: &[&str]) -> Result<CheckOutput, ToolError> {
    let mut a: Vec<OsString> = args.iter().map(|s| os(s)).collect();
    a.push(meta.as_os_str().to_owned());
    let out = run_raw("thin_check", &a)?;
    Ok(CheckOutput {
        success: out.status.success(),
        code: out.status.code(),
        cmd: command_line("thin_check", &a),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs a full `thin_check META` (no options) and captures the outcome.
pub fn thin_check(meta: &Path) -> Result<CheckOutput, ToolError> {
    thin_check_with_args(meta, &[])
}

// ---------------------------------------------------------------------------
// thin_delta
// ---------------------------------------------------------------------------

/// Kind of a `thin_delta` element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeltaKind {
    /// `<same>`: both devices map the block to the same data block.
    Same,
    /// `<different>`: both map it, to different data blocks.
    Different,
    /// `<left_only>`: only the first (`--snap1`) device maps it.
    LeftOnly,
    /// `<right_only>`: only the second (`--snap2`) device maps it.
    RightOnly,
}

impl DeltaKind {
    fn from_tag(name: &str) -> Option<DeltaKind> {
        match name {
            "same" => Some(DeltaKind::Same),
            "different" => Some(DeltaKind::Different),
            "left_only" => Some(DeltaKind::LeftOnly),
            "right_only" => Some(DeltaKind::RightOnly),
            _ => None,
        }
    }
}

/// One element of `thin_delta` output: `length` virtual blocks from `begin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeltaRun {
    /// What the two devices have in this range.
    pub kind: DeltaKind,
    /// First virtual block.
    pub begin: u64,
    /// Number of blocks.
    pub length: u64,
}

/// Parses non-verbose `thin_delta` XML (`<same begin=.. length=../>` etc.).
pub fn parse_delta_xml(text: &str) -> Result<Vec<DeltaRun>, ToolError> {
    let mut runs = Vec::new();
    let mut saw_diff = false;
    for t in tokenize(text)? {
        if t.closing {
            continue;
        }
        match t.name.as_str() {
            "superblock" => {}
            "diff" => saw_diff = true,
            name => match DeltaKind::from_tag(name) {
                Some(kind) => {
                    if t.attr("begin").is_none() && !t.self_closing {
                        return Err(ToolError::Parse(
                            "verbose thin_delta output is not supported".into(),
                        ));
                    }
                    runs.push(DeltaRun {
                        kind,
                        begin: t.u64("begin")?,
                        length: t.u64("length")?,
                    });
                }
                None => {
                    return Err(ToolError::Parse(format!(
                        "unexpected element <{name}> in thin_delta output"
                    )))
                }
            },
        }
    }
    if !saw_diff {
        return Err(ToolError::Parse(
            "no <diff> element in thin_delta output".into(),
        ));
    }
    Ok(runs)
}

/// Runs `thin_delta [-m] --snap1 A --snap2 B META` and parses its runs.
pub fn thin_delta(
    meta: &Path,
    snap1: u64,
    snap2: u64,
    metadata_snap: bool,
) -> Result<Vec<DeltaRun>, ToolError> {
    let mut args = Vec::new();
    if metadata_snap {
        args.push(os("-m"));
    }
    args.extend([
        os("--snap1"),
        os(&snap1.to_string()),
        os("--snap2"),
        os(&snap2.to_string()),
    ]);
    args.push(meta.as_os_str().to_owned());
    let (out, _) = run_ok("thin_delta", &args)?;
    parse_delta_xml(&out)
}

/// Computes exactly what `thin_delta` 0.9.0 prints for devices with these
/// virtual → data block maps (`left` = `--snap1`, `right` = `--snap2`).
///
/// Rules (from the tool's merge + `simple_emitter`, verified empirically):
/// every virtual block mapped on at least one side gets a kind — `Same`
/// (equal data blocks), `Different`, `LeftOnly`, `RightOnly`; times are not
/// considered. Consecutive virtual blocks of the same kind are coalesced into
/// one run regardless of their data blocks; a change of kind or a virtual
/// block mapped on neither side ends the run. Runs come out in increasing
/// `begin` order and never have length 0.
pub fn delta_from_maps(left: &BTreeMap<u64, u64>, right: &BTreeMap<u64, u64>) -> Vec<DeltaRun> {
    let mut runs: Vec<DeltaRun> = Vec::new();
    let mut push = |kind: DeltaKind, v: u64| {
        if let Some(last) = runs.last_mut() {
            if last.kind == kind && last.begin.checked_add(last.length) == Some(v) {
                last.length += 1;
                return;
            }
        }
        runs.push(DeltaRun {
            kind,
            begin: v,
            length: 1,
        });
    };
    let mut l = left.iter().peekable();
    let mut r = right.iter().peekable();
    loop {
        match (l.peek().copied(), r.peek().copied()) {
            (None, None) => break,
            (Some((&lv, _)), None) => {
                push(DeltaKind::LeftOnly, lv);
                l.next();
            }
            (None, Some((&rv, _))) => {
                push(DeltaKind::RightOnly, rv);
                r.next();
            }
            (Some((&lv, &ld)), Some((&rv, &rd))) => {
                if lv < rv {
                    push(DeltaKind::LeftOnly, lv);
                    l.next();
                } else if rv < lv {
                    push(DeltaKind::RightOnly, rv);
                    r.next();
                } else {
                    let kind = if ld == rd {
                        DeltaKind::Same
                    } else {
                        DeltaKind::Different
                    };
                    push(kind, lv);
                    l.next();
                    r.next();
                }
            }
        }
    }
    runs
}

// ---------------------------------------------------------------------------
// thin_ls
// ---------------------------------------------------------------------------

/// One row of `thin_ls -o DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ThinLsRow {
    /// `DEV`: thin device id.
    pub dev: u64,
    /// `MAPPED_BLOCKS`: `mapped_blocks` from the details tree.
    pub mapped_blocks: u64,
    /// `EXCLUSIVE_BLOCKS`: mappings whose data block no other mapping uses.
    pub exclusive_blocks: u64,
    /// `SHARED_BLOCKS`: `MAPPED_BLOCKS - EXCLUSIVE_BLOCKS`.
    pub shared_blocks: u64,
}

/// Parses `thin_ls --no-headers -o DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS` output.
pub fn parse_thin_ls(text: &str) -> Result<Vec<ThinLsRow>, ToolError> {
    let mut rows = Vec::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split_whitespace().collect();
        if cells.is_empty() {
            continue;
        }
        if cells.len() != 4 {
            return Err(ToolError::Parse(format!(
                "thin_ls row has {} cells: {line:?}",
                cells.len()
            )));
        }
        let mut n = [0u64; 4];
        for (slot, cell) in n.iter_mut().zip(&cells) {
            *slot = cell
                .parse()
                .map_err(|_| ToolError::Parse(format!("thin_ls cell {cell:?} is not a number")))?;
        }
        rows.push(ThinLsRow {
            dev: n[0],
            mapped_blocks: n[1],
            exclusive_blocks: n[2],
            shared_blocks: n[3],
        });
    }
    Ok(rows)
}

/// Runs `thin_ls --no-headers -o DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS [-m] META`.
pub fn thin_ls(meta: &Path, metadata_snap: bool) -> Result<Vec<ThinLsRow>, ToolError> {
    let mut args = vec![
        os("--no-headers"),
        os("-o"),
        os("DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS"),
    ];
    if metadata_snap {
        args.push(os("-m"));
    }
    args.push(meta.as_os_str().to_owned());
    let (out, _) = run_ok("thin_ls", &args)?;
    parse_thin_ls(&out)
}

/// Computes what `thin_ls` reports for a model: rows sorted by device id;
/// `mapped_blocks` is the number of mapped virtual blocks; a mapping is
/// exclusive when its data block occurs in exactly one mapping over all
/// devices.
pub fn expected_thin_ls(md: &Metadata) -> Vec<ThinLsRow> {
    let mut uses: BTreeMap<u64, u64> = BTreeMap::new();
    let maps: Vec<(u64, BTreeMap<u64, u64>)> = md
        .devices
        .iter()
        .map(|d| (d.dev_id, d.block_map()))
        .collect();
    for (_, m) in &maps {
        for &d in m.values() {
            *uses.entry(d).or_insert(0) += 1;
        }
    }
    let mut rows: Vec<ThinLsRow> = maps
        .iter()
        .map(|(id, m)| {
            let mapped = m.len() as u64;
            let excl = m.values().filter(|d| uses.get(d) == Some(&1)).count() as u64;
            ThinLsRow {
                dev: *id,
                mapped_blocks: mapped,
                exclusive_blocks: excl,
                shared_blocks: mapped - excl,
            }
        })
        .collect();
    rows.sort_by_key(|r| r.dev);
    rows
}

// ---------------------------------------------------------------------------
// thin_metadata_size
// ---------------------------------------------------------------------------

/// Runs `thin_metadata_size -b <B>b -s <S>b -m <M> -u b -n` and returns the
/// estimated metadata size in bytes.
pub fn thin_metadata_size_bytes(
    block_size_bytes: u64,
    pool_size_bytes: u64,
    max_thins: u64,
) -> Result<u64, ToolError> {
    let args = vec![
        os("-b"),
        os(&format!("{block_size_bytes}b")),
        os("-s"),
        os(&format!("{pool_size_bytes}b")),
        os("-m"),
        os(&max_thins.to_string()),
        os("-u"),
        os("b"),
        os("-n"),
    ];
    let (out, _) = run_ok("thin_metadata_size", &args)?;
    let t = out.trim();
    t.parse::<u64>()
        .map_err(|_| ToolError::Parse(format!("thin_metadata_size printed {t:?}")))
}

// ---------------------------------------------------------------------------
// Random models
// ---------------------------------------------------------------------------

/// Small deterministic PRNG (SplitMix64); no external dependency.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// Creates a generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            // Multiply-shift range reduction; bias is irrelevant for tests.
            ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
        }
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// virtual block → (data block, time)
type BlockTimeMap = BTreeMap<u64, (u64, u32)>;

/// Pool simulation used by [`random_metadata`].
struct PoolSim {
    rng: SplitMix64,
    nr_data_blocks: u64,
    max_blocks: u64,
    /// data block → number of device mappings referencing it
    refs: BTreeMap<u64, u32>,
    cursor: u64,
    time: u32,
    transaction: u64,
    /// (details, virtual → (data, time))
    devs: Vec<(Device, BlockTimeMap)>,
}

impl PoolSim {
    /// Allocates a free data block: usually the next free one after the last
    /// allocation (giving contiguous runs), sometimes from a random spot.
    fn alloc(&mut self) -> Option<u64> {
        if self.refs.len() as u64 >= self.nr_data_blocks {
            return None;
        }
        if self.rng.chance(15) {
            self.cursor = self.rng.below(self.nr_data_blocks);
        }
        let mut b = self.cursor % self.nr_data_blocks;
        while self.refs.contains_key(&b) {
            b = (b + 1) % self.nr_data_blocks;
        }
        self.refs.insert(b, 1);
        self.cursor = b + 1;
        Some(b)
    }

    fn release(&mut self, b: u64) {
        if let Some(c) = self.refs.get_mut(&b) {
            *c -= 1;
            if *c == 0 {
                self.refs.remove(&b);
            }
        }
    }

    /// Writes `len` blocks from `start` into device `i`: each block gets a
    /// fresh data block (breaking any sharing), stamped with the pool time.
    fn write(&mut self, i: usize, start: u64, len: u64) {
        for v in start..start.saturating_add(len).min(self.max_blocks) {
            let Some(nb) = self.alloc() else { return };
            let t = self.time;
            if let Some((old, _)) = self.devs[i].1.insert(v, (nb, t)) {
                self.release(old);
            }
        }
    }

    /// Unmaps (discards) `len` blocks from `start` in device `i`.
    fn discard(&mut self, i: usize, start: u64, len: u64) {
        for v in start..start.saturating_add(len).min(self.max_blocks) {
            if let Some((old, _)) = self.devs[i].1.remove(&v) {
                self.release(old);
            }
        }
    }

    fn random_extent(&mut self) -> (u64, u64) {
        let start = self.rng.below(self.max_blocks);
        let room = self.max_blocks - start;
        let len = 1 + self.rng.below(room.min(64));
        (start, len)
    }

    fn random_io(&mut self, i: usize, ops: u64) {
        for _ in 0..ops {
            let (s, l) = self.random_extent();
            if self.rng.chance(75) {
                self.write(i, s, l);
            } else {
                self.discard(i, s, l);
            }
        }
    }
}

/// Generates a valid, deterministic random pool model.
///
/// Simulates a pool: `nr_devices` thin devices (ids increasing with random
/// gaps) are either created empty and written, or created as snapshots of an
/// earlier device (sharing all its data blocks, bumping the pool time and the
/// origin's `snap_time` as the kernel does); afterwards random writes
/// (allocating fresh data blocks, i.e. breaking sharing) and discards hit
/// random devices. Virtual blocks are `< max_blocks`, data blocks are
/// `< nr_data_blocks` (writes stop when the pool is full), `mapped_blocks`
/// equals the mapping count, mappings are canonical maximal runs (as
/// `thin_dump` prints them), `flags` is `Some(0)` and `version` `Some(2)`.
/// The result restores with `thin_restore` and passes `thin_check`.
pub fn random_metadata(
    seed: u64,
    nr_devices: usize,
    max_blocks: u64,
    nr_data_blocks: u64,
) -> Metadata {
    let mut sim = PoolSim {
        rng: SplitMix64::new(seed ^ 0x7468_696E_766F_6C00),
        nr_data_blocks,
        max_blocks,
        refs: BTreeMap::new(),
        cursor: 0,
        time: 0,
        transaction: 0,
        devs: Vec::new(),
    };
    sim.cursor = sim.rng.below(nr_data_blocks.max(1));
    let mut next_id = sim.rng.below(3);
    for _ in 0..nr_devices {
        let dev_id = next_id;
        next_id += 1 + if sim.rng.chance(30) {
            sim.rng.below(5)
        } else {
            0
        };
        sim.transaction += sim.rng.below(3);
        let snapshot_of = if sim.devs.is_empty() || sim.rng.chance(35) {
            None
        } else {
            Some(sim.rng.below(sim.devs.len() as u64) as usize)
        };
        match snapshot_of {
            None => {
                let dev = Device {
                    dev_id,
                    mapped_blocks: 0,
                    transaction: sim.transaction,
                    creation_time: sim.time,
                    snap_time: sim.time,
                    mappings: Vec::new(),
                };
                sim.devs.push((dev, BTreeMap::new()));
                let i = sim.devs.len() - 1;
                let ops = 1 + sim.rng.below(4 + (max_blocks / 32).min(256));
                sim.random_io(i, ops);
            }
            Some(o) => {
                sim.time += 1;
                let map = sim.devs[o].1.clone();
                for (d, _) in map.values() {
                    if let Some(c) = sim.refs.get_mut(d) {
                        *c += 1;
                    }
                }
                sim.devs[o].0.snap_time = sim.time;
                let dev = Device {
                    dev_id,
                    mapped_blocks: 0,
                    transaction: sim.transaction,
                    creation_time: sim.time,
                    snap_time: sim.time,
                    mappings: Vec::new(),
                };
                sim.devs.push((dev, map));
                let i = sim.devs.len() - 1;
                let ops = sim.rng.below(3 + (max_blocks / 128).min(64));
                sim.random_io(i, ops);
                let ops = sim.rng.below(2 + (max_blocks / 256).min(32));
                sim.random_io(o, ops);
            }
        }
    }
    // Some late I/O to random devices.
    if !sim.devs.is_empty() {
        let extra = sim.rng.below(2 * sim.devs.len() as u64 + 1);
        for _ in 0..extra {
            let i = sim.rng.below(sim.devs.len() as u64) as usize;
            sim.random_io(i, 1);
        }
    }
    sim.transaction += 1;
    let devices = sim
        .devs
        .into_iter()
        .map(|(mut d, map)| {
            d.mapped_blocks = map.len() as u64;
            d.mappings = runs_from_block_time_map(&map);
            d
        })
        .collect();
    Metadata {
        superblock: Superblock {
            uuid: String::new(),
            time: sim.time,
            transaction: sim.transaction,
            data_block_size: 128,
            nr_data_blocks,
            flags: Some(0),
            version: Some(2),
        },
        devices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_roundtrip_through_parser() {
        for seed in 0..20 {
            let md = random_metadata(seed, 1 + (seed as usize % 6), 300, 2000);
            let back = parse_dump_xml(&to_xml(&md)).unwrap();
            assert_eq!(back, md);
        }
    }

    #[test]
    fn tolerant_parser() {
        let xml = "<?xml version='1.0'?>\n<!-- hi -->\n<superblock uuid='a&amp;b' time = \"1\" transaction=\"2\" \
                   data_block_size=\"128\" nr_data_blocks=\"10\"><device dev_id=\"3\" mapped_blocks=\"0\" \
                   transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/></superblock>";
        let md = parse_dump_xml(xml).unwrap();
        assert_eq!(md.superblock.uuid, "a&b");
        assert_eq!(md.superblock.flags, None);
        assert_eq!(md.devices.len(), 1);
        assert!(parse_dump_xml("<superblock time=\"x\"/>").is_err());
        assert!(parse_dump_xml("<superblock uuid=\"\" time=\"0\" transaction=\"0\" data_block_size=\"128\" nr_data_blocks=\"1\"><def name=\"x\"/></superblock>").is_err());
    }

    #[test]
    fn random_model_is_consistent() {
        for seed in 0..50 {
            let md = random_metadata(seed, 5, 500, 700);
            let mut all = BTreeMap::new();
            for d in &md.devices {
                let m = d.block_map();
                assert_eq!(m.len() as u64, d.mapped_blocks);
                assert!(m.keys().all(|&v| v < 500));
                for &b in m.values() {
                    assert!(b < 700);
                    *all.entry(b).or_insert(0u32) += 1;
                }
                // no data block mapped twice inside one device
                let mut seen = std::collections::BTreeSet::new();
                assert!(m.values().all(|b| seen.insert(*b)));
                assert_eq!(d.mappings, runs_from_block_time_map(&d.block_time_map()));
            }
            assert!(md.devices.windows(2).all(|w| w[0].dev_id < w[1].dev_id));
        }
    }

    #[test]
    fn delta_rules() {
        let l: BTreeMap<u64, u64> = [(0, 0), (1, 1), (2, 7), (4, 4), (6, 9)].into();
        let r: BTreeMap<u64, u64> = [(0, 0), (1, 1), (2, 8), (3, 3), (5, 5), (6, 9)].into();
        let d = delta_from_maps(&l, &r);
        let k = |kind, begin, length| DeltaRun {
            kind,
            begin,
            length,
        };
        use DeltaKind::*;
        assert_eq!(
            d,
            vec![
                k(Same, 0, 2),
                k(Different, 2, 1),
                k(RightOnly, 3, 1),
                k(LeftOnly, 4, 1),
                k(RightOnly, 5, 1),
                k(Same, 6, 1)
            ]
        );
    }

    #[test]
    fn parse_delta_and_ls() {
        let x = "<superblock uuid=\"\" time=\"1\" transaction=\"5\" data_block_size=\"128\" nr_data_blocks=\"1000\">\n  <diff left=\"1\" right=\"2\">\n    <same begin=\"0\" length=\"2\"/>\n    <left_only begin=\"5\" length=\"1\"/>\n  </diff>\n</superblock>\n";
        let d = parse_delta_xml(x).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].kind, DeltaKind::LeftOnly);
        let rows = parse_thin_ls("1 5 3 2 \n  2 4 2 2 \n").unwrap();
        assert_eq!(rows[1].dev, 2);
        assert_eq!(rows[0].exclusive_blocks, 3);
        assert!(parse_thin_ls("1 2 3\n").is_err());
    }

    #[test]
    fn check_output_classification() {
        let ok = CheckOutput {
            success: true,
            code: Some(0),
            cmd: "thin_check x".into(),
            stdout: "TRANSACTION_ID=5\nMETADATA_FREE_BLOCKS=255\n".into(),
            stderr: "examining superblock\nexamining devices tree\nexamining mapping tree\nchecking space map counts\n".into(),
        };
        assert!(ok.is_clean());
        let mut leak = ok.clone();
        leak.stderr
            .push_str("  metadata reference counts differ for block 200, expected 0, but got 1\n");
        assert_eq!(leak.problems().len(), 1);
        let mut failed = ok.clone();
        failed.success = false;
        failed.code = Some(1);
        assert!(!failed.is_clean());
    }
}
