//! `check --live`: connects to the Redis instances and the PostgreSQL database the configuration
//! describes and reports where the running servers contradict the model `emit` generates from —
//! an evicting broker, a broker without AOF, too few Redis databases, a `max_connections` below
//! what the stack opens — and a server that refuses the login with the configured password. Only
//! reads settings; never changes a server.
//!
//! The `redis` crate is used without default features (plain sync connections) and the sync
//! `postgres` crate: both are the maintained clients of their protocols, and a sync client keeps
//! this one-shot command free of a runtime.

use std::time::Duration;

use proxy_conf::Config;
use proxy_conf::emit::postgres::budget;
use proxy_conf::emit::redis::{Endpoint, Instance, Role, instances};
use proxy_conf::secrets::{Secret, Secrets};

/// How long to wait for a server before reporting it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Every contradiction found, one message each, naming the server and what to change. The
/// servers are logged in to with `secrets` (read by the caller, as `run` reads them).
pub fn check(config: &Config, secrets: &Secrets, cpus: u32) -> Vec<String> {
    let mut findings = Vec::new();
    if config.redis.is_some() {
        check_redis(config, secrets, &mut findings);
    }
    if config.postgres.is_some() {
        check_postgres(config, secrets, cpus, &mut findings);
    }
    if config.redis.is_none() && config.postgres.is_none() {
        findings
            .push("check --live: there is no [redis] or [postgres] section to check".to_owned());
    }
    findings
}

fn check_redis(config: &Config, secrets: &Secrets, findings: &mut Vec<String>) {
    let list = match instances(config) {
        Ok((list, _)) => list,
        Err(error) => {
            findings.push(error.to_string());
            return;
        }
    };
    // `[redis]`'s password, else one written into a broker URL (every instance shares it, as
    // the generated files do).
    let password = secrets
        .redis_password
        .clone()
        .or_else(|| proxy_conf::emit::redis::url_password(config).map(Secret::new));
    for instance in &list {
        let label = format!("redis {} ({})", instance.name, instance.endpoint);
        match redis_settings(instance, password.as_ref()) {
            Err(error) if crate::broker::is_auth_failure(&error) => findings.push(format!(
                "{label}: {}",
                crate::broker::describe(&error, password.is_some())
            )),
            Err(error) => findings.push(format!("{label}: cannot query it: {error}")),
            Ok(settings) => compare_redis(instance, &settings, &label, findings),
        }
    }
}

/// The settings `check --live` compares, as the server reports them.
struct RedisSettings {
    policy: String,
    appendonly: String,
    databases: u32,
}

fn redis_settings(
    instance: &Instance,
    password: Option<&Secret>,
) -> redis::RedisResult<RedisSettings> {
    use redis::IntoConnectionInfo as _;
    let addr = match &instance.endpoint {
        Endpoint::Tcp { host, port } => redis::ConnectionAddr::Tcp(host.clone(), *port),
        Endpoint::Unix(path) => redis::ConnectionAddr::Unix(path.clone()),
    };
    let mut settings = redis::RedisConnectionInfo::default();
    if let Some(password) = password {
        settings = settings.set_password(password.expose());
    }
    let info = addr.into_connection_info()?.set_redis_settings(settings);
    let client = redis::Client::open(info)?;
    let mut connection = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    connection.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let mut get = |key: &str| -> redis::RedisResult<String> {
        let pair: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(key)
            .query(&mut connection)?;
        Ok(pair.get(1).cloned().unwrap_or_default())
    };
    Ok(RedisSettings {
        policy: get("maxmemory-policy")?,
        appendonly: get("appendonly")?,
        databases: get("databases")?.parse().unwrap_or(0),
    })
}

fn compare_redis(
    instance: &Instance,
    actual: &RedisSettings,
    label: &str,
    findings: &mut Vec<String>,
) {
    match instance.role {
        Role::Broker => {
            if actual.policy != "noeviction" {
                findings.push(format!(
                    "{label}: maxmemory-policy is {}, but it holds the Celery broker: an evicting policy silently drops queued tasks (and beat's leader lock); set noeviction (`sauna-supervisor emit redis`)",
                    actual.policy
                ));
            }
            if actual.appendonly != "yes" {
                findings.push(format!(
                    "{label}: appendonly is {}, so queued Celery tasks are lost on a restart; set appendonly yes",
                    actual.appendonly
                ));
            }
        }
        Role::Cache => {
            if actual.policy != instance.policy {
                findings.push(format!(
                    "{label}: maxmemory-policy is {}, the config says {}",
                    actual.policy, instance.policy
                ));
            }
        }
    }
    if actual.databases < instance.databases {
        let (key, db) = instance
            .users
            .iter()
            .max_by_key(|(_, db)| *db)
            .cloned()
            .unwrap_or_default();
        findings.push(format!(
            "{label}: databases is {}, but {key} uses database {db}; set databases {}",
            actual.databases, instance.databases
        ));
    }
}

fn check_postgres(config: &Config, secrets: &Secrets, cpus: u32, findings: &mut Vec<String>) {
    let Some(pg) = &config.postgres else {
        return;
    };
    let label = format!("postgres {}@127.0.0.1:{}/{}", pg.user, pg.port, pg.database);
    let mut options = postgres::Config::new();
    options
        .host("127.0.0.1")
        .port(pg.port)
        .user(&pg.user)
        .dbname(&pg.database)
        .connect_timeout(CONNECT_TIMEOUT)
        .application_name("sauna-supervisor check --live");
    if let Some(password) = &secrets.postgres_password {
        options.password(password.expose());
    }
    let mut client = match options.connect(postgres::NoTls) {
        Ok(client) => client,
        Err(error) => {
            findings.push(format!("{label}: cannot connect: {}", with_causes(&error)));
            return;
        }
    };
    let max_connections = match client.query_one("SHOW max_connections", &[]) {
        Ok(row) => row
            .try_get::<_, String>(0)
            .ok()
            .and_then(|value| value.parse::<u32>().ok()),
        Err(error) => {
            findings.push(format!(
                "{label}: SHOW max_connections failed: {}",
                with_causes(&error)
            ));
            return;
        }
    };
    let reserved = client
        .query_one("SHOW superuser_reserved_connections", &[])
        .ok()
        .and_then(|row| row.try_get::<_, String>(0).ok())
        .and_then(|value| value.parse::<u32>().ok())
        .unwrap_or(proxy_conf::emit::postgres::SUPERUSER_RESERVED);
    let budget = budget(config, cpus);
    if let Some(max) = max_connections
        && max.saturating_sub(reserved) < budget.needed()
    {
        findings.push(format!(
            "{label}: max_connections is {max} ({reserved} reserved for superusers), but the stack may open {}:\n{}set max_connections = {} (`sauna-supervisor emit postgres`)",
            budget.needed(),
            budget.explain("    "),
            budget.max_connections()
        ));
    }
}

/// The error and its causes on one line: the postgres crate's top-level message ("error
/// connecting to server") says nothing about why without them.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
