//! The client side of the control socket, for the CLI: blocking, since `status`, `stop` and
//! `reload` do nothing else while they wait. It connects, sends one request line and reads
//! response lines until the final one.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, connect as connect_fd, socket,
};

use super::protocol::{Request, Response, ResponseBody, request_line};
use super::{ControlError, MAX_SOCKET_PATH};

/// Sends `request` to the supervisor listening on `path` and returns its response lines.
///
/// `timeout` bounds the wait for *each* line (not the whole exchange: a reload may take minutes
/// while sending progress); `None` waits as long as it takes. A missing socket, or one nobody
/// listens on, is [`ControlError::NotRunning`].
pub fn request(
    path: &Path,
    request: &Request,
    timeout: Option<Duration>,
) -> Result<Replies, ControlError> {
    let mut stream = connect(path)?;
    let io_error = |action| {
        move |source| ControlError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    stream
        .set_read_timeout(timeout)
        .map_err(io_error("cannot set a timeout on the control socket"))?;
    stream
        .set_write_timeout(timeout)
        .map_err(io_error("cannot set a timeout on the control socket"))?;
    let mut line = request_line(request).map_err(|error| ControlError::Protocol {
        path: path.to_owned(),
        message: format!("cannot encode the request: {error}"),
    })?;
    line.push('\n');
    match stream.write_all(line.as_bytes()) {
        Ok(()) => {}
        // The supervisor answered and closed early (a refusal, say): its answer is still
        // readable, and more useful than "broken pipe".
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(error) => {
            return Err(io_error("cannot send the request to the supervisor on")(
                error,
            ));
        }
    }
    Ok(Replies {
        reader: BufReader::new(stream),
        path: path.to_owned(),
        timeout,
        finished: false,
    })
}

/// The response lines of one request, up to and including the final one.
#[derive(Debug)]
pub struct Replies {
    reader: BufReader<UnixStream>,
    path: PathBuf,
    timeout: Option<Duration>,
    finished: bool,
}

impl Replies {
    /// Reads every line, handing each progress message to `progress`, and returns the final
    /// line (whose body is `Ok` or `Error`).
    pub fn wait(mut self, mut progress: impl FnMut(&str)) -> Result<Response, ControlError> {
        loop {
            let response = match self.next() {
                Some(response) => response?,
                None => {
                    return Err(ControlError::Closed { path: self.path });
                }
            };
            match &response.body {
                ResponseBody::Progress { message } => progress(message),
                _ => return Ok(response),
            }
        }
    }

    fn read_line(&mut self) -> Result<Response, ControlError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(ControlError::Closed {
                path: self.path.clone(),
            }),
            Ok(_) => serde_json::from_str(&line).map_err(|error| ControlError::Protocol {
                path: self.path.clone(),
                message: format!("{error}: {:?}", line.trim_end()),
            }),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(ControlError::Timeout {
                    path: self.path.clone(),
                    after: self.timeout.unwrap_or_default(),
                })
            }
            Err(source) => Err(ControlError::Io {
                action: "cannot read the answer from the supervisor on",
                path: self.path.clone(),
                source,
            }),
        }
    }
}

impl Iterator for Replies {
    type Item = Result<Response, ControlError>;

    /// The next line; after the final line or an error, `None`.
    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let result = self.read_line();
        self.finished = match &result {
            Ok(response) => response.body.is_final(),
            Err(_) => true,
        };
        Some(result)
    }
}

/// Connects to the control socket at `path`, telling "nobody runs" apart from other failures.
///
/// The connect is non-blocking so that a supervisor whose listen queue is full cannot hang the
/// caller (a blocking Unix connect would wait for room); the stream is blocking afterwards.
fn connect(path: &Path) -> Result<UnixStream, ControlError> {
    let address = socket_address(path)?;
    let io_error = |action, errno: Errno| ControlError::Io {
        action,
        path: path.to_owned(),
        source: errno.into(),
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|errno| io_error("cannot create a socket to connect to", errno))?;
    match connect_fd(fd.as_raw_fd(), &address) {
        Ok(()) => {}
        Err(Errno::ENOENT | Errno::ENOTDIR) => {
            return Err(ControlError::NotRunning {
                path: path.to_owned(),
                stale: false,
            });
        }
        Err(Errno::ECONNREFUSED) => {
            return Err(ControlError::NotRunning {
                path: path.to_owned(),
                stale: true,
            });
        }
        Err(errno @ Errno::EACCES) => {
            return Err(io_error(
                "permission denied: only root and the supervisor's user may use",
                errno,
            ));
        }
        Err(errno @ Errno::EAGAIN) => {
            return Err(io_error(
                "the supervisor is not accepting connections (its queue is full) on",
                errno,
            ));
        }
        Err(errno) => return Err(io_error("cannot connect to the control socket", errno)),
    }
    let stream = UnixStream::from(fd);
    stream
        .set_nonblocking(false)
        .map_err(|source| ControlError::Io {
            action: "cannot configure the connection to",
            path: path.to_owned(),
            source,
        })?;
    Ok(stream)
}

/// The socket address of `path`, or why it cannot be one.
fn socket_address(path: &Path) -> Result<UnixAddr, ControlError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ControlError::PathTooLong {
            path: path.to_owned(),
        });
    }
    UnixAddr::new(path).map_err(|errno| ControlError::Io {
        action: "invalid control socket path",
        path: path.to_owned(),
        source: errno.into(),
    })
}
