//! Receiving a whole request body before the request is dispatched, so that a slow client (an
//! upload at one byte per 100 ms) occupies a cheap tokio task instead of a Python worker. Bodies
//! up to `body_buffer` stay in memory; bigger ones go to an unnamed temporary file (deleted by the
//! kernel when closed), and `max_body` ends the read with 413. Serving the stored body to the
//! worker in pieces belongs to `web::exchange`.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// A request body, fully received.
#[derive(Debug)]
pub enum RequestBody {
    /// Held in memory.
    Memory(Bytes),
    /// Spilled to an unnamed temporary file of `len` bytes.
    File {
        /// The file.
        file: File,
        /// Its length.
        len: u64,
    },
}

/// Why a body could not be received.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// It is larger than `max_body`.
    #[error("the request body is larger than max_body ({0} bytes)")]
    TooLarge(u64),
    /// The client sent a broken body or went away.
    #[error("reading the request body failed: {0}")]
    Client(#[from] hyper::Error),
    /// The temporary file could not be written.
    #[error("cannot buffer the request body in a temporary file: {0}")]
    Spill(#[from] std::io::Error),
}

impl RequestBody {
    /// The body's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            RequestBody::Memory(bytes) => bytes.len() as u64,
            RequestBody::File { len, .. } => *len,
        }
    }

    /// True for an empty body.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` bytes from `offset`; empty at the end.
    ///
    /// A file read here is a page-cache read of a file this process has just written, a few
    /// microseconds, so it is done in place rather than on a blocking thread.
    pub fn read_at(&self, offset: u64, max: usize) -> std::io::Result<Bytes> {
        let remaining = self.len().saturating_sub(offset);
        let size = usize::try_from(remaining).unwrap_or(usize::MAX).min(max);
        match self {
            RequestBody::Memory(bytes) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                Ok(bytes.slice(start..start + size))
            }
            RequestBody::File { file, .. } => {
                let mut buffer = vec![0; size];
                let mut filled = 0;
                while filled < size {
                    let read = file.read_at(&mut buffer[filled..], offset + filled as u64)?;
                    if read == 0 {
                        break;
                    }
                    filled += read;
                }
                buffer.truncate(filled);
                Ok(Bytes::from(buffer))
            }
        }
    }
}

/// Receives `body` completely. `max_body` of 0 means no limit.
pub async fn receive(
    mut body: Incoming,
    max_body: u64,
    memory_limit: u64,
) -> Result<RequestBody, BodyError> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total: u64 = 0;
    let mut file: Option<File> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if max_body > 0 && total > max_body {
            return Err(BodyError::TooLarge(max_body));
        }
        if let Some(file) = &mut file {
            // Page-cache writes of a few kilobytes: cheaper in place than on a blocking thread.
            file.write_all(&data)?;
        } else if total > memory_limit {
            let mut spill = tempfile::tempfile()?;
            for chunk in chunks.drain(..) {
                spill.write_all(&chunk)?;
            }
            spill.write_all(&data)?;
            file = Some(spill);
        } else {
            chunks.push(data);
        }
    }
    if let Some(file) = file {
        return Ok(RequestBody::File { file, len: total });
    }
    Ok(RequestBody::Memory(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut joined = BytesMut::with_capacity(usize::try_from(total).unwrap_or(0));
            for chunk in chunks {
                joined.extend_from_slice(&chunk);
            }
            joined.freeze()
        }
    }))
}
