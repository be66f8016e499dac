//! Which programs a config holds, in start order, each resolved into what its actor starts
//! ([`Launch`]) and what a reload compares ([`Fingerprint`]). Start order is ascending
//! `priority`, then name; every order of programs in this role comes from [`start_key`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use proxy_conf::{Config, ProgramConfig, ProgramReload};

use super::launch::{Fingerprint, Launch};

/// The shortest RSS sampling interval, so a `sample_interval = "0s"` cannot spin the actor.
const MIN_RSS_INTERVAL: Duration = Duration::from_millis(50);

/// Where a program stands in start order: ascending `priority`, equal priorities by name (as
/// supervisord orders them). Every order of programs in `programs` comes from this key.
pub(super) fn start_key(priority: i64, name: &str) -> (i64, &str) {
    (priority, name)
}

/// The names of `programs` in start order (see `start_key`); stops go the reverse way.
pub fn start_order(programs: &BTreeMap<String, ProgramConfig>) -> Vec<&str> {
    let mut names: Vec<(&str, i64)> = programs
        .iter()
        .map(|(name, program)| (name.as_str(), program.priority))
        .collect();
    names.sort_by(|(a, a_priority), (b, b_priority)| {
        start_key(*a_priority, a).cmp(&start_key(*b_priority, b))
    });
    names.into_iter().map(|(name, _)| name).collect()
}

/// `sauna.toml` given without a directory has an empty parent: the current directory.
pub(super) fn base_dir_or_current(base_dir: &Path) -> &Path {
    if base_dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base_dir
    }
}

/// One program of a config, ready to start.
pub(super) struct Resolved {
    pub(super) name: String,
    pub(super) priority: i64,
    pub(super) policy: ProgramReload,
    pub(super) launch: Launch,
    pub(super) fingerprint: Fingerprint,
}

/// Every program of `config`, resolved, in start order.
pub(super) fn resolve(config: &Config, base_dir: &Path) -> Vec<Resolved> {
    let rss_interval = config.metrics.sample_interval.get().max(MIN_RSS_INTERVAL);
    start_order(&config.programs)
        .into_iter()
        .filter_map(|name| {
            let program = config.programs.get(name)?;
            let launch = Launch::new(name, program, &config.app, base_dir, rss_interval);
            let fingerprint = launch.fingerprint(program);
            Some(Resolved {
                name: name.to_owned(),
                priority: program.priority,
                policy: program.reload,
                launch,
                fingerprint,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(toml: &str) -> Vec<String> {
        let config = proxy_conf::load_str(toml, "sauna.toml").unwrap();
        start_order(&config.programs)
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn programs_start_by_priority_then_name() {
        assert_eq!(
            order(
                r#"
                [programs.celery]
                command = ["celery"]
                [programs.redis]
                command = ["redis-server"]
                priority = 10
                [programs.beta]
                command = ["x"]
                priority = 999
                [programs.alpha]
                command = ["x"]
                [programs.first]
                command = ["x"]
                priority = -5
                [programs.last]
                command = ["x"]
                priority = 1000
                "#
            ),
            ["first", "redis", "alpha", "beta", "celery", "last"],
            "lower first; the default is 999; equal priorities in name order"
        );
        assert!(order("").is_empty());
    }
}
