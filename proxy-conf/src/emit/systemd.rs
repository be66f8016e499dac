//! The systemd units: the supervisor's own (notify, reload through `sauna-supervisor reload`,
//! stop timeouts above the pool's and the programs', hardening) and one per Redis instance that
//! `emit redis` generates. Installing and enabling them is the user's step.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::redis::{Endpoint, Instance, data_dir, instances};
use super::{EmitError, File, Output, Problem, Service, check_name, copy, deploy, header};
use crate::schema::Config;
use crate::units::Duration;

/// Slack added to the longest stop/reload time so systemd never kills a stop that is on schedule.
const SLACK: Duration = Duration::from_secs(15);

/// Renders the supervisor's unit, plus the Redis units when `[redis]` is configured.
pub fn render(config: &Config) -> Result<Output, EmitError> {
    let deploy = deploy(config);
    let mut problems = Vec::new();
    check_name(&deploy, &mut problems);
    let unit = &deploy.systemd;
    for (key, path) in [("binary", &unit.binary), ("config", &unit.config)] {
        if !path.is_absolute() {
            problems.push(Problem::at(
                &["deploy", "systemd", key],
                format!(
                    "[deploy.systemd].{key} = {}: systemd needs an absolute path",
                    path.display()
                ),
            ));
        }
    }
    let redis_instances = match &config.redis {
        Some(_) => match instances(config) {
            Ok((list, _)) => list,
            Err(EmitError(more)) => {
                problems.extend(more);
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    if !problems.is_empty() {
        return Err(EmitError(problems));
    }
    let name = &deploy.name;

    // What the stop has to wait for: the pool's drain and each program's stop, whichever is longest.
    let mut stop_terms = Vec::new();
    if let Some(web) = &config.web {
        stop_terms.push(("[web].graceful_timeout".to_owned(), web.graceful_timeout));
    }
    for (program, settings) in &config.programs {
        stop_terms.push((
            format!("[programs.{program}].stop_timeout"),
            settings.stop_timeout,
        ));
    }
    let (stop_key, longest_stop) = stop_terms
        .iter()
        .max_by_key(|(_, d)| *d)
        .cloned()
        .unwrap_or_else(|| ("nothing to drain".to_owned(), Duration::default()));
    let stop = Duration(longest_stop.get() + SLACK.get());
    let start_bounds = start_bounds(config);
    let start = Duration(
        start_bounds
            .start
            .get()
            .max(start_bounds.reload.get())
            .max(longest_stop.get())
            + SLACK.get(),
    );

    let mut out = header("#", "systemd");
    let _ = writeln!(
        out,
        "# Install as /etc/systemd/system/{name}.service, then `systemctl daemon-reload` and\n# `systemctl enable --now {name}`.\n"
    );
    out.push_str("[Unit]\n");
    let _ = writeln!(out, "Description=sauna-supervisor: {name}");
    let mut after = vec!["network-online.target".to_owned()];
    let mut wants = vec!["network-online.target".to_owned()];
    for instance in &redis_instances {
        after.push(format!("{}.service", redis_unit(instance)));
        wants.push(format!("{}.service", redis_unit(instance)));
    }
    if config.postgres.is_some() {
        after.push("postgresql.service".to_owned());
    }
    let _ = writeln!(
        out,
        "After={}\nWants={}\n",
        after.join(" "),
        wants.join(" ")
    );

    out.push_str("[Service]\n");
    out.push_str("# The supervisor says READY=1 when the pool serves, and pings the watchdog. `sauna-supervisor\n# upgrade` (or SIGUSR2) starts a new binary that takes over the sockets; the old process\n# names it with MAINPID= and exits, so the service never stops.\nType=notify\nNotifyAccess=main\n");
    let config_path = unit.config.display();
    let binary = unit.binary.display();
    let _ = writeln!(
        out,
        "ExecStart={binary} run -c {config_path}\nExecReload={binary} reload -c {config_path}"
    );
    let _ = writeln!(
        out,
        "# TERM reaches the supervisor only; it stops its children gracefully, and whatever is left\n# after TimeoutStopSec is killed.\nKillMode=mixed\nKillSignal=SIGTERM"
    );
    let _ = writeln!(
        out,
        "# {stop_key} {longest_stop} + {SLACK}\nTimeoutStopSec={}",
        stop.get().as_secs()
    );
    for line in &start_bounds.explained {
        let _ = writeln!(out, "# {line}");
    }
    let _ = writeln!(out, "TimeoutStartSec={}", start.get().as_secs());
    if !unit.watchdog.is_zero() {
        let _ = writeln!(out, "WatchdogSec={}", unit.watchdog.get().as_secs().max(1));
    }
    let _ = writeln!(
        out,
        "Restart=on-failure\nRestartSec=2\nUser={}\nGroup={}\n# Holds control.sock; the default [control].socket is $RUNTIME_DIRECTORY/control.sock.\nRuntimeDirectory={}\nRuntimeDirectoryMode=0750",
        unit.user,
        unit.group,
        crate::load::SYSTEMD_RUNTIME_DIRECTORY
    );
    if let Some(directory) = &config.app.directory {
        let _ = writeln!(out, "WorkingDirectory={}", directory.display());
    }
    let _ = writeln!(
        out,
        "# The secrets named by password_env/token_env (`emit all -o DIR` writes the file, mode 0600).\n# No '-': a missing file fails the start instead of starting without them.\nEnvironmentFile={}\nLimitNOFILE={}",
        super::env::path(&deploy).display(),
        unit.limit_nofile
    );
    // An app under /home or /root still has to be readable.
    let in_home = config
        .app
        .directory
        .as_ref()
        .is_some_and(|dir| dir.starts_with("/home") || dir.starts_with("/root"));
    if in_home {
        out.push_str("# [app].directory is under a home directory: readable, not writable.\nProtectHome=read-only\n");
    } else {
        out.push_str("ProtectHome=yes\n");
    }
    out.push_str(
        "NoNewPrivileges=yes\nProtectSystem=strict\nPrivateTmp=yes\nPrivateDevices=yes\n\
         ProtectKernelTunables=yes\nProtectKernelModules=yes\nProtectControlGroups=yes\n\
         RestrictSUIDSGID=yes\nLockPersonality=yes\nRestrictRealtime=yes\n",
    );
    let mut writable: Vec<PathBuf> = unit.writable_paths.clone();
    if let Some(socket) = &config.control.socket
        && let Some(parent) = socket.parent()
        && !parent.starts_with("/run/sauna")
    {
        writable.push(parent.to_owned());
    }
    if !writable.is_empty() {
        // '-': a path that does not exist yet is skipped instead of failing the start.
        let _ = writeln!(
            out,
            "# Everything else is read-only ([deploy.systemd].writable_paths).\nReadWritePaths={}",
            writable
                .iter()
                .map(|p| format!("-{}", p.display()))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    out.push_str("\n[Install]\nWantedBy=multi-user.target\n");

    let mut output = Output::default();
    output.files.push(File {
        path: format!("systemd/{name}.service"),
        service: Service::Sauna,
        install: copy(unit_path(name), 0o644, "root", "root"),
        contents: out,
    });
    let redis = config.redis.clone().unwrap_or_default();
    for instance in &redis_instances {
        let unit_name = redis_unit(instance);
        output.files.push(File {
            path: format!("systemd/{unit_name}.service"),
            service: Service::Redis,
            install: copy(unit_path(&unit_name), 0o644, "root", "root"),
            contents: redis_unit_file(
                instance,
                &redis.server,
                &redis.user,
                &data_dir(&redis, instance),
            ),
        });
    }
    Ok(output)
}

/// How long the two things systemd bounds by `TimeoutStartSec=` may take, with the comment lines
/// that say why.
struct StartBounds {
    /// `run` until `READY=1`: the `before_start` hooks, then the web pool's first workers.
    start: Duration,
    /// `ExecReload=`: the `before_reload` hooks, the new generation getting ready and the old
    /// one draining.
    reload: Duration,
    explained: Vec<String>,
}

/// See [`StartBounds`]. Each hook command may run for up to `[hooks].hook_timeout`; without hooks
/// the comment reads as it always did.
fn start_bounds(config: &Config) -> StartBounds {
    let hooks = &config.hooks;
    let timeout = hooks.hook_timeout;
    let hooks_for = |commands: &[Vec<String>]| -> Duration {
        Duration(timeout.get() * u32::try_from(commands.len()).unwrap_or(u32::MAX))
    };
    let (start_hooks, reload_hooks) = (
        hooks_for(&hooks.before_start),
        hooks_for(&hooks.before_reload),
    );
    let (ready, drain) = config.web.as_ref().map_or_else(Default::default, |web| {
        (web.reload_timeout, web.graceful_timeout)
    });
    let start = Duration(start_hooks.get() + ready.get());
    let reload = Duration(reload_hooks.get() + ready.get() + drain.get());
    let pool = if config.web.is_some() {
        " + [web].reload_timeout"
    } else {
        ""
    };
    let explained = if hooks.before_start.is_empty() && hooks.before_reload.is_empty() {
        vec![
            format!(
                "A reload waits up to [web].reload_timeout + graceful_timeout = {reload}; systemd bounds"
            ),
            "ExecReload by TimeoutStartSec.".to_owned(),
        ]
    } else {
        let count =
            |commands: &[Vec<String>]| format!("{} × hook_timeout {timeout}", commands.len());
        vec![
            "systemd bounds the start (until READY=1) and ExecReload by TimeoutStartSec:"
                .to_owned(),
            format!(
                "- start: [hooks].before_start {}{pool} = {start}",
                count(&hooks.before_start)
            ),
            format!(
                "- reload: [hooks].before_reload {}{pool}{} = {reload}",
                count(&hooks.before_reload),
                if config.web.is_some() {
                    " + graceful_timeout"
                } else {
                    ""
                }
            ),
        ]
    };
    StartBounds {
        start,
        reload,
        explained,
    }
}

/// Where a unit is installed.
pub fn unit_path(unit: &str) -> PathBuf {
    PathBuf::from(format!("/etc/systemd/system/{unit}.service"))
}

/// The unit name of a Redis instance.
pub fn redis_unit(instance: &Instance) -> String {
    format!("{}-redis", instance.name)
}

fn redis_unit_file(instance: &Instance, server: &Path, user: &str, dir: &Path) -> String {
    let mut out = header("#", "systemd");
    let _ = writeln!(
        out,
        "[Unit]\nDescription=Redis {} for sauna-supervisor\nAfter=network.target\n\n[Service]\nType=notify\nExecStart={} /etc/redis/{}.conf\nUser={user}\nGroup={user}\n# Redis saves the AOF/RDB on SIGTERM before exiting; give it time.\nTimeoutStopSec=120\nRestart=always\nLimitNOFILE=65536\nNoNewPrivileges=yes\nProtectSystem=strict\nProtectHome=yes\nPrivateTmp=yes\nPrivateDevices=yes\nReadWritePaths={}",
        instance.name,
        server.display(),
        instance.name,
        dir.display()
    );
    if let Endpoint::Unix(socket) = &instance.endpoint
        && let Some(parent) = socket.parent()
    {
        let _ = writeln!(out, "ReadWritePaths=-{}", parent.display());
    }
    out.push_str("\n[Install]\nWantedBy=multi-user.target\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::load_str;

    /// The `TimeoutStartSec=` line and the comment lines just above it.
    fn start_timeout(text: &str) -> (u64, String) {
        let config = load_str(text, "sauna.toml").unwrap();
        let unit = &render(&config).unwrap().files[0].contents;
        let lines: Vec<&str> = unit.lines().collect();
        let at = lines
            .iter()
            .position(|line| line.starts_with("TimeoutStartSec="))
            .unwrap();
        let seconds = lines[at]["TimeoutStartSec=".len()..].parse().unwrap();
        let first = lines[..at]
            .iter()
            .rposition(|line| !line.starts_with('#'))
            .map_or(0, |before| before + 1);
        let comments = lines[first..at].join("\n");
        (seconds, comments)
    }

    const WEB: &str =
        "[app]\nwsgi = \"a:b\"\n[web]\nreload_timeout = \"60s\"\ngraceful_timeout = \"30s\"\n";

    #[test]
    fn without_hooks_the_reload_bounds_the_start() {
        let (seconds, comments) = start_timeout(WEB);
        assert_eq!(seconds, 60 + 30 + 15);
        assert!(
            comments.contains("[web].reload_timeout + graceful_timeout = 90s"),
            "{comments}"
        );
        assert!(!comments.contains("hooks"), "{comments}");
    }

    #[test]
    fn every_hook_command_gets_its_timeout_at_start_and_on_reload() {
        // Two reload hooks of 5 minutes each, on top of the pool's 90 s.
        let text = format!(
            "{WEB}[hooks]\nbefore_reload = [[\"python\", \"manage.py\", \"migrate\"], [\"python\", \"manage.py\", \"collectstatic\"]]\nhook_timeout = \"5m\"\n"
        );
        let (seconds, comments) = start_timeout(&text);
        assert_eq!(seconds, 600 + 90 + 15);
        assert!(
            comments.contains("- reload: [hooks].before_reload 2 × hook_timeout 5m + [web].reload_timeout + graceful_timeout = 690s"),
            "{comments}"
        );
        // A long migration before the first start outgrows the reload: READY=1 comes after it.
        let text = format!(
            "{WEB}[hooks]\nbefore_start = [[\"python\", \"manage.py\", \"migrate\"]]\nhook_timeout = \"30m\"\n"
        );
        let (seconds, comments) = start_timeout(&text);
        assert_eq!(seconds, 1800 + 60 + 15);
        assert!(
            comments.contains(
                "- start: [hooks].before_start 1 × hook_timeout 30m + [web].reload_timeout = 31m"
            ),
            "{comments}"
        );
    }

    #[test]
    fn hooks_without_a_web_pool_are_bounded_too() {
        let (seconds, _) = start_timeout(
            "[programs.w]\ncommand = [\"x\"]\nstop_timeout = \"20s\"\n[hooks]\nbefore_start = [[\"true\"]]\nhook_timeout = \"2m\"\n",
        );
        assert_eq!(seconds, 120 + 15);
    }
}
