//! HTTP/1.1 framing for the API server: finding one complete request at the start of a
//! connection's input (with httparse) within the size limits, and encoding responses.
//! No sockets here; the server feeds bytes in and writes bytes out.

use super::{MAX_BODY_BYTES, MAX_HEADER_BYTES};

/// Header fields a request may carry.
const MAX_HEADERS: usize = 64;
/// Input that always holds either a complete request or a reason to reject it.
pub const MAX_REQUEST_BYTES: usize = MAX_HEADER_BYTES + MAX_BODY_BYTES;

/// Why a request cannot be framed. After any of these the connection's byte stream can
/// no longer be trusted, so the server answers and closes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("the request line and headers are larger than {MAX_HEADER_BYTES} bytes")]
    HeaderTooLarge,
    #[error("the request has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("the request body of {0} bytes is larger than the limit of {MAX_BODY_BYTES} bytes")]
    BodyTooLarge(u64),
    #[error("Content-Length {0:?} is not a valid length")]
    BadContentLength(String),
    #[error("Transfer-Encoding is not supported; send the body with a Content-Length")]
    TransferEncoding,
    #[error("the connection closed in the middle of a request ({0} bytes received)")]
    Truncated(usize),
    #[error("no complete request arrived within the idle timeout")]
    Timeout,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeaderTooLarge | HttpError::TooManyHeaders | HttpError::BodyTooLarge(_) => {
                413
            }
            HttpError::Timeout => 408,
            _ => 400,
        }
    }
}

/// One complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    pub body: Vec<u8>,
    /// False when the client asked to close (`Connection: close`, or HTTP/1.0 without
    /// `Connection: keep-alive`).
    pub keep_alive: bool,
    pub http10: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed. `expect_continue` is set once the headers are complete and
    /// ask for `100 Continue` before the body.
    Partial { expect_continue: bool },
    /// A request, taking up the first `consumed` bytes of the input.
    Complete { request: Request, consumed: usize },
}

/// Frames the request at the start of `buf`.
pub fn parse_request(buf: &[u8]) -> Result<Parsed, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let header_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEADER_BYTES => {
            return Err(HttpError::HeaderTooLarge)
        }
        Ok(httparse::Status::Partial) => {
            return Ok(Parsed::Partial {
                expect_continue: false,
            })
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    if header_len > MAX_HEADER_BYTES {
        return Err(HttpError::HeaderTooLarge);
    }

    let http10 = req.version == Some(0);
    let mut keep_alive = !http10;
    let mut content_length: Option<u64> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| HttpError::BadContentLength(value.into()))?;
            if content_length.is_some_and(|old| old != n) {
                return Err(HttpError::BadContentLength(value.into()));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }

    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_BODY_BYTES as u64 {
        return Err(HttpError::BodyTooLarge(body_len));
    }
    let end = header_len + body_len as usize;
    if buf.len() < end {
        return Ok(Parsed::Partial { expect_continue });
    }

    let uri = req.path.unwrap_or("");
    let path = uri.split_once('?').map_or(uri, |(p, _)| p);
    Ok(Parsed::Complete {
        request: Request {
            method: req.method.unwrap_or("").to_string(),
            path: path.to_string(),
            body: buf[header_len..end].to_vec(),
            keep_alive,
            http10,
        },
        consumed: end,
    })
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// What goes back on a connection for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: serde_json::Value,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
    /// Adds `Connection: close`; the server closes after writing it.
    pub close: bool,
    /// Adds `Connection: keep-alive` (an HTTP/1.0 client that asked for it).
    pub keep_alive_header: bool,
}

impl Response {
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Response {
            status,
            body: serde_json::json!({ "error": message.into() }),
            allow: None,
            close: false,
            keep_alive_header: false,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        use std::fmt::Write;

        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\n",
            self.status,
            reason_phrase(self.status)
        );
        // A 204 or 304 must not have a body or a Content-Length.
        let body = if matches!(self.status, 204 | 304) {
            String::new()
        } else {
            let mut body = self.body.to_string();
            body.push('\n');
            let _ = write!(head, "Content-Length: {}\r\n", body.len());
            body
        };
        if let Some(allow) = self.allow {
            let _ = write!(head, "Allow: {allow}\r\n");
        }
        if self.close {
            head.push_str("Connection: close\r\n");
        } else if self.keep_alive_header {
            head.push_str("Connection: keep-alive\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }
}

pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse_request(buf) {
            Ok(Parsed::Complete { request, consumed }) => (request, consumed),
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    #[test]
    fn get_without_body_is_complete_and_keeps_alive() {
        let buf = b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let (req, consumed) = complete(buf);
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/vm");
        assert!(req.body.is_empty());
        assert!(req.keep_alive);
        assert_eq!(consumed, buf.len());
    }

    #[test]
    fn body_is_framed_by_content_length_and_the_rest_is_left() {
        let buf = b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcdGET /vm";
        let (req, consumed) = complete(buf);
        assert_eq!(req.body, b"abcd");
        assert_eq!(&buf[consumed..], b"GET /vm");
    }

    #[test]
    fn query_string_is_dropped_from_the_path() {
        let (req, _) = complete(b"GET /vm?pretty=1 HTTP/1.1\r\n\r\n");
        assert_eq!(req.path, "/vm");
    }

    #[test]
    fn partial_headers_and_partial_body_need_more() {
        assert_eq!(
            parse_request(b"GET /vm HTTP/1.1\r\nHost"),
            Ok(Parsed::Partial {
                expect_continue: false
            })
        );
        let buf =
            b"PUT /vm/update HTTP/1.1\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n{}";
        assert_eq!(
            parse_request(buf),
            Ok(Parsed::Partial {
                expect_continue: true
            })
        );
    }

    #[test]
    fn connection_close_and_http10_turn_keep_alive_off() {
        let (req, _) = complete(b"GET /vm HTTP/1.1\r\nConnection: Close\r\n\r\n");
        assert!(!req.keep_alive);
        let (req, _) = complete(b"GET /vm HTTP/1.0\r\n\r\n");
        assert!(!req.keep_alive && req.http10);
        let (req, _) = complete(b"GET /vm HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(req.keep_alive);
    }

    #[test]
    fn oversized_header_block_is_rejected_before_it_completes() {
        let mut buf = b"GET /vm HTTP/1.1\r\nX-Fill: ".to_vec();
        buf.resize(MAX_HEADER_BYTES + 1, b'a');
        assert_eq!(parse_request(&buf), Err(HttpError::HeaderTooLarge));
        assert_eq!(HttpError::HeaderTooLarge.status(), 413);
    }

    #[test]
    fn header_block_just_under_the_limit_is_accepted() {
        let mut buf = b"GET /vm HTTP/1.1\r\nX-Fill: ".to_vec();
        buf.resize(MAX_HEADER_BYTES - 4, b'a');
        buf.extend_from_slice(b"\r\n\r\n");
        assert_eq!(buf.len(), MAX_HEADER_BYTES);
        complete(&buf);
    }

    #[test]
    fn oversized_content_length_is_rejected_without_the_body() {
        let buf = format!(
            "PUT /vm/snapshot HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        let err = parse_request(buf.as_bytes()).unwrap_err();
        assert_eq!(err, HttpError::BodyTooLarge(MAX_BODY_BYTES as u64 + 1));
        assert_eq!(err.status(), 413);
    }

    #[test]
    fn bad_framing_headers_are_rejected() {
        let bad = [
            &b"PUT /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n"[..],
            b"PUT /vm HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"PUT /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ];
        for buf in bad {
            let err = parse_request(buf).unwrap_err();
            assert_eq!(err.status(), 400, "{err}");
        }
    }

    #[test]
    fn garbage_and_too_many_headers_are_errors() {
        assert!(matches!(
            parse_request(b"\x00\x01\x02garbage\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse_request(b"GET /vm HTTP/9.9\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        let mut buf = b"GET /vm HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            buf.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        buf.extend_from_slice(b"\r\n");
        assert_eq!(parse_request(&buf), Err(HttpError::TooManyHeaders));
    }

    #[test]
    fn any_buffer_of_the_maximum_size_either_completes_or_fails() {
        let mut buf =
            format!("PUT /vm/update HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\nX-Fill: ")
                .into_bytes();
        buf.resize(MAX_HEADER_BYTES - 4, b'a');
        buf.extend_from_slice(b"\r\n\r\n");
        buf.resize(MAX_REQUEST_BYTES, b'b');
        let (req, consumed) = complete(&buf);
        assert_eq!(req.body.len(), MAX_BODY_BYTES);
        assert_eq!(consumed, MAX_REQUEST_BYTES);
    }

    #[test]
    fn response_carries_json_type_length_and_allow() {
        let mut resp = Response::error(405, "no");
        resp.allow = Some("GET");
        resp.close = true;
        let text = String::from_utf8(resp.encode()).unwrap();
        let body = "{\"error\":\"no\"}\n";
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("Content-Type: application/json\r\n"));
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(text.contains("Allow: GET\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with(&format!("\r\n\r\n{body}")));
    }

    #[test]
    fn no_content_response_has_no_body() {
        let mut resp = Response::error(204, "ignored");
        resp.body = serde_json::Value::Null;
        let text = String::from_utf8(resp.encode()).unwrap();
        assert!(text.ends_with("\r\n\r\n"));
        assert!(!text.contains("Content-Length"));
    }
}
