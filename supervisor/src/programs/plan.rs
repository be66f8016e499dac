//! What a reload does with each program: one [`Step`] per program ([`plan`]), decided from the
//! running programs' and the new config's fingerprints and `reload` policies. Pure: carrying the
//! steps out is [`super::reload`]'s.
//!
//! Added programs start, removed ones stop gracefully, and the others follow their new `reload`
//! policy. `rolling` programs are rolled by their actor on *every* reload, whether or not their
//! [`Fingerprint`] changed: the code a program runs is not in the config, and a release deployed
//! in place (new files in the same directory) changes nothing a fingerprint sees, yet a Celery
//! worker must import the new task modules. `restart` and `none` programs are compared by
//! fingerprint: a changed `restart` program is stopped and started again, a changed `none` program
//! keeps running its old config, and an unchanged one of either is left running — a supervised
//! broker or database must not go down on every deploy.

use proxy_conf::ProgramReload;

use super::launch::Fingerprint;

/// What a reload does with one program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Only in the new config: start it.
    Start,
    /// Only in the old config: stop it gracefully.
    Stop,
    /// `reload = "rolling"`: new instances first, the old ones get their stop signal once every
    /// new one has survived `ready_after`. Taken on every reload; `changed` says whether the
    /// fingerprint differs (only the progress lines tell the two apart).
    Roll {
        /// Keys, `[app]` values or resolved paths differ from the running instances'.
        changed: bool,
    },
    /// `reload = "restart"` and changed: stop the old instances, then start the new ones.
    Restart,
    /// `reload = "none"` and changed: it keeps running with its old config.
    KeepOld,
    /// `reload = "restart"` or `"none"` and unchanged: left running.
    Leave,
}

/// What [`plan`] knows about a program of the new config.
#[derive(Debug, Clone)]
pub struct Planned {
    /// `[programs.NAME]`.
    pub name: String,
    /// What its instances would be started from.
    pub fingerprint: Fingerprint,
    /// Its `reload` key in the new config.
    pub policy: ProgramReload,
}

/// Decides the reload of every program: first each program of `new` (in the new config's start
/// order) with the step its new `reload` policy and its fingerprint call for (see the module
/// documentation), then the programs only in `old` (the running ones, in their start order) in
/// reverse order, the way a stop goes. Starting before stopping keeps a queue consumed when a
/// program is renamed.
pub fn plan(old: &[(String, Fingerprint)], new: &[Planned]) -> Vec<(String, Step)> {
    let find = |name: &str| {
        old.iter()
            .find(|(other, _)| other == name)
            .map(|(_, fingerprint)| fingerprint)
    };
    let kept = new.iter().map(|program| {
        let step = match (find(&program.name), program.policy) {
            (None, _) => Step::Start,
            (Some(old), ProgramReload::Rolling) => Step::Roll {
                changed: *old != program.fingerprint,
            },
            (Some(old), _) if *old == program.fingerprint => Step::Leave,
            (Some(_), ProgramReload::Restart) => Step::Restart,
            (Some(_), ProgramReload::None) => Step::KeepOld,
        };
        (program.name.clone(), step)
    });
    let removed = old
        .iter()
        .rev()
        .filter(|(name, _)| !new.iter().any(|program| program.name == *name))
        .map(|(name, _)| (name.clone(), Step::Stop));
    kept.chain(removed).collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::programs::resolve::resolve;

    /// The programs of `toml` as [`plan`] sees the new config.
    fn planned(toml: &str, base_dir: &Path) -> Vec<Planned> {
        let config = proxy_conf::load_str(toml, "sauna.toml").unwrap();
        resolve(&config, base_dir)
            .into_iter()
            .map(|program| Planned {
                name: program.name,
                fingerprint: program.fingerprint,
                policy: program.policy,
            })
            .collect()
    }

    /// The programs of `toml` as [`plan`] sees the running ones.
    fn running(toml: &str, base_dir: &Path) -> Vec<(String, Fingerprint)> {
        planned(toml, base_dir)
            .into_iter()
            .map(|program| (program.name, program.fingerprint))
            .collect()
    }

    fn steps(steps: &[(&str, Step)]) -> Vec<(String, Step)> {
        steps
            .iter()
            .map(|(name, step)| ((*name).to_owned(), *step))
            .collect()
    }

    const ROLL: Step = Step::Roll { changed: true };
    const ROLL_UNCHANGED: Step = Step::Roll { changed: false };

    #[test]
    fn the_plan_follows_the_new_start_order_and_removes_in_reverse() {
        let base = Path::new("/tmp");
        let old = running(
            "[programs.a]\ncommand = [\"x\"]\n[programs.b]\ncommand = [\"x\"]\npriority = 1\n[programs.c]\ncommand = [\"x\"]\npriority = 2\n",
            base,
        );
        let new = planned(
            "[programs.z]\ncommand = [\"x\"]\npriority = 0\n[programs.y]\ncommand = [\"y\"]\n",
            base,
        );
        assert_eq!(
            plan(&old, &new),
            steps(&[
                ("z", Step::Start),
                ("y", Step::Start),
                // Running in the order b, c, a: stopped a, c, b.
                ("a", Step::Stop),
                ("c", Step::Stop),
                ("b", Step::Stop),
            ])
        );
    }

    #[test]
    fn a_new_priority_alone_changes_no_program() {
        let base = Path::new("/tmp");
        let toml = |priority: i64| {
            format!(
                "[programs.a]\ncommand = [\"x\"]\n[programs.b]\ncommand = [\"x\"]\npriority = {priority}\n[programs.c]\ncommand = [\"x\"]\nreload = \"restart\"\npriority = {priority}\n"
            )
        };
        assert_eq!(
            plan(&running(&toml(999), base), &planned(&toml(1), base)),
            steps(&[
                ("b", ROLL_UNCHANGED),
                ("c", Step::Leave),
                ("a", ROLL_UNCHANGED),
            ]),
            "the new start order, and nothing counts as changed"
        );
    }

    #[test]
    fn rolling_programs_roll_on_every_reload_the_others_only_when_changed() {
        let base = Path::new("/tmp");
        let toml = |version: &str| {
            format!(
                r#"
                [programs.celery]
                command = ["celery", "worker"]
                env = {{ V = "{version}" }}
                [programs.worker]
                command = ["worker"]
                reload = "rolling"
                [programs.broker]
                command = ["redis-server"]
                reload = "restart"
                priority = 10
                [programs.broker-v]
                command = ["redis-server"]
                env = {{ V = "{version}" }}
                reload = "restart"
                priority = 10
                [programs.mailer]
                command = ["mailer"]
                reload = "none"
                [programs.mailer-v]
                command = ["mailer"]
                env = {{ V = "{version}" }}
                reload = "none"
                "#
            )
        };
        // An in-place deploy: nothing in the config changed, the code on disk did.
        assert_eq!(
            plan(&running(&toml("1"), base), &planned(&toml("1"), base)),
            steps(&[
                ("broker", Step::Leave),
                ("broker-v", Step::Leave),
                ("celery", ROLL_UNCHANGED),
                ("mailer", Step::Leave),
                ("mailer-v", Step::Leave),
                ("worker", ROLL_UNCHANGED),
            ])
        );
        assert_eq!(
            plan(&running(&toml("1"), base), &planned(&toml("2"), base)),
            steps(&[
                ("broker", Step::Leave),
                ("broker-v", Step::Restart),
                ("celery", ROLL),
                ("mailer", Step::Leave),
                ("mailer-v", Step::KeepOld),
                ("worker", ROLL_UNCHANGED),
            ])
        );
    }

    #[test]
    fn the_plan_sees_what_changed_in_a_program_and_the_app() {
        let base = Path::new("/tmp");
        let old = running(
            r#"
            [app]
            wsgi = "a:app"
            env = { A = "1" }
            [programs.same]
            command = ["sleep", "1"]
            reload = "restart"
            [programs.gone]
            command = ["sleep", "1"]
            [programs.edited]
            command = ["sleep", "1"]
            reload = "restart"
            [programs.envy]
            command = ["sleep", "1"]
            reload = "restart"
            [programs.py]
            command = ["python", "-V"]
            reload = "restart"
            "#,
            base,
        );
        // [app].wsgi matters to no program; [app].env to all of them; [app].python only to
        // a program whose command is `python`.
        let new = planned(
            r#"
            [app]
            wsgi = "b:app"
            env = { A = "1" }
            python = "/usr/bin/python3"
            [programs.same]
            command = ["sleep", "1"]
            reload = "restart"
            [programs.edited]
            command = ["sleep", "2"]
            reload = "restart"
            [programs.envy]
            command = ["sleep", "1"]
            env = { B = "2" }
            reload = "restart"
            [programs.py]
            command = ["python", "-V"]
            reload = "restart"
            [programs.fresh]
            command = ["sleep", "1"]
            "#,
            base,
        );
        assert_eq!(
            plan(&old, &new),
            steps(&[
                ("edited", Step::Restart),
                ("envy", Step::Restart),
                ("fresh", Step::Start),
                ("py", Step::Restart),
                ("same", Step::Leave),
                // Removed ones come last, once the new config runs.
                ("gone", Step::Stop),
            ])
        );
        // A new `reload` policy alone is a change of the program's keys, too: the new policy
        // applies.
        let plain = running("[programs.same]\ncommand = [\"sleep\", \"1\"]\n", base);
        let restart = planned(
            "[programs.same]\ncommand = [\"sleep\", \"1\"]\nreload = \"restart\"\n",
            base,
        );
        assert_eq!(plan(&plain, &restart), steps(&[("same", Step::Restart)]));
        let to_rolling = running(
            "[programs.same]\ncommand = [\"sleep\", \"1\"]\nreload = \"none\"\n",
            base,
        );
        let rolling = planned("[programs.same]\ncommand = [\"sleep\", \"1\"]\n", base);
        assert_eq!(plan(&to_rolling, &rolling), steps(&[("same", ROLL)]));
    }

    #[test]
    fn a_retargeted_current_symlink_changes_the_program() {
        let dir = tempfile::tempdir().unwrap();
        for release in ["r1", "r2"] {
            std::fs::create_dir_all(dir.path().join(release).join("venv/bin")).unwrap();
        }
        let current = dir.path().join("current");
        std::os::unix::fs::symlink("r1", &current).unwrap();
        let toml = r#"
            [app]
            directory = "current"
            python = "current/venv/bin/python"
            [programs.worker]
            command = ["sleep", "1"]
            reload = "restart"
            [programs.elsewhere]
            command = ["sleep", "1"]
            directory = "/"
            reload = "restart"
            [programs.pinned]
            command = ["/bin/sleep", "1"]
            directory = "/"
            reload = "restart"
            [programs.venv]
            command = ["python", "-V"]
            directory = "/"
            reload = "restart"
            [programs.rolling]
            command = ["sleep", "1"]
            "#;
        let before = running(toml, dir.path());
        assert_eq!(
            plan(&before, &planned(toml, dir.path())),
            steps(&[
                ("elsewhere", Step::Leave),
                ("pinned", Step::Leave),
                ("rolling", ROLL_UNCHANGED),
                ("venv", Step::Leave),
                ("worker", Step::Leave),
            ]),
            "same target: only the rolling program rolls"
        );
        std::fs::remove_file(&current).unwrap();
        std::os::unix::fs::symlink("r2", &current).unwrap();
        assert_eq!(
            plan(&before, &planned(toml, dir.path())),
            steps(&[
                ("elsewhere", Step::Leave),
                ("pinned", Step::Leave),
                // Its working directory is the release.
                ("rolling", ROLL),
                // Its interpreter lives in the release.
                ("venv", Step::Restart),
                // Its working directory is the release.
                ("worker", Step::Restart),
            ])
        );
    }
}
