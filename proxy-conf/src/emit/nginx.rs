//! The nginx site in front of the web pool: an upstream to `[web].listen` (or to every
//! `[deploy].app_hosts`), the proxy with its X-Forwarded headers and timeouts derived from the
//! pool's, static files from disk, WebSocket locations, TLS, the staging password and the response
//! cache. The output is one file included in nginx's `http` block; the main `nginx.conf` (user,
//! pid, temp paths) is the distribution's and is not generated.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use super::{EmitError, File, Output, Problem, Service, check_name, copy, deploy, header};
use crate::config::{Config, WebConfig};
use crate::listen::Listen;
use crate::stack::DeployConfig;
use crate::units::Duration;

/// Slack between the app's own deadline and nginx's, so the app's 504 (with its log line) reaches
/// the client instead of nginx cutting the connection first.
const TIMEOUT_SLACK: Duration = Duration::from_secs(5);

/// Mozilla's "intermediate" cipher list for TLS 1.2 (TLS 1.3 suites are not configurable here).
const CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:\
ECDHE-RSA-CHACHA20-POLY1305:DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384";

/// Text types worth compressing (`text/html` is always compressed and may not be repeated).
const GZIP_TYPES: &str = "text/plain text/css text/xml text/javascript application/javascript \
application/json application/xml application/rss+xml application/atom+xml image/svg+xml";

/// Renders the nginx site for `config`.
pub fn render(config: &Config) -> Result<Output, EmitError> {
    let deploy = deploy(config);
    let mut problems = Vec::new();
    check_name(&deploy, &mut problems);
    let Some(web) = &config.web else {
        return Err(EmitError(vec![Problem::at(
            &["web"],
            "emit nginx: there is no [web] section, so nothing to proxy to; add [web]",
        )]));
    };
    let servers = upstream_servers(web, &deploy, &mut problems);
    let tls = tls_files(&deploy, &mut problems);
    check_forwarded(web, &deploy, &mut problems);
    let statics = static_locations(&deploy, &mut problems);
    for (position, prefix) in deploy.websocket.iter().enumerate() {
        if !prefix.starts_with('/') {
            problems.push(Problem::at(
                &["deploy", "websocket", &position.to_string()],
                format!("[deploy].websocket: {prefix:?} must be a URL path starting with '/'"),
            ));
        }
    }
    if deploy.server_names.is_empty() {
        problems.push(Problem::at(
            &["deploy", "server_names"],
            "[deploy].server_names is empty: list the site's host names, or \"_\" for any",
        ));
    }
    if !problems.is_empty() {
        return Err(EmitError(problems));
    }

    let name = deploy.name.replace('-', "_");
    let mut out = header("#", "nginx");
    out.push_str(
        "# Include it in nginx's http block (Debian: /etc/nginx/conf.d/), then `nginx -t`.\n\n",
    );

    // The upstream.
    let _ = writeln!(out, "upstream {name}_app {{");
    if deploy.app_hosts.is_empty() {
        out.push_str("    # [web].listen\n");
    } else {
        out.push_str("    # [deploy].app_hosts on the TCP port of [web].listen\n");
    }
    for server in &servers {
        let _ = writeln!(out, "    server {server} max_fails=0;");
    }
    // Idle connections kept open per nginx worker: enough for every request slot of one host.
    let keepalive = web.workers.saturating_mul(web.threads).get().max(2);
    let _ = writeln!(
        out,
        "    # Idle connections kept per nginx worker: [web].workers × threads = {keepalive}.\n    keepalive {keepalive};\n}}\n"
    );

    if !deploy.websocket.is_empty() {
        let _ = writeln!(
            out,
            "# WebSocket locations pass the client's Upgrade; others keep the upstream connection alive.\n\
             map $http_upgrade ${name}_connection {{\n    default upgrade;\n    ''      \"\";\n}}\n"
        );
    }

    if let Some(cache) = &deploy.cache {
        let path = cache
            .path
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/var/cache/nginx/{}", deploy.name)));
        let _ = writeln!(
            out,
            "# Responses are cached only when the app allows it (Cache-Control max-age/s-maxage, Expires\n\
             # or X-Accel-Expires) and sets no cookie: there is no proxy_cache_valid default.\n\
             proxy_cache_path {} levels=1:2 keys_zone={name}_cache:10m max_size={} inactive={} use_temp_path=off;\n",
            path.display(),
            cache.max_size.bytes(),
            cache.inactive
        );
    }

    let body = server_body(web, &deploy, &name, &statics);
    let listen = |port: u16, extra: &str| {
        let mut text = format!("    listen {port}{extra};\n");
        if deploy.ipv6 {
            let _ = writeln!(text, "    listen [::]:{port}{extra};");
        }
        text
    };
    let server_names = deploy.server_names.join(" ");
    match tls {
        None => {
            out.push_str("server {\n");
            out.push_str(&listen(deploy.http_port, ""));
            let _ = writeln!(out, "    server_name {server_names};");
            out.push_str(&body);
            out.push_str("}\n");
        }
        Some(tls) => {
            out.push_str(
                "# Plain HTTP only answers ACME challenges and redirects to HTTPS.\nserver {\n",
            );
            out.push_str(&listen(deploy.http_port, ""));
            let _ = writeln!(
                out,
                "    server_name {server_names};\n    server_tokens off;"
            );
            if let Some(webroot) = &tls.acme_webroot {
                let _ = writeln!(
                    out,
                    "    location ^~ /.well-known/acme-challenge/ {{\n        root {};\n        default_type text/plain;\n        auth_basic off;\n    }}",
                    webroot.display()
                );
            }
            let port = if deploy.https_port == 443 {
                String::new()
            } else {
                format!(":{}", deploy.https_port)
            };
            let _ = writeln!(
                out,
                "    location / {{\n        return 301 https://$host{port}$request_uri;\n    }}\n}}\n"
            );
            out.push_str("server {\n");
            out.push_str(&listen(deploy.https_port, " ssl http2"));
            let _ = writeln!(out, "    server_name {server_names};");
            let _ = writeln!(
                out,
                "    ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_ciphers {CIPHERS};\n    ssl_prefer_server_ciphers off;\n    ssl_session_cache shared:{name}_tls:10m;\n    ssl_session_timeout 1d;\n    ssl_session_tickets off;",
                tls.certificate.display(),
                tls.key.display()
            );
            if !tls.hsts.is_zero() {
                // Server-level add_header is inherited only by locations without their own
                // add_header; the locations below add none.
                let _ = writeln!(
                    out,
                    "    add_header Strict-Transport-Security \"max-age={}\" always;",
                    tls.hsts.get().as_secs()
                );
            }
            out.push_str(&body);
            out.push_str("}\n");
        }
    }

    let mut output = Output {
        files: vec![File {
            path: format!("nginx/{}.conf", deploy.name),
            service: Service::Nginx,
            install: copy(site_path(&deploy), 0o644, "root", "root"),
            contents: out,
        }],
        ..Output::default()
    };
    if !deploy.app_hosts.is_empty() {
        output.warnings.push(format!(
            "[deploy].app_hosts: each app host's [web].forwarded_allow_ips must include this nginx host's address, or the X-Forwarded headers are ignored (currently {:?})",
            web.forwarded_allow_ips.entries()
        ));
    }
    Ok(output)
}

/// Where the site is installed.
pub fn site_path(deploy: &DeployConfig) -> PathBuf {
    PathBuf::from(format!("/etc/nginx/conf.d/{}.conf", deploy.name))
}

/// Where the temporary ACME-only site is installed while certbot fetches the first certificate.
pub fn acme_site_path(deploy: &DeployConfig) -> PathBuf {
    PathBuf::from(format!("/etc/nginx/conf.d/{}-acme.conf", deploy.name))
}

/// The ACME webroot when the certificate is Let's Encrypt's and so does not exist before the
/// first `certbot` run: nginx refuses a site whose certificate is missing, so the first
/// certificate is fetched through a temporary plain-HTTP site that serves only the challenge.
pub fn first_certificate_webroot(deploy: &DeployConfig) -> Option<&std::path::Path> {
    let tls = deploy.tls.as_ref()?;
    if tls.certificate.is_some() {
        return None;
    }
    tls.acme_webroot.as_deref()
}

/// The Let's Encrypt certificate `[deploy.tls]` defaults to, when it does.
pub fn acme_certificate(deploy: &DeployConfig) -> Option<PathBuf> {
    first_certificate_webroot(deploy)?;
    deploy
        .server_names
        .first()
        .filter(|n| n.as_str() != "_")
        .map(|n| PathBuf::from(format!("/etc/letsencrypt/live/{n}/fullchain.pem")))
}

/// The temporary site the install steps fetch the first certificate through, when there is no
/// certificate before `certbot` runs (see [`first_certificate_webroot`]). Not part of
/// [`render`], whose one file `emit nginx > site.conf` relies on.
pub fn first_certificate_site(config: &Config) -> Option<File> {
    let deploy = deploy(config);
    let webroot = first_certificate_webroot(&deploy)?;
    Some(File {
        path: format!("nginx/{}-acme.conf", deploy.name),
        service: Service::Nginx,
        install: copy(acme_site_path(&deploy), 0o644, "root", "root"),
        contents: acme_site(&deploy, webroot),
    })
}

/// The temporary site: the ACME challenge on the HTTP port, 503 for everything else.
fn acme_site(deploy: &DeployConfig, webroot: &std::path::Path) -> String {
    let mut out = header("#", "nginx");
    let _ = writeln!(
        out,
        "# Temporary: answers certbot's challenge until the first certificate exists, then the\n\
         # full site replaces it (nginx refuses a site whose certificate file is missing).\n\
         server {{\n    listen {port};",
        port = deploy.http_port
    );
    if deploy.ipv6 {
        let _ = writeln!(out, "    listen [::]:{};", deploy.http_port);
    }
    let _ = writeln!(
        out,
        "    server_name {};
    server_tokens off;
    location ^~ /.well-known/acme-challenge/ {{
        root {};
        default_type text/plain;
    }}
    location / {{
        return 503;
    }}
}}",
        deploy.server_names.join(" "),
        webroot.display()
    );
    out
}

/// The server block's body shared by the plain and the TLS server.
fn server_body(
    web: &WebConfig,
    deploy: &DeployConfig,
    name: &str,
    statics: &[(String, PathBuf)],
) -> String {
    let mut out = String::new();
    let access_log = deploy
        .access_log
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/log/nginx/{}.access.log", deploy.name)));
    let error_log = deploy
        .error_log
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/log/nginx/{}.error.log", deploy.name)));
    let _ = writeln!(
        out,
        "    server_tokens off;\n    access_log {};\n    error_log {};\n",
        access_log.display(),
        error_log.display()
    );
    let _ = writeln!(
        out,
        "    # = [web].max_body: the pool answers 413 beyond it too.\n    client_max_body_size {};\n    # = [web].body_buffer: larger bodies are buffered in a temporary file.\n    client_body_buffer_size {};\n    # = [web].max_header_size: a request line or header field up to it passes, a head much\n    # bigger gets 400 here; the pool answers 431 to a head over it.\n    large_client_header_buffers 1 {};\n",
        web.max_body.bytes(),
        web.body_buffer.bytes().max(1024),
        web.max_header_size.bytes()
    );
    let _ = writeln!(
        out,
        "    gzip on;\n    gzip_vary on;\n    gzip_proxied any;\n    gzip_comp_level 5;\n    gzip_min_length 1024;\n    gzip_types {GZIP_TYPES};\n"
    );
    if let Some(staging) = &deploy.staging {
        let _ = writeln!(
            out,
            "    # Staging: the whole site asks for a password (`sauna-supervisor htpasswd USER`).\n    auth_basic \"{}\";\n    auth_basic_user_file {};\n",
            staging.realm.replace(['"', '\\'], ""),
            staging.htpasswd.display()
        );
    }
    for (prefix, dir) in statics {
        let _ = writeln!(
            out,
            "    location {prefix} {{\n        alias {};\n        expires {};\n        access_log off;\n    }}\n",
            dir.display(),
            deploy.static_max_age
        );
    }
    for prefix in &deploy.websocket {
        let _ = writeln!(out, "    location {prefix} {{");
        proxy_directives(&mut out, web, deploy, name, true);
        out.push_str("    }\n\n");
    }
    out.push_str("    location / {\n");
    proxy_directives(&mut out, web, deploy, name, false);
    out.push_str("    }\n");
    out
}

/// The proxy directives of one location; repeated per location because nginx inherits
/// `proxy_set_header` only into locations that set none themselves.
fn proxy_directives(
    out: &mut String,
    web: &WebConfig,
    deploy: &DeployConfig,
    name: &str,
    websocket: bool,
) {
    let _ = writeln!(out, "        proxy_pass http://{name}_app;");
    out.push_str("        proxy_http_version 1.1;\n");
    if websocket {
        let _ = writeln!(
            out,
            "        proxy_set_header Upgrade $http_upgrade;\n        proxy_set_header Connection ${name}_connection;"
        );
    } else {
        out.push_str("        proxy_set_header Connection \"\";\n");
    }
    out.push_str(
        "        proxy_set_header Host $http_host;\n        proxy_set_header X-Real-IP $remote_addr;\n        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n        proxy_set_header X-Forwarded-Proto $scheme;\n        proxy_set_header X-Forwarded-Host $host;\n        proxy_set_header X-Forwarded-Port $server_port;\n        proxy_connect_timeout 5s;\n",
    );
    if websocket {
        // A WebSocket is idle between messages; the request deadline does not apply to it.
        out.push_str("        proxy_read_timeout 1h;\n        proxy_send_timeout 1h;\n");
    } else {
        let read = Duration(web.queue_timeout.get() + web.timeout.get() + TIMEOUT_SLACK.get());
        let _ = writeln!(
            out,
            "        # [web].queue_timeout {} + timeout {} + {} slack: the pool's 503/504 arrives first.\n        proxy_read_timeout {read};\n        proxy_send_timeout {read};",
            web.queue_timeout, web.timeout, TIMEOUT_SLACK
        );
        if deploy.cache.is_some() {
            let _ = writeln!(
                out,
                "        proxy_cache {name}_cache;\n        proxy_cache_key $scheme$host$request_uri;\n        proxy_cache_lock on;\n        proxy_cache_use_stale error timeout updating http_502 http_503 http_504;\n        proxy_cache_bypass $http_authorization;\n        proxy_no_cache $http_authorization;"
            );
        }
    }
}

/// The `server` entries of the upstream.
fn upstream_servers(
    web: &WebConfig,
    deploy: &DeployConfig,
    problems: &mut Vec<Problem>,
) -> Vec<String> {
    if deploy.app_hosts.is_empty() {
        return web
            .listen
            .iter()
            .map(|listen| match listen {
                Listen::Unix(_) => listen.to_string(),
                Listen::Tcp(address) => connect_address(*address).to_string(),
            })
            .collect();
    }
    let Some(port) = web.listen.iter().find_map(|listen| match listen {
        Listen::Tcp(address) => Some(address.port()),
        Listen::Unix(_) => None,
    }) else {
        problems.push(Problem::at(
            &["deploy", "app_hosts"],
            "[deploy].app_hosts needs a TCP address in [web].listen (\"0.0.0.0:8000\"): remote hosts cannot reach a unix socket",
        ));
        return Vec::new();
    };
    deploy
        .app_hosts
        .iter()
        .enumerate()
        .map(|(position, host)| {
            let bracketed = host.starts_with('[') && host.ends_with(']');
            if host.is_empty() || host.contains('/') || (host.contains(':') && !bracketed) {
                problems.push(Problem::at(
                    &["deploy", "app_hosts", &position.to_string()],
                    format!(
                        "[deploy].app_hosts: {host:?} must be a host name or address without a port (IPv6 in brackets); the port is [web].listen's {port}"
                    ),
                ));
            }
            format!("{host}:{port}")
        })
        .collect()
}

/// The address nginx connects to for a listen address: wildcards become loopback.
fn connect_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Certificate, key, ACME webroot and HSTS of the TLS server.
struct Tls {
    certificate: PathBuf,
    key: PathBuf,
    acme_webroot: Option<PathBuf>,
    hsts: Duration,
}

fn tls_files(deploy: &DeployConfig, problems: &mut Vec<Problem>) -> Option<Tls> {
    let tls = deploy.tls.as_ref()?;
    let live = deploy
        .server_names
        .first()
        .filter(|n| n.as_str() != "_")
        .map(|n| PathBuf::from(format!("/etc/letsencrypt/live/{n}")));
    let defaulted = |given: &Option<PathBuf>, file: &str| -> Option<PathBuf> {
        match (given, &tls.acme_webroot, &live) {
            (Some(path), _, _) => Some(path.clone()),
            (None, Some(_), Some(live)) => Some(live.join(file)),
            _ => None,
        }
    };
    let certificate = defaulted(&tls.certificate, "fullchain.pem");
    let key = defaulted(&tls.key, "privkey.pem");
    match (certificate, key) {
        (Some(certificate), Some(key)) => Some(Tls {
            certificate,
            key,
            acme_webroot: tls.acme_webroot.clone(),
            hsts: tls.hsts.unwrap_or(Duration::from_secs(365 * 86400)),
        }),
        _ => {
            problems.push(Problem::at(
                &["deploy", "tls"],
                "[deploy.tls]: set certificate and key, or acme_webroot with a real first entry in [deploy].server_names (Let's Encrypt paths)",
            ));
            None
        }
    }
}

/// Static mounts as nginx `location`/`alias` pairs, both ending in '/' (nginx maps the rest of
/// the URL onto the directory literally, so a missing slash on one side breaks every file).
fn static_locations(deploy: &DeployConfig, problems: &mut Vec<Problem>) -> Vec<(String, PathBuf)> {
    let mut locations = Vec::new();
    for (prefix, dir) in &deploy.static_dirs {
        let key = ["deploy", "static", prefix.as_str()];
        if !prefix.starts_with('/') {
            problems.push(Problem::at(
                &key,
                format!("[deploy.static]: {prefix:?} must be a URL path starting with '/'"),
            ));
            continue;
        }
        if !dir.is_absolute() {
            problems.push(Problem::at(
                &key,
                format!(
                    "[deploy.static] {prefix:?}: {} must be an absolute directory",
                    dir.display()
                ),
            ));
            continue;
        }
        let prefix = with_slash(prefix);
        let dir = PathBuf::from(with_slash(&dir.display().to_string()));
        locations.push((prefix, dir));
    }
    locations
}

fn with_slash(text: &str) -> String {
    if text.ends_with('/') {
        text.to_owned()
    } else {
        format!("{text}/")
    }
}

/// nginx's proxied requests come from loopback when the upstream is local; the pool only believes
/// X-Forwarded-* from addresses in `[web].forwarded_allow_ips`, so that list must cover it.
fn check_forwarded(web: &WebConfig, deploy: &DeployConfig, problems: &mut Vec<Problem>) {
    if !deploy.app_hosts.is_empty() {
        return;
    }
    for listen in &web.listen {
        let Listen::Tcp(address) = listen else {
            continue;
        };
        let ip = connect_address(*address).ip();
        if ip.is_loopback() && !web.forwarded_allow_ips.trusts(ip) {
            problems.push(Problem::at(
                &["web", "forwarded_allow_ips"],
                format!(
                    "[web].forwarded_allow_ips {:?} does not include {ip}, where nginx connects from: add \"{ip}\" or the pool ignores X-Forwarded-For/-Proto",
                    web.forwarded_allow_ips.entries()
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listen_addresses_are_reached_through_loopback() {
        let connect = |text: &str| connect_address(text.parse().unwrap()).to_string();
        assert_eq!(connect("0.0.0.0:8000"), "127.0.0.1:8000");
        assert_eq!(connect("[::]:8000"), "[::1]:8000");
        assert_eq!(connect("10.1.2.3:8000"), "10.1.2.3:8000");
    }
}
