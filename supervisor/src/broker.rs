//! How the supervisor logs in to the Celery broker: the connection for a broker URL, with the
//! `[redis]` password set on it (never formatted into a URL the supervisor keeps or prints), and
//! what to say when Redis refuses the login. Beat, the queue sampler and `check --live` connect
//! through it. Reading the password is `proxy_conf::secrets`' job; what each caller does after a
//! refusal (back off, log once, report) is its own.

use proxy_conf::secrets::Secret;
use redis::{ConnectionInfo, ErrorKind, IntoConnectionInfo as _, RedisError, RedisResult};

/// The connection for `url`, logging in with `password` when the URL carries none; a password
/// written in the URL is used as it is.
pub fn connection_info(url: &str, password: Option<&Secret>) -> RedisResult<ConnectionInfo> {
    let info = url.into_connection_info()?;
    match password {
        Some(password) if info.redis_settings().password().is_none() => {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            Ok(info.set_redis_settings(settings))
        }
        _ => Ok(info),
    }
}

/// Whether a connection built from `info` sends a password.
pub fn sends_password(info: &ConnectionInfo) -> bool {
    info.redis_settings().password().is_some()
}

/// True when Redis refused the login: a wrong password (`WRONGPASS`, which the client reports as
/// a failed authentication) or none where one is required (`NOAUTH`, which arrives as the answer
/// to the first command, possibly inside a pipeline or the connection's `SELECT`).
pub fn is_auth_failure(error: &RedisError) -> bool {
    if error.kind() == ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("NOAUTH" | "WRONGPASS"))
    {
        return true;
    }
    let text = error.to_string();
    text.contains("NOAUTH")
        || text.contains("WRONGPASS")
        || text.contains("Authentication required")
}

/// `error` as a log line, a status field or a `check` finding say it: a refused login names its
/// cause and the keys to look at; anything else is the client's own message.
pub fn describe(error: &RedisError, sent_password: bool) -> String {
    if !is_auth_failure(error) {
        return error.to_string();
    }
    if sent_password {
        "authentication failed (WRONGPASS: Redis refused the password; compare [redis].password_env or password_file, or the password in the URL, with the server's)".to_owned()
    } else {
        "authentication failed (NOAUTH: Redis requires a password and none was given; set [redis].password_env or password_file)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_password_fills_in_only_for_urls_without_one() {
        let password = Secret::new("from-config");
        let info = connection_info("redis://127.0.0.1:6390/3", Some(&password)).unwrap();
        assert_eq!(info.redis_settings().password(), Some("from-config"));
        assert_eq!(info.redis_settings().db(), 3);
        assert!(sends_password(&info));
        let inline = connection_info("redis://:in%40url@127.0.0.1/0", Some(&password)).unwrap();
        assert_eq!(inline.redis_settings().password(), Some("in@url"));
        let user = connection_info("redis://celery@127.0.0.1/0", Some(&password)).unwrap();
        assert_eq!(user.redis_settings().username(), Some("celery"));
        assert_eq!(user.redis_settings().password(), Some("from-config"));
        let none = connection_info("redis://127.0.0.1/0", None).unwrap();
        assert!(!sends_password(&none));
        assert!(connection_info("amqp://guest@localhost//", Some(&password)).is_err());
    }

    #[test]
    fn refused_logins_are_told_apart_from_other_errors() {
        let wrong = RedisError::from((
            ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        let missing = redis::make_extension_error(
            "NOAUTH".to_owned(),
            Some("Authentication required.".to_owned()),
        );
        let down = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(is_auth_failure(&wrong) && is_auth_failure(&missing));
        assert!(!is_auth_failure(&down));
        assert!(describe(&wrong, true).starts_with("authentication failed (WRONGPASS: "));
        assert!(describe(&missing, false).starts_with("authentication failed (NOAUTH: "));
        assert_eq!(describe(&down, false), down.to_string());
    }
}
