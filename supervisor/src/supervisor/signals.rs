//! The Unix signals the supervisor answers to, turned into [`SignalEvent`] at the edge so that
//! nothing deeper than the main loop ever sees a signal number.
//!
//! | signal | event |
//! |---|---|
//! | `TERM`, `INT` | [`SignalEvent::Shutdown`]`(`[`StopMode::Graceful`]`)` |
//! | `QUIT` | [`SignalEvent::Shutdown`]`(`[`StopMode::Fast`]`)` |
//! | `HUP` | [`SignalEvent::Reload`] |
//! | `USR1` | [`SignalEvent::ReopenLogs`] |
//! | `TTIN` / `TTOU` | [`SignalEvent::ScaleWorkers`]`(+1)` / `(-1)` |
//! | `USR2` | [`SignalEvent::Upgrade`] (like Gunicorn's and nginx's binary upgrade) |
//!
//! This module owns only the handlers and the translation; what each event does belongs to the
//! main loop. The handlers are tokio's (a self-pipe fed by an async-signal-safe handler), so
//! receiving is an ordinary `await` that fits in the loop's `select!`.
//!
//! Two OS facts shape the behaviour:
//! - Installing a handler replaces the signal's default action for the rest of the process's life
//!   (tokio never uninstalls it). That is wanted: once [`Signals::install`] has run, a `TERM` can
//!   no longer kill the supervisor before it has stopped its children. It also means systemd's
//!   `Type=notify-reload`, which checks that a `HUP` handler exists, is satisfied from then on.
//! - Standard signals do not queue: two `TTIN`s sent before the first is handled arrive as one,
//!   both in the kernel and in tokio. `ScaleWorkers` is therefore one step per *delivery*, and a
//!   script that wants +3 should send three signals with the status observed in between.

use std::io;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::supervisor::lifecycle::StopMode;

/// What a received signal asks the supervisor to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// Stop everything: `TERM`/`INT` gracefully, `QUIT` fast.
    Shutdown(StopMode),
    /// Re-read the configuration and roll a new generation (`HUP`, like `sauna-supervisor reload`).
    Reload,
    /// Reopen the log file, after logrotate has moved it (`USR1`).
    ReopenLogs,
    /// Change the number of web workers by this many (`TTIN` +1, `TTOU` -1).
    ScaleWorkers(i32),
    /// Hand the listening sockets to a new sauna-supervisor binary (`USR2`, like
    /// `sauna-supervisor upgrade` with the default binary).
    Upgrade,
}

/// The installed handlers; [`Signals::recv`] yields one event per delivered signal.
pub struct Signals {
    term: Signal,
    int: Signal,
    quit: Signal,
    hup: Signal,
    usr1: Signal,
    ttin: Signal,
    ttou: Signal,
    usr2: Signal,
}

impl Signals {
    /// Installs handlers for every signal in the table above.
    ///
    /// Must be called inside a tokio runtime (the handlers feed its driver). Call it early, before
    /// any child is spawned and before `READY=1`, so that no signal meets the default action —
    /// except in an upgrade's successor, which wants exactly that until it is ready (`start`).
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            ttin: signal(SignalKind::from_raw(libc::SIGTTIN))?,
            ttou: signal(SignalKind::from_raw(libc::SIGTTOU))?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Waits for the next signal and says what it asks for.
    ///
    /// Cancel-safe: a signal that arrives while the caller's `select!` takes another branch stays
    /// pending for the next call. When several kinds are pending at once, stop requests come first
    /// (a `QUIT` must not wait behind a reload), then the others in the table's order.
    pub async fn recv(&mut self) -> SignalEvent {
        // `Signal::recv` only returns `None` once the runtime is shutting down; the loop that
        // awaits us is then being dropped too, so waiting forever on that branch is correct.
        tokio::select! {
            biased;
            Some(()) = self.quit.recv() => SignalEvent::Shutdown(StopMode::Fast),
            Some(()) = self.term.recv() => SignalEvent::Shutdown(StopMode::Graceful),
            Some(()) = self.int.recv() => SignalEvent::Shutdown(StopMode::Graceful),
            Some(()) = self.hup.recv() => SignalEvent::Reload,
            Some(()) = self.usr1.recv() => SignalEvent::ReopenLogs,
            Some(()) = self.ttin.recv() => SignalEvent::ScaleWorkers(1),
            Some(()) = self.ttou.recv() => SignalEvent::ScaleWorkers(-1),
            Some(()) = self.usr2.recv() => SignalEvent::Upgrade,
            else => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nix::sys::signal::{Signal as Sig, raise};

    use super::*;

    /// Raises `signal` at this process and returns the event it became.
    async fn event_for(signals: &mut Signals, signal: Sig) -> SignalEvent {
        raise(signal).expect("raise");
        tokio::time::timeout(Duration::from_secs(5), signals.recv())
            .await
            .unwrap_or_else(|_| panic!("no event for {signal} within 5 s"))
    }

    // One test for every signal: handlers are process-wide, so separate tests running in parallel
    // would each see the others' signals.
    #[tokio::test]
    async fn every_signal_becomes_its_event() {
        let mut signals = Signals::install().expect("install handlers");
        let table = [
            (Sig::SIGTERM, SignalEvent::Shutdown(StopMode::Graceful)),
            (Sig::SIGINT, SignalEvent::Shutdown(StopMode::Graceful)),
            (Sig::SIGQUIT, SignalEvent::Shutdown(StopMode::Fast)),
            (Sig::SIGHUP, SignalEvent::Reload),
            (Sig::SIGUSR1, SignalEvent::ReopenLogs),
            (Sig::SIGTTIN, SignalEvent::ScaleWorkers(1)),
            (Sig::SIGTTOU, SignalEvent::ScaleWorkers(-1)),
            (Sig::SIGUSR2, SignalEvent::Upgrade),
        ];
        for (signal, expected) in table {
            assert_eq!(event_for(&mut signals, signal).await, expected, "{signal}");
        }

        // Pending together: the stop request is handed out before the reload.
        raise(Sig::SIGHUP).expect("raise");
        raise(Sig::SIGQUIT).expect("raise");
        // Both handlers have run once `raise` returns (it delivers synchronously to the calling
        // thread); give the driver a turn to read its pipe before asking.
        tokio::task::yield_now().await;
        let first = tokio::time::timeout(Duration::from_secs(5), signals.recv()).await;
        let second = tokio::time::timeout(Duration::from_secs(5), signals.recv()).await;
        assert_eq!(first.ok(), Some(SignalEvent::Shutdown(StopMode::Fast)));
        assert_eq!(second.ok(), Some(SignalEvent::Reload));
    }
}
