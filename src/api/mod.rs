//! The VMM's control API: JSON over HTTP/1.1 on a Unix socket, so that
//! `curl --unix-socket S http://localhost/vm` works (endpoints in `docs/api.md`).
//!
//! This module owns the socket (creating it 0600, refusing a live one, replacing a stale
//! one, adopting one inherited across `execve`), the HTTP framing and its limits, the
//! routing of a request to an [`ApiRequest`], and a blocking client. It does not know
//! what a VM is: the VMM supplies an [`ApiHandler`] that carries the requests out, and
//! removes the socket file when it exits.
//!
//! Wiring, in the VMM's event loop thread:
//!
//! ```ignore
//! // Early, to fail before building the VM; or ApiSocket::from_listener_fd after execve.
//! let socket = ApiSocket::bind(&socket_path)?;
//! let listener_fd = socket.listener_fd(); // for keep_fd_across_exec before an execve
//! let server = ApiServer::new(socket, Box::new(handler))?; // or ApiServer::bind(path, h)
//! event_manager.add_subscriber(Arc::new(Mutex::new(server)));
//! ```
//!
//! The handler runs on the event loop thread, one request at a time. Its response is
//! written to the client before `process` returns whenever the client's socket buffer
//! takes it (a few hundred bytes always fit in an empty one), so a handler that asks for
//! an `execve` or an exit should only record the wish and let the loop act on it after
//! `EventManager::run` returns; the client then gets the response and an end of file.

mod client;
mod http;
mod routes;
mod server;
mod socket;

use std::path::PathBuf;
use std::time::Duration;

pub use client::{ApiClient, ApiClientError, DEFAULT_CONNECT_TIMEOUT, DEFAULT_RESPONSE_TIMEOUT};
pub use server::ApiServer;
pub use socket::{keep_fd_across_exec, ApiServerError, ApiSocket, MAX_SOCKET_PATH_BYTES};

/// Largest request line plus header block the server accepts.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Largest request body (by `Content-Length`) the server accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Connections open at once; one more gets a 503 and is closed.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a connection has to send a whole request (or to read a response) before the
/// server closes it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A request the VMM is asked to carry out, decoded and validated from HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /vm`: describe the VM.
    Info,
    /// `PUT /vm/pause`: stop the vCPUs.
    Pause,
    /// `PUT /vm/resume`: let the vCPUs run again.
    Resume,
    /// `PUT /vm/snapshot`: save the VM into `dir` (absolute) and resume it unless
    /// `keep_paused`.
    Snapshot { dir: PathBuf, keep_paused: bool },
    /// `PUT /vm/update`: re-execute the VMM, as `binary` (absolute) if given, keeping the
    /// guest.
    Update { binary: Option<PathBuf> },
    /// `PUT /vm/shutdown`: stop the VM and the VMM.
    Shutdown,
}

/// What the handler answers: an HTTP status and a JSON body. Errors should use
/// [`ApiResponse::error`], so that every error body is `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: serde_json::Value,
}

impl ApiResponse {
    /// A 200 with `body`.
    pub fn ok(body: serde_json::Value) -> Self {
        ApiResponse { status: 200, body }
    }

    /// An error `status` with the body `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        ApiResponse {
            status,
            body: serde_json::json!({ "error": message.into() }),
        }
    }
}

/// Carries out API requests; supplied by the VMM and called on the event loop thread.
pub trait ApiHandler: Send {
    fn handle(&mut self, req: ApiRequest) -> ApiResponse;
}
