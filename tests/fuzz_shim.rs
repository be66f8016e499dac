//! Property test of the Python side of the worker frame protocol: the real `shim.py`'s frame
//! reader (`Slot.recv_frame`) in a real CPython, fed generated frames through a real socket
//! while its reads are cut at random sizes (seeded by the case, so a failure replays), echoes
//! each frame back with the shim's own header packing; the supervisor's decoder must get every
//! frame back unchanged. Both sides' encoders and decoders agree, whatever the read boundaries.
//! Case count: `util::fuzz::config`; long runs: `benches/fuzz.sh`.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use sauna_supervisor::web::worker::frame::{self, Frame};

use crate::fuzz_frame::{any_frame, encode};
use crate::util::{self, fuzz};

/// Loads the shim without running it (everything but its last line, `sys.exit(main(...))`),
/// then serves frames on descriptor 0: each read asks for at most a random 1–64 bytes, each
/// frame read goes back as it was, until the other end shuts its side.
const HARNESS: &str = r#"
import random, socket, sys
path, seed = sys.argv[1], int(sys.argv[2])
source = open(path, encoding="utf-8").read()
last = "sys.exit(main(sys.argv[1:]))"
if source.rstrip().splitlines()[-1] != last:
    sys.exit("the shim no longer ends with %r; update tests/fuzz_shim.rs" % last)
shim = {"__name__": "sauna_shim"}
exec(compile(source[:source.rindex(last)], path, "exec"), shim)
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
        slot.sendv([shim["_pack"](len(payload), arg, kind, flags, 0), payload])
except EOFError:
    pass
"#;

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
        let shim = util::repo_root().join("supervisor/src/web/worker/shim.py");
        let mut python = Command::new(util::python())
            .arg("-c")
            .arg(HARNESS)
            .arg(&shim)
            .arg(seed.to_string())
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
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
