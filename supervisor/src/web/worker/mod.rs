//! One worker process from spawn to exit: the channels it inherits, the ready handshake, the
//! Python stack dump before a kill, and the report of how it ended. It owns the process, not the
//! decisions: when to start, recycle or replace a worker is the pool's (`crate::web::pool`), which
//! requests it serves is the dispatcher's (`crate::web::dispatch`), and what goes over a request slot
//! is the front's (`crate::web::front`).
//!
//! Descriptors a worker inherits (see `shim.py`):
//! - **3, the control channel**, a socketpair. The supervisor writes the shim's source into it
//!   and shuts its writing side, so the bootstrap `python -c` reads the program until EOF (no
//!   temporary file that could be swapped or cleaned away). The shim answers with one `Ready`
//!   frame after the app imported, or `Failed` with the traceback. Afterwards faulthandler is
//!   registered on SIGUSR2 with this descriptor as its file: a stack dump of a stuck worker is
//!   written by the C signal handler even while Python code holds the GIL or sleeps in C.
//! - **4 … 4+threads-1, the request slots**, one socketpair each, one request at a time each.
//! - **4+threads … 4+2·threads-1, the slots' offer eventfds** and **4+2·threads, the memfd of
//!   their offer regions** (`offer`): a request is copied into a region and announced on the
//!   eventfd, so a busy slot can be handed its next request before it finishes the current one.
//! - **5+2·threads … 4+3·threads, the slots' shared body rings** (`ring`, x86-64), one memfd
//!   each: big response chunks are copied there and announced on the slot instead of written
//!   into it.
//!
//! The descriptors of a worker forked by a preloaded template travel in one `SCM_RIGHTS` message
//! (at most 253 descriptors: 3·threads + 4), so preload allows up to 83 threads per worker.
//!
//! Readiness is the child's own word over its own channel (started ≠ ready): a worker that is
//! running but has not imported the app never receives a request.
//!
//! With `[web] preload` a worker is not spawned but forked by its generation's template
//! (`template`), with the same descriptors on the same numbers, so everything after the fork —
//! the handshake, requests, stack dumps, kills — is the same as for a spawned worker.

pub mod frame;
pub mod offer;
pub mod ring;
mod template;

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use proxy_conf::AppConfig;
use tokio::process::Child;
use tokio::sync::mpsc;

use crate::process::spawn::{self as child, ChildSpec};
use frame::{Channel, ChannelError, Kind, PROTOCOL};

/// The shim, compiled into the binary.
const SHIM: &str = include_str!("shim.py");

/// The program `python -c` runs: read the shim from descriptor 3 until EOF and execute it.
const BOOTSTRAP: &str =
    "import os;exec(compile(b''.join(iter(lambda:os.read(3,65536),b'')),'sauna-shim.py','exec'))";

/// First descriptor number of the request slots in the worker.
const FIRST_SLOT_FD: i32 = 4;
/// Descriptor number of the control channel in the worker.
const CONTROL_FD: i32 = 3;
/// Shared body ring (`ring`) per worker, split among its slots: a single-threaded worker's slot
/// holds 128 chunks of 64 KiB read ahead of the clients before the worker falls back to the
/// socket. The front releases the worker once a response is read ahead, so the ring holds the
/// unwritten responses of every client the slot served lately, not one: with 2 MiB, a 1 MiB
/// stream to 8 keep-alive clients per worker sent about 30 % of its chunks through the socket
/// (a kernel copy on each side, CPU the front and the worker lack under that load); with 8 MiB,
/// none. Pages are only touched by responses that stream big chunks, and hold what the front
/// would otherwise hold in its heap. Only on x86-64, whose memory ordering makes the shim's
/// plain loads of the release counter safe.
const RING_PER_WORKER: usize = if cfg!(target_arch = "x86_64") {
    8 << 20
} else {
    0
};
/// Largest and smallest ring of one slot.
const RING_MAX: usize = 8 << 20;
const RING_MIN: usize = 256 << 10;

/// The ring size of each of `threads` slots (a power of two), 0 for none.
fn ring_size(threads: usize) -> usize {
    if RING_PER_WORKER == 0 {
        return 0;
    }
    let share = RING_PER_WORKER / threads.max(1);
    // The largest power of two not above the share.
    let size = if share.is_power_of_two() {
        share
    } else {
        share.next_power_of_two() / 2
    };
    size.clamp(RING_MIN, RING_MAX)
}

/// Send buffer of a worker's end of a request slot.
const SLOT_SEND_BUFFER: usize = 1 << 20;
/// The signal faulthandler dumps the Python stack on (registered by the shim).
const STACK_SIGNAL: Signal = Signal::SIGUSR2;
/// A stack dump is complete when nothing more arrived for this long.
const STACK_QUIET: Duration = Duration::from_millis(200);
/// Longest wait for a stack dump before the kill goes ahead anyway.
const STACK_MAX: Duration = Duration::from_secs(3);

/// Identifies one worker process for the pool's whole life (never reused, unlike pids and slots).
pub type WorkerId = u64;

/// How to run the app: everything every worker of one generation shares.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The interpreter.
    pub python: PathBuf,
    /// Working directory, first on `sys.path`.
    pub directory: PathBuf,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// `wsgi` or `paste`.
    pub kind: &'static str,
    /// `module:callable` or `file.ini[#name]`.
    pub target: String,
    /// Request slots per worker.
    pub threads: usize,
    /// Longest time from spawn to `Ready`.
    pub start_timeout: Duration,
    /// With `[web] preload`: the generation's template, which imports the app once and forks
    /// every worker of the generation. It dies with the last `Launch` of its generation.
    pub template: Option<Arc<template::Template>>,
}

impl Launch {
    /// Resolves `[app]` against the directory of the config file. Symlinks in the directory and
    /// in the interpreter's directory are resolved now, once per generation: a release deployed
    /// as a `current` symlink runs the target it had when this generation was created, so that a
    /// reload picks up the new target while crash restarts and a rollback of the old generation
    /// keep running the old one. (The interpreter file itself is not resolved: a venv's `python`
    /// is a symlink whose own path tells Python where the venv is.)
    pub fn new(
        app: &AppConfig,
        base_dir: &Path,
        threads: NonZeroUsize,
        start_timeout: Duration,
    ) -> Result<Launch, String> {
        let directory = app_directory(app, base_dir);
        let python = app_python(app, base_dir);
        // proxy-conf guarantees a target whenever [web] is set; an `AppConfig` built by hand
        // may still lack one.
        let Some(target) = &app.target else {
            return Err(
                "[app] needs `wsgi = \"module:callable\"` or `paste = \"file.ini\"` to run a web pool".to_owned(),
            );
        };
        let (kind, target) = (target.kind(), target.value().to_owned());
        Ok(Launch {
            python,
            directory,
            env: app_env(app),
            kind,
            target,
            threads: threads.get(),
            start_timeout,
            template: None,
        })
    }

    /// This launch with `[web] preload`: workers are forked from one template per generation,
    /// each calling `post_fork` (`module:callable`) first when given.
    pub fn preloaded(mut self, post_fork: Option<String>) -> Launch {
        self.template = Some(Arc::new(template::Template::new(post_fork)));
        self
    }

    /// The pid of this generation's running template (`[web] preload`).
    pub fn template_pid(&self) -> Option<u32> {
        self.template.as_ref().and_then(|template| template.pid())
    }

    /// True when workers are forked from a template (`[web] preload`).
    pub fn preloads(&self) -> bool {
        self.template.is_some()
    }
}

/// `[app].directory` (else `base_dir`, the config file's directory) with its symlinks resolved
/// now; see [`Launch::new`]. A missing directory stays as written, so that what starts there
/// fails naming it.
pub fn app_directory(app: &AppConfig, base_dir: &Path) -> PathBuf {
    let directory = match &app.directory {
        Some(directory) => base_dir.join(directory),
        None => base_dir.to_path_buf(),
    };
    std::fs::canonicalize(&directory).unwrap_or(directory)
}

/// `[app].python` as the workers run it: a bare name (`python3`) is looked up on `PATH`; a path
/// is taken from `base_dir` with the symlinks in its directory resolved now, but not the file
/// itself (see [`Launch::new`]).
pub fn app_python(app: &AppConfig, base_dir: &Path) -> PathBuf {
    if !app.python.contains('/') {
        return PathBuf::from(&app.python);
    }
    let python = base_dir.join(&app.python);
    match (python.parent(), python.file_name()) {
        (Some(parent), Some(name)) => {
            std::fs::canonicalize(parent).map_or(python.clone(), |parent| parent.join(name))
        }
        _ => python,
    }
}

/// The environment a worker gets on top of the supervisor's: `[app].env` (with the `url_env`
/// secrets installed into it) and `PYTHONUNBUFFERED=1` unless the app sets it, so that what the
/// app prints reaches the log at once.
pub fn app_env(app: &AppConfig) -> BTreeMap<String, String> {
    let mut env = app.env.clone();
    env.entry("PYTHONUNBUFFERED".to_owned())
        .or_insert_with(|| "1".to_owned());
    env
}

/// Why a worker never became ready.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StartError {
    /// The process could not be started.
    #[error("cannot start the worker: {0}")]
    Spawn(String),
    /// The app failed to import; the Python traceback.
    #[error("the app failed to import:\n{0}")]
    Import(String),
    /// The process exited before reporting ready.
    #[error("the worker exited before it was ready ({0}); its output is in the log above")]
    Exited(String),
    /// It took longer than the start timeout.
    #[error("the worker did not report ready within {0:?}")]
    Timeout(Duration),
    /// The control channel carried something unexpected.
    #[error("the worker broke the handshake: {0}")]
    Protocol(String),
}

/// What a worker task reports to the pool.
#[derive(Debug)]
pub enum Event {
    /// The app is imported; the request slots are ready to use.
    Ready {
        /// The worker.
        id: WorkerId,
        /// Its pid.
        pid: u32,
        /// One per request slot.
        slots: Vec<RequestSlot>,
    },
    /// The worker never became ready; its process is gone.
    Failed {
        /// The worker.
        id: WorkerId,
        /// Why.
        error: StartError,
    },
    /// The Python stack of a worker about to be killed.
    Stack {
        /// The worker.
        id: WorkerId,
        /// faulthandler's dump.
        text: String,
    },
    /// A ready worker's process ended.
    Exited {
        /// The worker.
        id: WorkerId,
        /// "exit status 0", "signal 9 (SIGKILL)" …
        how: String,
    },
}

/// What the pool asks of a worker task.
#[derive(Debug)]
pub enum Command {
    /// Dump the Python stack (logged with `context`, e.g. the request that timed out), then SIGKILL.
    KillWithStack {
        /// What the worker was doing, for the log line.
        context: String,
    },
    /// SIGKILL now.
    Kill,
}

/// Starts the task that owns worker `id`; returns the sender of its commands. Dropping that
/// sender kills the worker.
pub fn spawn(
    id: WorkerId,
    label: String,
    launch: Arc<Launch>,
    events: mpsc::UnboundedSender<Event>,
) -> mpsc::UnboundedSender<Command> {
    let (commands, receiver) = mpsc::unbounded_channel();
    tokio::spawn(run(id, label, launch, events, receiver));
    commands
}

async fn run(
    id: WorkerId,
    label: String,
    launch: Arc<Launch>,
    events: mpsc::UnboundedSender<Event>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let outcome = match &launch.template {
        Some(template) => template.fork(&launch, &label).await,
        None => start(&launch, Mode::Serve, &label).await,
    };
    let mut started = match outcome {
        Ok(started) => started,
        Err(error) => {
            let _ = events.send(Event::Failed { id, error });
            return;
        }
    };
    let pid = started.pid;
    let slots = std::mem::take(&mut started.slots);
    let _ = events.send(Event::Ready { id, pid, slots });
    loop {
        tokio::select! {
            how = started.process.wait() => {
                let _ = events.send(Event::Exited { id, how });
                return;
            }
            command = commands.recv() => match command {
                Some(Command::KillWithStack { context }) => {
                    let text = dump_stack(pid, &mut started.control).await;
                    tracing::error!(worker = %label, pid, "{context}; killing the worker. Python stack:\n{text}");
                    let _ = events.send(Event::Stack { id, text });
                    signal_group(pid, Signal::SIGKILL);
                }
                Some(Command::Kill) | None => signal_group(pid, Signal::SIGKILL),
            },
        }
    }
}

fn signal_group(pid: u32, signal: Signal) {
    if let Err(error) = child::signal_group(pid, signal) {
        tracing::warn!(pid, "cannot send {signal} to worker: {error}");
    }
}

fn describe_exit(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => {
                let name = Signal::try_from(signal).map(|s| s.as_str()).unwrap_or("?");
                format!("signal {signal} ({name})")
            }
            _ => format!("{status}"),
        },
        Err(error) => format!("cannot wait for it: {error}"),
    }
}

/// A worker's process: spawned by the supervisor, or forked by a template (`[web] preload`).
enum Process {
    Spawned(Child),
    Forked(template::Forked),
}

impl Process {
    /// Waits for the process to end; how it ended.
    async fn wait(&mut self) -> String {
        match self {
            Process::Spawned(child) => describe_exit(child.wait().await),
            Process::Forked(forked) => forked.wait().await,
        }
    }
}

/// The front's ends of one request slot: its socket and its offer mailbox.
#[derive(Debug)]
pub struct RequestSlot {
    /// The slot's socket.
    pub channel: Channel,
    /// The slot's offers (`offer`).
    pub mailbox: offer::Mailbox,
}

/// A worker process that reported ready.
struct Started {
    process: Process,
    pid: u32,
    control: Channel,
    slots: Vec<RequestSlot>,
    /// The `Ready` frame's payload: `pid\0protocol\0python[\0…]`.
    ready: String,
}

/// What the shim is run for (its `mode` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Import the app and serve requests.
    Serve,
    /// Import the app, report, exit (`sauna-supervisor check`).
    Check,
    /// Import the app once for a generation and fork its workers (`template`).
    Template,
}

impl Mode {
    fn arg(self) -> &'static str {
        match self {
            Mode::Serve => "serve",
            Mode::Check => "check",
            Mode::Template => "template",
        }
    }
}

fn tokio_stream(
    stream: std::os::unix::net::UnixStream,
) -> Result<tokio::net::UnixStream, StartError> {
    stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream))
        .map_err(|error| StartError::Spawn(format!("cannot set up a worker channel: {error}")))
}

fn channel_error(error: std::io::Error) -> StartError {
    StartError::Spawn(format!("cannot create a worker channel: {error}"))
}

/// The descriptors of one worker before it runs: our ends, and theirs by the number they get.
struct Channels {
    control: std::os::unix::net::UnixStream,
    slots: Vec<std::os::unix::net::UnixStream>,
    mailboxes: Vec<offer::Mailbox>,
    rings: Vec<Arc<ring::Ring>>,
    ring_size: usize,
    /// `(their end, its number in the worker)`: control, slots, eventfds, offer memfd, rings.
    theirs: Vec<(OwnedFd, i32)>,
}

/// The descriptor number `FIRST_SLOT_FD + index` in the worker.
fn worker_fd(index: usize) -> i32 {
    FIRST_SLOT_FD + i32::try_from(index).unwrap_or(i32::MAX - FIRST_SLOT_FD)
}

impl Channels {
    /// The control channel, `slot_count` request slots and their rings.
    fn new(slot_count: usize) -> Result<Channels, StartError> {
        use std::os::unix::net::UnixStream;
        let (control, control_theirs) = UnixStream::pair().map_err(channel_error)?;
        let mut theirs: Vec<(OwnedFd, i32)> = vec![(OwnedFd::from(control_theirs), CONTROL_FD)];
        let mut slots = Vec::new();
        for index in 0..slot_count {
            let (ours, slot_theirs) = UnixStream::pair().map_err(channel_error)?;
            // A deeper send buffer lets a streaming response run ahead of the front by several
            // chunks instead of blocking the worker on every one (the kernel caps it at wmem_max).
            let _ = nix::sys::socket::setsockopt(
                &slot_theirs,
                nix::sys::socket::sockopt::SndBuf,
                &SLOT_SEND_BUFFER,
            );
            theirs.push((OwnedFd::from(slot_theirs), worker_fd(index)));
            slots.push(ours);
        }
        let mut mailboxes = Vec::new();
        if slot_count > 0 {
            let offers = offer::Mailboxes::new(slot_count).map_err(|error| {
                StartError::Spawn(format!(
                    "cannot create the request offer mailboxes: {error}"
                ))
            })?;
            for (index, fd) in offers.eventfds.into_iter().enumerate() {
                theirs.push((fd, worker_fd(slot_count + index)));
            }
            theirs.push((offers.memfd, worker_fd(2 * slot_count)));
            mailboxes = offers.ours;
        }
        // One ring per slot, passed after the mailboxes; without them (memfd refused) bodies go
        // through the sockets.
        let mut rings = Vec::new();
        let wanted_ring = ring_size(slot_count);
        if wanted_ring > 0 {
            for index in 0..slot_count {
                match ring::Ring::new(wanted_ring) {
                    Ok((ring, fd)) => {
                        theirs.push((fd, worker_fd(2 * slot_count + 1 + index)));
                        rings.push(ring);
                    }
                    Err(error) => {
                        tracing::warn!(
                            "cannot create a shared body ring, using the sockets: {error}"
                        );
                        theirs.truncate(theirs.len() - rings.len());
                        rings.clear();
                        break;
                    }
                }
            }
        }
        let ring_size = if rings.is_empty() { 0 } else { wanted_ring };
        Ok(Channels {
            control,
            slots,
            mailboxes,
            rings,
            ring_size,
            theirs,
        })
    }
}

/// Spawns the shim and waits for its `Ready` (modes `serve` and `template`) or its exit after
/// the import (`check`). A template also gets `extra` descriptors and `post_fork` as argument.
async fn start(launch: &Launch, mode: Mode, label: &str) -> Result<Started, StartError> {
    start_with(launch, mode, label, Vec::new(), None).await
}

async fn start_with(
    launch: &Launch,
    mode: Mode,
    label: &str,
    extra: Vec<(OwnedFd, i32)>,
    post_fork: Option<&str>,
) -> Result<Started, StartError> {
    use std::io::Write;
    let slot_count = if mode == Mode::Serve {
        launch.threads
    } else {
        0
    };
    let Channels {
        mut control,
        slots,
        mailboxes,
        rings,
        ring_size,
        mut theirs,
    } = Channels::new(slot_count)?;
    // The shim's source fits in the socket buffer, so this never blocks.
    control.write_all(SHIM.as_bytes()).map_err(channel_error)?;
    control
        .shutdown(std::net::Shutdown::Write)
        .map_err(channel_error)?;
    theirs.extend(extra);
    let mut argv = vec![
        launch.python.display().to_string(),
        "-c".to_owned(),
        BOOTSTRAP.to_owned(),
        PROTOCOL.to_string(),
        mode.arg().to_owned(),
        launch.kind.to_owned(),
        launch.target.clone(),
        // A template reserves the descriptor numbers of this many slots for its workers.
        if mode == Mode::Template {
            launch.threads
        } else {
            slot_count.max(1)
        }
        .to_string(),
        ring_size.to_string(),
    ];
    argv.extend(post_fork.map(str::to_owned));
    let spec = ChildSpec {
        argv,
        cwd: Some(launch.directory.clone()),
        env: launch.env.clone(),
        pass_fds: theirs,
        ..ChildSpec::default()
    };
    let mut child = child::spawn(spec).map_err(|error| StartError::Spawn(error.to_string()))?;
    child::capture_output(&mut child, label.to_owned());
    let pid = child.id().unwrap_or_default();
    let pending = Pending {
        process: Process::Spawned(child),
        pid,
        control: Channel::new(tokio_stream(control)?),
        slots,
        mailboxes,
        rings,
    };
    pending.handshake(mode, launch.start_timeout).await
}

/// A worker process that runs but has not reported ready yet.
struct Pending {
    process: Process,
    pid: u32,
    control: Channel,
    slots: Vec<std::os::unix::net::UnixStream>,
    mailboxes: Vec<offer::Mailbox>,
    rings: Vec<Arc<ring::Ring>>,
}

impl Pending {
    /// Waits for the `Ready` frame (or, in `check` mode, the exit after it) within `timeout`.
    async fn handshake(self, mode: Mode, timeout: Duration) -> Result<Started, StartError> {
        let Pending {
            mut process,
            pid,
            mut control,
            slots,
            mailboxes,
            rings,
        } = self;
        let deadline = Instant::now() + timeout;

        enum First {
            Frame(Result<Result<frame::Frame, ChannelError>, tokio::time::error::Elapsed>),
            Exit(String),
        }
        let first = tokio::select! {
            frame = tokio::time::timeout_at(deadline.into(), control.frame()) => First::Frame(frame),
            how = process.wait() => First::Exit(how),
        };
        let outcome = match first {
            First::Frame(frame) => frame,
            First::Exit(how) => {
                // The process ended first; its Ready or Failed frame may still be in the channel.
                return match control.frame().await {
                    Ok(frame) if frame.kind == Kind::Failed => Err(StartError::Import(
                        String::from_utf8_lossy(&frame.payload).into_owned(),
                    )),
                    Ok(frame) if frame.kind == Kind::Ready && mode == Mode::Check => Ok(Started {
                        process,
                        pid,
                        control,
                        slots: Vec::new(),
                        ready: String::from_utf8_lossy(&frame.payload).into_owned(),
                    }),
                    _ => Err(StartError::Exited(how)),
                };
            }
        };
        let frame = match outcome {
            Err(_elapsed) => {
                signal_group(pid, Signal::SIGKILL);
                return Err(StartError::Timeout(timeout));
            }
            Ok(Err(ChannelError::Closed)) => {
                return Err(StartError::Exited(process.wait().await));
            }
            Ok(Err(error)) => {
                signal_group(pid, Signal::SIGKILL);
                return Err(StartError::Protocol(error.to_string()));
            }
            Ok(Ok(frame)) => frame,
        };
        let ready = String::from_utf8_lossy(&frame.payload).into_owned();
        match frame.kind {
            Kind::Ready => {
                let protocol = ready.split('\0').nth(1).unwrap_or("");
                if protocol != PROTOCOL.to_string() {
                    signal_group(pid, Signal::SIGKILL);
                    return Err(StartError::Protocol(format!(
                        "shim speaks protocol {protocol:?}, expected {PROTOCOL}"
                    )));
                }
            }
            Kind::Failed => {
                let _ = process.wait().await;
                return Err(StartError::Import(ready));
            }
            other => {
                signal_group(pid, Signal::SIGKILL);
                return Err(StartError::Protocol(format!("unexpected {other:?} frame")));
            }
        }
        let mut rings = rings.into_iter();
        let slots = slots
            .into_iter()
            .zip(mailboxes)
            .map(|(stream, mailbox)| {
                tokio_stream(stream).map(|stream| RequestSlot {
                    channel: match rings.next() {
                        Some(ring) => Channel::with_ring(stream, ring),
                        None => Channel::new(stream),
                    },
                    mailbox,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Started {
            process,
            pid,
            control,
            slots,
            ready,
        })
    }
}

/// Asks faulthandler for every thread's stack and collects what it writes.
async fn dump_stack(pid: u32, control: &mut Channel) -> String {
    if let Err(error) = child::signal_process(pid, STACK_SIGNAL) {
        return format!("(no stack: cannot signal the worker: {error})");
    }
    let mut text = Vec::new();
    let give_up = tokio::time::Instant::now() + STACK_MAX;
    loop {
        let quiet = tokio::time::Instant::now() + STACK_QUIET;
        match tokio::time::timeout_at(quiet.min(give_up), control.read_raw()).await {
            Ok(Ok(chunk)) if !chunk.is_empty() => text.extend_from_slice(&chunk),
            _ => break,
        }
    }
    if text.is_empty() {
        return "(the worker wrote no stack within 3 s)".to_owned();
    }
    String::from_utf8_lossy(&text).trim_end().to_owned()
}

/// Why `check` could not confirm that the app imports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportCheck {
    /// The app ran and failed to import: the Python traceback. `check` fails on it.
    #[error("{0}")]
    Failed(String),
    /// The app could not be run at all (no such interpreter or directory, bad `[app]`), so the
    /// import was not checked; `check` only warns, since a config may be checked on a machine
    /// other than the one it runs on.
    #[error("cannot check that the app imports: {0}")]
    NotRun(String),
}

/// Imports the app in a throwaway worker (`sauna-supervisor check`). Must be called outside any
/// tokio runtime (it runs its own, small one).
pub fn check_import(app: &AppConfig, base_dir: &Path) -> Result<(), ImportCheck> {
    check_import_with(app, base_dir, None)
}

/// [`check_import`], and with `post_fork` (`[web] preload`) also imports the hook and checks
/// that it names a callable, as a template does before it forks.
pub fn check_import_with(
    app: &AppConfig,
    base_dir: &Path,
    post_fork: Option<&str>,
) -> Result<(), ImportCheck> {
    let launch = Launch::new(app, base_dir, NonZeroUsize::MIN, Duration::from_secs(120))
        .map_err(ImportCheck::NotRun)?;
    if !launch.directory.is_dir() {
        return Err(ImportCheck::NotRun(format!(
            "[app].directory {} does not exist",
            launch.directory.display()
        )));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| ImportCheck::NotRun(format!("cannot start a runtime: {error}")))?;
    runtime.block_on(async {
        match start_with(&launch, Mode::Check, "check", Vec::new(), post_fork).await {
            Ok(mut started) => {
                let _ = started.process.wait().await;
                Ok(())
            }
            Err(StartError::Import(traceback)) => Err(ImportCheck::Failed(traceback)),
            Err(StartError::Spawn(message)) => Err(ImportCheck::NotRun(message)),
            Err(other) => Err(ImportCheck::Failed(other.to_string())),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_are_split_among_slots_within_bounds() {
        if RING_PER_WORKER == 0 {
            assert_eq!(ring_size(1), 0);
            return;
        }
        assert_eq!(ring_size(1), 8 << 20);
        assert_eq!(ring_size(2), 4 << 20);
        assert_eq!(ring_size(3), 2 << 20);
        assert_eq!(ring_size(8), 1 << 20);
        assert_eq!(ring_size(64), 256 << 10);
        assert!((1..100).all(|threads| ring_size(threads).is_power_of_two()));
    }

    /// The shim keeps its own copies of the numbers both sides must agree on; a mismatch would
    /// have it read requests from the wrong offer region.
    #[test]
    fn the_shim_agrees_on_the_protocol_and_the_offer_regions() {
        for (name, value) in [
            ("PROTOCOL", frame::PROTOCOL as usize),
            ("REGION", offer::REGION),
            ("REGIONS", offer::REGIONS),
        ] {
            let line = format!("\n{name} = {value}\n");
            assert!(SHIM.contains(&line), "shim.py must say {line:?}");
        }
    }
}
