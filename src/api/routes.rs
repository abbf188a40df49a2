//! Maps a method, path and JSON body to an [`ApiRequest`], or to the 4xx that says what
//! was wrong with them. The table of endpoints lives here and in `docs/api.md`.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::ApiRequest;

/// A request that names no endpoint or carries a bad body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no endpoint at {0}; see docs/api.md for the list")]
    NotFound(String),
    #[error("{path} does not support {method}; it allows {allow}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allow: &'static str,
    },
    #[error("{endpoint} needs a JSON body with {needs}")]
    MissingBody {
        endpoint: &'static str,
        needs: &'static str,
    },
    #[error("invalid JSON body for {endpoint}: {reason}")]
    BadBody {
        endpoint: &'static str,
        reason: String,
    },
    #[error("{endpoint}: \"{field}\" must be an absolute path, got {value:?}")]
    RelativePath {
        endpoint: &'static str,
        field: &'static str,
        value: PathBuf,
    },
}

impl RouteError {
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NotFound(_) => 404,
            RouteError::MethodNotAllowed { .. } => 405,
            _ => 400,
        }
    }

    /// The `Allow` header a 405 carries.
    pub fn allow(&self) -> Option<&'static str> {
        match self {
            RouteError::MethodNotAllowed { allow, .. } => Some(allow),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    dir: PathBuf,
    #[serde(default)]
    keep_paused: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    #[serde(default)]
    binary: Option<PathBuf>,
}

pub fn route(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, RouteError> {
    let allow = match path {
        "/vm" => "GET",
        "/vm/pause" | "/vm/resume" | "/vm/snapshot" | "/vm/update" | "/vm/shutdown" => "PUT",
        _ => return Err(RouteError::NotFound(path.to_string())),
    };
    if method != allow {
        return Err(RouteError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_string(),
            allow,
        });
    }

    match path {
        "/vm" => no_fields("GET /vm", body).map(|()| ApiRequest::Info),
        "/vm/pause" => no_fields("PUT /vm/pause", body).map(|()| ApiRequest::Pause),
        "/vm/resume" => no_fields("PUT /vm/resume", body).map(|()| ApiRequest::Resume),
        "/vm/shutdown" => no_fields("PUT /vm/shutdown", body).map(|()| ApiRequest::Shutdown),
        "/vm/snapshot" => snapshot(body),
        _ => update(body),
    }
}

fn snapshot(body: &[u8]) -> Result<ApiRequest, RouteError> {
    const ENDPOINT: &str = "PUT /vm/snapshot";
    let body: SnapshotBody = parse(ENDPOINT, body)?.ok_or(RouteError::MissingBody {
        endpoint: ENDPOINT,
        needs: "\"dir\"",
    })?;
    absolute(ENDPOINT, "dir", &body.dir)?;
    Ok(ApiRequest::Snapshot {
        dir: body.dir,
        keep_paused: body.keep_paused,
    })
}

fn update(body: &[u8]) -> Result<ApiRequest, RouteError> {
    const ENDPOINT: &str = "PUT /vm/update";
    let binary = parse::<UpdateBody>(ENDPOINT, body)?.and_then(|b| b.binary);
    if let Some(binary) = &binary {
        absolute(ENDPOINT, "binary", binary)?;
    }
    Ok(ApiRequest::Update { binary })
}

/// An endpoint without parameters takes no body, or an empty JSON object.
fn no_fields(endpoint: &'static str, body: &[u8]) -> Result<(), RouteError> {
    parse::<NoFields>(endpoint, body).map(|_| ())
}

/// Decodes a body; `None` for an empty (or all-whitespace) one.
fn parse<T: DeserializeOwned>(
    endpoint: &'static str,
    body: &[u8],
) -> Result<Option<T>, RouteError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let bad = |reason: String| RouteError::BadBody { endpoint, reason };
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    // serde would also take a struct from an array of its fields.
    if !value.is_object() {
        return Err(bad(format!("expected a JSON object, got {value}")));
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

fn absolute(endpoint: &'static str, field: &'static str, path: &Path) -> Result<(), RouteError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(RouteError::RelativePath {
            endpoint,
            field,
            value: path.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(method: &str, path: &str, body: &str) -> RouteError {
        route(method, path, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn every_endpoint_maps_to_its_request() {
        let ok = |m, p, b: &str| route(m, p, b.as_bytes()).unwrap();
        assert_eq!(ok("GET", "/vm", ""), ApiRequest::Info);
        assert_eq!(ok("PUT", "/vm/pause", ""), ApiRequest::Pause);
        assert_eq!(ok("PUT", "/vm/resume", "{}"), ApiRequest::Resume);
        assert_eq!(ok("PUT", "/vm/shutdown", " \n"), ApiRequest::Shutdown);
        assert_eq!(
            ok("PUT", "/vm/snapshot", r#"{"dir": "/s"}"#),
            ApiRequest::Snapshot {
                dir: "/s".into(),
                keep_paused: false
            }
        );
        assert_eq!(
            ok(
                "PUT",
                "/vm/snapshot",
                r#"{"dir": "/s", "keep_paused": true}"#
            ),
            ApiRequest::Snapshot {
                dir: "/s".into(),
                keep_paused: true
            }
        );
        assert_eq!(
            ok("PUT", "/vm/update", ""),
            ApiRequest::Update { binary: None }
        );
        assert_eq!(
            ok("PUT", "/vm/update", r#"{"binary": null}"#),
            ApiRequest::Update { binary: None }
        );
        assert_eq!(
            ok("PUT", "/vm/update", r#"{"binary": "/usr/bin/wb"}"#),
            ApiRequest::Update {
                binary: Some("/usr/bin/wb".into())
            }
        );
    }

    #[test]
    fn unknown_path_is_404_naming_it() {
        for path in ["/", "/vm/", "/vms", "/vm/pause/now", ""] {
            let e = err("GET", path, "");
            assert_eq!(e.status(), 404);
            assert!(e.to_string().contains(path));
        }
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        let e = err("POST", "/vm/pause", "");
        assert_eq!((e.status(), e.allow()), (405, Some("PUT")));
        let e = err("PUT", "/vm", "");
        assert_eq!((e.status(), e.allow()), (405, Some("GET")));
        assert!(e.to_string().contains("PUT"));
        assert_eq!(err("get", "/vm", "").status(), 405);
    }

    #[test]
    fn bad_bodies_are_400_naming_the_problem() {
        let cases = [
            ("PUT", "/vm/snapshot", "", "\"dir\""),
            ("PUT", "/vm/snapshot", "{", "EOF"),
            (
                "PUT",
                "/vm/snapshot",
                r#"{"keep_paused": true}"#,
                "missing field `dir`",
            ),
            (
                "PUT",
                "/vm/snapshot",
                r#"{"dir": "/s", "x": 1}"#,
                "unknown field `x`",
            ),
            ("PUT", "/vm/snapshot", r#"{"dir": 5}"#, "invalid type"),
            ("PUT", "/vm/snapshot", r#"{"dir": "rel/dir"}"#, "absolute"),
            ("PUT", "/vm/snapshot", r#"{"dir": ""}"#, "absolute"),
            ("PUT", "/vm/snapshot", r#"["/s"]"#, "expected a JSON object"),
            ("PUT", "/vm/update", r#"{"binary": "wb"}"#, "absolute"),
            (
                "PUT",
                "/vm/update",
                r#"{"bin": "/wb"}"#,
                "unknown field `bin`",
            ),
            (
                "PUT",
                "/vm/pause",
                r#"{"now": true}"#,
                "unknown field `now`",
            ),
            ("PUT", "/vm/pause", "null", "expected a JSON object"),
            ("GET", "/vm", "\u{0}", "invalid JSON body for GET /vm"),
        ];
        for (method, path, body, needle) in cases {
            let e = err(method, path, body);
            assert_eq!(e.status(), 400, "{method} {path} {body:?}");
            assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
        }
    }
}
