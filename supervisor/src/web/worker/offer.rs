//! Request offers: how a `Request` frame reaches a worker's request slot without the socket, and
//! how the front can take it back while the worker has not started it.
//!
//! Each slot has an eventfd (semaphore mode, non-blocking) and `REGIONS` offer regions of `REGION`
//! bytes in a memfd shared by the worker's slots (slot `i`'s regions at `i · REGIONS · REGION`).
//! To **offer** a request the front copies the complete frame (header, environ, inline body) into
//! a region and adds 1 to the eventfd. The eventfd counter arbitrates the claim: the worker
//! **claims** an offer with a successful read (semaphore mode takes exactly 1), the front **takes
//! it back** with a successful read of the same eventfd; exactly one side wins, and the
//! eventfd's lock orders the region's bytes before the worker reads them, on every architecture
//! (the regions themselves need no atomics).
//!
//! The worker claims offers in order and reads region `claims % REGIONS`. At most `REGIONS`
//! offers of a slot are outstanding (the request in service and those pending behind it; the
//! dispatcher keeps to that), and a take-back always removes the latest unclaimed one, so the
//! front writes the region `offers not taken back % REGIONS`: never the region of a request still
//! in service or pending, and a region is rewritten only after the request that used it is
//! complete (the worker copies a frame out before it serves it).
//!
//! It owns the mapping, the eventfds and that counting; when to offer or take back is the
//! dispatcher's (`crate::web::dispatch`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

/// Bytes of one offer region: a `Request` frame up to this size can be offered; a bigger one
/// goes over the slot's socket to an idle slot.
pub const REGION: usize = 64 * 1024;

/// Offer regions per slot: the most offers a slot can have outstanding (the shim's `REGIONS`).
pub const REGIONS: usize = 4;

/// The shared memfd mapping of one worker's offer regions.
#[derive(Debug)]
struct Mapping {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping lives as long as the `Mapping`; the front only writes regions that the
// worker does not read at that time (see the module comment), and never reads them.
unsafe impl Send for Mapping {}
// SAFETY: as above; each slot's `Mailbox` writes only its own regions, behind `&mut`.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `Mailboxes::new`; every `Mailbox` holding it is
        // gone (each holds an Arc).
        unsafe {
            libc::munmap(self.base.cast::<libc::c_void>(), self.len);
        }
    }
}

/// The offer side of one request slot, held by the dispatcher.
#[derive(Debug)]
pub struct Mailbox {
    eventfd: OwnedFd,
    mapping: Arc<Mapping>,
    /// Offset of the slot's first region in the mapping.
    at: usize,
    /// Offers made and not taken back: the next offer goes to region `offered % REGIONS`.
    offered: u64,
}

/// The mailboxes of one worker's slots and the descriptors the worker gets for them.
#[derive(Debug)]
pub struct Mailboxes {
    /// One per slot, in slot order.
    pub ours: Vec<Mailbox>,
    /// The worker's copies of the eventfds, in slot order.
    pub eventfds: Vec<OwnedFd>,
    /// The worker's copy of the memfd holding every slot's regions.
    pub memfd: OwnedFd,
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd with an initial count and flags; the result is checked.
    let fd = unsafe {
        libc::eventfd(
            0,
            libc::EFD_SEMAPHORE | libc::EFD_NONBLOCK | libc::EFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: eventfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Mailboxes {
    /// The mailboxes of `slots` request slots.
    pub fn new(slots: usize) -> io::Result<Mailboxes> {
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"sauna-offers".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = slots.max(1) * REGIONS * REGION;
        let length = libc::off_t::try_from(len).map_err(io::Error::other)?;
        // SAFETY: ftruncate on our descriptor.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), length) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh shared mapping of the whole file; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mapping = Arc::new(Mapping {
            base: base.cast::<u8>(),
            len,
        });
        let mut ours = Vec::with_capacity(slots);
        let mut eventfds = Vec::with_capacity(slots);
        for index in 0..slots {
            let ours_fd = eventfd()?;
            eventfds.push(ours_fd.try_clone()?);
            ours.push(Mailbox {
                eventfd: ours_fd,
                mapping: Arc::clone(&mapping),
                at: index * REGIONS * REGION,
                offered: 0,
            });
        }
        Ok(Mailboxes {
            ours,
            eventfds,
            memfd,
        })
    }
}

impl Mailbox {
    /// Whether a frame of `len` bytes can be offered.
    pub fn fits(len: usize) -> bool {
        len <= REGION
    }

    /// Offers a complete `Request` frame (at most `REGION` bytes): copies it into the next
    /// region and wakes the worker if it waits.
    pub fn offer(&mut self, frame: &[u8]) -> io::Result<()> {
        if !Mailbox::fits(frame.len()) {
            return Err(io::Error::other(
                "the request frame is bigger than a region",
            ));
        }
        // `offered % REGIONS` is below `REGIONS`, so the cast cannot truncate.
        let region = self.at + (self.offered % REGIONS as u64) as usize * REGION;
        // SAFETY: `region + frame.len()` is within the mapping (checked size, `REGIONS` regions
        // per slot); the worker does not read this region now (module comment).
        unsafe {
            std::ptr::copy_nonoverlapping(
                frame.as_ptr(),
                self.mapping.base.add(region),
                frame.len(),
            );
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a live buffer to our eventfd.
        let written = unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), 8) };
        if written != 8 {
            return Err(io::Error::last_os_error());
        }
        self.offered += 1;
        Ok(())
    }

    /// Takes back the latest offer the worker has not claimed; false when it claimed them all.
    pub fn take_back(&mut self) -> io::Result<bool> {
        let mut count = [0u8; 8];
        // SAFETY: reading 8 bytes into a live buffer from our eventfd.
        let read = unsafe { libc::read(self.eventfd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        if read == 8 {
            self.offered = self.offered.saturating_sub(1);
            return Ok(true);
        }
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::WouldBlock {
            Ok(false)
        } else {
            Err(error)
        }
    }
}

/// The worker's side of the mailboxes, as the shim does it, for tests.
#[cfg(test)]
pub(crate) mod worker_side {
    use super::*;

    /// Claims offers like the shim: a read of the slot's eventfd, then region
    /// `claims % REGIONS`.
    pub(crate) struct Claimer {
        eventfds: Vec<OwnedFd>,
        memfd: std::fs::File,
        claims: Vec<u64>,
    }

    impl Claimer {
        /// Splits fresh mailboxes into the front's side and the worker's.
        pub(crate) fn new(slots: usize) -> (Vec<Mailbox>, Claimer) {
            let boxes = Mailboxes::new(slots).unwrap();
            let claimer = Claimer {
                eventfds: boxes.eventfds,
                memfd: std::fs::File::from(boxes.memfd),
                claims: vec![0; slots],
            };
            (boxes.ours, claimer)
        }

        /// The next offered frame of `slot`, if one is there to claim.
        pub(crate) fn claim(&mut self, slot: usize) -> Option<Vec<u8>> {
            use std::os::unix::fs::FileExt;
            let mut count = [0u8; 8];
            let fd = self.eventfds[slot].as_raw_fd();
            // SAFETY: reading 8 bytes into a live buffer.
            if unsafe { libc::read(fd, count.as_mut_ptr().cast(), 8) } != 8 {
                return None;
            }
            let claims = &mut self.claims[slot];
            let at = slot * REGIONS * REGION + (*claims % REGIONS as u64) as usize * REGION;
            *claims += 1;
            let mut header = [0u8; 4];
            self.memfd.read_exact_at(&mut header, at as u64).unwrap();
            let len = u32::from_le_bytes(header) as usize;
            let mut frame = vec![0u8; 12 + len];
            self.memfd.read_exact_at(&mut frame, at as u64).unwrap();
            Some(frame)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worker_side::Claimer;
    use super::*;

    /// A frame as far as the regions care: its length word, then the rest of a 12-byte header
    /// and the payload.
    fn frame(text: &[u8]) -> Vec<u8> {
        let mut frame = u32::try_from(text.len()).unwrap().to_le_bytes().to_vec();
        frame.extend_from_slice(&[0; 8]);
        frame.extend_from_slice(text);
        frame
    }

    #[test]
    fn offers_are_claimed_in_order_and_the_latest_unclaimed_one_can_be_taken_back() {
        let (mut ours, mut worker) = Claimer::new(2);
        let slot = &mut ours[1];
        slot.offer(&frame(b"first")).unwrap();
        slot.offer(&frame(b"second")).unwrap();
        assert_eq!(worker.claim(1), Some(frame(b"first")));
        // "second" is unclaimed: the front wins it back, and the next offer reuses its region.
        assert!(slot.take_back().unwrap());
        assert!(!slot.take_back().unwrap(), "nothing left to take back");
        assert_eq!(worker.claim(1), None);
        slot.offer(&frame(b"third")).unwrap();
        assert_eq!(worker.claim(1), Some(frame(b"third")));
        assert!(
            !slot.take_back().unwrap(),
            "claimed offers stay with the worker"
        );
        // The other slot's eventfd is its own.
        assert_eq!(worker.claim(0), None);
        assert!(slot.offer(&vec![0; REGION + 1]).is_err());
    }

    #[test]
    fn every_region_of_a_slot_holds_an_outstanding_offer_until_claimed() {
        let (mut ours, mut worker) = Claimer::new(1);
        let slot = &mut ours[0];
        for round in 0..3 {
            let texts: Vec<Vec<u8>> = (0..REGIONS)
                .map(|n| format!("round {round} offer {n}").into_bytes())
                .collect();
            for text in &texts {
                slot.offer(&frame(text)).unwrap();
            }
            // The last one is taken back and offered again: its region is reused, the others
            // are untouched.
            assert!(slot.take_back().unwrap());
            slot.offer(&frame(&texts[REGIONS - 1])).unwrap();
            for text in &texts {
                assert_eq!(worker.claim(0), Some(frame(text)));
            }
            assert_eq!(worker.claim(0), None);
        }
    }
}
