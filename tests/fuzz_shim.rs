//! Property tests of the Python side of the worker frame protocol, with the real `shim.py` in a
//! real CPython: its frame reader (`Slot.recv_frame`), fed generated frames through a real socket
//! while its reads are cut at random sizes (seeded by the case, so a failure replays), echoes
//! each frame back with the shim's own header packing, and the supervisor's decoder must get
//! every frame back unchanged; and its body writer (`Slot.send_body`) streams generated chunks
//! through a slot's shared ring (`Shared` frames, split at the ring's end, socket fallback when
//! full) while the supervisor's channel holds and drops them in any order, and every chunk
//! must arrive intact. Plus example tests of Abort numbering and of how responses are framed.
//! Case counts: `util::fuzz::config`; long runs: `benches/fuzz.sh`.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use sauna_supervisor::web::worker::frame::{self, Channel, Frame, Kind};
use sauna_supervisor::web::worker::ring::Ring;

use crate::fuzz_frame::{any_frame, encode};
use crate::util::{self, fuzz};

/// Serves frames on descriptor 0: each read asks for at most a random 1–64 bytes, each
/// frame read goes back as it was, until the other end shuts its side.
const HARNESS: &str = r#"
import random, socket, sys
seed = int(sys.argv[2])
rng = random.Random(seed)

class ShortReads(socket.socket):
    def recv_into(self, buffer, nbytes=0, flags=0):
        return super().recv_into(buffer, min(nbytes or len(buffer), rng.randint(1, 64)), flags)

slot = shim["Slot"](0, None, {})
slot.sock = ShortReads(fileno=slot.sock.detach())
slot.sock.setblocking(True)
try:
    while True:
        kind, flags, arg, payload = slot.recv_frame()
        header = shim["_pack"](len(payload), arg, kind, flags, 0)
        slot.sendv([header, payload], len(header) + len(payload))
except EOFError:
    pass
"#;

/// The shim's body writer on a slot with a ring (descriptor 1, the memfd, `RING_SIZE` bytes):
/// each `Data` frame's payload goes back through `send_body`, followed by an `End` frame.
const RING_HARNESS: &str = r#"
import socket, sys
ring_size = int(sys.argv[2])
slot = shim["Slot"](0, None, {}, 1, ring_size)
end = shim["_pack"](0, 0, shim["END"], 0, 0)
try:
    while True:
        kind, flags, arg, payload = slot.recv_frame()
        if payload:
            slot.send_body(payload)
        slot.send(end)
except EOFError:
    pass
"#;

/// What every harness starts with: the shim at `sys.argv[1]` loaded without running it
/// (everything but its last line, `sys.exit(main(...))`), its globals in `shim`.
const LOAD_SHIM: &str = r#"
import sys
path = sys.argv[1]
source = open(path, encoding="utf-8").read()
last = "sys.exit(main(sys.argv[1:]))"
if source.rstrip().splitlines()[-1] != last:
    sys.exit("the shim no longer ends with %r; update tests/fuzz_shim.rs" % last)
shim = {"__name__": "sauna_shim"}
exec(compile(source[:source.rindex(last)], path, "exec"), shim)
"#;

/// The Python the harnesses run (after [`LOAD_SHIM`]), started with the slot socket as
/// descriptor 0.
fn shim_python(
    harness: &str,
    slot: OwnedFd,
    args: &[String],
    stdout: Stdio,
) -> std::process::Child {
    let shim = util::repo_root().join("supervisor/src/web/worker/shim.py");
    Command::new(util::python())
        .arg("-c")
        .arg(format!("{LOAD_SHIM}{harness}"))
        .arg(&shim)
        .args(args)
        .stdin(Stdio::from(slot))
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn frames() -> impl Strategy<Value = Vec<Frame>> {
    // Mostly small frames, and now and then one bigger than the shim's 64 KiB receive buffer.
    let big = (65_000usize..140_000, any::<u8>()).prop_map(|(len, fill)| Frame {
        kind: frame::Kind::Data,
        flags: 0,
        arg: 0,
        payload: Bytes::from(vec![fill; len]),
    });
    prop::collection::vec(prop_oneof![12 => any_frame(), 1 => big], 0..12)
}

proptest! {
    #![proptest_config(fuzz::config(24))]

    #[test]
    fn the_shim_reads_every_frame_whatever_its_read_sizes(frames in frames(), seed in any::<u64>()) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut python = shim_python(HARNESS, OwnedFd::from(theirs), &[seed.to_string()], Stdio::null());
        let wire = encode(&frames);
        let mut writer = ours.try_clone().unwrap();
        let sending = std::thread::spawn(move || {
            let result = writer.write_all(&wire);
            let _ = writer.shutdown(std::net::Shutdown::Write);
            result
        });
        ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut echoed = Vec::new();
        let read = (&ours).read_to_end(&mut echoed);
        if read.is_err() {
            let _ = python.kill();
        }
        let status = python.wait().unwrap();
        let mut stderr = String::new();
        if let Some(mut pipe) = python.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        prop_assert!(read.is_ok(), "the shim did not answer and close within 10 s: {read:?}\n{stderr}");
        prop_assert!(sending.join().unwrap().is_ok(), "the shim stopped reading\n{stderr}");
        prop_assert!(status.success(), "the shim failed: {status}\n{stderr}");
        let mut buffer = BytesMut::from(&echoed[..]);
        let mut back = Vec::new();
        while let Some(frame) = frame::decode(&mut buffer).unwrap() {
            back.push(frame);
        }
        prop_assert!(buffer.is_empty(), "{} bytes after the last whole frame", buffer.len());
        prop_assert_eq!(back, frames, "stderr:\n{}", stderr);
    }
}

/// Size of the ring in the ring test: the shim's sharing threshold is 16 KiB, so chunks from
/// 16 KiB up to this go through the ring while it has room, bigger ones through the socket.
const RING_SIZE: usize = 64 * 1024;

proptest! {
    #![proptest_config(fuzz::config(16))]

    #[test]
    fn the_shim_streams_chunks_through_the_ring_intact(
        chunks in prop::collection::vec((prop_oneof![1 => 1usize..16_384, 3 => 16_384usize..90_000], any::<u8>()), 1..16),
        keep in 0usize..4,
        order in prop::collection::vec(any::<usize>(), 1..6),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _context = runtime.enter();
        let (ring, memfd) = Ring::new(RING_SIZE).unwrap();
        let counter = std::fs::File::from(memfd.try_clone().unwrap());
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut python = shim_python(RING_HARNESS, OwnedFd::from(theirs), &[RING_SIZE.to_string()], Stdio::from(memfd));
        let mut channel = Channel::with_ring(tokio::net::UnixStream::from_std(ours).unwrap(), ring);
        let outcome: Result<(), String> = runtime.block_on(async {
            let mut held: Vec<Bytes> = Vec::new();
            for (index, (len, fill)) in chunks.iter().enumerate() {
                let data = vec![*fill; *len];
                frame::put_header(channel.queue(), Kind::Data, 0, 0, data.len());
                channel.queue().extend_from_slice(&data);
                let flushed = tokio::time::timeout(Duration::from_secs(10), std::future::poll_fn(|cx| channel.poll_flush(cx))).await;
                if !matches!(flushed, Ok(Ok(()))) {
                    return Err(format!("chunk {index}: writing to the shim failed: {flushed:?}"));
                }
                let mut received = Vec::new();
                loop {
                    let frame = match tokio::time::timeout(Duration::from_secs(10), channel.frame()).await {
                        Ok(Ok(frame)) => frame,
                        other => return Err(format!("chunk {index}: no answer from the shim: {other:?}")),
                    };
                    match frame.kind {
                        Kind::Body => {
                            received.extend_from_slice(&frame.payload);
                            held.push(frame.payload);
                        }
                        Kind::End => break,
                        other => return Err(format!("chunk {index}: a {other:?} frame")),
                    }
                }
                if received != data {
                    return Err(format!("chunk {index} of {len} bytes came back as {} bytes, not the same", received.len()));
                }
                // The client is slow: the last few chunks stay with hyper, the others go, in
                // any order.
                while held.len() > keep {
                    let pick = order[held.len() % order.len()] % held.len();
                    drop(held.swap_remove(pick));
                }
            }
            Ok(())
        });
        drop(channel);
        let status = python.wait().unwrap();
        let mut stderr = String::new();
        if let Some(mut pipe) = python.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        prop_assert!(outcome.is_ok(), "{}\nshim stderr:\n{}", outcome.unwrap_err(), stderr);
        prop_assert!(status.success(), "the shim failed: {status}\n{stderr}");
        // The first chunk that fits went through the ring (it starts empty), and was released.
        if chunks.iter().any(|(len, _)| (16_384..=RING_SIZE).contains(len)) {
            let mut word = [0u8; 4];
            std::os::unix::fs::FileExt::read_exact_at(&counter, &mut word, 0).unwrap();
            prop_assert!(u32::from_ne_bytes(word) > 0, "the ring was never used");
        }
    }
}

/// An `Abort` names its request: one that arrives after its request ended (the worker sent
/// `End` before reading it) must not stop the next request on the slot, which may have come as
/// an offer, past it. The shim's body reader and its between-chunks check both get a late
/// `Abort` (for request 4) while serving request 5, then the check gets one for request 5.
const ABORT_HARNESS: &str = r#"
import select, socket, sys
slot = shim["Slot"](0, None, {})
slot.seq = 5
reader = shim["PullInput"](slot)
buffer = bytearray(16)
got = reader.readinto(buffer)
print("read", bytes(buffer[:got]).decode(), "aborted" if slot.aborted else "running", flush=True)
for _ in range(2):
    select.select([slot.sock], [], [])
    print("gone" if slot.client_gone() else "running", flush=True)
"#;

#[test]
fn a_late_abort_does_not_stop_the_next_request() {
    use std::io::BufRead;
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut python = shim_python(ABORT_HARNESS, OwnedFd::from(theirs), &[], Stdio::piped());
    let mut lines = std::io::BufReader::new(python.stdout.take().unwrap()).lines();
    let mut next_line = || lines.next().and_then(Result::ok).unwrap_or_default();
    let frame = |kind: Kind, arg: u32, payload: &[u8]| {
        let mut wire = BytesMut::new();
        frame::put_header(&mut wire, kind, 0, arg, payload.len());
        wire.extend_from_slice(payload);
        wire
    };
    let mut writer = &ours;
    // The body read: a late Abort, then the Data it asked for.
    let mut read_frame = [0u8; frame::HEADER_LEN];
    (&ours).read_exact(&mut read_frame).unwrap();
    assert_eq!(read_frame[8], Kind::Read as u8);
    writer.write_all(&frame(Kind::Abort, 4, b"")).unwrap();
    writer.write_all(&frame(Kind::Data, 0, b"body")).unwrap();
    let first = next_line();
    writer.write_all(&frame(Kind::Abort, 4, b"")).unwrap();
    let second = next_line();
    writer.write_all(&frame(Kind::Abort, 5, b"")).unwrap();
    let third = next_line();
    let _ = python.kill();
    let output = python.wait_with_output().unwrap();
    assert_eq!(
        [first.as_str(), &second, &third],
        ["read body running", "running", "gone"],
        "stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Responses as the shim frames them: Django's `HttpResponse` (no `len()`, iterates over a
/// list it holds) leaves in one `Start` frame marked as the end, while a generator still
/// streams — its first chunk is sent before the app produces the next, not held back.
const RESPONSE_HARNESS: &str = r#"
import sys

class HttpResponseLike:
    def __init__(self):
        self._container = [b"<p>", b"page", b"</p>"]
    def __iter__(self):
        return iter(self._container)

def stream():
    yield b"first"
    # The supervisor answers once it has the first chunk: a held-back chunk never arrives.
    slot.sock.recv(1)
    yield b"second"

slot = shim["Slot"](0, None, {})
for result in (HttpResponseLike(), stream()):
    slot.status, slot.sent = None, False
    slot.start_response("200 OK", [("Content-Type", "text/html")])
    slot.respond(result)
"#;

#[test]
fn an_in_memory_body_is_one_frame_and_a_generator_still_streams() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut python = shim_python(RESPONSE_HARNESS, OwnedFd::from(theirs), &[], Stdio::null());
    let next_frame = || {
        let mut header = [0u8; frame::HEADER_LEN];
        (&ours).read_exact(&mut header).unwrap();
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let arg = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let mut payload = vec![0u8; len];
        (&ours).read_exact(&mut payload).unwrap();
        (header[8], header[9], payload.split_off(arg.min(len)))
    };
    let whole = next_frame();
    assert_eq!(
        whole,
        (Kind::Start as u8, frame::FLAG_END, b"<p>page</p>".to_vec()),
        "an in-memory body must leave in one frame that ends the response"
    );
    let first = next_frame();
    assert_eq!(first, (Kind::Start as u8, 0, b"first".to_vec()));
    (&ours).write_all(b"x").unwrap();
    assert_eq!(
        [next_frame(), next_frame()],
        [
            (Kind::Body as u8, 0, b"second".to_vec()),
            (Kind::End as u8, 0, Vec::new())
        ]
    );
    let status = python.wait().unwrap();
    assert!(status.success(), "the harness failed: {status}");
}

/// A body over the supervisor's 64 MiB frame limit, returned whole (a list) or yielded as one
/// chunk: the shim must cut it into frames the supervisor accepts, and every byte must arrive.
const BIG_BODY_HARNESS: &str = r#"
import sys
big = b"x" * ((65 << 20) + 3)

def stream():
    yield big

slot = shim["Slot"](0, None, {})
for result in ([big], stream()):
    slot.status, slot.sent = None, False
    slot.start_response("200 OK", [("Content-Type", "application/octet-stream")])
    slot.respond(result)
"#;

#[test]
fn a_body_over_the_frame_limit_arrives_whole_in_accepted_frames() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut python = shim_python(BIG_BODY_HARNESS, OwnedFd::from(theirs), &[], Stdio::null());
    let mut decoder = BytesMut::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut responses = Vec::new();
    let mut body = 0usize;
    while responses.len() < 2 {
        let frame = loop {
            match frame::decode(&mut decoder) {
                Ok(Some(frame)) => break frame,
                Ok(None) => {}
                Err(error) => panic!("the supervisor would refuse this frame: {error:?}"),
            }
            let read = (&ours).read(&mut buffer).unwrap();
            assert!(read > 0, "the shim closed the slot mid-response");
            decoder.extend_from_slice(&buffer[..read]);
        };
        match frame.kind {
            Kind::Start => body += frame.payload.len() - frame.arg as usize,
            Kind::Body => body += frame.payload.len(),
            Kind::End => responses.push(std::mem::take(&mut body)),
            other => panic!("unexpected {other:?} frame"),
        }
        assert_eq!(
            frame.flags & frame::FLAG_END,
            0,
            "a cut body cannot end in its first frame"
        );
    }
    assert_eq!(responses, [(65 << 20) + 3, (65 << 20) + 3]);
    let status = python.wait().unwrap();
    assert!(status.success(), "the harness failed: {status}");
}
