//! The command line: every command of the user-facing contract, its flags and its exit status.
//! This module parses and dispatches; each command's front end is a submodule (`check`, with
//! `live` for `check --live`; `emit`; `beat`; and `remote` for the commands that talk to a
//! running supervisor), which prints what it found and returns a [`CommandError`] when it failed,
//! while the work itself stays in the module that owns the feature. [`error`] turns that error
//! into the `sauna-supervisor: …` line and the exit status, in one place. `run` hands over to
//! [`crate::supervisor::run`]. Nothing outside this module imports it: what the rest needs from
//! the command line is converted into plain types here ([`RunOptions`], [`LogOptions`]).

pub mod beat;
pub mod beat_jobs;
pub mod check;
pub mod emit;
pub mod error;
pub mod live;
pub mod remote;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use proxy_conf::Loaded;

use crate::config::ConfigError;
use crate::logging::{LogFormat, LogOptions};
use crate::supervisor::RunOptions;
pub use error::CommandError;

/// Runs a Python WSGI pool, Celery workers and a Celery beat replacement from one sauna.toml.
///
/// Without a command, `run` is assumed. The config file is `-c FILE`, else $SAUNA_CONFIG,
/// else ./sauna.toml. Without any, status, stop, reload and upgrade find the supervisor on
/// $RUNTIME_DIRECTORY/control.sock, else /run/sauna/control.sock.
#[derive(Debug, Parser)]
#[command(name = "sauna-supervisor", version, propagate_version = true)]
pub struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `run`, accepted without the word `run`.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Where the configuration file is.
#[derive(Debug, Clone, Args, Default)]
pub struct ConfigArg {
    /// The configuration file [default: $SAUNA_CONFIG, else ./sauna.toml]
    #[arg(short = 'c', long = "config", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    /// Loads the file this names (see [`crate::config::config_path`]).
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        crate::config::load(self.config.as_deref())
    }
}

/// Logging options shared by every command that runs for a while.
#[derive(Debug, Clone, Args, Default)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Minimum level (error, warn, info, debug, trace) or a RUST_LOG-style filter; RUST_LOG wins.
    #[arg(long, value_name = "FILTER", global = true)]
    pub log_level: Option<String>,
    /// Append log lines to this file instead of stderr; reopened on SIGUSR1 (for logrotate).
    #[arg(long, value_name = "FILE", global = true)]
    pub log_file: Option<PathBuf>,
}

impl LogArgs {
    /// The options as the logger takes them.
    pub fn options(&self) -> LogOptions {
        LogOptions {
            log_format: self.log_format,
            log_level: self.log_level.clone(),
            log_file: self.log_file.clone(),
        }
    }
}

/// Options of `run`.
#[derive(Debug, Clone, Args, Default)]
pub struct RunArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
    /// Development mode: reload when the app's .py or .ini files change.
    #[arg(long)]
    pub watch: bool,
}

impl RunArgs {
    /// The options as the main loop takes them.
    pub fn options(&self) -> RunOptions {
        RunOptions {
            config: self.config.config.clone(),
            log: self.log.options(),
            watch: self.watch,
        }
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the stack in the foreground (systemd ExecStart); exits 0 after a clean stop.
    ///
    /// `[hooks].before_start` runs first; if it fails, nothing starts and the exit status is 1.
    Run(RunArgs),
    /// Ask the running supervisor to reload its config and roll every role; waits until done.
    ///
    /// Runs `[hooks].before_reload` first, then rolls the web pool, the programs and beat.
    /// Exit status: 0 done, 1 a hook failed or the roll was rolled back (the old generation
    /// keeps serving), 2 usage or config error.
    Reload {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// Give up waiting after this long, e.g. "2m".
        #[arg(long, value_name = "DURATION")]
        timeout: Option<proxy_conf::Duration>,
    },
    /// Show pools, workers, programs and beat jobs of the running supervisor, with the last
    /// error of each program and of beat.
    ///
    /// Exit status: 0, or 3 when no supervisor is running.
    Status {
        /// The configuration file (to find the control socket).
        #[command(flatten)]
        config: ConfigArg,
        /// Print the full status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the running supervisor gracefully and wait until it has exited.
    Stop {
        /// The configuration file (to find the control socket).
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the configuration: every problem as FILE:LINE:COL: message; exit 2 on problems.
    Check {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// Also connect to the configured Redis and PostgreSQL and compare them with the config.
        #[arg(long)]
        live: bool,
    },
    /// Write generated nginx, Redis, PostgreSQL, systemd or Grafana configuration.
    Emit {
        /// What to generate.
        #[arg(value_enum)]
        target: EmitTarget,
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// Write files into this directory instead of printing to stdout.
        #[arg(short = 'o', long = "output", value_name = "DIR")]
        output: Option<PathBuf>,
    },
    /// Scheduling tools.
    Beat {
        /// The beat command.
        #[command(subcommand)]
        command: BeatCommand,
    },
    /// Write an nginx-compatible htpasswd entry for USER (password read from stdin).
    Htpasswd {
        /// The user name.
        user: String,
    },
    /// Replace the running sauna-supervisor binary without refusing a connection; waits until
    /// the new process serves and the old one has exited. SIGUSR2 does the same (default binary).
    ///
    /// The new process runs in its own process group. If it fails or is not ready within
    /// --timeout, the whole group (a wrapper script and the binary it runs, too) gets TERM, then
    /// KILL after 3 s, and the command answers only once no process but the old supervisor holds
    /// a socket it handed over. The new process takes over only when the old one releases it; a
    /// hand-over channel closed without that makes it stop and exit non-zero. If it dies before
    /// it is released, the old supervisor starts its roles again and serves on.
    ///
    /// Exit status: 0 done, 1 failed (the old supervisor keeps serving), 2 usage or config error.
    Upgrade {
        /// The configuration file (to find the control socket).
        #[command(flatten)]
        config: ConfigArg,
        /// The binary to start [default: the running supervisor's own path, as resolved when
        /// it started, so a binary replaced on disk by a package upgrade is picked up].
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// How long the new process gets to become ready, e.g. "2m" [default: [web].reload_timeout
        /// plus 30 s].
        #[arg(long, value_name = "DURATION")]
        timeout: Option<proxy_conf::Duration>,
    },
}

/// What `emit` generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EmitTarget {
    /// nginx server and upstream configuration.
    Nginx,
    /// Redis configuration (broker and cache instances).
    Redis,
    /// postgresql.conf fragment, pg_hba.conf lines and init SQL.
    Postgres,
    /// The systemd unit(s).
    Systemd,
    /// A Grafana dashboard JSON.
    Grafana,
    /// Everything, into `-o DIR`.
    All,
}

/// `beat` subcommands.
#[derive(Debug, Subcommand)]
pub enum BeatCommand {
    /// Print the next fire times, one RFC 3339 timestamp per line.
    ///
    /// With -c and neither --cron nor --every: each configured job.
    Next(BeatNextArgs),
    /// Add a runtime job (stored in Redis, run by the leader from its next slot, no reload), or
    /// replace the runtime job of that name.
    ///
    /// The job is checked with the rules of [beat.jobs.NAME] and refused, never stored, when
    /// invalid (exit 2); a sauna.toml job's name is refused too. Talks to the broker of
    /// [beat] directly: no supervisor needs to run here.
    Add(Box<BeatAddArgs>),
    /// Remove a runtime job; exit 1 when there is none of that name.
    Remove {
        /// The job name.
        name: String,
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Pause a runtime job: it publishes nothing until resumed.
    Pause {
        /// The job name.
        name: String,
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Resume a paused runtime job from its next slot (slots while paused are not caught up).
    Resume {
        /// The job name.
        name: String,
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List every job (sauna.toml's and runtime ones) with its state and next and last run.
    List {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Import django-celery-beat's enabled periodic tasks as runtime jobs.
    ///
    /// Crontab and interval schedules (and one-off tasks) are imported; solar and clocked
    /// schedules and options a runtime job cannot honour are listed as not imported (exit 1).
    Import(BeatImportArgs),
}

/// Options of `beat add`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("schedule").required(true).args(["cron", "every"])))]
pub struct BeatAddArgs {
    /// The job name.
    pub name: String,
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Registered Celery task name.
    #[arg(long, value_name = "TASK")]
    pub task: String,
    /// A 5-field crontab expression or @hourly/@daily/@weekly/@monthly/@yearly.
    #[arg(long, value_name = "EXPR")]
    pub cron: Option<String>,
    /// An interval such as "30s" or "5m", aligned to the Unix epoch.
    #[arg(long, value_name = "DURATION")]
    pub every: Option<String>,
    /// IANA time zone of --cron [default: [beat].timezone of the leader].
    #[arg(long, value_name = "TZ")]
    pub timezone: Option<String>,
    /// Positional arguments, a JSON array, e.g. '[1, "x"]'.
    #[arg(long, value_name = "JSON")]
    pub args: Option<String>,
    /// Keyword arguments, a JSON object, e.g. '{"tenant": 7}'.
    #[arg(long, value_name = "JSON")]
    pub kwargs: Option<String>,
    /// Queue [default: celery].
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// Priority 0..9 (0 is the highest under Redis).
    #[arg(long, value_name = "N")]
    pub priority: Option<i64>,
    /// Workers discard the task when they start it later than this after publishing, e.g. "10m".
    #[arg(long, value_name = "DURATION")]
    pub expires: Option<String>,
    /// Missed-slot policy: skip, once (default) or all.
    #[arg(long, value_name = "POLICY")]
    pub catch_up: Option<String>,
    /// How old a missed slot may be and still be published [default: one period].
    #[arg(long, value_name = "DURATION")]
    pub catch_up_window: Option<String>,
    /// Publish one slot, then pause the job.
    #[arg(long)]
    pub one_off: bool,
}

/// Options of `beat import`.
#[derive(Debug, Clone, Args)]
pub struct BeatImportArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// The Django database holding django-celery-beat's tables, e.g.
    /// postgres://app@localhost/app (a password in the URL or $PGPASSWORD).
    #[arg(long, value_name = "POSTGRES_URL")]
    pub django_celery_beat: String,
    /// Print what would be imported without writing anything.
    #[arg(long)]
    pub dry_run: bool,
}

/// Options of `beat next`.
#[derive(Debug, Clone, Args)]
pub struct BeatNextArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// A 5-field crontab expression or @hourly/@daily/@weekly/@monthly/@yearly.
    #[arg(long, value_name = "EXPR", conflicts_with = "every")]
    pub cron: Option<String>,
    /// An interval such as "30s" or "5m".
    #[arg(long, value_name = "DURATION")]
    pub every: Option<proxy_conf::Duration>,
    /// IANA time zone of the expression [default: UTC].
    #[arg(long, value_name = "TZ")]
    pub timezone: Option<String>,
    /// Start after this instant (RFC 3339) [default: now].
    #[arg(long, value_name = "RFC3339")]
    pub after: Option<String>,
    /// How many fire times to print.
    #[arg(long, default_value_t = 5)]
    pub count: usize,
}

/// Parses the command line, runs the command and maps the outcome to an exit status: the only
/// place the process's exit status comes from ([`CommandError::exit_code`]).
pub fn main() -> ExitCode {
    match Cli::try_parse()
        .map_err(CommandError::from)
        .and_then(dispatch)
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error.report();
            ExitCode::from(error.exit_code())
        }
    }
}

fn dispatch(cli: Cli) -> Result<(), CommandError> {
    match cli.command {
        None => Ok(crate::supervisor::run(&cli.run.options())?),
        Some(Command::Run(args)) => Ok(crate::supervisor::run(&args.options())?),
        Some(Command::Reload { config, timeout }) => remote::reload_command(&config, timeout),
        Some(Command::Status { config, json }) => remote::status_command(&config, json),
        Some(Command::Stop { config }) => remote::stop_command(&config),
        Some(Command::Check { config, live }) => check::check_command(&config, live),
        Some(Command::Emit {
            target: EmitTarget::Grafana,
            output,
            ..
        }) => emit::grafana_command(output.as_deref()),
        Some(Command::Emit {
            target,
            config,
            output,
        }) => emit::emit_command(target, &config, output.as_deref()),
        Some(Command::Beat { command }) => match command {
            BeatCommand::Next(args) => beat::next_command(&args),
            BeatCommand::Add(args) => beat_jobs::add_command(&args),
            BeatCommand::Remove { name, config } => beat_jobs::remove_command(&config, &name),
            BeatCommand::Pause { name, config } => beat_jobs::pause_command(&config, &name, true),
            BeatCommand::Resume { name, config } => beat_jobs::pause_command(&config, &name, false),
            BeatCommand::List { config, json } => beat_jobs::list_command(&config, json),
            BeatCommand::Import(args) => beat_jobs::import_command(&args),
        },
        Some(Command::Htpasswd { user }) => emit::htpasswd_command(&user),
        Some(Command::Upgrade {
            config,
            binary,
            timeout,
        }) => remote::upgrade_command(&config, binary, timeout),
    }
}
