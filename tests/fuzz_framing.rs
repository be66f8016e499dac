//! Property tests of the front's chunked-framing check (`web::front::framing`), which reads every
//! byte a client sends before hyper does: whatever the bytes and however the socket splits them
//! into reads, it must not panic, and it must find the same violation at the same offset — a check
//! that depended on read sizes would let a smuggled `0 \r\n` through when it arrives split.
//! Case counts: `util::fuzz::config`; long runs: `benches/fuzz.sh`.

use proptest::prelude::*;
use sauna_supervisor::web::front::framing::Framing;

use crate::util::fuzz;

const MAX_HEAD: usize = 64 * 1024;

/// The absolute offset of the first violation when `stream` arrives in reads cut at `cuts`.
fn first_violation(stream: &[u8], cuts: &[usize]) -> Option<usize> {
    let mut framing = Framing::new(MAX_HEAD);
    let mut bounds: Vec<usize> = cuts.iter().map(|cut| cut % (stream.len() + 1)).collect();
    bounds.push(0);
    bounds.push(stream.len());
    bounds.sort_unstable();
    bounds.dedup();
    for window in bounds.windows(2) {
        let (start, end) = (window[0], window[1]);
        if let Err(violation) = framing.feed(&stream[start..end]) {
            return Some(start + violation.at);
        }
    }
    None
}

/// A chunk size line: hex digits, sometimes with the whitespace or extensions under test.
fn size_line() -> impl Strategy<Value = Vec<u8>> {
    (
        0u32..64,
        prop::sample::select(vec!["", " ", "\t", " ;ext=1", ";a", "  ; b=\"c\"", " x"]),
        prop::sample::select(vec!["\r\n", "\n", " \r\n", "\r"]),
    )
        .prop_map(|(size, middle, end)| format!("{size:x}{middle}{end}").into_bytes())
}

/// One request, chunked or with a length or without a body, its parts sometimes malformed.
fn request() -> impl Strategy<Value = Vec<u8>> {
    let chunked = (
        prop::collection::vec(
            (size_line(), prop::collection::vec(any::<u8>(), 0..8)),
            0..4,
        ),
        size_line(),
        prop::sample::select(vec!["\r\n", "X-Trailer: 1\r\n\r\n", "\n", ""]),
    )
        .prop_map(|(chunks, last, trailer)| {
            let mut request =
                b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for (line, data) in chunks {
                request.extend_from_slice(&line);
                request.extend_from_slice(&data);
                request.extend_from_slice(b"\r\n");
            }
            let mut zero = last;
            zero[0] = b'0';
            request.extend_from_slice(&zero);
            request.extend_from_slice(trailer.as_bytes());
            request
        });
    let with_length = prop::collection::vec(any::<u8>(), 0..16).prop_map(|body| {
        let mut request = format!(
            "POST /l HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        request
    });
    let plain = Just(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec());
    prop_oneof![chunked, with_length, plain]
}

/// Several requests on one connection, with random bytes flipped or inserted.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(request(), 1..4),
        prop::collection::vec((any::<usize>(), any::<u8>(), any::<bool>()), 0..3),
    )
        .prop_map(|(requests, edits)| {
            let mut stream: Vec<u8> = requests.concat();
            for (at, byte, insert) in edits {
                let at = at % (stream.len() + 1);
                if insert || at == stream.len() {
                    stream.insert(at, byte);
                } else {
                    stream[at] = byte;
                }
            }
            stream
        })
}

proptest! {
    #![proptest_config(fuzz::config(2000))]

    #[test]
    fn the_verdict_does_not_depend_on_how_reads_split_the_stream(
        stream in stream(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = first_violation(&stream, &[]);
        prop_assert_eq!(first_violation(&stream, &cuts), whole);
        let byte_by_byte: Vec<usize> = (1..stream.len()).collect();
        prop_assert_eq!(first_violation(&stream, &byte_by_byte), whole);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let _ = first_violation(&bytes, &cuts);
    }
}

#[test]
fn a_last_chunk_with_trailing_whitespace_is_found_however_it_is_split() {
    let stream = b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0 \r\n\r\n";
    let at = stream.len() - 4;
    assert_eq!(first_violation(stream, &[]), Some(at));
    let byte_by_byte: Vec<usize> = (1..stream.len()).collect();
    assert_eq!(first_violation(stream, &byte_by_byte), Some(at));
}
