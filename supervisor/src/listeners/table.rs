//! The fd table: every listening socket of a supervisor, by [`Role`] and address. An upgrade
//! fills one with duplicates of the sockets in use, describes it to the successor as [`Row`]s
//! (the descriptors themselves cross `exec` by inheritance), and the successor reads it back
//! ([`FdTable::from_rows`]) and takes out the socket of each address its config still names —
//! adopting it instead of binding, so no connection is refused — closing the rest.
//!
//! The table only holds descriptors; binding and adopting are `bind`'s, spawning the successor
//! and the environment variable that carries the rows are `supervisor::upgrade`'s.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use proxy_conf::Listen;
use serde::{Deserialize, Serialize};

use super::bind::{BindError, Listener, Options, adopt, bind};

/// What a listening socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A `[web].listen` address of the HTTP front.
    Web,
    /// The `[metrics].listen` endpoint.
    Metrics,
    /// The control socket.
    Control,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Web => "web",
            Role::Metrics => "metrics",
            Role::Control => "control",
        })
    }
}

/// Listening sockets by role and address; at most one per pair.
#[derive(Debug, Default)]
pub struct FdTable {
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    role: Role,
    address: Listen,
    fd: OwnedFd,
}

impl FdTable {
    /// Adds `fd` as `role`'s socket for `address`, closing any it replaces.
    pub fn insert(&mut self, role: Role, address: Listen, fd: OwnedFd) {
        drop(self.take(role, &address));
        self.entries.push(Entry { role, address, fd });
    }

    /// Takes `role`'s socket for `address` out of the table.
    pub fn take(&mut self, role: Role, address: &Listen) -> Option<OwnedFd> {
        let index = self
            .entries
            .iter()
            .position(|entry| entry.role == role && entry.address == *address)?;
        Some(self.entries.remove(index).fd)
    }

    /// Takes every socket of `role` out of the table, in the order they were added.
    pub fn take_role(&mut self, role: Role) -> Vec<(Listen, OwnedFd)> {
        let (taken, kept) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|entry| entry.role == role);
        self.entries = kept;
        taken
            .into_iter()
            .map(|entry: Entry| (entry.address, entry.fd))
            .collect()
    }

    /// Moves every socket of `other` into this table.
    pub fn append(&mut self, other: FdTable) {
        for entry in other.entries {
            self.insert(entry.role, entry.address, entry.fd);
        }
    }

    /// How many sockets the table holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A listener for each of `addresses` (in order), all for `options.role`: the socket this
    /// table holds for the address, adopted, else a new one bound with `options`. Must be called
    /// inside a tokio runtime.
    pub fn open_all(
        &mut self,
        addresses: &[Listen],
        options: &Options,
    ) -> Result<Vec<Listener>, BindError> {
        addresses
            .iter()
            .map(|address| {
                match self.take(options.role, address) {
                    Some(fd) => adopt(address, fd),
                    None => bind(address, options),
                }
                .map_err(|error| BindError {
                    address: address.clone(),
                    error,
                })
            })
            .collect()
    }

    /// The table as it is described to a successor that inherits its descriptors. The numbers
    /// stay valid while the table lives.
    pub fn rows(&self) -> Vec<Row> {
        self.entries
            .iter()
            .map(|entry| Row {
                role: entry.role,
                address: entry.address.clone(),
                fd: entry.fd.as_raw_fd(),
            })
            .collect()
    }

    /// Reads a table back from the rows its predecessor described, claiming each descriptor
    /// ([`claim_inherited`]).
    ///
    /// # Safety
    ///
    /// As for [`claim_inherited`], for every row; no two rows may name the same descriptor.
    pub unsafe fn from_rows(rows: Vec<Row>) -> Result<FdTable, ClaimError> {
        let mut table = FdTable::default();
        for row in rows {
            // SAFETY: the caller vouches for every row.
            let fd = unsafe { claim_inherited(row.fd) }?;
            table.insert(row.role, row.address, fd);
        }
        Ok(table)
    }
}

/// One socket of a table, as the successor is told about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// What the socket is for.
    pub role: Role,
    /// The address as configured (port 0 stays 0: it is what the successor's config says).
    #[serde(with = "address")]
    pub address: Listen,
    /// The descriptor's number, the same in the successor.
    pub fd: RawFd,
}

/// A descriptor named as inherited is not open in this process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("descriptor {fd} was not inherited")]
pub struct ClaimError {
    /// The number.
    pub fd: RawFd,
}

/// Takes ownership of descriptor `fd`, inherited across `exec`, and makes it close-on-exec again
/// so that no worker or program inherits it in turn. Fails when `fd` is not open or is one of
/// the standard streams.
///
/// # Safety
///
/// Nothing else in this process may own or use `fd`: the predecessor handed it to this process
/// alone, and it is claimed at most once.
pub unsafe fn claim_inherited(fd: RawFd) -> Result<OwnedFd, ClaimError> {
    // SAFETY: fcntl on a number only inspects and flags it; an fd that is not open fails with
    // EBADF, which is reported instead of adopting a stranger.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
        return Err(ClaimError { fd });
    }
    // SAFETY: open (checked above) and nobody else's, as the caller guarantees.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A [`Listen`] on the wire: `{"tcp": "127.0.0.1:8000"}` or `{"unix": "/run/app.sock"}`, so that
/// neither side parses `unix:` text and a path needs no validation it already passed.
mod address {
    use super::{Listen, Path, PathBuf, SocketAddr};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize)]
    #[serde(rename_all = "snake_case")]
    enum Borrowed<'a> {
        Tcp(&'a SocketAddr),
        Unix(&'a Path),
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Owned {
        Tcp(SocketAddr),
        Unix(PathBuf),
    }

    pub fn serialize<S: Serializer>(listen: &Listen, serializer: S) -> Result<S::Ok, S::Error> {
        match listen {
            Listen::Tcp(address) => Borrowed::Tcp(address),
            Listen::Unix(path) => Borrowed::Unix(path),
        }
        .serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Listen, D::Error> {
        Ok(match Owned::deserialize(deserializer)? {
            Owned::Tcp(address) => Listen::Tcp(address),
            Owned::Unix(path) => Listen::Unix(path),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::listeners::{bind_tcp, bind_unix};

    fn tcp(text: &str) -> Listen {
        Listen::Tcp(text.parse().expect("address"))
    }

    #[test]
    fn rows_are_plain_json_by_role_and_address() {
        let row = Row {
            role: Role::Web,
            address: Listen::Unix("/run/app; odd=name.sock".into()),
            fd: 11,
        };
        let text = serde_json::to_string(&row).expect("serialize");
        assert_eq!(
            text,
            r#"{"role":"web","address":{"unix":"/run/app; odd=name.sock"},"fd":11}"#
        );
        assert_eq!(serde_json::from_str::<Row>(&text).expect("parse"), row);
        let metrics = Row {
            role: Role::Metrics,
            address: tcp("[::1]:0"),
            fd: 9,
        };
        let text = serde_json::to_string(&metrics).expect("serialize");
        assert_eq!(
            text,
            r#"{"role":"metrics","address":{"tcp":"[::1]:0"},"fd":9}"#
        );
        assert_eq!(serde_json::from_str::<Row>(&text).expect("parse"), metrics);
    }

    #[tokio::test]
    async fn the_table_round_trips_to_a_successor_that_adopts_every_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let web_unix = Listen::Unix(dir.path().join("web.sock"));
        let control = Listen::Unix(dir.path().join("control.sock"));
        let web_tcp = tcp("127.0.0.1:0");
        let options = Options::new(Role::Web, 16);
        let web = bind_tcp("127.0.0.1:0".parse().expect("address"), &options).expect("bind");
        let web_port = web.local_addr().expect("address");
        let unix = bind(&web_unix, &options).expect("bind");
        let control_socket =
            bind_unix(dir.path().join("control.sock").as_path(), &options).expect("bind");

        let mut table = FdTable::default();
        let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().expect("dup");
        table.insert(Role::Web, web_tcp.clone(), dup(web.as_fd()));
        table.insert(Role::Web, web_unix.clone(), dup(unix.as_fd()));
        table.insert(Role::Control, control.clone(), dup(control_socket.as_fd()));
        assert_eq!(table.len(), 3);

        let text = serde_json::to_string(&table.rows()).expect("serialize");
        // What exec does to the old side's descriptors: the successor owns the same numbers.
        std::mem::forget(table);
        let rows: Vec<Row> = serde_json::from_str(&text).expect("parse");
        // SAFETY: the numbers were the forgotten table's, so nothing else owns them.
        let mut inherited = unsafe { FdTable::from_rows(rows) }.expect("claim");
        assert_eq!(inherited.len(), 3);

        assert!(
            inherited.take(Role::Web, &control).is_none(),
            "role and address together are the key"
        );
        let control_fd = inherited.take(Role::Control, &control).expect("control");
        crate::listeners::adopt_unix(control_fd).expect("adopt the control socket");

        // The successor's config keeps the TCP address, adds one and drops the Unix one.
        let new = Listen::Tcp("127.0.0.1:0".parse().expect("address"));
        let wanted = [web_tcp.clone(), new];
        let listeners = inherited
            .open_all(&wanted[..1], &options)
            .expect("adopt the web socket");
        assert_eq!(listeners[0].address(), web_port.to_string());
        let bound = inherited
            .open_all(&wanted[1..], &options)
            .expect("bind the new one");
        assert_ne!(bound[0].address(), web_port.to_string());
        let left: Vec<Listen> = inherited
            .take_role(Role::Web)
            .into_iter()
            .map(|(address, _)| address)
            .collect();
        assert_eq!(left, [web_unix]);
        assert!(inherited.is_empty());

        // The adopted socket is the old one: a client of the old address reaches it.
        let client = std::net::TcpStream::connect(web_port).expect("connect");
        let Listener::Tcp(adopted) = &listeners[0] else {
            panic!("a TCP listener");
        };
        let (_, peer) = adopted.accept().await.expect("accept");
        assert_eq!(peer, client.local_addr().expect("address"));
    }

    #[test]
    fn inserting_the_same_key_twice_keeps_the_last() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (a, b) = (OwnedFd::from(a), OwnedFd::from(b));
        let b_raw = b.as_raw_fd();
        let mut table = FdTable::default();
        table.insert(Role::Metrics, tcp("127.0.0.1:9808"), a);
        table.insert(Role::Metrics, tcp("127.0.0.1:9808"), b);
        assert_eq!(table.len(), 1);
        assert_eq!(table.rows()[0].fd, b_raw);
        let mut other = FdTable::default();
        let (c, _d) = std::os::unix::net::UnixStream::pair().expect("pair");
        other.insert(Role::Web, tcp("127.0.0.1:9808"), OwnedFd::from(c));
        table.append(other);
        assert_eq!(
            table.len(),
            2,
            "the same address in another role is another socket"
        );
    }

    #[test]
    fn only_open_descriptors_beyond_the_standard_streams_are_claimed() {
        for fd in [0, 1, 2, -1] {
            // SAFETY: refused before anything is owned.
            assert_eq!(
                unsafe { claim_inherited(fd) }.expect_err("refused"),
                ClaimError { fd }
            );
        }
        // A number far above anything this test process has open.
        // SAFETY: not open, so refused before anything is owned.
        let error = unsafe { claim_inherited(1_000_000) }.expect_err("not open");
        assert_eq!(error.to_string(), "descriptor 1000000 was not inherited");

        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let raw = std::os::fd::IntoRawFd::into_raw_fd(a);
        // Clear close-on-exec, as the old supervisor does in the successor before exec.
        // SAFETY: `raw` is ours (released above); the flag change is all this does.
        assert_ne!(unsafe { libc::fcntl(raw, libc::F_SETFD, 0) }, -1);
        // SAFETY: released by `into_raw_fd` above and claimed once.
        let claimed = unsafe { claim_inherited(raw) }.expect("claimed");
        let flags =
            nix::fcntl::fcntl(claimed.as_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "close-on-exec again");
    }
}
