//! Deploy hooks (`[hooks]`): the commands a release needs run before it serves — database
//! migrations, `collectstatic` — run one after the other, each like a web worker of that release:
//! `python` means `[app].python`, the working directory is `[app].directory` resolved at that
//! moment (behind a `current` symlink, the release it points to now), the environment is the
//! workers' (`[app].env` with the `url_env` secrets, `PYTHONUNBUFFERED=1`) plus `SAUNA_HOOK`.
//!
//! This module owns running one hook list and telling about it: every line a command prints goes
//! to the log (tagged `hook before_reload[0]`) and, as it is read, to whoever watches (the
//! `reload` client); `status` can see which command runs; a failure names the command, how it
//! ended and its last lines. Each command is bounded by `[hooks].hook_timeout`; past it, or when
//! the supervisor is asked to stop, its whole process group is ended (`process::group`: TERM,
//! then KILL after [`GRACE`]), and so is whatever a command that exited left in its group — a
//! hook is a step, not a service, and a background process would also hold its output pipe open.
//! The hook inherits no socket of the supervisor (everything is opened close-on-exec), reads
//! `/dev/null`, and writes stdout and stderr into one pipe, so its lines keep their order.
//!
//! When a hook list runs is decided elsewhere: `before_reload` by the reload run (after the
//! config is re-read, before the canary), `before_start` by the main loop's start-up, before any
//! role — whose wait is here ([`before_start`]) because the main loop does not run yet: it
//! answers `status`, lets `stop` and TERM end the hook, and refuses `reload` and `upgrade`.
//! `upgrade` runs no hook: the binary changes, not the release.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use proxy_conf::Loaded;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::control::{ControlRequest, ControlServer, ErrorKind, Request, Responder};
use crate::logging::LogHandle;
use crate::process::group;
use crate::process::spawn::{self as child, ChildSpec};
use crate::supervisor::signals::{SignalEvent, Signals};

/// The variable that tells a command which hook runs it (`before_start`, `before_reload`).
pub const HOOK_ENV: &str = "SAUNA_HOOK";

/// Lines of a failed command's output quoted in the failure.
pub const TAIL_LINES: usize = 20;

/// Time between TERM and KILL when a command's group is ended.
pub const GRACE: Duration = Duration::from_secs(5);

/// How long the output of a command that exited may still take to arrive: its pipes close once
/// every writer is gone, but a process that left the group could keep them open.
const DRAIN: Duration = Duration::from_secs(1);

/// Which hook list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Run once by `run`, before any role starts.
    BeforeStart,
    /// Run by each reload, after the config is re-read and before the canary.
    BeforeReload,
}

impl Hook {
    /// The key in `[hooks]`.
    pub fn key(self) -> &'static str {
        match self {
            Hook::BeforeStart => "before_start",
            Hook::BeforeReload => "before_reload",
        }
    }
}

/// One hook list, resolved against the config it belongs to.
#[derive(Debug, Clone)]
pub struct HookPlan {
    hook: Hook,
    commands: Vec<Vec<String>>,
    timeout: Duration,
    python: PathBuf,
    directory: PathBuf,
    env: BTreeMap<String, String>,
}

impl HookPlan {
    /// The `hook` list of `loaded`, with `[app]` resolved now (a `current` symlink to the release
    /// it points to at this moment); `None` when the list is empty.
    pub fn new(hook: Hook, loaded: &Loaded) -> Option<HookPlan> {
        let hooks = &loaded.config.hooks;
        let commands = match hook {
            Hook::BeforeStart => &hooks.before_start,
            Hook::BeforeReload => &hooks.before_reload,
        };
        if commands.is_empty() {
            return None;
        }
        let app = &loaded.config.app;
        let base_dir = loaded.config_dir();
        let mut env = crate::web::worker::app_env(app);
        env.insert(HOOK_ENV.to_owned(), hook.key().to_owned());
        Some(HookPlan {
            hook,
            commands: commands.clone(),
            timeout: hooks.hook_timeout.get(),
            python: crate::web::worker::app_python(app, &base_dir),
            directory: crate::web::worker::app_directory(app, &base_dir),
            env,
        })
    }

    /// How many commands the list has.
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    /// Never true: an empty list has no plan.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    fn spec(&self, argv: &[String]) -> ChildSpec {
        let mut argv = argv.to_vec();
        if let Some(first) = argv.first_mut().filter(|first| *first == "python") {
            *first = self.python.display().to_string();
        }
        ChildSpec {
            argv,
            cwd: Some(self.directory.clone()),
            env: self.env.clone(),
            // One pipe, as in a terminal: the error line stays after what led to it, in the
            // tail too.
            merge_stderr: true,
            ..ChildSpec::default()
        }
    }
}

/// The command running now, for `status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HookStatus {
    /// `before_start` or `before_reload`.
    pub hook: &'static str,
    /// The command's position in the list, from 0.
    pub index: usize,
    /// How many commands the list has.
    pub commands: usize,
    /// The command as configured.
    pub command: String,
    /// Its process (and process group) id.
    pub pid: u32,
    /// When it started, as Unix time.
    pub started_at: f64,
}

/// Why a hook list stopped short; the commands after the failed one did not run.
#[derive(Debug, thiserror::Error)]
#[error("[hooks].{hook}[{index}] `{command}` {why}")]
pub struct HookFailure {
    /// `before_start` or `before_reload`.
    pub hook: &'static str,
    /// The failed command's position in the list.
    pub index: usize,
    /// The command as configured.
    pub command: String,
    /// How it ended.
    pub why: Ended,
    /// The last [`TAIL_LINES`] lines it printed, stdout and stderr as read.
    pub tail: Vec<String>,
}

impl HookFailure {
    /// The last lines the command printed, under a line that says what they are.
    pub fn output(&self) -> String {
        let name = format!("{}[{}]", self.hook, self.index);
        if self.tail.is_empty() {
            return format!("({name} printed nothing)");
        }
        format!(
            "the last {} line(s) {name} printed:\n{}",
            self.tail.len(),
            self.tail.join("\n")
        )
    }
}

/// How a failed command ended.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Ended {
    /// It exited non-zero or was killed by a signal: `exited with status 1`.
    #[error("{0}")]
    Status(String),
    /// It ran past `hook_timeout`; its process group was ended.
    #[error("timed out after {}; its process group was killed", proxy_conf::Duration(*.0))]
    TimedOut(Duration),
    /// It could not be started.
    #[error("could not start: {0}")]
    Spawn(String),
    /// The supervisor was asked to stop while it ran; its process group was ended.
    #[error("was stopped: the supervisor is stopping")]
    Stopped,
}

/// The running side of a hook list: where it reports and how it hears it must stop.
pub struct Reporter {
    lines: mpsc::UnboundedSender<String>,
    current: watch::Sender<Option<HookStatus>>,
    stop: watch::Receiver<bool>,
}

/// The watching side of a hook list: its lines for the clients, what runs now, and the stop.
pub struct HookWatch {
    lines: mpsc::UnboundedReceiver<String>,
    current: watch::Receiver<Option<HookStatus>>,
    stop: watch::Sender<bool>,
}

/// A reporter and the watch that sees what it reports.
pub fn channel() -> (Reporter, HookWatch) {
    let (lines_in, lines) = mpsc::unbounded_channel();
    let (current_in, current) = watch::channel(None);
    let (stop, stop_out) = watch::channel(false);
    (
        Reporter {
            lines: lines_in,
            current: current_in,
            stop: stop_out,
        },
        HookWatch {
            lines,
            current,
            stop,
        },
    )
}

impl HookWatch {
    /// The next line for the clients (a step or a line of output); pending once the hook list
    /// is over. The lines are already in the log.
    pub async fn next_line(&mut self) -> Option<String> {
        self.lines.recv().await
    }

    /// The command running now, if any.
    pub fn status(&self) -> Option<HookStatus> {
        self.current.borrow().clone()
    }

    /// Ends the running command's process group and the list (the supervisor is stopping).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Reporter {
    /// A step: logged, and told to the clients.
    fn step(&self, line: String) {
        tracing::info!("{line}");
        let _ = self.lines.send(line);
    }
}

/// Runs `plan`'s commands in order until one fails; see the module comment for how each runs.
pub async fn run(plan: &HookPlan, reporter: &Reporter) -> Result<(), HookFailure> {
    for (index, argv) in plan.commands.iter().enumerate() {
        // A stop that came while the previous command finished: the next one does not start.
        if *reporter.stop.borrow() {
            return Err(HookFailure {
                hook: plan.hook.key(),
                index,
                command: shown(argv),
                why: Ended::Stopped,
                tail: Vec::new(),
            });
        }
        run_one(plan, index, argv, reporter).await?;
    }
    Ok(())
}

async fn run_one(
    plan: &HookPlan,
    index: usize,
    argv: &[String],
    reporter: &Reporter,
) -> Result<(), HookFailure> {
    let hook = plan.hook.key();
    let name = format!("{hook}[{index}]");
    let command = shown(argv);
    let failure = |why: Ended, tail: VecDeque<String>| HookFailure {
        hook,
        index,
        command: command.clone(),
        why,
        tail: tail.into(),
    };
    reporter.step(format!(
        "[hooks].{name} ({}/{}): {command}",
        index + 1,
        plan.len()
    ));
    let started = Instant::now();
    // Otherwise the spawn fails with a bare "No such file or directory" that seems to be about
    // the command.
    if !plan.directory.is_dir() {
        let missing = format!(
            "[app].directory {} does not exist",
            plan.directory.display()
        );
        return Err(failure(Ended::Spawn(missing), VecDeque::new()));
    }
    let mut process = child::spawn(plan.spec(argv))
        .map_err(|error| failure(Ended::Spawn(error.to_string()), VecDeque::new()))?;
    let pid = process.id().unwrap_or_default();
    reporter.current.send_replace(Some(HookStatus {
        hook,
        index,
        commands: plan.len(),
        command: command.clone(),
        pid,
        started_at: unix_now(),
    }));
    let (line_in, mut lines) = mpsc::unbounded_channel::<String>();
    let mut capture =
        child::capture_output_each(&mut process, format!("hook {name}"), move |line| {
            let _ = line_in.send(line.to_owned());
        });
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let pass_on = |line: String, tail: &mut VecDeque<String>| {
        let _ = reporter.lines.send(format!("{name} | {line}"));
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    };
    let deadline = tokio::time::sleep(plan.timeout);
    tokio::pin!(deadline);
    let mut stop = reporter.stop.clone();
    let outcome = loop {
        tokio::select! {
            Some(line) = lines.recv() => pass_on(line, &mut tail),
            status = process.wait() => break Outcome::Exited(status),
            () = &mut deadline => break Outcome::TimedOut,
            () = stopped(&mut stop) => break Outcome::Stopped,
        }
    };
    // `Err` once the group was ended: the failure is the timeout or the stop, not the status.
    let status = match outcome {
        Outcome::Exited(status) => {
            if group::clear(pid, GRACE).await {
                tracing::warn!(
                    "[hooks].{name} left processes running in its group; they were stopped (a hook is a step, not a service: use [programs.NAME])"
                );
            }
            Ok(status)
        }
        Outcome::TimedOut | Outcome::Stopped => {
            let (why, ended) = match outcome {
                Outcome::TimedOut => (
                    format!(
                        "ran past hook_timeout {}",
                        proxy_conf::Duration(plan.timeout)
                    ),
                    Ended::TimedOut(plan.timeout),
                ),
                _ => (
                    "is stopped: the supervisor is stopping".to_owned(),
                    Ended::Stopped,
                ),
            };
            tracing::warn!("[hooks].{name} {why}; ending its process group {pid}");
            let _ = group::terminate(&mut process, pid, GRACE).await;
            Err(ended)
        }
    };
    if tokio::time::timeout(DRAIN, &mut capture).await.is_err() {
        capture.abort();
        tracing::warn!(
            "[hooks].{name}: its output is still open after it exited (a process that left its group?); no longer reading it"
        );
    }
    while let Ok(line) = lines.try_recv() {
        pass_on(line, &mut tail);
    }
    reporter.current.send_replace(None);
    let elapsed = started.elapsed();
    let ended = match status {
        Ok(Ok(status)) if status.success() => {
            reporter.step(format!(
                "[hooks].{name}: done in {:.1}s",
                elapsed.as_secs_f64()
            ));
            return Ok(());
        }
        Ok(Ok(status)) => Ended::Status(describe(status)),
        Ok(Err(error)) => Ended::Status(format!("could not be waited for: {error}")),
        Err(ended) => ended,
    };
    let failure = failure(ended, tail);
    tracing::error!("{failure} after {:.1}s", elapsed.as_secs_f64());
    Err(failure)
}

/// How the wait for one command ended.
enum Outcome {
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
    Stopped,
}

/// Resolves once `stop` turns true; never when its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// `exited with status 1`, `was killed by signal SIGSEGV`.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => {
            let name =
                Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.to_string());
            format!("was killed by signal {name}")
        }
        (None, None) => format!("ended ({status})"),
    }
}

/// The command as a person would type it: words with spaces or quotes are quoted.
fn shown(argv: &[String]) -> String {
    argv.iter()
        .map(|word| {
            if !word.is_empty()
                && !word.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            {
                word.clone()
            } else {
                format!("{word:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// Why `run` did not get past `[hooks].before_start`.
#[derive(Debug, thiserror::Error)]
pub enum BeforeStartError {
    /// A command failed; nothing was started.
    #[error("{0}; nothing was started\n{output}", output = .0.output())]
    Failed(HookFailure),
    /// A stop (signal or `stop`) arrived while a command ran; it was ended, nothing started.
    #[error("stopped while [hooks].before_start ran; nothing was started")]
    Stopped,
}

/// `run`'s `before_start` hooks, before any role starts. Meanwhile the control socket answers
/// `status` (through `status`, given the running command), `stop` and TERM/INT/QUIT end the
/// running command and the start, and `reload`, `upgrade` and the other signals are refused:
/// there is nothing to reload yet.
pub async fn before_start(
    loaded: &Loaded,
    signals: &mut Signals,
    control: &mut ControlServer,
    log: &LogHandle,
    status: impl Fn(Option<HookStatus>) -> serde_json::Value,
) -> Result<(), BeforeStartError> {
    let Some(plan) = HookPlan::new(Hook::BeforeStart, loaded) else {
        return Ok(());
    };
    tracing::info!(
        commands = plan.len(),
        "running [hooks].before_start before any role starts"
    );
    let (reporter, mut watch) = channel();
    let hooks = run(&plan, &reporter);
    tokio::pin!(hooks);
    let mut stop_waiters: Vec<Responder> = Vec::new();
    let mut stopping = false;
    let outcome = loop {
        tokio::select! {
            outcome = &mut hooks => break outcome,
            // Nobody watches a start's lines; they are in the log already.
            Some(_) = watch.next_line() => {}
            event = signals.recv() => match event {
                SignalEvent::Shutdown(mode) => {
                    tracing::info!(?mode, "stop requested by signal during [hooks].before_start");
                    stopping = true;
                    watch.stop();
                }
                SignalEvent::ReopenLogs => match log.reopen() {
                    Ok(()) => tracing::info!("log file reopened"),
                    Err(error) => tracing::error!("cannot reopen the log file: {error}"),
                },
                other => tracing::warn!(
                    "{other:?} ignored: [hooks].before_start is still running and no role has started"
                ),
            },
            request = control.accept() => {
                let ControlRequest { request, reply } = request;
                match request {
                    Request::Status => reply.ok(status(watch.status())),
                    Request::Stop { .. } => {
                        tracing::info!("stop requested over the control socket during [hooks].before_start");
                        reply.progress("stopping: ending [hooks].before_start");
                        stop_waiters.push(reply);
                        stopping = true;
                        watch.stop();
                    }
                    Request::Reload { .. } | Request::Upgrade { .. } => reply.error(
                        ErrorKind::Unavailable,
                        "still starting: [hooks].before_start is running and no role has started; try again once it has finished",
                        None,
                    ),
                }
            }
        }
    };
    let result = match outcome {
        Ok(()) if !stopping => return Ok(()),
        // A stop that came as the last command ended still stops: nothing has started.
        Ok(()) => Err(BeforeStartError::Stopped),
        Err(failure) if failure.why == Ended::Stopped => Err(BeforeStartError::Stopped),
        Err(failure) => Err(BeforeStartError::Failed(failure)),
    };
    for waiter in stop_waiters {
        waiter.ok(serde_json::json!({ "stopped": true }));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::runtime;

    fn plan(commands: &[&[&str]], timeout: Duration) -> HookPlan {
        HookPlan {
            hook: Hook::BeforeReload,
            commands: commands
                .iter()
                .map(|argv| argv.iter().map(|word| (*word).to_owned()).collect())
                .collect(),
            timeout,
            python: PathBuf::from("python3"),
            directory: std::env::temp_dir(),
            env: BTreeMap::from([(HOOK_ENV.to_owned(), "before_reload".to_owned())]),
        }
    }

    fn lines_of(watch: &mut HookWatch) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = watch.lines.try_recv() {
            lines.push(line);
        }
        lines
    }

    #[test]
    fn commands_run_in_order_and_their_output_is_passed_on() {
        runtime().block_on(async {
            let plan = plan(
                &[
                    &["sh", "-c", "echo one; echo $SAUNA_HOOK >&2"],
                    &["echo", "two"],
                ],
                Duration::from_secs(10),
            );
            let (reporter, mut watch) = channel();
            run(&plan, &reporter).await.unwrap();
            let lines = lines_of(&mut watch);
            let position = |needle: &str| {
                lines
                    .iter()
                    .position(|line| line == needle)
                    .unwrap_or_else(|| panic!("{needle:?} not in {lines:?}"))
            };
            assert!(position("before_reload[0] | one") < position("before_reload[1] | two"));
            position("before_reload[0] | before_reload");
            assert!(lines[0].starts_with("[hooks].before_reload[0] (1/2): sh -c \"echo one;"));
            assert!(watch.status().is_none(), "nothing runs any more");
        });
    }

    #[test]
    fn a_failure_names_the_command_its_status_and_its_last_lines() {
        runtime().block_on(async {
            let plan = plan(
                &[
                    &[
                        "sh",
                        "-c",
                        "for i in $(seq 1 30); do echo line $i; done; exit 3",
                    ],
                    &["touch", "/nonexistent/never-run"],
                ],
                Duration::from_secs(10),
            );
            let (reporter, _watch) = channel();
            let failure = run(&plan, &reporter).await.unwrap_err();
            assert_eq!(failure.index, 0);
            assert_eq!(
                failure.why,
                Ended::Status("exited with status 3".to_owned())
            );
            assert_eq!(failure.tail.len(), TAIL_LINES);
            assert_eq!(failure.tail.first().map(String::as_str), Some("line 11"));
            assert_eq!(failure.tail.last().map(String::as_str), Some("line 30"));
            let message = failure.to_string();
            assert!(
                message.starts_with("[hooks].before_reload[0] `sh -c "),
                "{message}"
            );
            assert!(message.ends_with("exited with status 3"), "{message}");
            assert!(
                failure
                    .output()
                    .starts_with("the last 20 line(s) before_reload[0] printed:\nline 11\n")
            );
        });
    }

    #[test]
    fn a_command_past_its_timeout_is_killed_with_its_group() {
        runtime().block_on(async {
            let plan = plan(
                &[&["sh", "-c", "trap '' TERM; sleep 60 & echo $!; wait"]],
                Duration::from_millis(500),
            );
            let (reporter, _watch) = channel();
            let began = Instant::now();
            let failure = run(&plan, &reporter).await.unwrap_err();
            assert_eq!(failure.why, Ended::TimedOut(Duration::from_millis(500)));
            assert!(
                failure.to_string().contains("timed out after 500ms"),
                "{failure}"
            );
            let sleep: u32 = failure.tail[0].parse().unwrap();
            let alive = std::fs::read_to_string(format!("/proc/{sleep}/stat"))
                .ok()
                .and_then(|stat| crate::process::procfs::parse_stat(&stat))
                .is_some_and(|stat| stat.state != 'Z');
            assert!(!alive, "the background sleep is gone");
            // TERM is ignored by the shell, so KILL came after the grace.
            assert!(began.elapsed() < Duration::from_millis(500) + GRACE + Duration::from_secs(3));
        });
    }

    #[test]
    fn a_stop_ends_the_running_command() {
        runtime().block_on(async {
            let plan = plan(&[&["sleep", "60"]], Duration::from_secs(60));
            let (reporter, watch) = channel();
            let hooks = run(&plan, &reporter);
            tokio::pin!(hooks);
            // Let it start, then stop it.
            tokio::select! {
                _ = &mut hooks => panic!("sleep 60 ended by itself"),
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            assert_eq!(
                watch.status().map(|status| status.command),
                Some("sleep 60".to_owned())
            );
            watch.stop();
            let failure = hooks.await.unwrap_err();
            assert_eq!(failure.why, Ended::Stopped);
        });
    }

    #[test]
    fn a_missing_program_fails_to_start_by_name() {
        runtime().block_on(async {
            let plan = plan(&[&["/nonexistent/manage.py"]], Duration::from_secs(5));
            let (reporter, _watch) = channel();
            let failure = run(&plan, &reporter).await.unwrap_err();
            assert!(matches!(failure.why, Ended::Spawn(_)), "{failure}");
            assert!(
                failure.to_string().contains("/nonexistent/manage.py"),
                "{failure}"
            );
        });
    }

    #[test]
    fn a_missing_app_directory_is_named() {
        runtime().block_on(async {
            let mut plan = plan(&[&["true"]], Duration::from_secs(5));
            plan.directory = PathBuf::from("/nonexistent/releases/v9");
            let (reporter, _watch) = channel();
            let failure = run(&plan, &reporter).await.unwrap_err();
            assert_eq!(
                failure.to_string(),
                "[hooks].before_reload[0] `true` could not start: [app].directory /nonexistent/releases/v9 does not exist"
            );
        });
    }

    #[test]
    fn python_means_the_app_interpreter() {
        let plan = plan(&[], Duration::from_secs(1));
        let spec = plan.spec(&["python".to_owned(), "manage.py".to_owned()]);
        assert_eq!(spec.argv, ["python3", "manage.py"]);
        assert_eq!(spec.cwd, Some(std::env::temp_dir()));
        assert_eq!(
            shown(&["a".into(), "b c".into(), String::new()]),
            "a \"b c\" \"\""
        );
    }
}
