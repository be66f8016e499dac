//! `[web].warmup`, the request each `reload` sends through its canary worker, resolved once at
//! load into a [`WarmUp`]: the path, the `Host` it carries and whether it comes as HTTPS.
//!
//! The `Host` matters because applications check it — Django answers 400 to a host missing from
//! `ALLOWED_HOSTS`, Flask's `TRUSTED_HOSTS` and Rails' host authorization likewise — and a
//! refused warm-up rolls the reload back. So the request names the site the way a client
//! reaching it through nginx would: the host of an absolute URL (`"https://example.com/health"`),
//! else the first `[deploy].server_names` entry that names one host (nginx's catch-all `_`,
//! wildcards and regular expressions name none), else `localhost`. Sending it is the HTTP
//! front's job.

use std::fmt;
use std::net::Ipv6Addr;

/// The host a warm-up names when neither the URL nor `[deploy].server_names` gives one.
const FALLBACK_HOST: &str = "localhost";

/// The reload's warm-up request, as the front sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmUp {
    /// The `Host` header: a host name or IP address, with `:port` when the URL gives one.
    pub host: String,
    /// The request target: a path starting with `/`, with its `?query` if any, every character
    /// one that may be sent as it is.
    pub path: String,
    /// The URL is `https://`: the request comes as one a TLS-terminating proxy forwarded
    /// (`X-Forwarded-Proto: https`), so the application sees `wsgi.url_scheme` `https`.
    pub https: bool,
}

impl fmt::Display for WarmUp {
    /// The request as a URL, `http://localhost/health`: what the operator reads in `reload`'s
    /// output, with the host the application judged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.host, self.path)
    }
}

/// Why a `warmup` value was refused; the text says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WarmUpError(String);

impl WarmUp {
    /// `warmup` as written: a path, which takes its host from `server_names`
    /// (`[deploy].server_names`, see [`site_host`]), or an absolute `http://` or `https://` URL.
    pub(crate) fn resolve(written: &str, server_names: &[String]) -> Result<WarmUp, WarmUpError> {
        if written.starts_with('/') {
            check_target(written).map_err(|why| invalid(written, &why))?;
            return Ok(WarmUp {
                host: site_host(server_names).to_owned(),
                path: written.to_owned(),
                https: false,
            });
        }
        let Some((scheme, rest)) = written.split_once("://") else {
            return Err(WarmUpError(format!(
                "must be a path starting with \"/\" or an http:// or https:// URL, e.g. \"/health\" or \"https://example.com/health\", not \"{written}\""
            )));
        };
        let https = if scheme.eq_ignore_ascii_case("https") {
            true
        } else if scheme.eq_ignore_ascii_case("http") {
            false
        } else {
            return Err(invalid(
                written,
                &format!("only http:// and https:// can be requested, not {scheme}://"),
            ));
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(end);
        if authority.contains('@') {
            // The part before "@" may be a password, so the value is not repeated.
            return Err(WarmUpError(format!(
                "a warm-up URL cannot carry a user name or password: remove the part up to \"@\", e.g. \"{scheme}://example.com/health\""
            )));
        }
        let host = check_authority(authority).map_err(|why| invalid(written, &why))?;
        let path = match target.chars().next() {
            None => "/".to_owned(),
            Some('?') => format!("/{target}"),
            Some(_) => target.to_owned(),
        };
        check_target(&path).map_err(|why| invalid(written, &why))?;
        Ok(WarmUp {
            host: host.to_owned(),
            path,
            https,
        })
    }
}

fn invalid(written: &str, why: &str) -> WarmUpError {
    WarmUpError(format!(
        "invalid warm-up URL \"{written}\": {why}; expected a path like \"/health\" or a URL like \"https://example.com/health\""
    ))
}

/// The host a warm-up given as a path names: the first of `server_names` that is one host (see
/// [`is_host_name`]), else [`FALLBACK_HOST`]. Only the site's own names pass an application's
/// host check, and the first is the canonical one (nginx's `$server_name`, Let's Encrypt's
/// certificate name).
pub(crate) fn site_host(server_names: &[String]) -> &str {
    server_names
        .iter()
        .map(String::as_str)
        .find(|name| is_host_name(name))
        .unwrap_or(FALLBACK_HOST)
}

/// True when `name` names exactly one host that a `Host` header can carry: dot-separated labels
/// of ASCII letters, digits and `-` (an IPv4 address is one such name; one trailing dot, as in
/// `example.com.`, is allowed), or an IPv6 address in brackets. nginx's catch-all `_`, the
/// wildcards `*.example.com` and `.example.com`, the regular expressions `~…` and the empty
/// name are not: each stands for many hosts, or none.
pub(crate) fn is_host_name(name: &str) -> bool {
    if let Some(v6) = name
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
    {
        return v6.parse::<Ipv6Addr>().is_ok();
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The authority of an absolute URL (already known to hold no user or password): a host with
/// an optional port. Returns it unchanged as the `Host` header.
fn check_authority(authority: &str) -> Result<&str, String> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, after)) => (
                &authority[..v6.len() + 2],
                match after {
                    "" => None,
                    _ => Some(after.strip_prefix(':').unwrap_or(after)),
                },
            ),
            None => (authority, None),
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("the URL names no host".to_owned());
    }
    if !is_host_name(host) {
        return Err(format!(
            "\"{host}\" is not a host name or IP address (nginx's \"_\", wildcards and regular expressions name no single host)"
        ));
    }
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|port| port != 0);
        if !valid {
            return Err(format!(
                "the port \"{port}\" is not a number from 1 to 65535"
            ));
        }
    }
    Ok(authority)
}

/// A request target sent as written: only the characters a URL path and query may hold
/// unencoded (RFC 3986), and no fragment, which a client never sends.
fn check_target(target: &str) -> Result<(), String> {
    if target.contains('#') {
        return Err("a \"#fragment\" is never sent to the server; remove it".to_owned());
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/?%".contains(c);
    match target.chars().find(|c| !allowed(*c)) {
        None => Ok(()),
        Some(c) => Err(format!(
            "{c:?} cannot be sent as it is in a request path; percent-encode it (a space is %20)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    fn resolve(written: &str, server_names: &[&str]) -> WarmUp {
        WarmUp::resolve(written, &names(server_names))
            .unwrap_or_else(|error| panic!("{written:?} refused: {error}"))
    }

    fn refusal(written: &str) -> String {
        match WarmUp::resolve(written, &[]) {
            Ok(warm_up) => panic!("{written:?} accepted as {warm_up:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn a_path_without_server_names_asks_localhost() {
        let warm_up = resolve("/health?deep=1", &[]);
        assert_eq!(
            warm_up,
            WarmUp {
                host: "localhost".to_owned(),
                path: "/health?deep=1".to_owned(),
                https: false,
            }
        );
        assert_eq!(warm_up.to_string(), "http://localhost/health?deep=1");
    }

    #[test]
    fn a_path_takes_the_first_server_name() {
        assert_eq!(
            resolve("/health", &["example.com", "www.example.com"]).host,
            "example.com"
        );
    }

    #[test]
    fn server_names_for_many_hosts_or_none_are_skipped() {
        let skipped = [
            "_",
            "",
            "*.example.com",
            ".example.com",
            "www.example.*",
            "~^www\\d+\\.example\\.com$",
            "~^(?<user>.+)\\.example\\.net$",
        ];
        let mut listed = skipped.to_vec();
        listed.push("shop.example.com");
        listed.push("example.com");
        assert_eq!(resolve("/health", &listed).host, "shop.example.com");
        assert_eq!(resolve("/health", &skipped).host, "localhost");
    }

    #[test]
    fn ip_addresses_are_host_names() {
        assert_eq!(resolve("/", &["_", "192.0.2.7"]).host, "192.0.2.7");
        assert_eq!(resolve("/", &["[2001:db8::1]"]).host, "[2001:db8::1]");
        assert!(!is_host_name("[not-v6]"));
        assert!(!is_host_name("2001:db8::1"));
    }

    #[test]
    fn host_names_are_labels_of_letters_digits_and_hyphens() {
        for name in [
            "example.com",
            "example.com.",
            "a-b.example",
            "localhost",
            "xn--bcher-kva.example",
        ] {
            assert!(is_host_name(name), "{name}");
        }
        for name in [
            "-a.example",
            "a-.example",
            "a..example",
            "ex ample.com",
            "ex_ample.com",
            "exämple.com",
            ".",
        ] {
            assert!(!is_host_name(name), "{name}");
        }
    }

    #[test]
    fn an_absolute_url_gives_its_host_path_and_scheme() {
        let server_names = ["other.example"];
        assert_eq!(
            resolve("http://example.com/health", &server_names),
            WarmUp {
                host: "example.com".to_owned(),
                path: "/health".to_owned(),
                https: false,
            }
        );
        let secure = resolve("HTTPS://example.com:8443/health?deep=1", &server_names);
        assert_eq!(
            secure,
            WarmUp {
                host: "example.com:8443".to_owned(),
                path: "/health?deep=1".to_owned(),
                https: true,
            }
        );
        assert_eq!(secure.to_string(), "https://example.com:8443/health?deep=1");
        assert_eq!(resolve("http://example.com", &[]).path, "/");
        assert_eq!(resolve("http://example.com?x=1", &[]).path, "/?x=1");
        assert_eq!(resolve("https://[::1]:8443/", &[]).host, "[::1]:8443");
    }

    #[test]
    fn anything_but_a_path_or_an_http_url_is_refused() {
        assert_eq!(
            refusal("health"),
            "must be a path starting with \"/\" or an http:// or https:// URL, e.g. \"/health\" or \"https://example.com/health\", not \"health\""
        );
        assert_eq!(
            refusal("ftp://example.com/health"),
            "invalid warm-up URL \"ftp://example.com/health\": only http:// and https:// can be requested, not ftp://; expected a path like \"/health\" or a URL like \"https://example.com/health\""
        );
    }

    #[test]
    fn a_bad_host_or_port_is_refused() {
        let cases = [
            ("http:///health", "the URL names no host"),
            ("http://:80/health", "the URL names no host"),
            (
                "http://*.example.com/",
                "\"*.example.com\" is not a host name or IP address",
            ),
            ("http://_/", "\"_\" is not a host name or IP address"),
            (
                "http://example.com:0/",
                "the port \"0\" is not a number from 1 to 65535",
            ),
            (
                "http://example.com:99999/",
                "the port \"99999\" is not a number from 1 to 65535",
            ),
            (
                "http://example.com:/",
                "the port \"\" is not a number from 1 to 65535",
            ),
            (
                "http://[::1]x/",
                "the port \"x\" is not a number from 1 to 65535",
            ),
            ("http://[::1/", "\"[::1\" is not a host name or IP address"),
        ];
        for (written, why) in cases {
            let message = refusal(written);
            assert!(
                message.starts_with(&format!("invalid warm-up URL \"{written}\": {why}")),
                "{written}: {message}"
            );
        }
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_being_repeated() {
        let message = refusal("https://admin:s3cret@example.com/health");
        assert!(
            message.contains("a warm-up URL cannot carry a user name or password"),
            "{message}"
        );
        assert!(!message.contains("s3cret"), "{message}");
    }

    #[test]
    fn the_target_must_be_sendable_as_written() {
        assert!(refusal("/health#top").contains("a \"#fragment\" is never sent"));
        assert!(refusal("http://example.com/a#b").contains("a \"#fragment\" is never sent"));
        assert!(refusal("/my health").contains(
            "' ' cannot be sent as it is in a request path; percent-encode it (a space is %20)"
        ));
        assert!(refusal("/häälsa").contains("'ä' cannot be sent as it is"));
        assert!(refusal("/a<b").contains("'<' cannot be sent as it is"));
        assert_eq!(
            resolve("/my%20health?a=b&c=d:e@f", &[]).path,
            "/my%20health?a=b&c=d:e@f"
        );
    }
}
