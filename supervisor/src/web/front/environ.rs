//! Turning a parsed HTTP request into the CGI part of a WSGI environ (PEP 3333), written straight
//! into the request frame as `key\0value\0…` bytes. Values are the request's raw bytes, which the
//! shim decodes as latin-1, so every value is a `str` of code points U+0000–U+00FF as the PEP
//! requires, with no transcoding on either side. It also decides whom to believe about the
//! client's address and scheme (`forwarded_allow_ips`). The `wsgi.*` objects are the shim's.

use std::net::{IpAddr, SocketAddr};

use bytes::BytesMut;
use hyper::http::request::Parts;
use hyper::http::{HeaderMap, Version};
use proxy_conf::Forwarders;

/// The connection a request arrived on.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The client, or `None` on a Unix socket.
    pub peer: Option<SocketAddr>,
    /// Our address, or `None` on a Unix socket.
    pub local: Option<SocketAddr>,
}

/// Settings that shape every environ.
#[derive(Debug, Clone, Default)]
pub struct EnvironConfig {
    /// The mount prefix (`SCRIPT_NAME`), without a trailing `/`.
    pub script_name: String,
    /// Trusted proxies, `[web].forwarded_allow_ips`.
    pub forwarders: Forwarders,
}

/// The request cannot be given to a WSGI app.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// `%00` in the path: a NUL cannot be passed in a CGI variable.
    #[error("the request path contains an encoded NUL byte")]
    NulInPath,
}

fn put(out: &mut BytesMut, key: &[u8], value: &[u8]) {
    out.extend_from_slice(key);
    out.extend_from_slice(b"\0");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\0");
}

/// Percent-decodes a path; invalid escapes stay as they are (as `urllib.parse.unquote` does).
pub fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let hex = |byte: u8| match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    };
    let mut decoded = Vec::with_capacity(raw.len());
    let mut index = 0;
    while index < raw.len() {
        if raw[index] == b'%' && index + 2 < raw.len() {
            if let (Some(high), Some(low)) = (hex(raw[index + 1]), hex(raw[index + 2])) {
                decoded.push(high << 4 | low);
                index += 3;
                continue;
            }
        }
        decoded.push(raw[index]);
        index += 1;
    }
    decoded
}

/// Appends the environ block of `parts` to `out`. `body_len` is the length of the buffered body
/// (always known: the front reads the whole body before dispatch, chunked or not).
pub fn write_environ(
    out: &mut BytesMut,
    parts: &Parts,
    connection: &Connection,
    body_len: u64,
    config: &EnvironConfig,
) -> Result<(), BadRequest> {
    let uri = &parts.uri;
    let raw_path = uri.path().as_bytes();
    let path = if raw_path.contains(&b'%') {
        let decoded = percent_decode(raw_path);
        if decoded.contains(&0) {
            return Err(BadRequest::NulInPath);
        }
        decoded
    } else {
        raw_path.to_vec()
    };
    let script_name = config.script_name.as_bytes();
    let path_info = match path.strip_prefix(script_name) {
        Some(rest) if !script_name.is_empty() && (rest.is_empty() || rest.starts_with(b"/")) => {
            rest
        }
        _ => &path[..],
    };
    let query = uri.query().unwrap_or("");
    put(out, b"REQUEST_METHOD", parts.method.as_str().as_bytes());
    put(out, b"SCRIPT_NAME", script_name);
    put(out, b"PATH_INFO", path_info);
    put(out, b"QUERY_STRING", query.as_bytes());
    let raw_uri = uri.path_and_query().map_or("/", |pq| pq.as_str());
    put(out, b"REQUEST_URI", raw_uri.as_bytes());
    put(out, b"RAW_URI", raw_uri.as_bytes());
    let protocol: &[u8] = match parts.version {
        Version::HTTP_10 => b"HTTP/1.0",
        Version::HTTP_09 => b"HTTP/0.9",
        _ => b"HTTP/1.1",
    };
    put(out, b"SERVER_PROTOCOL", protocol);

    let headers = &parts.headers;
    let trusted_proxy = match connection.peer {
        Some(peer) => config.forwarders.trusts(peer.ip()),
        // A Unix socket is reachable only through the file system: the proxy in front of it.
        None => true,
    };
    let mut scheme: &[u8] = b"http";
    let mut remote = connection.peer.map(|peer| (peer.ip(), Some(peer.port())));
    if trusted_proxy {
        if let Some(proto) = headers.get("x-forwarded-proto") {
            let proto = proto
                .as_bytes()
                .split(|b| *b == b',')
                .next()
                .unwrap_or(b"")
                .trim_ascii();
            if proto.eq_ignore_ascii_case(b"https") {
                scheme = b"https";
            }
        }
        if let Some(client) = forwarded_client(headers, &config.forwarders) {
            remote = Some((client, None));
        }
    }
    put(out, b"wsgi.url_scheme", scheme);
    if let Some((ip, port)) = remote {
        put(out, b"REMOTE_ADDR", ip.to_string().as_bytes());
        if let Some(port) = port {
            put(out, b"REMOTE_PORT", port.to_string().as_bytes());
        }
    }

    let default_port: &[u8] = if scheme == b"https" { b"443" } else { b"80" };
    let host = headers
        .get("host")
        .map(|value| value.as_bytes())
        .or_else(|| uri.host().map(str::as_bytes));
    match host.map(split_host) {
        Some((name, port)) if !name.is_empty() => {
            put(out, b"SERVER_NAME", name);
            put(out, b"SERVER_PORT", port.unwrap_or(default_port));
        }
        _ => match connection.local {
            Some(local) => {
                put(out, b"SERVER_NAME", local.ip().to_string().as_bytes());
                put(out, b"SERVER_PORT", local.port().to_string().as_bytes());
            }
            None => {
                put(out, b"SERVER_NAME", b"localhost");
                put(out, b"SERVER_PORT", default_port);
            }
        },
    }

    if let Some(content_type) = headers.get("content-type") {
        put(out, b"CONTENT_TYPE", content_type.as_bytes());
    }
    if body_len > 0
        || headers.contains_key("content-length")
        || headers.contains_key("transfer-encoding")
    {
        put(out, b"CONTENT_LENGTH", body_len.to_string().as_bytes());
    }
    write_http_headers(out, headers);
    Ok(())
}

/// `HTTP_*` variables; repeated headers are joined with ", " (cookies with "; ").
fn write_http_headers(out: &mut BytesMut, headers: &HeaderMap) {
    for name in headers.keys() {
        let name_text = name.as_str();
        // Content-Type/-Length have their own variables; names with "_" would collide with the
        // "-" spelling after the CGI transformation (a spoofing vector), so they are dropped.
        if name_text == "content-type" || name_text == "content-length" || name_text.contains('_') {
            continue;
        }
        out.extend_from_slice(b"HTTP_");
        out.extend(name_text.bytes().map(|b| {
            if b == b'-' {
                b'_'
            } else {
                b.to_ascii_uppercase()
            }
        }));
        out.extend_from_slice(b"\0");
        let separator: &[u8] = if name_text == "cookie" { b"; " } else { b", " };
        for (index, value) in headers.get_all(name).iter().enumerate() {
            if index > 0 {
                out.extend_from_slice(separator);
            }
            out.extend_from_slice(value.as_bytes());
        }
        out.extend_from_slice(b"\0");
    }
}

/// The client address from `X-Forwarded-For`: the right-most entry that is not a trusted proxy
/// (entries further left can be forged by the client), or the left-most when all are trusted.
fn forwarded_client(headers: &HeaderMap, forwarders: &Forwarders) -> Option<IpAddr> {
    let mut entries: Vec<IpAddr> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        for entry in value.to_str().ok()?.split(',') {
            let entry = entry.trim();
            let ip = entry
                .parse::<IpAddr>()
                .ok()
                .or_else(|| entry.parse::<SocketAddr>().ok().map(|address| address.ip()))?;
            entries.push(ip);
        }
    }
    entries
        .iter()
        .rev()
        .find(|ip| !forwarders.trusts(**ip))
        .or_else(|| entries.first())
        .copied()
}

/// Splits `host[:port]`, including `[v6]:port`.
fn split_host(host: &[u8]) -> (&[u8], Option<&[u8]>) {
    if host.starts_with(b"[") {
        if let Some(end) = host.iter().position(|b| *b == b']') {
            let port = host[end + 1..]
                .strip_prefix(b":")
                .filter(|port| !port.is_empty());
            return (&host[..=end], port);
        }
        return (host, None);
    }
    match host.iter().rposition(|b| *b == b':') {
        Some(colon) if colon + 1 < host.len() => (&host[..colon], Some(&host[colon + 1..])),
        Some(colon) => (&host[..colon], None),
        None => (host, None),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use hyper::http::Request;

    fn environ(
        request: Request<()>,
        connection: &Connection,
        config: &EnvironConfig,
    ) -> Vec<(String, String)> {
        let (parts, ()) = request.into_parts();
        let mut out = BytesMut::new();
        write_environ(&mut out, &parts, connection, 5, config).unwrap();
        pairs(&out)
    }

    /// An environ block (`key\0value\0…`) as (key, value) pairs; bytes read as Latin-1.
    pub(in crate::web::front) fn pairs(block: &[u8]) -> Vec<(String, String)> {
        let text: String = block.iter().map(|b| char::from(*b)).collect();
        let items: Vec<&str> = text.split('\0').collect();
        items
            .chunks_exact(2)
            .map(|pair| (pair[0].to_owned(), pair[1].to_owned()))
            .collect()
    }

    /// The value of `key` in `environ`.
    pub(in crate::web::front) fn get<'a>(
        environ: &'a [(String, String)],
        key: &str,
    ) -> Option<&'a str> {
        environ
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn tcp() -> Connection {
        Connection {
            peer: Some("10.0.0.7:41000".parse().unwrap()),
            local: Some("127.0.0.1:8000".parse().unwrap()),
        }
    }

    #[test]
    fn path_is_percent_decoded_as_latin1_and_query_stays_raw() {
        let request = Request::post("/caf%C3%A9/a%2Fb?x=%C3%A9&y=1")
            .header("Host", "example.com:8080")
            .header("Content-Type", "text/plain")
            .header("X-Multi", "a")
            .header("X-Multi", "b")
            .header("X_Sneaky", "dropped")
            .body(())
            .unwrap();
        let env = environ(request, &tcp(), &EnvironConfig::default());
        assert_eq!(get(&env, "PATH_INFO"), Some("/caf\u{c3}\u{a9}/a/b"));
        assert_eq!(get(&env, "QUERY_STRING"), Some("x=%C3%A9&y=1"));
        assert_eq!(
            get(&env, "REQUEST_URI"),
            Some("/caf%C3%A9/a%2Fb?x=%C3%A9&y=1")
        );
        assert_eq!(get(&env, "SCRIPT_NAME"), Some(""));
        assert_eq!(get(&env, "SERVER_NAME"), Some("example.com"));
        assert_eq!(get(&env, "SERVER_PORT"), Some("8080"));
        assert_eq!(get(&env, "CONTENT_TYPE"), Some("text/plain"));
        assert_eq!(get(&env, "CONTENT_LENGTH"), Some("5"));
        assert_eq!(get(&env, "HTTP_CONTENT_TYPE"), None);
        assert_eq!(get(&env, "HTTP_X_MULTI"), Some("a, b"));
        assert_eq!(get(&env, "HTTP_X_SNEAKY"), None);
        assert_eq!(get(&env, "REMOTE_ADDR"), Some("10.0.0.7"));
        assert_eq!(get(&env, "REMOTE_PORT"), Some("41000"));
        assert_eq!(get(&env, "wsgi.url_scheme"), Some("http"));
    }

    #[test]
    fn script_name_is_stripped_only_at_a_segment_boundary() {
        let config = EnvironConfig {
            script_name: "/app".to_owned(),
            ..EnvironConfig::default()
        };
        let env = environ(Request::get("/app/x").body(()).unwrap(), &tcp(), &config);
        assert_eq!(
            (get(&env, "SCRIPT_NAME"), get(&env, "PATH_INFO")),
            (Some("/app"), Some("/x"))
        );
        let env = environ(Request::get("/apple").body(()).unwrap(), &tcp(), &config);
        assert_eq!(get(&env, "PATH_INFO"), Some("/apple"));
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let request = || {
            Request::get("/")
                .header("Host", "h")
                .header("X-Forwarded-For", "6.6.6.6, 1.2.3.4, 10.0.0.8")
                .header("X-Forwarded-Proto", "https")
                .body(())
                .unwrap()
        };
        let untrusted = environ(request(), &tcp(), &EnvironConfig::default());
        assert_eq!(get(&untrusted, "REMOTE_ADDR"), Some("10.0.0.7"));
        assert_eq!(get(&untrusted, "wsgi.url_scheme"), Some("http"));

        let config = EnvironConfig {
            forwarders: Forwarders(vec!["10.0.0.0/8".parse().unwrap()]),
            ..EnvironConfig::default()
        };
        let trusted = environ(request(), &tcp(), &config);
        assert_eq!(get(&trusted, "REMOTE_ADDR"), Some("1.2.3.4"));
        assert_eq!(get(&trusted, "REMOTE_PORT"), None);
        assert_eq!(get(&trusted, "wsgi.url_scheme"), Some("https"));
        assert_eq!(get(&trusted, "SERVER_PORT"), Some("443"));
    }

    #[test]
    fn encoded_nul_is_refused_and_bad_escapes_are_kept() {
        let (parts, ()) = Request::get("/a%00b").body(()).unwrap().into_parts();
        let result = write_environ(
            &mut BytesMut::new(),
            &parts,
            &tcp(),
            0,
            &EnvironConfig::default(),
        );
        assert_eq!(result, Err(BadRequest::NulInPath));
        assert_eq!(percent_decode(b"/100%/%zz%4"), b"/100%/%zz%4");
        assert_eq!(percent_decode(b"%41%42"), b"AB");
    }

    #[test]
    fn hosts_split_with_and_without_ports() {
        assert_eq!(split_host(b"a.b:81"), (&b"a.b"[..], Some(&b"81"[..])));
        assert_eq!(split_host(b"a.b"), (&b"a.b"[..], None));
        assert_eq!(
            split_host(b"[::1]:8000"),
            (&b"[::1]"[..], Some(&b"8000"[..]))
        );
    }
}
