//! Starting the write-back of received data while the stream still arrives, so the
//! pool commit at a checkpoint (which waits for every data write since the last one
//! to reach the disk) finds most of it written already, and the disk writes overlap
//! with the stream instead of following it. `sync_file_range(SYNC_FILE_RANGE_WRITE)`
//! only starts the I/O: it makes nothing durable (durability still comes from the
//! pool commit's flush) and changes no data. It runs on its own thread because
//! submitting the I/O may block while the device queue is full.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::thread::JoinHandle;

/// Start write-back after this many bytes written since the last start.
pub const WRITEBACK_BYTES: u64 = 16 << 20;

pub struct Writeback {
    tx: Option<SyncSender<()>>,
    handle: Option<JoinHandle<()>>,
    pending: u64,
}

impl Writeback {
    /// Best effort: without the data file (or the thread), `wrote` does nothing.
    pub fn new(pool_dir: &std::path::Path) -> Writeback {
        let file = std::fs::File::open(pool_dir.join(thinvol_engine::DATA_FILE)).ok();
        let (tx, rx) = sync_channel::<()>(1);
        let handle = file.and_then(|f| {
            std::thread::Builder::new()
                .name("thinvol-writeback".into())
                .spawn(move || {
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
                    for () in rx {
                        // SAFETY: sync_file_range on a valid descriptor with integer
                        // arguments (0, 0: the whole file); the result is advisory.
                        unsafe {
                            libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE);
                        }
                    }
                })
                .ok()
        });
        Writeback {
            tx: handle.is_some().then_some(tx),
            handle,
            pending: 0,
        }
    }

    /// `n` more bytes were written to the data file.
    pub fn wrote(&mut self, n: u64) {
        self.pending += n;
        if self.pending >= WRITEBACK_BYTES {
            if let Some(tx) = &self.tx {
                match tx.try_send(()) {
                    // Busy: the running pass will pick this data up or the next one.
                    Ok(()) | Err(TrySendError::Full(())) => {}
                    Err(TrySendError::Disconnected(())) => self.tx = None,
                }
            }
            self.pending = 0;
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
