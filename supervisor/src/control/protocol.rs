//! The control protocol's wire format: JSON lines over the control socket. A client sends one
//! request line per connection and reads response lines until the final one (`ok` or `error`);
//! long operations (reload) send `progress` lines first.
//!
//! ```text
//! → {"v":1,"cmd":"reload","timeout_secs":120}
//! ← {"v":1,"pid":4242,"kind":"progress","message":"generation 3: 4/4 workers ready"}
//! ← {"v":1,"pid":4242,"kind":"ok","data":{"generation":3}}
//! ```
//!
//! `v` is the protocol version. A request without it is taken as version 1; a supervisor that
//! receives another version answers with an `error` naming both, instead of guessing. Every
//! response line carries the supervisor's `pid`, so a client can say which process answered.
//! What `data` holds for `status` belongs to the main loop, not to this module.

use serde::{Deserialize, Serialize};

use crate::supervisor::lifecycle::StopMode;

/// The version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// What a client asks the running supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Report pools, workers, programs and beat jobs (`sauna-supervisor status`).
    Status,
    /// Stop the supervisor (`sauna-supervisor stop`).
    Stop {
        /// Graceful unless the client asks otherwise.
        #[serde(default = "graceful")]
        mode: StopMode,
    },
    /// Re-read the config and roll every role to a new generation (`sauna-supervisor reload`).
    Reload {
        /// Give up (and roll back) after this many seconds; the supervisor's default when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
    /// Start a new sauna-supervisor binary, hand it the listening sockets and exit once it
    /// serves (`sauna-supervisor upgrade`).
    Upgrade {
        /// The binary to start; the supervisor's own executable (as resolved when it started)
        /// when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<std::path::PathBuf>,
        /// Give up (and keep the old supervisor) after this many seconds; the supervisor's
        /// default when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
}

fn graceful() -> StopMode {
    StopMode::Graceful
}

/// One response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version of the sender.
    pub v: u32,
    /// The supervisor's process id.
    pub pid: u32,
    /// What the line says.
    #[serde(flatten)]
    pub body: ResponseBody,
}

/// What a response line says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ResponseBody {
    /// Not final: a step of a long operation, for the client to print.
    Progress {
        /// One human-readable line.
        message: String,
    },
    /// Final: the request succeeded.
    Ok {
        /// The result (the status object for `status`); `null` when there is nothing to say.
        #[serde(default)]
        data: serde_json::Value,
    },
    /// Final: the request failed.
    Error {
        /// What kind of failure, for the client's exit status.
        error: ErrorKind,
        /// One line saying what failed and what to do.
        message: String,
        /// More text to print after the message: an application traceback, say.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
}

impl ResponseBody {
    /// Whether this is the last line of the response.
    pub fn is_final(&self) -> bool {
        !matches!(self, ResponseBody::Progress { .. })
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was not understood (malformed, unknown command, other protocol version).
    BadRequest,
    /// The client's user may not control this supervisor.
    Refused,
    /// The configuration is invalid; nothing was changed (a `reload` client exits 2).
    Config,
    /// The operation failed or was rolled back (a `reload` client exits 1).
    Failed,
    /// The supervisor cannot answer now: it is stopping, or it dropped the request.
    Unavailable,
}

/// Reads one request line: checks the version, then the command.
pub(crate) fn parse_request(line: &str) -> Result<Request, String> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|error| format!("the request is not a JSON object: {error}"))?;
    let version = match value.get("v") {
        None => PROTOCOL_VERSION,
        Some(v) => v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| format!("the request's \"v\" is not a version number: {v}"))?,
    };
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "this supervisor speaks control protocol version {PROTOCOL_VERSION}, the client \
             sent version {version}: use the same sauna-supervisor build for both"
        ));
    }
    serde_json::from_value(value).map_err(|error| format!("invalid request: {error}"))
}

/// The request line a client sends, without its newline.
pub(crate) fn request_line(request: &Request) -> Result<String, serde_json::Error> {
    #[derive(Serialize)]
    struct Line<'a> {
        v: u32,
        #[serde(flatten)]
        request: &'a Request,
    }
    serde_json::to_string(&Line {
        v: PROTOCOL_VERSION,
        request,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn requests_round_trip_with_their_version() {
        let requests = [
            Request::Status,
            Request::Stop {
                mode: StopMode::Fast,
            },
            Request::Reload {
                timeout_secs: Some(120),
            },
            Request::Reload { timeout_secs: None },
            Request::Upgrade {
                binary: Some("/usr/bin/sauna-supervisor".into()),
                timeout_secs: Some(60),
            },
            Request::Upgrade {
                binary: None,
                timeout_secs: None,
            },
        ];
        for request in requests {
            let line = request_line(&request).expect("serialize");
            assert!(line.starts_with("{\"v\":1,"), "{line}");
            assert_eq!(parse_request(&line), Ok(request));
        }
    }

    #[test]
    fn the_documented_request_lines_parse() {
        assert_eq!(parse_request(r#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(r#"{"cmd":"stop"}"#),
            Ok(Request::Stop {
                mode: StopMode::Graceful
            })
        );
        assert_eq!(
            parse_request(r#"{"v":1,"cmd":"stop","mode":"graceful"}"#),
            Ok(Request::Stop {
                mode: StopMode::Graceful
            })
        );
        assert_eq!(
            parse_request(r#"{"cmd":"reload","timeout_secs":30}"#),
            Ok(Request::Reload {
                timeout_secs: Some(30)
            })
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases = [
            ("status", "not a JSON object"),
            (r#"{"cmd":"dance"}"#, "unknown variant `dance`"),
            (r#"{"v":2,"cmd":"status"}"#, "client sent version 2"),
            (r#"{"v":"one","cmd":"status"}"#, "not a version number"),
            (r#"{"cmd":"stop","mode":"slow"}"#, "unknown variant `slow`"),
        ];
        for (line, expected) in cases {
            let error = parse_request(line).expect_err(line);
            assert!(error.contains(expected), "{line}: {error}");
        }
    }

    #[test]
    fn responses_are_flat_objects() {
        let response = Response {
            v: PROTOCOL_VERSION,
            pid: 42,
            body: ResponseBody::Error {
                error: ErrorKind::Config,
                message: "sauna.toml:3:1: unknown key".into(),
                detail: None,
            },
        };
        let value = serde_json::to_value(&response).expect("serialize");
        assert_eq!(
            value,
            json!({"v": 1, "pid": 42, "kind": "error", "error": "config",
                   "message": "sauna.toml:3:1: unknown key"})
        );
        assert_eq!(
            serde_json::from_value::<Response>(value).expect("parse"),
            response
        );
        let ok: Response =
            serde_json::from_str(r#"{"v":1,"pid":7,"kind":"ok"}"#).expect("data is optional");
        assert_eq!(
            ok.body,
            ResponseBody::Ok {
                data: serde_json::Value::Null
            }
        );
        assert!(ok.body.is_final());
        assert!(
            !ResponseBody::Progress {
                message: String::new()
            }
            .is_final()
        );
    }
}
