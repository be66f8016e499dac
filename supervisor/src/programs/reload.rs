//! Applying a new config to the running programs ([`Programs::reload`]): the [`plan`]'s steps are
//! taken one after the other in the new start order, then the removed programs are stopped in
//! reverse of their start order. A rolling or restarted program is handed to its actor as a
//! [`Reload`] and the facade waits for the answer; the first failure stops the reload there, and
//! what was already applied stays applied. The progress lines and the one-line summary the
//! `reload` client prints are written here.

use std::collections::BTreeMap;
use std::path::Path;

use proxy_conf::{Config, ProgramReload};
use tokio::sync::oneshot;

use super::actor::{Command, Reload, Reloaded};
use super::launch::Fingerprint;
use super::plan::{Planned, Step, plan};
use super::resolve::{Resolved, base_dir_or_current, resolve};
use super::{ProgramHandle, Programs};
use crate::supervisor::lifecycle::{Progress, StopMode};

/// The `reload` key's value as written in sauna.toml.
fn policy_name(policy: ProgramReload) -> &'static str {
    match policy {
        ProgramReload::Rolling => "rolling",
        ProgramReload::Restart => "restart",
        ProgramReload::None => "none",
    }
}

impl Programs {
    /// Applies a new config to the running programs (see the module documentation); new
    /// instances start under `generation`. Returns a one-line summary naming what happened to
    /// each program, e.g. `programs: "celery" rolled, "redis" left running (unchanged, reload =
    /// "restart")` (empty when there are no programs before or after), or what failed: the
    /// program, how its new instance ended and its last output, and which programs were already
    /// reloaded before it (those stay reloaded; the ones after it were not touched).
    ///
    /// A changed program with `reload = "none"` keeps running with its old config, which it
    /// also keeps for later restarts after an exit: the next reload still sees it as changed.
    pub async fn reload(
        &mut self,
        config: &Config,
        base_dir: &Path,
        progress: &Progress,
        generation: u64,
    ) -> Result<String, String> {
        let resolved = resolve(config, base_dir_or_current(base_dir));
        let old: Vec<(String, Fingerprint)> = self
            .programs
            .iter()
            .map(|program| (program.name.clone(), program.fingerprint.clone()))
            .collect();
        let planned: Vec<Planned> = resolved
            .iter()
            .map(|program| Planned {
                name: program.name.clone(),
                fingerprint: program.fingerprint.clone(),
                policy: program.policy,
            })
            .collect();
        let mut new: BTreeMap<String, Resolved> = resolved
            .into_iter()
            .map(|program| (program.name.clone(), program))
            .collect();
        let say = |line: String| {
            tracing::info!("{line}");
            let _ = progress.send(line);
        };
        // What happened to each program, in plan order, for the summary; and the subset that
        // changed something, which a later failure leaves in place.
        let mut done: Vec<String> = Vec::new();
        let mut applied: Vec<String> = Vec::new();
        for (name, step) in plan(&old, &planned) {
            match step {
                Step::Leave | Step::KeepOld => {
                    if let Some(program) = new.get(&name) {
                        self.set_priority(&name, program.priority);
                    }
                    let policy = policy_name(
                        new.get(&name)
                            .map_or(ProgramReload::Rolling, |program| program.policy),
                    );
                    if step == Step::Leave {
                        say(format!(
                            "program \"{name}\": unchanged, left running (reload = \"{policy}\")"
                        ));
                        done.push(format!(
                            "\"{name}\" left running (unchanged, reload = \"{policy}\")"
                        ));
                    } else {
                        say(format!(
                            "program \"{name}\": changed, but reload = \"none\": it keeps running with its old config"
                        ));
                        done.push(format!(
                            "\"{name}\" kept the old config (reload = \"none\")"
                        ));
                    }
                }
                Step::Start => {
                    let Some(program) = new.remove(&name) else {
                        continue;
                    };
                    let handle = ProgramHandle::start(program, &self.metrics, generation);
                    self.programs.push(handle);
                    self.reorder();
                    say(format!("program \"{name}\": added, started"));
                    applied.push(format!("\"{name}\" started"));
                    done.push(format!("\"{name}\" started"));
                }
                Step::Stop => {
                    let Some(at) = self
                        .programs
                        .iter()
                        .position(|program| program.name == name)
                    else {
                        continue;
                    };
                    say(format!("program \"{name}\": removed, stopping it"));
                    self.programs.remove(at).stop(StopMode::Graceful).await;
                    // Only now: the views see the program stopping, as its actor answers
                    // until its processes are gone.
                    self.publish();
                    say(format!("program \"{name}\": stopped"));
                    applied.push(format!("\"{name}\" stopped"));
                    done.push(format!("\"{name}\" stopped"));
                }
                Step::Roll { .. } | Step::Restart => {
                    let Some(Resolved {
                        priority,
                        policy,
                        launch,
                        fingerprint,
                        ..
                    }) = new.remove(&name)
                    else {
                        continue;
                    };
                    let Some(handle) = self
                        .programs
                        .iter_mut()
                        .find(|program| program.name == name)
                    else {
                        continue;
                    };
                    let changed = step != Step::Roll { changed: false };
                    let (reply, answer) = oneshot::channel();
                    let reload = Reload {
                        launch,
                        policy,
                        changed,
                        generation,
                        progress: progress.clone(),
                        reply,
                    };
                    let outcome = match handle
                        .commands
                        .send(Command::Reload(Box::new(reload)))
                        .await
                    {
                        Ok(()) => answer.await.unwrap_or_else(|_| {
                            Err(format!(
                                "program \"{name}\": its actor ended during the reload"
                            ))
                        }),
                        Err(_) => Err(format!("program \"{name}\": its actor is gone")),
                    };
                    match outcome {
                        Ok(Reloaded { summary, outcome }) => {
                            handle.fingerprint = fingerprint;
                            self.set_priority(&name, priority);
                            say(summary);
                            applied.push(format!("\"{name}\" {outcome}"));
                            done.push(format!("\"{name}\" {outcome}"));
                        }
                        Err(failure) => {
                            let before = if applied.is_empty() {
                                String::new()
                            } else {
                                format!(
                                    "\nalready applied before it, and kept: {}",
                                    applied.join(", ")
                                )
                            };
                            return Err(format!("{failure}{before}"));
                        }
                    }
                }
            }
        }
        if done.is_empty() {
            // No programs before or after: nothing to say.
            return Ok(String::new());
        }
        Ok(format!("programs: {}", done.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;
    use crate::programs::InstanceState;
    use crate::programs::tests::{alive, start, wait_for};
    use crate::test_support::runtime;

    /// A program config whose instance records, in `dir`, when it started and when it got
    /// SIGTERM (nanoseconds since the epoch), then runs until stopped.
    fn recording(dir: &Path, name: &str, extra: &str) -> String {
        let dir = dir.display();
        format!(
            r#"
            [programs.{name}]
            command = ["sh", "-c", "date +%s%N > {dir}/start-$$; trap 'date +%s%N > {dir}/term-$$; exit 0' TERM; sleep 300 & wait"]
            ready_after = "600ms"
            stop_timeout = "5s"
            {extra}
            "#
        )
    }

    fn recorded(dir: &Path, what: &str, pid: u32) -> u128 {
        let text = std::fs::read_to_string(dir.join(format!("{what}-{pid}")))
            .unwrap_or_else(|error| panic!("{what}-{pid}: {error}"));
        text.trim().parse().unwrap()
    }

    fn drain(progress: &mut mpsc::UnboundedReceiver<String>) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = progress.try_recv() {
            lines.push(line);
        }
        lines
    }

    async fn reload(
        programs: &mut Programs,
        toml: &str,
        generation: u64,
    ) -> (Result<String, String>, Vec<String>) {
        let config = proxy_conf::load_str(toml, "sauna.toml").unwrap();
        let (progress, mut lines) = mpsc::unbounded_channel();
        let outcome = programs
            .reload(&config, Path::new("/tmp"), &progress, generation)
            .await;
        (outcome, drain(&mut lines))
    }

    #[test]
    fn rolling_keeps_the_old_instance_until_the_new_one_survived_ready_after() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let old_toml = recording(dir.path(), "celery", "instances = 2");
            let mut programs = start(&old_toml);
            let status = wait_for(&programs, "two running instances", |status| {
                status[0].state == InstanceState::Running
            })
            .await;
            let old: Vec<u32> = status[0].instances.iter().map(|i| i.pid.unwrap()).collect();
            // Any change of the command is a change; this one also sets an env var.
            let new_toml = recording(
                dir.path(),
                "celery",
                "instances = 2\nenv = { RELEASE = \"2\" }",
            );
            let (outcome, lines) = reload(&mut programs, &new_toml, 2).await;
            let summary = outcome.unwrap();
            assert!(summary.contains("\"celery\" rolled"), "{summary}");
            let status = programs.status().await;
            let instances = &status[0].instances;
            assert_eq!(instances.len(), 2, "{instances:#?}");
            for (index, instance) in instances.iter().enumerate() {
                let new = instance.pid.unwrap();
                assert_eq!((instance.index, instance.generation), (index, 2));
                assert!(!old.contains(&new));
                assert!(alive(new));
                assert!(!alive(old[index]));
                // The old one got TERM only after the new one had run for ready_after (counted
                // from the spawn, which `started_at` records).
                let term = recorded(dir.path(), "term", old[index]) as f64 / 1e9;
                let gap = term - instance.started_at.unwrap();
                assert!(gap >= 0.6, "old stopped {gap} s after the new start");
            }
            assert!(
                lines.iter().any(|line| line.contains("new instance 1 up")
                    && line.contains("stopping the old one")),
                "{lines:#?}"
            );
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn a_new_instance_that_dies_rolls_back_and_the_old_one_is_untouched() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut programs = start(&format!(
                "{}{}",
                recording(dir.path(), "celery", ""),
                "[programs.beta]\ncommand = [\"sleep\", \"300\"]\nready_after = \"0s\"\n"
            ));
            // `beta` sorts first, so it is rolled before celery fails.
            let status = wait_for(&programs, "running", |status| {
                status.iter().all(|p| p.state == InstanceState::Running)
            })
            .await;
            let old = status[1].instances[0].pid.unwrap();
            let toml = r#"
                [programs.beta]
                command = ["sleep", "301"]
                ready_after = "0s"
                [programs.celery]
                command = ["sh", "-c", "echo 'ImportError: no module named tasks' >&2; exit 7"]
                ready_after = "2s"
                "#;
            let (outcome, _) = reload(&mut programs, toml, 2).await;
            let error = outcome.unwrap_err();
            assert!(error.contains("program \"celery\""), "{error}");
            assert!(error.contains("exited with status 7"), "{error}");
            assert!(
                error.contains("ImportError: no module named tasks"),
                "{error}"
            );
            assert!(error.contains("old instances kept running"), "{error}");
            assert!(error.contains("\"beta\" rolled"), "{error}");
            let status = programs.status().await;
            assert_eq!(status[0].instances[0].generation, 2, "beta stays rolled");
            let celery = &status[1].instances;
            assert_eq!(celery.len(), 1, "{celery:#?}");
            assert_eq!((celery[0].pid, celery[0].generation), (Some(old), 1));
            assert_eq!(celery[0].state, InstanceState::Running);
            assert!(
                !dir.path().join(format!("term-{old}")).exists(),
                "the old instance never got a signal"
            );
            // The next reload still sees the change and tries again.
            let (outcome, _) = reload(&mut programs, toml, 3).await;
            assert!(outcome.unwrap_err().contains("exited with status 7"));
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn restart_stops_first_and_none_keeps_the_old_config() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let toml = |restart_env: &str, none_env: &str| {
                format!(
                    "{}{}",
                    recording(
                        dir.path(),
                        "again",
                        &format!("reload = \"restart\"\nenv = {{ V = \"{restart_env}\" }}")
                    ),
                    recording(
                        dir.path(),
                        "steady",
                        &format!("reload = \"none\"\nenv = {{ V = \"{none_env}\" }}")
                    )
                )
            };
            let mut programs = start(&toml("1", "1"));
            let status = wait_for(&programs, "running", |status| {
                status.iter().all(|p| p.state == InstanceState::Running)
            })
            .await;
            let (again, steady) = (
                status[0].instances[0].pid.unwrap(),
                status[1].instances[0].pid.unwrap(),
            );
            let (outcome, lines) = reload(&mut programs, &toml("2", "2"), 2).await;
            let summary = outcome.unwrap();
            assert!(summary.contains("\"again\" restarted"), "{summary}");
            assert!(
                summary.contains("\"steady\" kept the old config"),
                "{summary}"
            );
            assert!(
                lines.iter().any(|line| line.contains("reload = \"none\"")),
                "{lines:#?}"
            );
            let status = programs.status().await;
            let new = status[0].instances[0].pid.unwrap();
            assert_ne!(new, again);
            assert_eq!(status[0].instances[0].generation, 2);
            assert!(
                recorded(dir.path(), "start", new) >= recorded(dir.path(), "term", again),
                "restart: the old one was stopped before the new one started"
            );
            assert_eq!(status[1].instances[0].pid, Some(steady));
            assert_eq!(status[1].instances[0].generation, 1);
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn a_failed_restart_brings_the_old_config_back() {
        runtime().block_on(async {
            let toml = |command: &str| {
                format!(
                    "[programs.svc]\ncommand = {command}\nreload = \"restart\"\nready_after = \"0s\"\n"
                )
            };
            let mut programs = start(&toml(r#"["sleep", "300"]"#));
            let status = wait_for(&programs, "running", |status| {
                status[0].instances[0].pid.is_some()
            })
            .await;
            let old = status[0].instances[0].pid.unwrap();
            let (outcome, _) = reload(&mut programs, &toml(r#"["/nonexistent/svc"]"#), 2).await;
            let error = outcome.unwrap_err();
            assert!(error.contains("could not start"), "{error}");
            assert!(error.contains("/nonexistent/svc"), "{error}");
            assert!(error.contains("old config was started again"), "{error}");
            assert!(!alive(old), "restart stopped the old process first");
            let status = wait_for(&programs, "the old config back", |status| {
                status[0].instances[0].state == InstanceState::Running
            })
            .await;
            let instances = &status[0].instances;
            assert_eq!(instances.len(), 1, "{instances:#?}");
            assert_eq!(instances[0].generation, 1);
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn rolling_to_fewer_instances_retires_the_extra_ones() {
        runtime().block_on(async {
            let toml = |instances: u32| {
                format!(
                    "[programs.pool]\ncommand = [\"sleep\", \"300\"]\ninstances = {instances}\nready_after = \"0s\"\n"
                )
            };
            let mut programs = start(&toml(3));
            let status = wait_for(&programs, "three running", |status| {
                status[0].state == InstanceState::Running
            })
            .await;
            let old: Vec<u32> = status[0].instances.iter().map(|i| i.pid.unwrap()).collect();
            let (outcome, lines) = reload(&mut programs, &toml(1), 2).await;
            outcome.unwrap();
            let status = programs.status().await;
            let instances = &status[0].instances;
            assert_eq!(instances.len(), 1, "{instances:#?}");
            assert_eq!((instances[0].index, instances[0].generation), (0, 2));
            assert!(old.iter().all(|pid| !alive(*pid)));
            assert_eq!(lines.iter().filter(|line| line.contains(" up (pid")).count(), 1);
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn reload_starts_added_and_stops_removed_programs() {
        runtime().block_on(async {
            let same_toml = "[programs.same]\ncommand = [\"sleep\", \"300\"]\nreload = \"restart\"\n";
            let mut programs = start(&format!(
                "[programs.old]\ncommand = [\"sleep\", \"300\"]\n{same_toml}"
            ));
            let status = wait_for(&programs, "started", |status| {
                status.iter().all(|p| p.instances[0].pid.is_some())
            })
            .await;
            let (old, same) = (status[0].instances[0].pid.unwrap(), status[1].instances[0].pid.unwrap());
            let (outcome, _) = reload(
                &mut programs,
                &format!("[programs.new]\ncommand = [\"sleep\", \"300\"]\n{same_toml}"),
                2,
            )
            .await;
            assert_eq!(
                outcome.unwrap(),
                "programs: \"new\" started, \"same\" left running (unchanged, reload = \"restart\"), \"old\" stopped"
            );
            let status = programs.status().await;
            let names: Vec<&str> = status.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["new", "same"]);
            assert_eq!(status[0].instances[0].generation, 2);
            assert_eq!(status[1].instances[0].pid, Some(same));
            assert!(!alive(old));
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn a_reload_with_new_priorities_reorders_without_restarting() {
        runtime().block_on(async {
            let toml = |a: i64, b: i64| {
                format!(
                    "[programs.a]\ncommand = [\"sleep\", \"300\"]\nready_after = \"0s\"\nreload = \"restart\"\npriority = {a}\n[programs.b]\ncommand = [\"sleep\", \"300\"]\nready_after = \"0s\"\nreload = \"none\"\npriority = {b}\n"
                )
            };
            let mut programs = start(&toml(1, 2));
            let status = wait_for(&programs, "started", |status| {
                status.iter().all(|p| p.instances[0].pid.is_some())
            })
            .await;
            let names: Vec<&str> = status.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["a", "b"]);
            let pids: Vec<Option<u32>> = status.iter().map(|p| p.instances[0].pid).collect();
            let (outcome, _) = reload(&mut programs, &toml(2, 1), 2).await;
            assert_eq!(
                outcome.unwrap(),
                "programs: \"b\" left running (unchanged, reload = \"none\"), \"a\" left running (unchanged, reload = \"restart\")"
            );
            let status = programs.status().await;
            let names: Vec<&str> = status.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["b", "a"], "status lists the new start order");
            let now: Vec<Option<u32>> = status.iter().map(|p| p.instances[0].pid).collect();
            assert_eq!(now, [pids[1], pids[0]], "nothing was restarted");
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn an_unchanged_rolling_program_is_rolled_new_first_on_every_reload() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let toml = recording(dir.path(), "celery", "");
            let mut programs = start(&toml);
            let status = wait_for(&programs, "running", |status| {
                status[0].state == InstanceState::Running
            })
            .await;
            let mut old = status[0].instances[0].pid.unwrap();
            for generation in [2, 3] {
                let (outcome, lines) = reload(&mut programs, &toml, generation).await;
                assert_eq!(outcome.unwrap(), "programs: \"celery\" rolled");
                assert!(
                    lines
                        .iter()
                        .any(|line| line.contains("config unchanged; rolling it")),
                    "{lines:#?}"
                );
                let status = programs.status().await;
                let instance = &status[0].instances[0];
                let new = instance.pid.unwrap();
                assert_ne!(new, old);
                assert_eq!(instance.generation, generation);
                assert!(!alive(old));
                let term = recorded(dir.path(), "term", old) as f64 / 1e9;
                let gap = term - instance.started_at.unwrap();
                assert!(gap >= 0.6, "old stopped {gap} s after the new start");
                old = new;
            }
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn an_unchanged_one_shot_program_that_exited_is_not_run_again() {
        runtime().block_on(async {
            let toml = "[programs.once]\ncommand = [\"true\"]\nrestart = \"on-failure\"\nready_after = \"0s\"\n";
            let mut programs = start(toml);
            wait_for(&programs, "exited", |status| {
                status[0].state == InstanceState::Exited
            })
            .await;
            let (outcome, _) = reload(&mut programs, toml, 2).await;
            assert_eq!(
                outcome.unwrap(),
                "programs: \"once\" left exited (restart = \"on-failure\")"
            );
            let status = programs.status().await;
            assert_eq!(status[0].instances[0].generation, 1);
            assert_eq!(status[0].instances[0].restarts, 0);
            programs.shutdown(StopMode::Fast).await;
        });
    }

    #[test]
    fn a_view_taken_before_a_reload_follows_programs_added_removed_and_reordered() {
        runtime().block_on(async {
            let sleeper = |name: &str, priority: i64| {
                format!(
                    "[programs.{name}]\ncommand = [\"sleep\", \"300\"]\nready_after = \"0s\"\npriority = {priority}\n"
                )
            };
            let mut programs = start(&format!("{}{}", sleeper("alpha", 0), sleeper("beta", 1)));
            let view = programs.view();
            let names = |status: Vec<crate::programs::ProgramStatus>| -> Vec<String> {
                status.into_iter().map(|program| program.name).collect()
            };
            assert_eq!(names(view.status().await), ["alpha", "beta"]);
            // beta now starts first, gamma is new, alpha is removed.
            let toml = format!("{}{}", sleeper("beta", -1), sleeper("gamma", 0));
            let (outcome, _) = reload(&mut programs, &toml, 2).await;
            outcome.unwrap();
            assert_eq!(names(view.status().await), ["beta", "gamma"]);
            programs.shutdown(StopMode::Fast).await;
        });
    }
}
