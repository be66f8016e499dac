//! `[web]` judged and typed: counts that cannot be zero, listen addresses parsed and checked for
//! clashes (among themselves and with `[metrics].listen`), the request head's size limit, the
//! warm-up request (with the host
//! `[deploy].server_names` gives it), the mount prefix and the trusted proxies. Whether an
//! address can really be bound is the front's to find out.

use std::net::SocketAddr;

use super::Checker;
use crate::config::{AppConfig, MAX_HEADER_SIZE, MIN_HEADER_SIZE, WebConfig};
use crate::forwarded::{Forwarders, TrustedPeer};
use crate::listen::Listen;
use crate::schema::RawWeb;
use crate::units::ByteSize;
use crate::warm_up::WarmUp;

impl Checker<'_> {
    /// `[web]` with the checks that need other sections: an application to serve, and a metrics
    /// endpoint (`metrics`, as written and as parsed) that is not on one of its addresses.
    /// `server_names` (`[deploy].server_names`) name the host of a warm-up given as a path.
    pub(crate) fn web(
        &mut self,
        web: &RawWeb,
        app: &AppConfig,
        metrics: (&str, Option<SocketAddr>),
        server_names: &[String],
    ) -> WebConfig {
        if app.target.is_none() && !self.broken_under(&["app"]) {
            self.report(
                &["web"],
                "the web pool needs an application: set [app].wsgi = \"module:callable\" or [app].paste = \"production.ini\"",
            );
        }
        let typed = self.web_values(web, server_names);
        if let (written, Some(address)) = metrics {
            let endpoint = Listen::Tcp(address);
            if let Some(listed) = typed
                .listen
                .iter()
                .find(|listen| listen.conflicts_with(&endpoint))
            {
                self.report(
                    &["metrics", "listen"],
                    format!("\"{written}\" clashes with [web].listen \"{listed}\"; give the metrics endpoint its own port"),
                );
            }
        }
        typed
    }

    /// `[web]`'s own keys, and `server_names` for the warm-up's host.
    pub(crate) fn web_values(&mut self, web: &RawWeb, server_names: &[String]) -> WebConfig {
        let workers = self.count(
            &["web", "workers"],
            web.workers,
            "must be at least 1; remove [web] to run without a web pool",
        );
        let threads = self.count(
            &["web", "threads"],
            web.threads,
            "must be at least 1 (1 = one request at a time per worker)",
        );
        if web.preload && threads.get() > crate::config::MAX_PRELOAD_THREADS {
            self.report(
                &["web", "threads"],
                format!(
                    "is at most {} with preload = true (a forked worker gets its descriptors in one message); lower threads or add workers",
                    crate::config::MAX_PRELOAD_THREADS
                ),
            );
        }
        if web.max_requests_jitter > 0 && web.max_requests == 0 {
            self.report(
                &["web", "max_requests_jitter"],
                "has no effect without max_requests; set max_requests too, or remove it",
            );
        }
        let queue_size = self.count(
            &["web", "queue_size"],
            web.queue_size,
            "must be at least 1: requests wait here for a free worker",
        );
        if web.listen.is_empty() && !self.broken_under(&["web", "listen"]) {
            self.report(
                &["web", "listen"],
                "needs at least one address, e.g. [\"127.0.0.1:8000\"]",
            );
        }
        let warmup = web.warmup.as_ref().and_then(|written| {
            WarmUp::resolve(written, server_names)
                .map_err(|error| self.report(&["web", "warmup"], error))
                .ok()
        });
        let script_name = &web.script_name;
        if !script_name.is_empty() && (!script_name.starts_with('/') || script_name.ends_with('/'))
        {
            self.report(
                &["web", "script_name"],
                format!("must start with \"/\" and not end with one, e.g. \"/app\", not \"{script_name}\""),
            );
        }
        if let Some(post_fork) = &web.post_fork {
            if let Err(why) = super::check_python_target(post_fork) {
                self.report(
                    &["web", "post_fork"],
                    format!("\"{post_fork}\" {why}; expected \"module:callable\", e.g. \"myapp.hooks:post_fork\""),
                );
            } else if !web.preload {
                self.report(
                    &["web", "post_fork"],
                    "has no effect without preload = true: only workers forked from a preloaded template run it",
                );
            }
        }
        let max_header_size = self.header_size(web.max_header_size);
        let mut forwarders = Vec::new();
        for (position, peer) in web.forwarded_allow_ips.iter().enumerate() {
            match peer.parse::<TrustedPeer>() {
                Ok(peer) => forwarders.push(peer),
                Err(error) => {
                    self.report_element(&["web", "forwarded_allow_ips"], position, error);
                }
            }
        }
        WebConfig {
            listen: self.listen_addresses(&web.listen),
            workers,
            threads,
            timeout: web.timeout,
            max_requests: web.max_requests,
            max_requests_jitter: web.max_requests_jitter,
            max_rss: web.max_rss,
            queue_size,
            queue_timeout: web.queue_timeout,
            max_body: web.max_body,
            body_buffer: web.body_buffer,
            max_header_size,
            graceful_timeout: web.graceful_timeout,
            reload_timeout: web.reload_timeout,
            warmup,
            script_name: web.script_name.clone(),
            forwarded_allow_ips: Forwarders(forwarders),
            access_log: web.access_log,
            backlog: web.backlog,
            preload: web.preload,
            post_fork: web.post_fork.clone(),
        }
    }

    /// `max_header_size` within its bounds; a value outside is reported and read as the nearest
    /// bound, so a front is never built with a limit hyper refuses.
    fn header_size(&mut self, written: ByteSize) -> ByteSize {
        let bytes = written.bytes();
        if (MIN_HEADER_SIZE..=MAX_HEADER_SIZE).contains(&bytes) {
            return written;
        }
        self.report(
            &["web", "max_header_size"],
            format!(
                "must be between \"{}KiB\" and \"{}MiB\" (the whole request head: request line and header fields), not {bytes} bytes",
                MIN_HEADER_SIZE >> 10,
                MAX_HEADER_SIZE >> 20
            ),
        );
        ByteSize(bytes.clamp(MIN_HEADER_SIZE, MAX_HEADER_SIZE))
    }

    /// Every `[web].listen` entry parsed, each reported at its position when it does not parse
    /// or clashes with one listed before it; the valid ones are returned.
    fn listen_addresses(&mut self, listen: &[String]) -> Vec<Listen> {
        let mut seen: Vec<(Listen, usize)> = Vec::new();
        let path = ["web", "listen"];
        for (position, text) in listen.iter().enumerate() {
            match text.parse::<Listen>() {
                Err(error) => self.report_element(&path, position, error),
                Ok(address) => {
                    if let Some((_, first)) = seen
                        .iter()
                        .find(|(other, _)| other.conflicts_with(&address))
                    {
                        self.report_element(
                            &path,
                            position,
                            format!("\"{text}\" clashes with \"{}\" listed before it; each address can be bound once", listen[*first]),
                        );
                    } else {
                        seen.push((address, position));
                    }
                }
            }
        }
        seen.into_iter().map(|(address, _)| address).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{APP, assert_one, problems};
    use crate::load::load_str;

    #[test]
    fn zero_workers_and_threads_are_refused() {
        let text = format!("{APP}[web]\nworkers = 0\nthreads = 0\n");
        assert_eq!(
            problems(&text),
            [
                "4:11: web.workers: must be at least 1; remove [web] to run without a web pool",
                "5:11: web.threads: must be at least 1 (1 = one request at a time per worker)",
            ]
        );
    }

    #[test]
    fn web_needs_exactly_one_application() {
        assert_one(
            "[web]\nworkers = 2\n",
            "1:1: web: the web pool needs an application: set [app].wsgi = \"module:callable\" or [app].paste = \"production.ini\"",
        );
        assert_one(
            "[app]\nwsgi = \"a:b\"\npaste = \"x.ini\"\n",
            "3:9: app.paste: set either wsgi or paste, not both: paste loads the app from an ini file, wsgi names it directly",
        );
        assert!(problems("[app]\npaste = \"production.ini#main\"\n[web]\n").is_empty());
        assert_one(
            "[app]\npaste = \"x.ini#\"\n",
            "2:9: app.paste: \"x.ini#\" is not a PasteDeploy file; expected \"production.ini\" or \"production.ini#main\"",
        );
    }

    #[test]
    fn a_mistyped_wsgi_is_not_also_reported_as_missing() {
        assert_eq!(
            problems("[app]\nwsgi = 5\n[web]\n"),
            ["2:8: app.wsgi: expected a string, found the integer 5"]
        );
    }

    #[test]
    fn listen_addresses_are_parsed_and_must_not_clash() {
        let text = format!(
            "{APP}[web]\nlisten = [\"127.0.0.1:8000\", \"unix:/run/a.sock\", \"0.0.0.0:8000\", \"8001\", \"unix:/run/a.sock\"]\n[metrics]\nlisten = \"127.0.0.1:8000\"\n"
        );
        assert_eq!(
            problems(&text),
            [
                "4:49: web.listen[2]: \"0.0.0.0:8000\" clashes with \"127.0.0.1:8000\" listed before it; each address can be bound once",
                "4:65: web.listen[3]: invalid listen address \"8001\": the port is missing; expected \"host:port\", \"[v6]:port\" or \"unix:/absolute/path\"",
                "4:73: web.listen[4]: \"unix:/run/a.sock\" clashes with \"unix:/run/a.sock\" listed before it; each address can be bound once",
                "6:10: metrics.listen: \"127.0.0.1:8000\" clashes with [web].listen \"127.0.0.1:8000\"; give the metrics endpoint its own port",
            ]
        );
        assert_one(
            &format!("{APP}[web]\nlisten = []\n"),
            "4:10: web.listen: needs at least one address, e.g. [\"127.0.0.1:8000\"]",
        );
        assert!(problems(&format!("{APP}[web]\nlisten = [\"[::1]:8000\"]\n")).is_empty());
    }

    #[test]
    fn a_host_name_is_refused_where_it_is_written() {
        assert_one(
            &format!("{APP}[web]\nlisten = [\"localhost:8000\"]\n"),
            "4:11: web.listen[0]: invalid listen address \"localhost:8000\": \"localhost\" is not an IP address (the socket is bound without DNS; write \"127.0.0.1\" for localhost); expected \"host:port\", \"[v6]:port\" or \"unix:/absolute/path\"",
        );
    }

    #[test]
    fn the_runtime_gets_parsed_values() {
        let config = load_str(
            &format!(
                "{APP}[web]\nlisten = [\"0.0.0.0:8000\", \"unix:/run/app.sock\"]\nworkers = 3\nforwarded_allow_ips = [\"10.0.0.0/8\"]\n"
            ),
            "sauna.toml",
        )
        .unwrap();
        let web = config.web.unwrap();
        assert_eq!(
            web.listen,
            [
                "0.0.0.0:8000".parse().unwrap(),
                crate::Listen::Unix("/run/app.sock".into())
            ]
        );
        assert_eq!(web.workers.get(), 3);
        assert!(web.forwarded_allow_ips.trusts("10.1.2.3".parse().unwrap()));
        assert!(!web.forwarded_allow_ips.trusts("127.0.0.1".parse().unwrap()));
        assert_eq!(
            config.app.target,
            Some(crate::AppTarget::Wsgi("myapp.wsgi:application".to_owned()))
        );
    }

    #[test]
    fn post_fork_names_a_callable_and_needs_preload() {
        assert_eq!(
            problems(&format!(
                "{APP}[web]\npreload = true\npost_fork = \"hooks.reopen\"\n"
            )),
            [
                "5:13: web.post_fork: \"hooks.reopen\" has no \":\" between module and callable; expected \"module:callable\", e.g. \"myapp.hooks:post_fork\"",
            ]
        );
        assert_eq!(
            problems(&format!("{APP}[web]\npost_fork = \"hooks:reopen\"\n")),
            [
                "4:13: web.post_fork: has no effect without preload = true: only workers forked from a preloaded template run it",
            ]
        );
        let text = format!("{APP}[web]\npreload = true\npost_fork = \"hooks:reopen\"\n");
        assert!(problems(&text).is_empty());
        let web = load_str(&text, "sauna.toml").unwrap().web.unwrap();
        assert!(web.preload);
        assert_eq!(web.post_fork.as_deref(), Some("hooks:reopen"));
    }

    #[test]
    fn preload_bounds_threads_by_what_one_descriptor_message_carries() {
        assert_eq!(
            problems(&format!("{APP}[web]\npreload = true\nthreads = 84\n")),
            [
                "5:11: web.threads: is at most 83 with preload = true (a forked worker gets its descriptors in one message); lower threads or add workers",
            ]
        );
        assert!(problems(&format!("{APP}[web]\npreload = true\nthreads = 83\n")).is_empty());
        assert!(problems(&format!("{APP}[web]\nthreads = 84\n")).is_empty());
    }

    #[test]
    fn jitter_needs_max_requests_and_the_queue_needs_room() {
        let text = format!("{APP}[web]\nmax_requests_jitter = 50\nqueue_size = 0\n");
        assert_eq!(
            problems(&text),
            [
                "4:23: web.max_requests_jitter: has no effect without max_requests; set max_requests too, or remove it",
                "5:14: web.queue_size: must be at least 1: requests wait here for a free worker",
            ]
        );
        assert!(
            problems(&format!(
                "{APP}[web]\nmax_requests = 1000\nmax_requests_jitter = 50\n"
            ))
            .is_empty()
        );
    }

    #[test]
    fn web_paths_and_trusted_peers_are_checked() {
        let text = format!(
            "{APP}[web]\nwarmup = \"health\"\nscript_name = \"/app/\"\nforwarded_allow_ips = [\"10.0.0.0/8\", \"*\", \"10.0.0.0/33\"]\n"
        );
        assert_eq!(
            problems(&text),
            [
                "4:10: web.warmup: must be a path starting with \"/\" or an http:// or https:// URL, e.g. \"/health\" or \"https://example.com/health\", not \"health\"",
                "5:15: web.script_name: must start with \"/\" and not end with one, e.g. \"/app\", not \"/app/\"",
                "6:43: web.forwarded_allow_ips[2]: \"10.0.0.0/33\" is not an IP address, a CIDR like \"10.0.0.0/8\", or \"*\"",
            ]
        );
    }

    #[test]
    fn the_header_size_limit_is_bounded_and_typed() {
        assert_one(
            &format!("{APP}[web]\nmax_header_size = \"4KiB\"\n"),
            "4:19: web.max_header_size: must be between \"8KiB\" and \"1MiB\" (the whole request head: request line and header fields), not 4096 bytes",
        );
        assert_one(
            &format!("{APP}[web]\nmax_header_size = \"2MiB\"\n"),
            "4:19: web.max_header_size: must be between \"8KiB\" and \"1MiB\" (the whole request head: request line and header fields), not 2097152 bytes",
        );
        assert_one(
            &format!("{APP}[web]\nmax_header_size = \"big\"\n"),
            "4:19: web.max_header_size: invalid size \"big\": expected a number with an optional unit, like \"512MiB\", \"1GiB\", \"100MB\" or \"0\"",
        );
        let config = load_str(
            &format!("{APP}[web]\nmax_header_size = \"16KiB\"\n"),
            "sauna.toml",
        )
        .unwrap();
        assert_eq!(config.web.unwrap().max_header_size.bytes(), 16 << 10);
        let config = load_str(&format!("{APP}[web]\n"), "sauna.toml").unwrap();
        assert_eq!(config.web.unwrap().max_header_size.bytes(), 64 << 10);
    }

    /// `[web].warmup` as loaded, with `deploy` (a `[deploy]` table's body) after `[web]`.
    fn warm_up(warmup: &str, deploy: Option<&str>) -> Option<crate::WarmUp> {
        let deploy = deploy.map_or(String::new(), |body| format!("[deploy]\n{body}\n"));
        let text = format!("{APP}[web]\nwarmup = \"{warmup}\"\n{deploy}");
        let config =
            load_str(&text, "sauna.toml").unwrap_or_else(|problems| panic!("{text}\n{problems:?}"));
        config.web.and_then(|web| web.warmup)
    }

    fn expected(host: &str, path: &str, https: bool) -> Option<crate::WarmUp> {
        Some(crate::WarmUp {
            host: host.to_owned(),
            path: path.to_owned(),
            https,
        })
    }

    #[test]
    fn the_warm_up_host_is_the_first_real_server_name_else_localhost() {
        assert_eq!(
            warm_up("/health", None),
            expected("localhost", "/health", false)
        );
        assert_eq!(
            warm_up("/health", Some("name = \"site\"")),
            expected("localhost", "/health", false),
            "[deploy] without server_names means \"_\""
        );
        assert_eq!(
            warm_up(
                "/health",
                Some(
                    "server_names = [\"_\", \"*.example.com\", \".example.org\", \"~^www\\\\d+\\\\.example\\\\.net$\", \"example.com\", \"www.example.com\"]"
                )
            ),
            expected("example.com", "/health", false)
        );
        assert_eq!(
            warm_up("/health", Some("server_names = [\"_\", \"*.example.com\"]")),
            expected("localhost", "/health", false)
        );
    }

    #[test]
    fn an_absolute_warm_up_url_names_its_own_host_and_scheme() {
        let deploy = Some("server_names = [\"example.com\"]");
        assert_eq!(
            warm_up("http://internal.example/ping", deploy),
            expected("internal.example", "/ping", false)
        );
        assert_eq!(
            warm_up("https://example.com/health?db=1", None),
            expected("example.com", "/health?db=1", true)
        );
    }

    #[test]
    fn a_bad_warm_up_url_is_reported_where_it_is_written() {
        assert_one(
            &format!("{APP}[web]\nworkers = 2\nwarmup   =   \"https://*.example.com/health\"\n"),
            "5:14: web.warmup: invalid warm-up URL \"https://*.example.com/health\": \"*.example.com\" is not a host name or IP address (nginx's \"_\", wildcards and regular expressions name no single host); expected a path like \"/health\" or a URL like \"https://example.com/health\"",
        );
        assert_one(
            &format!("{APP}[web]\nwarmup = \"/my health\"\n"),
            "4:10: web.warmup: invalid warm-up URL \"/my health\": ' ' cannot be sent as it is in a request path; percent-encode it (a space is %20); expected a path like \"/health\" or a URL like \"https://example.com/health\"",
        );
    }
}
