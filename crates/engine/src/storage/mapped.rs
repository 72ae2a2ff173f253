//! Small reads through a shared, read-only mapping of a regular file.
//!
//! A 4 KiB `pread` from the page cache costs a system call on top of the copy
//! (~1.3 µs against ~0.55 µs for the copy alone on the benchmark machine); a read
//! from a mapping of the same file costs the copy. [`ReadMap`] maps the whole file
//! once, with room to grow, and copies small reads out of it. The page cache is the
//! same one `pread`/`pwrite`/`fallocate` use, so a mapped read sees exactly what a
//! `pread` at the same instant would: every write that completed before it, zeros in
//! a punched hole (punching unmaps the pages from every mapping).
//!
//! The hazard of a mapping is that a failed page — a disk error, or a range past the
//! end of a file someone truncated — is reported as `SIGBUS`, which kills the process
//! by default. Here it is not fatal: the copy is a single `rep movsb` whose address is
//! known, and a `SIGBUS` handler that finds the faulting instruction there moves the
//! program counter past it (the Linux kernel's exception-table technique for
//! `copy_from_user`). The copy then returns the count of bytes it did not copy, and
//! the caller repeats the read with `pread`, which reports the real error (`EIO`,
//! `UnexpectedEof`) exactly as before. A `SIGBUS` anywhere else goes to the handler
//! that was installed before ours (Rust's runtime installs one for stack overflows),
//! or kills the process as it would have without us. docs/design.md §4.1.
//!
//! Only on x86-64 Linux; elsewhere [`ReadMap::new`] returns `None` and every read
//! uses `pread`. Sequential streams use `pread` too ([`continues_stream`]).

use std::fs::File;

/// Reads up to this many bytes use the mapping; larger ones use `pread`, whose
/// fixed cost is small next to the copy and which keeps the kernel's readahead.
pub(super) const MAPPED_READ_MAX: usize = 32 << 10;

/// The least address space reserved for a mapping, so a file can grow under it.
const MIN_RESERVE: u64 = 1 << 30;

/// A read-only `MAP_SHARED` mapping of a file, `reserved` bytes long. Bytes past the
/// file's current end are never copied from it by a caller that checks bounds first
/// (and would fault harmlessly if the file was truncated behind our back).
pub(super) struct ReadMap {
    base: *const u8,
    reserved: u64,
}

// SAFETY: the mapping is read-only and lives until `drop`; copying from it through
// `&self` from many threads is like `pread` from many threads.
unsafe impl Send for ReadMap {}
unsafe impl Sync for ReadMap {}

impl ReadMap {
    /// Maps `file` (whose length is now `len`) with room for it to double, or `None`
    /// when this platform or the address space does not allow it.
    pub(super) fn new(file: &File, len: u64) -> Option<Self> {
        imp::new(file, len)
    }

    /// Copies `[offset, offset + buf.len())` into `buf`, a range the caller has checked
    /// against the file's length. Returns `false`, and the caller must `pread` instead,
    /// when the range is past the mapping, when it continues a sequential stream on
    /// this thread (`pread` has readahead, the mapping does not), or when a page could
    /// not be read (a fault was caught; `buf` holds junk).
    #[inline]
    pub(super) fn read(&self, buf: &mut [u8], offset: u64) -> bool {
        let Some(end) = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.reserved)
        else {
            return false;
        };
        if continues_stream(self.base as usize, offset, end) {
            return false;
        }
        // SAFETY: `offset + len <= reserved`, so the source lies inside our mapping;
        // `imp::copy` survives faults on it.
        unsafe { imp::copy(buf, self.base.add(offset as usize)) }
    }
}

impl Drop for ReadMap {
    fn drop(&mut self) {
        imp::unmap(self.base, self.reserved);
    }
}

/// A read starting within this many bytes after the end of the previous small read of
/// the same mapping on the same thread continues a sequential stream. A window rather
/// than exact adjacency: a stream split over several worker threads (NBD) skips the
/// pieces the other workers read.
const STREAM_WINDOW: u64 = 256 << 10;

thread_local! {
    /// (mapping base, end offset) of this thread's previous mapped-eligible read.
    static LAST_READ: std::cell::Cell<(usize, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Records `[offset, end)` as this thread's latest read of mapping `key` and says
/// whether it continues the previous one (sequential): such reads go to `pread`, because
/// the mapping is `MADV_RANDOM` — a page fault reads just the missing page, as a random
/// `pread` does, where the kernel's default mmap readaround read up to the whole file
/// for a few thousand random 4 KiB reads of a cold file (measured; docs/design.md §4.1)
/// — and only `pread` keeps readahead for a sequential stream.
#[inline]
fn continues_stream(key: usize, offset: u64, end: u64) -> bool {
    LAST_READ.with(|last| {
        let (k, prev_end) = last.replace((key, end));
        k == key && offset >= prev_end && offset - prev_end < STREAM_WINDOW
    })
}

fn reserve_for(len: u64) -> u64 {
    let page = 4096u64;
    len.saturating_mul(2)
        .max(MIN_RESERVE)
        .checked_next_multiple_of(page)
        .unwrap_or(u64::MAX - page + 1)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use super::{reserve_for, ReadMap};
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::sync::OnceLock;

    // The fault-tolerant copy. `rep movsb` is restartable: on a fault, rdi/rsi/rcx
    // describe how far it got. The SIGBUS handler resumes a fault at
    // `thinvol_mapcopy_fault` at `thinvol_mapcopy_resume`, so the function returns
    // the bytes left (non-zero) instead of dying. The System V ABI guarantees the
    // direction flag is clear on entry.
    std::arch::global_asm!(
        ".pushsection .text.thinvol_mapcopy,\"ax\",@progbits",
        ".globl thinvol_mapcopy",
        ".hidden thinvol_mapcopy",
        ".type thinvol_mapcopy,@function",
        "thinvol_mapcopy:",
        "    mov rcx, rdx",
        ".globl thinvol_mapcopy_fault",
        ".hidden thinvol_mapcopy_fault",
        "thinvol_mapcopy_fault:",
        "    rep movsb",
        ".globl thinvol_mapcopy_resume",
        ".hidden thinvol_mapcopy_resume",
        "thinvol_mapcopy_resume:",
        "    mov rax, rcx",
        "    ret",
        ".size thinvol_mapcopy, .-thinvol_mapcopy",
        ".popsection",
    );

    extern "C" {
        /// Copies `len` bytes from `src` to `dst`; returns the count not copied
        /// (0 unless a fault on `src` was caught).
        fn thinvol_mapcopy(dst: *mut u8, src: *const u8, len: usize) -> usize;
        static thinvol_mapcopy_fault: u8;
        static thinvol_mapcopy_resume: u8;
    }

    /// The SIGBUS disposition found when ours was installed (chained to).
    static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
    /// Whether our handler is installed (set once; `false` if sigaction failed).
    static INSTALLED: OnceLock<bool> = OnceLock::new();

    pub(super) fn new(file: &File, len: u64) -> Option<ReadMap> {
        if !*INSTALLED.get_or_init(install_handler) {
            return None;
        }
        let reserved = reserve_for(len);
        let size = usize::try_from(reserved).ok()?;
        // SAFETY: a fresh read-only shared mapping of our own descriptor; the kernel
        // picks the address. Pages past the end of the file fault (SIGBUS, caught by
        // `copy`) until the file grows over them.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // No readaround on a fault: a cold page is read alone, as by a random `pread`
        // (sequential streams use `pread`: `continues_stream`). Advisory; on failure the
        // default readaround stays.
        // SAFETY: advice on the range just mapped.
        unsafe { libc::madvise(p, size, libc::MADV_RANDOM) };
        Some(ReadMap {
            base: p as *const u8,
            reserved,
        })
    }

    pub(super) fn unmap(base: *const u8, reserved: u64) {
        // SAFETY: exactly the range `new` mapped; no reference into it outlives the
        // `ReadMap` (copies go into the caller's buffers).
        unsafe { libc::munmap(base as *mut libc::c_void, reserved as usize) };
    }

    /// # Safety
    /// `src .. src + buf.len()` lies inside a live mapping made by `new`.
    #[inline]
    pub(super) unsafe fn copy(buf: &mut [u8], src: *const u8) -> bool {
        thinvol_mapcopy(buf.as_mut_ptr(), src, buf.len()) == 0
    }

    fn install_handler() -> bool {
        // SAFETY: sigaction with a zeroed struct whose handler is an
        // `extern "C" fn(c_int, *mut siginfo_t, *mut c_void)` and SA_SIGINFO set;
        // the previous disposition is saved before ours can run (PREVIOUS is read
        // only by the handler, for signals that are not ours).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return false;
            }
            let _ = PREVIOUS.set(old);
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) == 0
        }
    }

    /// Async-signal-safe: reads the interrupted context, and either resumes our copy
    /// past its faulting instruction or hands the signal on.
    extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        let rip = libc::REG_RIP as usize;
        // SAFETY: with SA_SIGINFO the kernel passes a valid ucontext_t.
        unsafe {
            let uc = ctx as *mut libc::ucontext_t;
            let pc = (*uc).uc_mcontext.gregs[rip] as usize;
            if pc == &raw const thinvol_mapcopy_fault as usize {
                (*uc).uc_mcontext.gregs[rip] = &raw const thinvol_mapcopy_resume as i64;
                return;
            }
            pass_on(sig, info, ctx);
        }
    }

    /// A SIGBUS that is not ours: do what would have happened without us.
    unsafe fn pass_on(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        let prev = PREVIOUS.get();
        let handler = prev.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
        let sent = (*info).si_code <= 0; // by kill(2)/raise(3), not by a fault
        if handler == libc::SIG_IGN && sent {
            return;
        }
        if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
            let flags = prev.map_or(0, |p| p.sa_flags);
            if flags & libc::SA_SIGINFO != 0 {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(handler);
                f(sig, info, ctx);
            } else {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
                f(sig);
            }
            return;
        }
        // Default action (a fault cannot be ignored: the kernel would reset it to
        // the default too): restore it. A fault re-executes its instruction and dies
        // of it; a sent signal is raised again, delivered once we return.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
        if sent {
            libc::raise(sig);
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    use super::ReadMap;
    use std::fs::File;

    pub(super) fn new(_file: &File, _len: u64) -> Option<ReadMap> {
        let _ = super::reserve_for;
        None
    }
    pub(super) fn unmap(_base: *const u8, _reserved: u64) {}
    pub(super) unsafe fn copy(_buf: &mut [u8], _src: *const u8) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::continues_stream;

    #[test]
    fn sequential_streams_are_recognised_per_mapping_and_thread() {
        let (a, b) = (0x1000, 0x2000);
        assert!(!continues_stream(a, 0, 4096)); // first read
        assert!(continues_stream(a, 4096, 8192)); // adjacent
        assert!(continues_stream(a, 16384, 20480)); // a gap another worker read
        assert!(!continues_stream(b, 20480, 24576)); // another mapping
        assert!(!continues_stream(a, 24576, 28672)); // ... breaks a's record
        assert!(!continues_stream(a, 1 << 30, (1 << 30) + 4096)); // far away
        assert!(!continues_stream(a, 0, 4096)); // backwards
        assert!(!continues_stream(a, (1 << 20) + 4096, (1 << 20) + 8192)); // past the window
        assert!(continues_stream(a, (1 << 20) + 8192, (1 << 20) + 12288));
        std::thread::spawn(|| assert!(!continues_stream(0x1000, (1 << 20) + 12288, 1 << 21)))
            .join()
            .unwrap();
    }
}
