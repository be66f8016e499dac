//! The secrets file the supervisor's unit reads (`EnvironmentFile=/etc/sauna/NAME.env`): one
//! `VAR="value"` line for each variable a `*_env` key of `sauna.toml` names, with the value the
//! caller read from its own environment. It is the only generated file holding a secret in plain
//! text, so it is mode 0600 everywhere and its contents never reach stdout; variables the
//! supervisor derives itself (the `*.url_env` connection URLs) are not in it.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::{EmitError, File, Problem, Service, copy, deploy, header};
use crate::config::Config;
use crate::stack::DeployConfig;

/// A variable the secrets file carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// The key that names it, e.g. `[redis].password_env`.
    pub key: &'static str,
    /// The same key as a path (`["redis", "password_env"]`), for diagnostics at its position.
    pub path: &'static [&'static str],
    /// The environment variable.
    pub name: String,
}

/// Where the secrets file is installed; the unit names it.
pub fn path(deploy: &DeployConfig) -> PathBuf {
    PathBuf::from(format!("/etc/sauna/{}.env", deploy.name))
}

/// Every variable a `*_env` key names, in file order, each once.
pub fn variables(config: &Config) -> Vec<Variable> {
    type Named<'a> = (&'static str, &'static [&'static str], Option<&'a String>);
    let mut named: Vec<Named<'_>> = Vec::new();
    if let Some(redis) = &config.redis {
        named.push((
            "[redis].password_env",
            &["redis", "password_env"],
            redis.password_env.as_ref(),
        ));
    }
    if let Some(postgres) = &config.postgres {
        named.push((
            "[postgres].password_env",
            &["postgres", "password_env"],
            postgres.password_env.as_ref(),
        ));
    }
    named.push((
        "[metrics].token_env",
        &["metrics", "token_env"],
        config.metrics.token_env.as_ref(),
    ));
    let mut variables: Vec<Variable> = Vec::new();
    for (key, path, name) in named {
        if let Some(name) = name
            && !variables.iter().any(|v| &v.name == name)
        {
            variables.push(Variable {
                key,
                path,
                name: name.clone(),
            });
        }
    }
    variables
}

/// Renders the secrets file from `values`, one `(variable, value)` per [`variables`] entry.
pub fn render(config: &Config, values: &[(String, String)]) -> Result<File, EmitError> {
    let deploy = deploy(config);
    let mut problems = Vec::new();
    for variable in variables(config) {
        let valid = variable
            .name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && variable
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            problems.push(Problem::at(
                variable.path,
                format!(
                    "{} = {:?}: not an environment variable name (letters, digits and '_')",
                    variable.key, variable.name
                ),
            ));
        } else if !values.iter().any(|(name, _)| *name == variable.name) {
            problems.push(Problem::at(
                variable.path,
                format!(
                    "{} names {}, which is not set: export it before `emit all`, which writes its value into the secrets file {}",
                    variable.key,
                    variable.name,
                    path(&deploy).display()
                ),
            ));
        }
    }
    if !problems.is_empty() {
        return Err(EmitError(problems));
    }
    let mut out = header("#", "all");
    let _ = writeln!(
        out,
        "# The secrets the supervisor's unit passes to it (EnvironmentFile=); root only, mode 0600.\n\
         # Double-quoted values read the same by systemd and by a POSIX shell's `.`."
    );
    for variable in variables(config) {
        if let Some((_, value)) = values.iter().find(|(name, _)| *name == variable.name) {
            let _ = writeln!(
                out,
                "# {}\n{}={}",
                variable.key,
                variable.name,
                quote(value)
            );
        }
    }
    Ok(File {
        path: format!("{}.env", deploy.name),
        service: Service::Base,
        install: copy(path(&deploy), 0o600, "root", "root"),
        contents: out,
    })
}

/// A value in double quotes with `\`, `"`, `` ` `` and `$` escaped: what systemd's
/// `EnvironmentFile=` and a POSIX shell both read back as the same string.
fn quote(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        if matches!(c, '\\' | '"' | '`' | '$') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MetricsConfig;
    use crate::stack::{PostgresConfig, RedisConfig};

    fn config() -> Config {
        Config {
            redis: Some(RedisConfig {
                password_env: Some("REDIS_PASSWORD".into()),
                ..RedisConfig::default()
            }),
            postgres: Some(PostgresConfig {
                password_file: Some("/etc/sauna/db.password".into()),
                ..PostgresConfig::default()
            }),
            metrics: MetricsConfig {
                token_env: Some("REDIS_PASSWORD".into()),
                ..MetricsConfig::default()
            },
            ..Config::default()
        }
    }

    #[test]
    fn each_named_variable_is_listed_once_and_files_are_not() {
        let names: Vec<String> = variables(&config()).into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["REDIS_PASSWORD"]);
    }

    #[test]
    fn a_missing_value_is_refused_naming_the_variable_and_its_key() {
        let EmitError(problems) = render(&config(), &[]).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .message
                .starts_with("[redis].password_env names REDIS_PASSWORD, which is not set"),
            "{problems:?}"
        );
    }

    #[test]
    fn values_are_quoted_for_systemd_and_the_shell_alike() {
        assert_eq!(quote(r#"a b"c\d`e$f'g"#), r#""a b\"c\\d\`e\$f'g""#);
        let file = render(&config(), &[("REDIS_PASSWORD".into(), "p'w".into())]).unwrap();
        assert!(
            file.contents
                .ends_with("# [redis].password_env\nREDIS_PASSWORD=\"p'w\"\n"),
            "{}",
            file.contents
        );
        assert_eq!(file.mode_in_dir(), 0o600);
    }
}
