//! Property tests of the worker frame protocol (`web::worker::frame`) and of a slot's shared body
//! ring (`web::worker::ring`). Everything a worker sends is untrusted — a buggy or hostile app
//! runs there — so the supervisor's decoder must turn any byte stream, cut anywhere, into frames
//! or a protocol error, and the ring offsets and lengths a worker announces must never reach
//! outside the mapping or jam the ring's release accounting. The Python side of the same format
//! is checked by `fuzz_shim`. Case counts: `util::fuzz::config`; long runs: `benches/fuzz.sh`.

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream as StdUnixStream;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use sauna_supervisor::web::worker::frame::{
    self, Channel, ChannelError, FLAG_PULL, FLAG_TERMINATED, Frame, HEADER_LEN, Kind, MAX_PAYLOAD,
    RequestFrame,
};
use sauna_supervisor::web::worker::ring::{self, Ring};
use tokio::net::UnixStream;

use crate::util::fuzz;

/// Every kind of frame, in either direction.
const KINDS: [Kind; 11] = [
    Kind::Request,
    Kind::Data,
    Kind::Abort,
    Kind::Ready,
    Kind::Failed,
    Kind::Start,
    Kind::Body,
    Kind::End,
    Kind::Error,
    Kind::Read,
    Kind::Shared,
];

pub fn any_frame() -> impl Strategy<Value = Frame> {
    (
        prop::sample::select(&KINDS[..]),
        any::<u8>(),
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(kind, flags, arg, payload)| Frame {
            kind,
            flags,
            arg,
            payload: Bytes::from(payload),
        })
}

pub fn encode(frames: &[Frame]) -> BytesMut {
    let mut wire = BytesMut::new();
    for frame in frames {
        frame::put_header(
            &mut wire,
            frame.kind,
            frame.flags,
            frame.arg,
            frame.payload.len(),
        );
        wire.extend_from_slice(&frame.payload);
    }
    wire
}

/// Cut points into a stream of `len` bytes, from arbitrary numbers.
fn cuts(len: usize, raw: &[usize]) -> Vec<usize> {
    let mut cuts: Vec<usize> = raw.iter().map(|cut| cut % (len + 1)).collect();
    cuts.push(len);
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// What a decoder made of a stream: the frames before the first error, and whether one came.
#[derive(Debug, PartialEq)]
struct Decoded {
    frames: Vec<Frame>,
    failed: bool,
}

/// Decodes `wire` handed over in pieces ending at `cuts`, as a channel's reads would.
fn decode_in_pieces(wire: &[u8], cuts: &[usize]) -> Decoded {
    let mut buffer = BytesMut::new();
    let mut frames = Vec::new();
    let mut start = 0;
    for &end in cuts {
        buffer.extend_from_slice(&wire[start..end]);
        start = end;
        loop {
            match frame::decode(&mut buffer) {
                Ok(Some(frame)) => {
                    assert!(frame.payload.len() <= MAX_PAYLOAD);
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(ChannelError::Protocol(_)) => {
                    return Decoded {
                        frames,
                        failed: true,
                    };
                }
                Err(other) => panic!("decode gave a non-protocol error: {other}"),
            }
        }
    }
    // What is left is less than one frame: a short header or a payload still to come.
    if buffer.len() >= HEADER_LEN {
        let len = u32::from_le_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]) as usize;
        assert!(
            buffer.len() < HEADER_LEN + len,
            "a whole frame was left undecoded"
        );
    }
    Decoded {
        frames,
        failed: false,
    }
}

/// Byte streams worth decoding: pure noise, and real frames with some bytes overwritten (which
/// mostly keeps headers plausible, so lengths and kinds are what varies).
fn hostile_stream() -> impl Strategy<Value = Vec<u8>> {
    let noise = prop::collection::vec(any::<u8>(), 0..600);
    let mutated = (
        prop::collection::vec(any_frame(), 0..6),
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
    )
        .prop_map(|(frames, edits)| {
            let mut wire = encode(&frames).to_vec();
            for (at, byte) in edits {
                if !wire.is_empty() {
                    let index = at % wire.len();
                    wire[index] = byte;
                }
            }
            wire
        });
    prop_oneof![noise, mutated]
}

proptest! {
    #![proptest_config(fuzz::config(256))]

    /// Any byte stream, cut anywhere: frames or a protocol error, never a panic, and the same
    /// outcome whatever the cuts (a read boundary must not change what the stream means).
    #[test]
    fn decoding_any_stream_cut_anywhere_gives_the_same_frames_or_a_protocol_error(
        wire in hostile_stream(),
        raw_cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = decode_in_pieces(&wire, &[wire.len()]);
        let pieces = decode_in_pieces(&wire, &cuts(wire.len(), &raw_cuts));
        prop_assert_eq!(whole, pieces);
    }

    /// Encode → decode gives back every frame, whatever the cuts.
    #[test]
    fn encoded_frames_decode_to_themselves(
        frames in prop::collection::vec(any_frame(), 0..8),
        raw_cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let wire = encode(&frames);
        let decoded = decode_in_pieces(&wire, &cuts(wire.len(), &raw_cuts));
        prop_assert_eq!(decoded, Decoded { frames, failed: false });
    }

    /// A request frame built in place carries its environ length, flags and bytes.
    #[test]
    fn request_frames_decode_to_their_environ_and_body(
        environ in prop::collection::vec(any::<u8>(), 0..400),
        body in prop::collection::vec(any::<u8>(), 0..400),
        pulled in any::<bool>(),
        terminated in any::<bool>(),
    ) {
        let mut request = RequestFrame::new(environ.len() + body.len());
        request.environ().extend_from_slice(&environ);
        let mut wire = if pulled {
            request.pulled_body(terminated)
        } else {
            request.inline_body(&body, terminated)
        };
        let frame = frame::decode(&mut wire).unwrap().unwrap();
        prop_assert!(wire.is_empty());
        prop_assert_eq!(frame.kind, Kind::Request);
        prop_assert_eq!(frame.arg as usize, environ.len());
        let flags = if pulled { FLAG_PULL } else { 0 } | if terminated { FLAG_TERMINATED } else { 0 };
        prop_assert_eq!(frame.flags, flags);
        let mut expected = environ.clone();
        if !pulled {
            expected.extend_from_slice(&body);
        }
        prop_assert_eq!(&frame.payload[..], &expected[..]);
    }
}

/// Frames as a worker streams them: small ones and body chunks past the size at which the
/// channel starts aiming its reads at frame boundaries (8 KiB), up to beyond one read (120 KiB).
fn streamed_frames() -> impl Strategy<Value = Vec<Frame>> {
    let big = (
        prop::sample::select(&KINDS[..]),
        8_000usize..150_000,
        any::<u8>(),
    )
        .prop_map(|(kind, len, fill)| Frame {
            kind,
            flags: 0,
            arg: 0,
            payload: Bytes::from(vec![fill; len]),
        });
    // A `Shared` frame means something else on a slot without a ring: a protocol error.
    let frame = prop_oneof![2 => any_frame(), 1 => big].prop_map(|mut frame| {
        if frame.kind == Kind::Shared {
            frame.kind = Kind::Body;
        }
        frame
    });
    prop::collection::vec(frame, 0..10)
}

proptest! {
    #![proptest_config(fuzz::config(48))]

    /// The channel's reads (sized to end at frame boundaries once a big frame has begun) give
    /// back every frame whole, whatever pieces the worker's writes arrive in.
    #[test]
    fn a_channel_reads_every_frame_whole_whatever_the_write_sizes(
        frames in streamed_frames(),
        raw_cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let wire = encode(&frames);
        let cuts = cuts(wire.len(), &raw_cuts);
        let runtime = runtime();
        let (ours, theirs) = StdUnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut channel = {
            let _context = runtime.enter();
            Channel::new(UnixStream::from_std(ours).unwrap())
        };
        let writer = std::thread::spawn(move || {
            let mut start = 0;
            for end in cuts {
                std::io::Write::write_all(&mut &theirs, &wire[start..end]).unwrap();
                start = end;
            }
        });
        let received = runtime.block_on(async {
            let mut received = Vec::new();
            for _ in 0..frames.len() {
                received.push(channel.frame().await.unwrap());
            }
            received
        });
        writer.join().unwrap();
        prop_assert_eq!(received, frames);
    }
}

/// Where a worker says a shared chunk starts, relative to where the supervisor expects it.
#[derive(Debug, Clone)]
enum At {
    Expected,
    Off(i32),
    Any(u32),
}

/// How long a worker says a shared chunk is.
#[derive(Debug, Clone)]
enum Len {
    /// Within what is left before the ring's end (by a fraction in 1/256ths, at least 1).
    Fits(u8),
    Zero,
    /// Past the ring's end by this much.
    Beyond(u16),
    Any(u32),
}

/// One frame of a hostile worker's stream on a slot with a ring.
#[derive(Debug, Clone)]
enum Announce {
    /// A `Shared` frame; `malformed` payload lengths other than 4 are used instead when set.
    Shared {
        at: At,
        len: Len,
        malformed: Option<u8>,
    },
    /// A plain `Body` frame between shared ones.
    Body(u16),
}

fn announce() -> impl Strategy<Value = Announce> {
    let at = prop_oneof![
        6 => Just(At::Expected),
        1 => (-300i32..300).prop_map(At::Off),
        1 => any::<u32>().prop_map(At::Any),
    ];
    let len = prop_oneof![
        6 => any::<u8>().prop_map(Len::Fits),
        1 => Just(Len::Zero),
        1 => (1u16..2000).prop_map(Len::Beyond),
        1 => any::<u32>().prop_map(Len::Any),
    ];
    let malformed = prop_oneof![8 => Just(None), 1 => (0u8..9).prop_map(Some)];
    prop_oneof![
        8 => (at, len, malformed).prop_map(|(at, len, malformed)| Announce::Shared { at, len, malformed }),
        1 => (0u16..100).prop_map(Announce::Body),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A slot's channel with a ring of `size` bytes, the worker's end of the socket and the memfd.
fn slot_with_ring(size: usize) -> (Channel, StdUnixStream, std::fs::File) {
    let (ring, fd) = Ring::new(size).unwrap();
    let (ours, theirs) = StdUnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let channel = Channel::with_ring(UnixStream::from_std(ours).unwrap(), ring);
    (channel, theirs, std::fs::File::from(fd))
}

fn released(memfd: &std::fs::File) -> u32 {
    let mut word = [0u8; 4];
    memfd.read_exact_at(&mut word, 0).unwrap();
    u32::from_ne_bytes(word)
}

fn send(socket: &StdUnixStream, kind: Kind, arg: u32, payload: &[u8]) {
    let mut wire = BytesMut::new();
    frame::put_header(&mut wire, kind, 0, arg, payload.len());
    wire.extend_from_slice(payload);
    std::io::Write::write_all(&mut &*socket, &wire).unwrap();
}

/// Drops `held` in the order `order` picks (indices taken modulo what is left).
fn drop_in_order(held: &mut Vec<Bytes>, order: &[usize]) {
    let mut order = order.iter().cycle();
    while !held.is_empty() {
        let index = order.next().map_or(0, |pick| pick % held.len());
        drop(held.swap_remove(index));
    }
}

proptest! {
    #![proptest_config(fuzz::config(128))]

    /// A hostile worker announcing shared chunks anywhere, of any length: every chunk the channel
    /// hands on lies inside the ring and holds the ring's bytes there, anything else is a
    /// protocol error; and once the chunks are dropped, in any order, the ring is released up to
    /// the last chunk accepted (a stuck counter would push the worker off the ring for good).
    #[test]
    fn ring_offsets_from_a_worker_never_reach_outside_the_ring(
        size_shift in 6u32..13,
        announces in prop::collection::vec(announce(), 1..24),
        order in prop::collection::vec(any::<usize>(), 1..8),
    ) {
        let size = 1usize << size_shift;
        let runtime = runtime();
        let (mut channel, worker, memfd) = {
            let _context = runtime.enter();
            slot_with_ring(size)
        };
        // Recognisable ring contents: byte i of the ring is i mod 251.
        let pattern: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        memfd.write_all_at(&pattern, ring::HEADER as u64).unwrap();
        let mut position: u64 = 0;
        let mut held = Vec::new();
        runtime.block_on(async {
            for announce in &announces {
                let expected = (position % size as u64) as usize;
                let (at, len, payload) = match announce {
                    Announce::Body(len) => {
                        send(&worker, Kind::Body, 0, &vec![7; usize::from(*len)]);
                        let frame = channel.frame().await.unwrap();
                        assert_eq!((frame.kind, frame.payload.len()), (Kind::Body, usize::from(*len)));
                        continue;
                    }
                    Announce::Shared { at, len, malformed } => {
                        let at = match at {
                            At::Expected => expected as u32,
                            At::Off(delta) => (expected as i64 + i64::from(*delta)).max(0) as u32,
                            At::Any(at) => *at,
                        };
                        let room = size.saturating_sub(at as usize);
                        let len = match len {
                            Len::Fits(fraction) => (room * usize::from(*fraction) / 256).max(1) as u32,
                            Len::Zero => 0,
                            Len::Beyond(more) => (room + usize::from(*more)) as u32,
                            Len::Any(len) => *len,
                        };
                        let payload = match malformed {
                            None => len.to_le_bytes().to_vec(),
                            Some(bytes) => vec![1; usize::from(*bytes)],
                        };
                        (at, len, payload)
                    }
                };
                send(&worker, Kind::Shared, at, &payload);
                match channel.frame().await {
                    Ok(frame) => {
                        let (at, len) = (at as usize, len as usize);
                        assert_eq!(payload.len(), 4, "a malformed shared frame was accepted");
                        assert_eq!(frame.kind, Kind::Body);
                        assert!(at + len <= size, "chunk {at}+{len} outside a ring of {size}");
                        assert_eq!(at, expected, "chunk not where the last one ended");
                        assert_eq!(&frame.payload[..], &pattern[at..at + len]);
                        position += len as u64;
                        held.push(frame.payload);
                    }
                    Err(ChannelError::Protocol(_)) => break,
                    Err(other) => panic!("unexpected channel error: {other}"),
                }
            }
        });
        drop_in_order(&mut held, &order);
        prop_assert_eq!(released(&memfd), position as u32);
    }

    /// An honest worker (the shim's algorithm: write at its running counter, split a chunk at
    /// the ring's end, only while the released counter leaves room) streams chunks of any size
    /// while the supervisor drops them in any order: every chunk arrives intact.
    #[test]
    fn shared_chunks_from_an_honest_worker_arrive_intact(
        size_shift in 6u32..11,
        chunks in prop::collection::vec((1usize..2000, any::<u8>()), 1..40),
        order in prop::collection::vec(any::<usize>(), 1..8),
        keep in 0usize..6,
    ) {
        let size = 1usize << size_shift;
        let runtime = runtime();
        let (mut channel, worker, memfd) = {
            let _context = runtime.enter();
            slot_with_ring(size)
        };
        let mut written: u32 = 0;
        let mut held: Vec<Bytes> = Vec::new();
        runtime.block_on(async {
            for (len, fill) in &chunks {
                let (len, fill) = (*len, *fill);
                let data = vec![fill; len];
                if held.len() > keep {
                    // The oldest response chunks leave first, mostly; not always in order.
                    let index = order[held.len() % order.len()] % held.len();
                    drop(held.swap_remove(index));
                }
                let in_use = written.wrapping_sub(released(&memfd)) as usize;
                if in_use + len > size {
                    // No room: the shim sends the chunk through the socket.
                    send(&worker, Kind::Body, 0, &data);
                    let frame = channel.frame().await.unwrap();
                    assert_eq!(&frame.payload[..], &data[..]);
                    held.push(frame.payload);
                    continue;
                }
                let at = written as usize & (size - 1);
                let first = len.min(size - at);
                memfd.write_all_at(&data[..first], (ring::HEADER + at) as u64).unwrap();
                send(&worker, Kind::Shared, at as u32, &(first as u32).to_le_bytes());
                if first < len {
                    memfd.write_all_at(&data[first..], ring::HEADER as u64).unwrap();
                    send(&worker, Kind::Shared, 0, &((len - first) as u32).to_le_bytes());
                }
                written = written.wrapping_add(len as u32);
                let mut received = Vec::new();
                while received.len() < len {
                    let frame = channel.frame().await.unwrap();
                    assert_eq!(frame.kind, Kind::Body);
                    received.extend_from_slice(&frame.payload);
                    held.push(frame.payload);
                }
                assert_eq!(received, data);
            }
        });
        drop_in_order(&mut held, &order);
        prop_assert_eq!(released(&memfd), written);
    }
}
