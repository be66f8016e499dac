//! The systemd units: the supervisor's own (notify, reload through `sauna-supervisor reload`,
//! stop timeouts above the pool's and the programs', hardening) and one per Redis instance that
//! `emit redis` generates. Installing and enabling them is the user's step.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::redis::{Endpoint, Instance, data_dir, instances};
use super::{EmitError, File, Output, Problem, Service, check_name, copy, deploy, header};
use crate::config::Config;
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
    // `reload` waits for the new generation to be ready and the old one to drain; systemd bounds
    // ExecReload= by TimeoutStartSec=, like the start itself.
    let reload = config.web.as_ref().map_or(Duration::default(), |web| {
        Duration(web.reload_timeout.get() + web.graceful_timeout.get())
    });
    let start = Duration(reload.get().max(longest_stop.get()) + SLACK.get());

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
    let _ = writeln!(
        out,
        "# A reload waits up to [web].reload_timeout + graceful_timeout = {reload}; systemd bounds\n# ExecReload by TimeoutStartSec.\nTimeoutStartSec={}",
        start.get().as_secs()
    );
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
