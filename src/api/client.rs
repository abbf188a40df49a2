//! A blocking client for the API socket, for `waterbear ctl` and the tests: one request
//! per connection, with connect and response timeouts, and errors that name the socket.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::socket::{connect_nonblocking, send_nosignal};

/// Default time to get a connection (only a full listen backlog makes it wait).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time to wait for a response; a snapshot that writes guest memory out can
/// take this long.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest response the client reads.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error("no API socket at {path}; is the VM running, and is this its --api-socket?")]
    NoSocket { path: PathBuf },
    #[error("nobody is listening on API socket {path}; its VMM has probably exited")]
    NotListening { path: PathBuf },
    #[error("permission denied on API socket {path}; run as the user that started the VMM")]
    PermissionDenied { path: PathBuf },
    #[error("API socket {path} accepted no connection within {timeout:?}")]
    ConnectTimeout { path: PathBuf, timeout: Duration },
    #[error("cannot connect to API socket {path}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("cannot send the request to API socket {path}")]
    Send { path: PathBuf, source: io::Error },
    #[error("no response from API socket {path} within {timeout:?}")]
    ResponseTimeout { path: PathBuf, timeout: Duration },
    #[error("cannot read the response from API socket {path}")]
    Receive { path: PathBuf, source: io::Error },
    #[error("malformed response from API socket {path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("cannot resolve {path} to an absolute path")]
    Absolute { path: PathBuf, source: io::Error },
    #[error("path {path:?} is not valid UTF-8 and cannot be sent in a JSON request")]
    NonUtf8Path { path: PathBuf },
    #[error("the VMM at {path} refused the request ({status}): {message}")]
    Refused {
        path: PathBuf,
        status: u16,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct ApiClient {
    path: PathBuf,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl ApiClient {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ApiClient {
            path: path.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
        }
    }

    pub fn with_timeouts(mut self, connect: Duration, response: Duration) -> Self {
        self.connect_timeout = connect;
        self.response_timeout = response;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `GET /vm`.
    pub fn info(&self) -> Result<Value, ApiClientError> {
        self.call("GET", "/vm", None)
    }

    pub fn pause(&self) -> Result<Value, ApiClientError> {
        self.call("PUT", "/vm/pause", None)
    }

    pub fn resume(&self) -> Result<Value, ApiClientError> {
        self.call("PUT", "/vm/resume", None)
    }

    /// `PUT /vm/snapshot`; a relative `dir` is taken from this process's directory.
    pub fn snapshot(&self, dir: &Path, keep_paused: bool) -> Result<Value, ApiClientError> {
        let dir = json_path(dir)?;
        let body = json!({ "dir": dir, "keep_paused": keep_paused });
        self.call("PUT", "/vm/snapshot", Some(&body))
    }

    /// `PUT /vm/update`; a relative `binary` is taken from this process's directory.
    pub fn update(&self, binary: Option<&Path>) -> Result<Value, ApiClientError> {
        let body = match binary {
            Some(b) => Some(json!({ "binary": json_path(b)? })),
            None => None,
        };
        self.call("PUT", "/vm/update", body.as_ref())
    }

    pub fn shutdown(&self) -> Result<Value, ApiClientError> {
        self.call("PUT", "/vm/shutdown", None)
    }

    /// Sends one request and returns the body of a 2xx, or `Refused` with the server's
    /// error message.
    pub fn call(
        &self,
        method: &str,
        uri: &str,
        body: Option<&Value>,
    ) -> Result<Value, ApiClientError> {
        let (status, body) = self.send(method, uri, body)?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let message = match body.get("error").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None => body.to_string(),
        };
        Err(ApiClientError::Refused {
            path: self.path.clone(),
            status,
            message,
        })
    }

    /// Sends one request and returns the status and JSON body (`null` when empty),
    /// whatever the status.
    pub fn send(
        &self,
        method: &str,
        uri: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), ApiClientError> {
        let mut stream = self.connect()?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut request = format!(
            "{method} {uri} HTTP/1.1\r\nHost: localhost\r\n\
             Accept: application/json\r\nConnection: close\r\n"
        );
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));

        // A server that refuses the connection answers and closes before reading: its
        // response is still worth reading when the write fails.
        let sent = write_all(&stream, request.as_bytes());
        match (self.receive(&mut stream), sent) {
            (Ok(response), _) => Ok(response),
            (Err(_), Err(source)) => Err(ApiClientError::Send {
                path: self.path.clone(),
                source,
            }),
            (Err(e), Ok(())) => Err(e),
        }
    }

    fn connect(&self) -> Result<UnixStream, ApiClientError> {
        let path = || self.path.clone();
        let deadline = Instant::now() + self.connect_timeout;
        let stream = loop {
            match connect_nonblocking(&self.path) {
                Ok(stream) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(ApiClientError::ConnectTimeout {
                            path: path(),
                            timeout: self.connect_timeout,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(match e.kind() {
                        io::ErrorKind::NotFound => ApiClientError::NoSocket { path: path() },
                        io::ErrorKind::ConnectionRefused => {
                            ApiClientError::NotListening { path: path() }
                        }
                        io::ErrorKind::PermissionDenied => {
                            ApiClientError::PermissionDenied { path: path() }
                        }
                        _ => ApiClientError::Connect {
                            path: path(),
                            source: e,
                        },
                    })
                }
            }
        };
        let set_up = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(self.response_timeout)))
            .and_then(|()| stream.set_write_timeout(Some(self.response_timeout)));
        set_up.map_err(|source| ApiClientError::Connect {
            path: path(),
            source,
        })?;
        Ok(stream)
    }

    fn receive(&self, stream: &mut UnixStream) -> Result<(u16, Value), ApiClientError> {
        let malformed = |reason: String| ApiClientError::Malformed {
            path: self.path.clone(),
            reason,
        };
        let mut input = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let eof = match stream.read(&mut chunk) {
                Ok(0) => true,
                Ok(n) => {
                    input.extend_from_slice(&chunk[..n]);
                    false
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ApiClientError::ResponseTimeout {
                        path: self.path.clone(),
                        timeout: self.response_timeout,
                    })
                }
                // A reset after the server's last byte still leaves a response to parse.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => true,
                Err(source) => {
                    return Err(ApiClientError::Receive {
                        path: self.path.clone(),
                        source,
                    })
                }
            };
            if input.len() > MAX_RESPONSE_BYTES {
                return Err(malformed(format!("more than {MAX_RESPONSE_BYTES} bytes")));
            }
            if let Some((status, body)) = parse_response(&input, eof).map_err(malformed)? {
                let value = if body.iter().all(u8::is_ascii_whitespace) {
                    Value::Null
                } else {
                    serde_json::from_slice(body)
                        .map_err(|e| malformed(format!("the body is not JSON ({e})")))?
                };
                return Ok((status, value));
            }
            if eof {
                return Err(malformed(format!(
                    "the connection closed after {} bytes, before a complete response",
                    input.len()
                )));
            }
        }
    }
}

fn write_all(stream: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match send_nosignal(stream.as_raw_fd(), bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Finds a final (non-1xx) response in `input`: its status and body. `None` when more
/// bytes are needed.
fn parse_response(mut input: &[u8], eof: bool) -> Result<Option<(u16, &[u8])>, String> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let header_len = match resp.parse(input) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("bad status line or headers ({e})")),
        };
        let status = resp.code.unwrap_or(0);
        if (100..200).contains(&status) {
            input = &input[header_len..];
            continue;
        }
        let length = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| {
                std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| "bad Content-Length".to_string())
            })
            .transpose()?;
        let body = &input[header_len..];
        return Ok(match length {
            Some(n) if body.len() >= n => Some((status, &body[..n])),
            None if eof || matches!(status, 204 | 304) => Some((status, body)),
            _ => None,
        });
    }
}

fn json_path(path: &Path) -> Result<String, ApiClientError> {
    let absolute = std::path::absolute(path).map_err(|source| ApiClientError::Absolute {
        path: path.into(),
        source,
    })?;
    absolute
        .into_os_string()
        .into_string()
        .map_err(|p| ApiClientError::NonUtf8Path { path: p.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_is_framed_by_content_length_after_interim_ones() {
        let input =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{}\nextra";
        assert_eq!(parse_response(input, false), Ok(Some((200, &b"{}\n"[..]))));
        assert_eq!(parse_response(&input[..40], false), Ok(None));
    }

    #[test]
    fn response_without_length_ends_at_eof() {
        let input = b"HTTP/1.1 500 Oops\r\n\r\n{\"error\": \"x\"}";
        assert_eq!(parse_response(input, false), Ok(None));
        assert_eq!(
            parse_response(input, true),
            Ok(Some((500, &b"{\"error\": \"x\"}"[..])))
        );
    }

    #[test]
    fn garbage_response_is_malformed() {
        assert!(parse_response(b"\x00garbage\r\n\r\n", true).is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", true).is_err());
    }

    #[test]
    fn errors_name_the_socket_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let client = ApiClient::new(&path);
        let err = client.info().unwrap_err();
        assert!(matches!(err, ApiClientError::NoSocket { .. }), "{err}");
        assert!(err.to_string().contains(path.to_str().unwrap()));

        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let err = client.info().unwrap_err();
        assert!(matches!(err, ApiClientError::NotListening { .. }), "{err}");
        assert!(err.to_string().contains(path.to_str().unwrap()));
    }

    #[test]
    fn relative_paths_are_sent_absolute() {
        let p = json_path(Path::new("snap")).unwrap();
        assert!(Path::new(&p).is_absolute() && p.ends_with("/snap"), "{p}");
    }
}
