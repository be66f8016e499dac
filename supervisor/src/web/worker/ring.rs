//! The shared-memory body ring of one request slot: a memfd mapped by the supervisor and by the
//! worker, into which the shim copies big response chunks instead of writing them to the slot's
//! socket. The socket then carries only a 16-byte `Shared` frame (where and how long), and the
//! chunk reaches hyper as a `Bytes` pointing into the mapping, so the supervisor never copies it:
//! one user-space copy (Python → ring) replaces two kernel copies (Python → socket → supervisor)
//! plus the socket buffers' allocation.
//!
//! Layout: a 64-byte header whose first word is the `released` counter (u32, wrapping), then
//! `size` bytes of ring. The shim writes at its own running `written` counter and only while
//! `written - released` leaves room; a chunk that does not fit goes through the socket as before,
//! so a slow client fills the ring and then costs copies, never a blocked worker. The supervisor
//! advances `released` when hyper has dropped a chunk, in ring order (chunks of consecutive
//! responses on the slot may be dropped out of order by their connections).
//!
//! It owns the mapping and the release bookkeeping; the frame format is `worker::frame`'s.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Bytes before the ring proper (the `released` counter, on its own cache line).
pub const HEADER: usize = 64;

/// One slot's ring, mapped in the supervisor.
#[derive(Debug)]
pub struct Ring {
    base: *mut u8,
    size: usize,
    release: Mutex<Release>,
}

// SAFETY: the mapping lives as long as the Ring; the ring bytes handed out are only read, and
// only after the worker wrote them and announced them on the socket; the counter is atomic.
unsafe impl Send for Ring {}
// SAFETY: as above; the release bookkeeping is behind a Mutex.
unsafe impl Sync for Ring {}

#[derive(Debug, Default)]
struct Release {
    /// Everything before this absolute position is released.
    tail: u64,
    /// Released chunks beyond `tail`: start → length.
    done: BTreeMap<u64, u64>,
}

impl Ring {
    /// Creates a ring of `size` bytes (a power of two): the mapping and the descriptor for the
    /// worker.
    pub fn new(size: usize) -> io::Result<(Arc<Ring>, OwnedFd)> {
        debug_assert!(size.is_power_of_two());
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"sauna-body-ring".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let total = HEADER + size;
        let length = libc::off_t::try_from(total).map_err(io::Error::other)?;
        // SAFETY: ftruncate on our descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), length) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh shared mapping of the whole file; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = Ring {
            base: base.cast::<u8>(),
            size,
            release: Mutex::new(Release::default()),
        };
        Ok((Arc::new(ring), fd))
    }

    /// The ring size.
    pub fn size(&self) -> usize {
        self.size
    }

    fn released(&self) -> &AtomicU32 {
        // SAFETY: the header's first word is 64-byte aligned (page-aligned mapping) and only
        // ever accessed atomically here and by plain aligned 4-byte loads in the worker.
        unsafe { AtomicU32::from_ptr(self.base.cast::<u32>()) }
    }

    /// The `len` bytes at ring offset `at` (absolute position `position`), as `Bytes` that
    /// release their space when dropped.
    pub fn chunk(self: &Arc<Ring>, at: usize, len: usize, position: u64) -> Bytes {
        Bytes::from_owner(Chunk {
            ring: Arc::clone(self),
            at,
            len,
            position,
        })
    }

    fn release(&self, position: u64, len: u64) {
        // An empty chunk (only a broken worker announces one) frees nothing, and it shares its
        // position with the next chunk: recorded, it could overwrite that chunk's entry and stop
        // the counter there for good.
        if len == 0 {
            return;
        }
        let mut release = self
            .release
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        release.done.insert(position, len);
        let before = release.tail;
        loop {
            let tail = release.tail;
            let Some(len) = release.done.remove(&tail) else {
                break;
            };
            release.tail = tail + len;
        }
        if release.tail != before {
            // The worker counts in u32 and compares with wrapping arithmetic.
            self.released()
                .store(release.tail as u32, Ordering::Release);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`; no Chunk is alive (each holds an Arc).
        unsafe {
            libc::munmap(self.base.cast::<libc::c_void>(), HEADER + self.size);
        }
    }
}

/// A chunk of a ring handed to hyper.
struct Chunk {
    ring: Arc<Ring>,
    at: usize,
    len: usize,
    position: u64,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `at + len <= size` was checked when the frame was read; the worker does not
        // write these bytes again until they are released, which happens when this is dropped.
        unsafe { std::slice::from_raw_parts(self.ring.base.add(HEADER + self.at), self.len) }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.ring.release(self.position, self.len as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_is_released_in_ring_order_only() {
        let (ring, _fd) = Ring::new(4096).unwrap();
        let first = ring.chunk(0, 100, 0);
        let second = ring.chunk(100, 50, 100);
        drop(second);
        assert_eq!(ring.released().load(Ordering::Acquire), 0);
        drop(first);
        assert_eq!(ring.released().load(Ordering::Acquire), 150);
    }

    #[test]
    fn an_empty_chunk_does_not_hide_the_chunk_at_its_position() {
        let (ring, _fd) = Ring::new(4096).unwrap();
        let first = ring.chunk(0, 100, 0);
        let empty = ring.chunk(100, 0, 100);
        let second = ring.chunk(100, 50, 100);
        drop(second);
        drop(empty);
        drop(first);
        assert_eq!(ring.released().load(Ordering::Acquire), 150);
    }
}
