//! The template of one generation (`[web] preload`): a shim process that imports the app once,
//! `gc.freeze()`s it and then forks every worker of its generation, so that the workers share
//! the imported code and data copy-on-write and a replacement is ready in milliseconds.
//!
//! The template is spawned like a worker (same interpreter, directory, environment, control
//! channel on descriptor 3) with one more descriptor: 4, a `SOCK_SEQPACKET` socket for fork
//! requests. Its `Ready` is the import of the generation: a failure there is the failure of the
//! first worker that asked for it, which is how a reload's canary fails and rolls back.
//!
//! For each worker the supervisor makes the descriptors exactly as for a spawned one (control,
//! slots, offer eventfds and memfd, rings) plus two output pipes, and passes them with `SCM_RIGHTS`; the template forks,
//! the child puts them on their numbers and serves. The child leads its own process group (set
//! on both sides of the fork, before the supervisor learns the pid), dies with the template
//! (`PR_SET_PDEATHSIG`), and the template — spawned like every child, so it dies with the
//! supervisor — reaps it and reports how it ended. So a `kill -9` of the supervisor takes the
//! template along, which takes its workers along; the group reaper knows every worker's group
//! as well.
//!
//! The template lives as long as its generation: the `Launch` that owns it is shared by the pool
//! and by every worker task of the generation, and dropping the last one kills the template.
//! A template that died (it was killed, or crashed) is started again, with a new import, by the
//! next worker that needs one.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, recv, sendmsg, socketpair,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::process::Child;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Channels, Launch, Mode, Pending, Process, StartError, Started, channel_error};
use crate::process::spawn as child;

/// The fork-request socket's number in the template.
const TEMPLATE_FD: i32 = 4;
/// Most descriptors one `SCM_RIGHTS` message carries (the kernel's `SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;
/// Longest wait for the template to answer a fork request (it forks at once; this only catches
/// a template that hangs).
const FORK_ANSWER: Duration = Duration::from_secs(10);
/// Longest wait for a template whose socket closed to exit by itself.
const TEMPLATE_EXIT: Duration = Duration::from_secs(5);

/// The template of one generation; started by the first worker that needs it.
pub struct Template {
    post_fork: Option<String>,
    state: Mutex<State>,
    /// The running template's pid for `status`, 0 while none runs.
    pid: Arc<AtomicU32>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("post_fork", &self.post_fork)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    running: Option<Running>,
    /// The last failed start, shared with every worker that was waiting for it.
    failed: Option<(Instant, StartError)>,
}

/// A template process that imported the app.
struct Running {
    pid: u32,
    shown: Arc<AtomicU32>,
    /// Set when the generation is over, so that the reader does not report the kill as a crash.
    retired: Arc<AtomicBool>,
    requests: Arc<AsyncFd<OwnedFd>>,
    answers: mpsc::UnboundedReceiver<Answer>,
    /// Reads the template's messages and owns its process; finished once the template is gone.
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // The template goes (the generation is over, or it stopped answering), and any worker
        // still forked from it with it. The reader ends once the process has.
        if let Err(error) = child::signal_group(self.pid, Signal::SIGKILL) {
            tracing::warn!(pid = self.pid, "cannot kill the web template: {error}");
        }
        self.shown.store(0, Ordering::Relaxed);
    }
}

impl Drop for Template {
    fn drop(&mut self) {
        if let Some(running) = &self.state.get_mut().running {
            running.retired.store(true, Ordering::Relaxed);
        }
    }
}

/// The template's answer to a fork request.
enum Answer {
    Forked(u32, oneshot::Receiver<String>),
    Refused(String),
}

/// A worker forked by a template: its exit is reported by the template, its parent.
pub(super) struct Forked {
    exit: oneshot::Receiver<String>,
    ended: Option<String>,
}

impl Forked {
    /// How the worker ended, once it did.
    pub(super) async fn wait(&mut self) -> String {
        if let Some(how) = &self.ended {
            return how.clone();
        }
        let how = (&mut self.exit).await.unwrap_or_else(|_| {
            "killed with its template (the template process is gone)".to_owned()
        });
        self.ended = Some(how.clone());
        how
    }
}

impl Template {
    /// A template not started yet; `post_fork` is called in each forked worker.
    pub fn new(post_fork: Option<String>) -> Template {
        Template {
            post_fork,
            state: Mutex::new(State::default()),
            pid: Arc::new(AtomicU32::new(0)),
        }
    }

    /// The pid of the running template, if one runs.
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Relaxed)).filter(|pid| *pid != 0)
    }

    /// Forks one worker of this generation (starting the template first if it is not running)
    /// and waits for its `Ready`. A template found dead on the way is replaced once.
    pub(super) async fn fork(&self, launch: &Launch, label: &str) -> Result<Started, StartError> {
        let arrived = Instant::now();
        let mut state = self.state.lock().await;
        let mut replaced = false;
        let (pid, exit, ends) = loop {
            let running = self.running(&mut state, launch, arrived).await?;
            match ask_for_worker(running, launch).await {
                Ok(forked) => break forked,
                Err(Refusal::Gone(error)) => {
                    state.running = None;
                    if replaced {
                        return Err(error);
                    }
                    replaced = true;
                }
                Err(Refusal::Failed(error)) => return Err(error),
            }
        };
        drop(state);
        crate::process::reaper::track(pid);
        let WorkerEnds {
            control,
            slots,
            mailboxes,
            rings,
            stdout,
            stderr,
        } = ends;
        if let Err(error) = child::capture_pipes(stdout, stderr, label.to_owned(), pid) {
            tracing::warn!(pid, "cannot read the output of a forked worker: {error}");
        }
        let pending = Pending {
            process: Process::Forked(Forked { exit, ended: None }),
            pid,
            control: super::frame::Channel::new(super::tokio_stream(control)?),
            slots,
            mailboxes,
            rings,
        };
        pending.handshake(Mode::Serve, launch.start_timeout).await
    }

    /// The running template, started now if there is none. A start that failed while this
    /// caller (arrived at `arrived`) waited for the lock is its failure too: one import error,
    /// not one import per waiting worker.
    async fn running<'a>(
        &self,
        state: &'a mut State,
        launch: &Launch,
        arrived: Instant,
    ) -> Result<&'a mut Running, StartError> {
        if state
            .running
            .as_ref()
            .is_some_and(|running| running.reader.is_finished())
        {
            state.running = None;
        }
        if state.running.is_none() {
            if let Some((at, error)) = &state.failed {
                if *at >= arrived {
                    return Err(error.clone());
                }
            }
            match self.start(launch).await {
                Ok(running) => state.running = Some(running),
                Err(error) => {
                    state.failed = Some((Instant::now(), error.clone()));
                    return Err(error);
                }
            }
        }
        state
            .running
            .as_mut()
            .ok_or_else(|| StartError::Spawn("the web template is not running".to_owned()))
    }

    /// Spawns the template and waits until it imported the app.
    async fn start(&self, launch: &Launch) -> Result<Running, StartError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(|errno| channel_error(errno.into()))?;
        // The template blocks on its end (select, then recv); only ours is polled by tokio.
        nix::fcntl::fcntl(
            &theirs,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(|errno| channel_error(errno.into()))?;
        // SAFETY: the descriptor is owned by the AsyncFd from here on and only closed when the
        // AsyncFd is dropped, so it is never closed or reused while registered.
        let requests = unsafe { AsyncFd::register(ours) }
            .map(Arc::new)
            .map_err(|error| channel_error(error.into()))?;
        let started = super::start_with(
            launch,
            Mode::Template,
            "web template",
            vec![(theirs, TEMPLATE_FD)],
            self.post_fork.as_deref(),
        )
        .await?;
        let Started {
            process,
            pid,
            ready,
            ..
        } = started;
        let Process::Spawned(process) = process else {
            return Err(StartError::Protocol(
                "the template was not spawned".to_owned(),
            ));
        };
        warn_about_threads(pid, &ready);
        tracing::info!(
            pid,
            "web template imported the app; workers are forked from it"
        );
        let (answers_tx, answers) = mpsc::unbounded_channel();
        self.pid.store(pid, Ordering::Relaxed);
        let retired = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_template(
            process,
            pid,
            Arc::clone(&requests),
            answers_tx,
            Arc::clone(&self.pid),
            Arc::clone(&retired),
        ));
        Ok(Running {
            pid,
            shown: Arc::clone(&self.pid),
            retired,
            requests,
            answers,
            reader,
        })
    }
}

/// Our ends of a forked worker's descriptors.
struct WorkerEnds {
    control: std::os::unix::net::UnixStream,
    slots: Vec<std::os::unix::net::UnixStream>,
    mailboxes: Vec<super::offer::Mailbox>,
    rings: Vec<Arc<super::ring::Ring>>,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// Why a template did not fork a worker.
enum Refusal {
    /// The template is gone or hangs: a new one may do.
    Gone(StartError),
    /// Anything else.
    Failed(StartError),
}

/// Makes a worker's descriptors, passes them to the template and waits for the pid.
async fn ask_for_worker(
    running: &mut Running,
    launch: &Launch,
) -> Result<(u32, oneshot::Receiver<String>, WorkerEnds), Refusal> {
    let Channels {
        control,
        slots,
        mailboxes,
        rings,
        ring_size,
        theirs,
    } = Channels::new(launch.threads).map_err(Refusal::Failed)?;
    let (stdout, stdout_theirs) = output_pipe().map_err(Refusal::Failed)?;
    let (stderr, stderr_theirs) = output_pipe().map_err(Refusal::Failed)?;
    let mut fds: Vec<RawFd> = theirs.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
    fds.extend([stdout_theirs.as_raw_fd(), stderr_theirs.as_raw_fd()]);
    if fds.len() > SCM_MAX_FD {
        return Err(Refusal::Failed(StartError::Spawn(format!(
            "[web] preload hands a worker its {} descriptors in one message, and the kernel passes at most {SCM_MAX_FD}: use at most {} threads per worker with preload",
            fds.len(),
            proxy_conf::config::MAX_PRELOAD_THREADS
        ))));
    }
    let request = format!("{} {ring_size}", launch.threads);
    send_request(&running.requests, request.as_bytes(), &fds)
        .await
        .map_err(|error| {
            Refusal::Gone(StartError::Spawn(format!(
                "cannot ask the web template for a worker: {error}"
            )))
        })?;
    // Our copies of the worker's ends close now; the template holds its own until it forked.
    drop((theirs, stdout_theirs, stderr_theirs));
    let (pid, exit) = match tokio::time::timeout(FORK_ANSWER, running.answers.recv()).await {
        Ok(Some(Answer::Forked(pid, exit))) => (pid, exit),
        Ok(Some(Answer::Refused(why))) => {
            return Err(Refusal::Failed(StartError::Spawn(format!(
                "the web template could not fork: {why}"
            ))));
        }
        Ok(None) => {
            return Err(Refusal::Gone(StartError::Spawn(
                "the web template died before it forked the worker".to_owned(),
            )));
        }
        // A template that does not answer cannot be trusted with the next request.
        Err(_) => {
            return Err(Refusal::Gone(StartError::Spawn(format!(
                "the web template did not fork within {FORK_ANSWER:?}"
            ))));
        }
    };
    let ends = WorkerEnds {
        control,
        slots,
        mailboxes,
        rings,
        stdout,
        stderr,
    };
    Ok((pid, exit, ends))
}

/// The template's `Ready` carries `pid\0protocol\0python\0threads\0names`: threads running
/// after the import are not in the forked workers, which is worth a clear warning.
fn warn_about_threads(pid: u32, ready: &str) {
    let mut fields = ready.split('\0').skip(3);
    let count: usize = fields
        .next()
        .and_then(|count| count.parse().ok())
        .unwrap_or(0);
    if count == 0 {
        return;
    }
    let names = fields.next().unwrap_or("").replace(',', ", ");
    let names = if names.is_empty() {
        "not started by the threading module".to_owned()
    } else {
        names
    };
    tracing::warn!(
        pid,
        "the app started {count} thread(s) while it was imported ({names}); threads do not survive fork, so the workers forked from the preloaded template run without them: start them in [web].post_fork or on first use, or set preload = false"
    );
}

/// A pipe for a forked worker's stdout or stderr: (our read end, its write end).
fn output_pipe() -> Result<(OwnedFd, OwnedFd), StartError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|errno| StartError::Spawn(format!("cannot create an output pipe: {errno}")))
}

/// Sends one fork request with the worker's descriptors attached.
async fn send_request(
    requests: &AsyncFd<OwnedFd>,
    payload: &[u8],
    fds: &[RawFd],
) -> std::io::Result<()> {
    requests
        .async_io(Interest::WRITABLE, |socket| {
            let parts = [IoSlice::new(payload)];
            let rights = [ControlMessage::ScmRights(fds)];
            sendmsg::<()>(
                socket.as_raw_fd(),
                &parts,
                &rights,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        })
        .await
        .map(drop)
}

/// Reads the template's messages until it is gone: fork answers go to the requester, exits to
/// the worker's task. When the template is gone, the exit senders of the workers still listed
/// are dropped: those workers died with it (`PR_SET_PDEATHSIG`).
async fn read_template(
    mut process: Child,
    pid: u32,
    requests: Arc<AsyncFd<OwnedFd>>,
    answers: mpsc::UnboundedSender<Answer>,
    shown: Arc<AtomicU32>,
    retired: Arc<AtomicBool>,
) {
    let exited = match read_messages(&mut process, pid, &requests, &answers).await {
        Some(status) => status,
        // Its socket closed first; the process follows at once, or is made to.
        None => match tokio::time::timeout(TEMPLATE_EXIT, process.wait()).await {
            Ok(status) => status,
            Err(_) => {
                let _ = child::signal_group(pid, Signal::SIGKILL);
                process.wait().await
            }
        },
    };
    if !retired.load(Ordering::Relaxed) {
        tracing::error!(
            pid,
            "the web template exited ({}); the workers forked from it went with it, and the next worker of its generation imports the app in a new template",
            super::describe_exit(exited)
        );
    }
    let _ = shown.compare_exchange(pid, 0, Ordering::Relaxed, Ordering::Relaxed);
}

/// Hands the template's messages on until its socket ends (`None`) or its process does (how).
/// Returning drops the exit senders of the workers still listed: they died with the template.
async fn read_messages(
    process: &mut Child,
    pid: u32,
    requests: &AsyncFd<OwnedFd>,
    answers: &mpsc::UnboundedSender<Answer>,
) -> Option<std::io::Result<std::process::ExitStatus>> {
    let mut exits: HashMap<u32, oneshot::Sender<String>> = HashMap::new();
    let mut buffer = [0u8; 512];
    loop {
        let message = tokio::select! {
            status = process.wait() => return Some(status),
            message = requests.async_io(Interest::READABLE, |socket| {
                recv(socket.as_raw_fd(), &mut buffer, MsgFlags::empty()).map_err(std::io::Error::from)
            }) => message,
        };
        let text = match message {
            Ok(0) | Err(_) => return None,
            Ok(size) => String::from_utf8_lossy(&buffer[..size]).into_owned(),
        };
        match parse_message(&text) {
            Some(Message::Forked(worker)) => {
                let (exit_tx, exit) = oneshot::channel();
                exits.insert(worker, exit_tx);
                let _ = answers.send(Answer::Forked(worker, exit));
            }
            Some(Message::Refused(why)) => {
                let _ = answers.send(Answer::Refused(why));
            }
            Some(Message::Exited(worker, code)) => {
                if let Some(exit) = exits.remove(&worker) {
                    let _ = exit.send(describe_code(code));
                }
            }
            None => tracing::warn!(pid, "unexpected message from the web template: {text:?}"),
        }
    }
}

/// One message from the template.
#[derive(Debug, PartialEq, Eq)]
enum Message {
    /// `F pid`: forked.
    Forked(u32),
    /// `E why`: could not fork.
    Refused(String),
    /// `X pid code`: a worker ended; `code` as Python's `os.waitstatus_to_exitcode` (negative =
    /// killed by that signal).
    Exited(u32, i32),
}

fn parse_message(text: &str) -> Option<Message> {
    let (kind, rest) = text.split_once(' ')?;
    match kind {
        "F" => rest.parse().ok().map(Message::Forked),
        "E" => Some(Message::Refused(rest.to_owned())),
        "X" => {
            let (pid, code) = rest.split_once(' ')?;
            Some(Message::Exited(pid.parse().ok()?, code.parse().ok()?))
        }
        _ => None,
    }
}

/// The words `describe_exit` uses, from a `waitstatus_to_exitcode` value.
fn describe_code(code: i32) -> String {
    if code >= 0 {
        return format!("exit status {code}");
    }
    let signal = code.saturating_neg();
    let name = Signal::try_from(signal).map_or("?", |signal| signal.as_str());
    format!("signal {signal} ({name})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_from_the_template_are_parsed() {
        assert_eq!(parse_message("F 1234"), Some(Message::Forked(1234)));
        assert_eq!(parse_message("X 1234 -9"), Some(Message::Exited(1234, -9)));
        assert_eq!(parse_message("X 1234 3"), Some(Message::Exited(1234, 3)));
        assert_eq!(
            parse_message("E [Errno 11] Resource temporarily unavailable"),
            Some(Message::Refused(
                "[Errno 11] Resource temporarily unavailable".to_owned()
            ))
        );
        assert_eq!(parse_message("F x"), None);
        assert_eq!(parse_message("X 12"), None);
        assert_eq!(parse_message("hello"), None);
    }

    #[test]
    fn exit_codes_read_like_spawned_workers_exits() {
        assert_eq!(describe_code(0), "exit status 0");
        assert_eq!(describe_code(-9), "signal 9 (SIGKILL)");
        assert_eq!(describe_code(-15), "signal 15 (SIGTERM)");
    }
}
