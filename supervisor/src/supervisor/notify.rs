//! systemd's readiness protocol (`sd_notify`), written by hand: one `AF_UNIX` datagram of
//! `KEY=VALUE` lines to `$NOTIFY_SOCKET`, which is a filesystem path (`/run/systemd/notify`) or a
//! Linux abstract address written `@name`. The `sd-notify` crate (0.5) passes `@name` to
//! `connect` as a path and fails with ENOENT, hence this module.
//!
//! It owns the wire format, the environment variables systemd sets for the service, and the
//! watchdog interval derived from them. It does not decide *when* to notify: the main loop sends
//! `READY=1` once every role has started, pings the watchdog from its own `select!` (so a hung
//! loop stops pinging and systemd restarts it), and brackets reloads with
//! [`Notifier::reloading`] and [`Notifier::ready`].
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd, or `Type=simple`) every method is a no-op.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// The variables systemd sets for the service that describe its notification channel. Children
/// must not inherit them: a Celery worker that found `NOTIFY_SOCKET` could tell systemd it is
/// ready (with `NotifyAccess=all`) on the supervisor's behalf, and a `WATCHDOG_USEC` without the
/// matching `WATCHDOG_PID` would make a child believe it must ping.
const SYSTEMD_VARIABLES: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Where notifications go.
#[derive(Debug)]
enum Target {
    /// Not run under a service manager that listens: notifications are dropped.
    None,
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract socket; the name without the leading `@`.
    Abstract(Vec<u8>),
    /// `$NOTIFY_SOCKET` had a form this module cannot send to (`vsock:…`, a relative path);
    /// every send fails with this text so the caller's log says why systemd heard nothing.
    Unsupported(String),
}

/// Sends state changes to systemd. Cheap to call; a send never blocks (a full receiver queue is
/// reported as an error instead of stalling the main loop).
#[derive(Debug)]
pub struct Notifier {
    target: Target,
    /// The unbound datagram socket every notification is sent from, created on first need.
    socket: Option<UnixDatagram>,
    watchdog: Option<Duration>,
    /// `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` as systemd gave them (when the watchdog was meant
    /// for us), handed on to the process that takes over in an upgrade.
    successor_env: Vec<(&'static str, OsString)>,
    /// While set, nothing is sent: an upgrade's successor is not the main process yet, and
    /// systemd (`NotifyAccess=main`) would reject and log every message.
    muted: bool,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` and removes them from this
    /// process's environment, so that no program or worker spawned later inherits them.
    ///
    /// # Safety
    ///
    /// Must be called while the process has exactly one thread: in `main`, before the tokio
    /// runtime (or anything else that starts threads) is built. Changing the environment while
    /// another thread may read it (`getenv` inside libc's DNS resolver, for one) is undefined
    /// behaviour, which is why `std::env::remove_var` is `unsafe` since Rust 2024. Removing the
    /// variables once here, rather than `env_remove` on every `Command`, means no spawn site can
    /// forget it.
    pub unsafe fn from_env_take() -> Notifier {
        let [socket, usec, pid] = SYSTEMD_VARIABLES.map(std::env::var_os);
        for name in SYSTEMD_VARIABLES {
            // SAFETY: the caller guarantees that this thread is the only one (see above).
            unsafe { std::env::remove_var(name) };
        }
        Notifier::from_values(
            socket.as_deref(),
            usec.as_deref(),
            pid.as_deref(),
            std::process::id(),
        )
    }

    /// A notifier built from the three variables' values, for a process whose pid is `our_pid`.
    fn from_values(
        socket: Option<&OsStr>,
        watchdog_usec: Option<&OsStr>,
        watchdog_pid: Option<&OsStr>,
        our_pid: u32,
    ) -> Notifier {
        let watchdog = watchdog_interval(watchdog_usec, watchdog_pid, our_pid);
        let mut successor_env = Vec::new();
        if let Some(socket) = socket.filter(|socket| !socket.is_empty()) {
            successor_env.push(("NOTIFY_SOCKET", socket.to_owned()));
        }
        if let (Some(usec), Some(_)) = (watchdog_usec, watchdog) {
            // Without WATCHDOG_PID: the successor's pid is not known before it runs, and
            // systemd's convention is that an absent WATCHDOG_PID means "for you".
            successor_env.push(("WATCHDOG_USEC", usec.to_owned()));
        }
        Notifier {
            target: parse_target(socket),
            socket: None,
            watchdog,
            successor_env,
            muted: false,
        }
    }

    /// The systemd variables a successor started by `upgrade` needs to speak to systemd in our
    /// place once it is the main process: `NOTIFY_SOCKET`, and `WATCHDOG_USEC` when the watchdog
    /// was ours (never `WATCHDOG_PID`, which names us).
    pub fn successor_env(&self) -> &[(&'static str, OsString)] {
        &self.successor_env
    }

    /// `MAINPID=…` with a `STATUS=`: systemd should track `pid` as the service's main process
    /// from now on (the successor of an upgrade). Only the current main process may send it.
    pub fn main_pid(&mut self, pid: u32, status: &str) -> io::Result<()> {
        self.send(&format!("MAINPID={pid}\nSTATUS={}", one_line(status)))
    }

    /// Holds (`true`) or releases every notification; see the `muted` field.
    pub fn set_muted(&mut self, muted: bool) {
        self.muted = muted;
    }

    /// Whether notifications go anywhere (`$NOTIFY_SOCKET` was set).
    pub fn is_enabled(&self) -> bool {
        !matches!(self.target, Target::None)
    }

    /// `READY=1`: startup finished, or a reload finished.
    pub fn ready(&mut self) -> io::Result<()> {
        self.send("READY=1")
    }

    /// `RELOADING=1` with `MONOTONIC_USEC` (in the same datagram, as `Type=notify-reload`
    /// requires): a reload starts. Must be followed by [`Notifier::ready`] when it is done, also
    /// when it failed and the old generation keeps serving.
    pub fn reloading(&mut self) -> io::Result<()> {
        let now = clock_gettime(ClockId::CLOCK_MONOTONIC).map_err(io::Error::from)?;
        let usec = Duration::from(now).as_micros();
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"))
    }

    /// `STOPPING=1`: shutdown begins (final since systemd 259).
    pub fn stopping(&mut self) -> io::Result<()> {
        self.send("STOPPING=1")
    }

    /// `STATUS=…`: free-form text shown by `systemctl status`. Line breaks become spaces, since a
    /// newline would start a new assignment.
    pub fn status(&mut self, text: &str) -> io::Result<()> {
        self.send(&format!("STATUS={}", one_line(text)))
    }

    /// `WATCHDOG=1`: the keep-alive ping; send it every [`Notifier::watchdog_interval`].
    pub fn watchdog(&mut self) -> io::Result<()> {
        self.send("WATCHDOG=1")
    }

    /// How often to ping: half of `$WATCHDOG_USEC` (as `sd_watchdog_enabled(3)` advises) when
    /// systemd set it for this process (`$WATCHDOG_PID` unset or our pid); `None` otherwise.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one datagram.
    fn send(&mut self, payload: &str) -> io::Result<()> {
        if self.muted {
            return Ok(());
        }
        let address = match &self.target {
            Target::None => return Ok(()),
            Target::Unsupported(message) => {
                return Err(io::Error::new(io::ErrorKind::Unsupported, message.clone()));
            }
            Target::Path(path) => SocketAddr::from_pathname(path)?,
            Target::Abstract(name) => SocketAddr::from_abstract_name(name)?,
        };
        let socket = match &mut self.socket {
            Some(socket) => socket,
            empty => {
                let socket = UnixDatagram::unbound()?;
                socket.set_nonblocking(true)?;
                empty.insert(socket)
            }
        };
        socket
            .send_to_addr(payload.as_bytes(), &address)
            .map(drop)
            .map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("sd_notify to {}: {error}", describe(&self.target)),
                )
            })
    }
}

/// `text` with line breaks made spaces, so it stays one assignment.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect()
}

/// Reads `$NOTIFY_SOCKET`.
fn parse_target(value: Option<&OsStr>) -> Target {
    let Some(value) = value.filter(|value| !value.is_empty()) else {
        return Target::None;
    };
    match value.as_bytes() {
        [b'@', name @ ..] => Target::Abstract(name.to_vec()),
        [b'/', ..] => Target::Path(PathBuf::from(value)),
        _ => Target::Unsupported(format!(
            "NOTIFY_SOCKET={} is not supported: only an absolute path or @abstract name is \
             (systemd uses /run/systemd/notify)",
            value.to_string_lossy()
        )),
    }
}

/// Names the target in error messages.
fn describe(target: &Target) -> String {
    match target {
        Target::Path(path) => path.display().to_string(),
        Target::Abstract(name) => format!("@{}", String::from_utf8_lossy(name)),
        Target::None | Target::Unsupported(_) => String::from("NOTIFY_SOCKET"),
    }
}

/// Half the watchdog timeout, when the watchdog is meant for `our_pid`.
fn watchdog_interval(usec: Option<&OsStr>, pid: Option<&OsStr>, our_pid: u32) -> Option<Duration> {
    let for_us = match pid {
        None => true,
        Some(pid) => pid.to_str().and_then(|pid| pid.parse::<u32>().ok()) == Some(our_pid),
    };
    let usec: u64 = usec?.to_str()?.parse().ok()?;
    (for_us && usec > 0).then(|| Duration::from_micros(usec) / 2)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn notifier_for(socket: &str) -> Notifier {
        Notifier::from_values(Some(OsStr::new(socket)), None, None, 1)
    }

    fn received(receiver: &UnixDatagram) -> String {
        let mut buffer = [0u8; 4096];
        let length = receiver.recv(&mut buffer).expect("a datagram within 5 s");
        String::from_utf8(buffer[..length].to_vec()).expect("UTF-8 payload")
    }

    fn check_sequence(receiver: &UnixDatagram, notifier: &mut Notifier) {
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        notifier.ready().expect("ready");
        assert_eq!(received(receiver), "READY=1");

        let before = Duration::from(clock_gettime(ClockId::CLOCK_MONOTONIC).expect("clock"));
        notifier.reloading().expect("reloading");
        let after = Duration::from(clock_gettime(ClockId::CLOCK_MONOTONIC).expect("clock"));
        let payload = received(receiver);
        let usec = payload
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("unexpected reload payload {payload:?}"));
        let usec: u128 = usec.parse().expect("decimal microseconds");
        assert!(
            (before.as_micros()..=after.as_micros()).contains(&usec),
            "{usec} µs is not between {before:?} and {after:?}"
        );

        notifier.ready().expect("ready");
        assert_eq!(received(receiver), "READY=1");
        notifier
            .status("serving 4 workers\nline two")
            .expect("status");
        assert_eq!(received(receiver), "STATUS=serving 4 workers line two");
        notifier.watchdog().expect("watchdog");
        assert_eq!(received(receiver), "WATCHDOG=1");
        notifier.stopping().expect("stopping");
        assert_eq!(received(receiver), "STOPPING=1");
        notifier.main_pid(4242, "handed\nover").expect("main pid");
        assert_eq!(received(receiver), "MAINPID=4242\nSTATUS=handed over");
    }

    #[test]
    fn sequence_reaches_a_path_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).expect("bind receiver");
        let mut notifier = notifier_for(path.to_str().expect("UTF-8 temp path"));
        assert!(notifier.is_enabled());
        check_sequence(&receiver, &mut notifier);
    }

    #[test]
    fn sequence_reaches_an_abstract_socket() {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "sauna-notify-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let address = SocketAddr::from_abstract_name(name.as_bytes()).expect("address");
        let receiver = UnixDatagram::bind_addr(&address).expect("bind abstract receiver");
        let mut notifier = notifier_for(&format!("@{name}"));
        check_sequence(&receiver, &mut notifier);
    }

    #[test]
    fn without_notify_socket_everything_is_a_no_op() {
        let mut notifier = Notifier::from_values(None, None, None, 1);
        assert!(!notifier.is_enabled());
        notifier.ready().expect("no-op");
        notifier.reloading().expect("no-op");
        notifier.stopping().expect("no-op");
        assert_eq!(notifier.watchdog_interval(), None);
    }

    #[test]
    fn a_missing_receiver_is_an_error_naming_the_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gone");
        let mut notifier = notifier_for(path.to_str().expect("UTF-8 temp path"));
        let error = notifier.ready().expect_err("nobody listens");
        assert!(error.to_string().contains("gone"), "{error}");
    }

    #[test]
    fn unsupported_addresses_fail_with_the_reason() {
        let mut notifier = notifier_for("vsock:2:1234");
        assert!(notifier.is_enabled());
        let error = notifier.ready().expect_err("vsock is not supported");
        assert_eq!(error.kind(), io::ErrorKind::Unsupported);
        assert!(error.to_string().contains("vsock:2:1234"), "{error}");
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_our_pid_only() {
        let os = |value: &'static str| Some(OsStr::new(value));
        let half = Some(Duration::from_secs(15));
        assert_eq!(watchdog_interval(os("30000000"), None, 7), half);
        assert_eq!(watchdog_interval(os("30000000"), os("7"), 7), half);
        assert_eq!(watchdog_interval(os("30000000"), os("8"), 7), None);
        assert_eq!(watchdog_interval(os("30000000"), os("x"), 7), None);
        assert_eq!(watchdog_interval(os("0"), None, 7), None);
        assert_eq!(watchdog_interval(os("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, os("7"), 7), None);
    }

    #[test]
    fn a_successor_gets_the_socket_and_our_watchdog_but_never_our_pid() {
        let os = |value: &'static str| Some(OsStr::new(value));
        let ours = Notifier::from_values(os("/run/n"), os("30000000"), os("7"), 7);
        let names: Vec<_> = ours
            .successor_env()
            .iter()
            .map(|(name, value)| format!("{name}={}", value.to_string_lossy()))
            .collect();
        assert_eq!(names, ["NOTIFY_SOCKET=/run/n", "WATCHDOG_USEC=30000000"]);
        let not_ours = Notifier::from_values(os("/run/n"), os("30000000"), os("8"), 7);
        assert_eq!(not_ours.successor_env().len(), 1);
        assert!(
            Notifier::from_values(None, None, None, 7)
                .successor_env()
                .is_empty()
        );
    }
}
