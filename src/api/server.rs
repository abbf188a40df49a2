//! The API server: an event-manager subscriber that owns the listening socket and its
//! connections, all non-blocking, so that no client can stall the event loop thread.
//! It reads each connection's bytes as they come, frames requests (`http`), routes them
//! (`routes`) and passes each to the VMM's [`ApiHandler`]; the handler's work is the
//! only thing that runs long on this thread.
//!
//! Limits: see the constants in the parent module. A connection must deliver a whole
//! request, and read its response, within the idle timeout; one that does not is sent a
//! 408 (when it had started or never sent a request) and closed. One connection over the
//! limit is sent a 503 and closed at once.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::timerfd::TimerFd;

use super::http::{self, HttpError, Parsed, Response, MAX_REQUEST_BYTES};
use super::socket::{send_nosignal, ApiServerError, ApiSocket};
use super::{routes, ApiHandler, IDLE_TIMEOUT, MAX_CONNECTIONS};

/// Connections taken per wake-up, so that a flood of connects cannot starve the loop.
const ACCEPTS_PER_WAKEUP: usize = 32;
/// Pause before accepting again after `accept` failed (out of descriptors, say).
const ACCEPT_RETRY: Duration = Duration::from_secs(1);
const READ_CHUNK: usize = 16 * 1024;

struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// When the current request must have arrived and its response been read.
    deadline: Instant,
    served: u64,
    continue_sent: bool,
    close_after_write: bool,
    peer_closed: bool,
    interest: EventSet,
}

impl Connection {
    /// Waiting for request bytes, as opposed to writing a response out.
    fn reading(&self) -> bool {
        self.output.is_empty() && !self.close_after_write
    }

    /// Reads what has arrived, up to one maximal request.
    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; READ_CHUNK];
        while self.input.len() < MAX_REQUEST_BYTES {
            let want = READ_CHUNK.min(MAX_REQUEST_BYTES - self.input.len());
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => {
                    self.peer_closed = true;
                    break;
                }
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes as much pending output as the socket takes.
    fn flush(&mut self) -> io::Result<()> {
        while !self.output.is_empty() {
            match send_nosignal(self.stream.as_raw_fd(), &self.output) {
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn queue(&mut self, response: &Response) {
        self.output.extend_from_slice(&response.encode());
        self.close_after_write |= response.close;
    }

    /// Answers a framing error and gives up on the connection's byte stream.
    fn reject(&mut self, error: &HttpError) {
        log::debug!("API: rejecting a request: {error}");
        let mut response = Response::error(error.status(), error.to_string());
        response.close = true;
        self.queue(&response);
        self.input.clear();
    }
}

/// Serves the API on one socket; add it to the VMM's `EventManager`.
pub struct ApiServer {
    socket: ApiSocket,
    handler: Box<dyn ApiHandler>,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    conns: HashMap<RawFd, Connection>,
    idle_timeout: Duration,
    accept_paused_until: Option<Instant>,
}

impl ApiServer {
    pub fn new(socket: ApiSocket, handler: Box<dyn ApiHandler>) -> Result<Self, ApiServerError> {
        let timer = TimerFd::new().map_err(|e| ApiServerError::Timer(e.into()))?;
        // SAFETY: F_GETFL/F_SETFL only change the status flags of a timerfd we own. It
        // must not block: re-arming it discards an expiry epoll may already have seen.
        let ret = unsafe {
            let flags = libc::fcntl(timer.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
        };
        if ret < 0 {
            return Err(ApiServerError::Timer(io::Error::last_os_error()));
        }
        Ok(ApiServer {
            socket,
            handler,
            timer,
            timer_deadline: None,
            conns: HashMap::new(),
            idle_timeout: IDLE_TIMEOUT,
            accept_paused_until: None,
        })
    }

    /// Creates the socket at `path` (see [`ApiSocket::bind`]) and a server on it.
    pub fn bind(path: &Path, handler: Box<dyn ApiHandler>) -> Result<Self, ApiServerError> {
        Self::new(ApiSocket::bind(path)?, handler)
    }

    /// Serves on a listening socket inherited across `execve` (see
    /// [`ApiSocket::from_listener_fd`]).
    pub fn from_listener_fd(
        fd: OwnedFd,
        path: &Path,
        handler: Box<dyn ApiHandler>,
    ) -> Result<Self, ApiServerError> {
        Self::new(ApiSocket::from_listener_fd(fd, path)?, handler)
    }

    pub fn socket(&self) -> &ApiSocket {
        &self.socket
    }

    pub fn socket_path(&self) -> &Path {
        self.socket.path()
    }

    pub fn listener_fd(&self) -> RawFd {
        self.socket.listener_fd()
    }

    /// See [`ApiSocket::keep_across_exec`].
    pub fn keep_listener_across_exec(&self) -> Result<RawFd, ApiServerError> {
        self.socket.keep_across_exec()
    }

    /// See [`ApiSocket::remove_file`]; the VMM calls it when it exits for good.
    pub fn remove_socket_file(&self) -> Result<bool, ApiServerError> {
        self.socket.remove_file()
    }

    /// Changes the time a connection has for each request (default [`IDLE_TIMEOUT`]).
    pub fn set_idle_timeout(&mut self, timeout: Duration) {
        self.idle_timeout = timeout;
    }

    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    fn accept(&mut self, ops: &mut EventOps) {
        for _ in 0..ACCEPTS_PER_WAKEUP {
            match self.socket.listener().accept() {
                Ok((stream, _)) => self.admit(stream, ops),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    log::warn!(
                        "API: cannot accept a connection on {}: {e}; retrying in {} s",
                        self.socket.path().display(),
                        ACCEPT_RETRY.as_secs()
                    );
                    let _ = ops.remove(Events::empty_raw(self.socket.listener_fd()));
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, stream: UnixStream, ops: &mut EventOps) {
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("API: cannot make a connection non-blocking: {e}");
            return;
        }
        let fd = stream.as_raw_fd();
        if self.conns.len() >= MAX_CONNECTIONS {
            log::debug!("API: refusing a connection over the limit of {MAX_CONNECTIONS}");
            let mut response = Response::error(
                503,
                format!(
                    "too many open API connections (at most {MAX_CONNECTIONS}); \
                     close one or try again later"
                ),
            );
            response.close = true;
            let _ = send_nosignal(fd, &response.encode());
            discard_unread(&stream);
            return;
        }
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            log::warn!("API: cannot watch a new connection: {e:?}");
            return;
        }
        self.conns.insert(
            fd,
            Connection {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                deadline: Instant::now() + self.idle_timeout,
                served: 0,
                continue_sent: false,
                close_after_write: false,
                peer_closed: false,
                interest: EventSet::IN,
            },
        );
    }

    /// Reads, answers and writes what a connection allows now; closes it when done.
    fn service(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        let open = (!conn.reading() || conn.fill().is_ok())
            && drive(conn, self.handler.as_mut(), self.idle_timeout);
        let want = if conn.output.is_empty() {
            EventSet::IN
        } else {
            EventSet::OUT
        };
        if open && want != conn.interest {
            if ops.modify(Events::new_raw(fd, want)).is_ok() {
                conn.interest = want;
            } else {
                self.close(fd, ops);
            }
        } else if !open {
            self.close(fd, ops);
        }
    }

    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(conn) = self.conns.remove(&fd) {
            // Out of epoll before the descriptor closes and its number can be reused.
            let _ = ops.remove(Events::empty_raw(fd));
            discard_unread(&conn.stream);
        }
    }

    fn on_timer(&mut self, ops: &mut EventOps) {
        let _ = self.timer.wait();
        self.timer_deadline = None;
        let now = Instant::now();

        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
            let listener = Events::new_raw(self.socket.listener_fd(), EventSet::IN);
            if let Err(e) = ops.add(listener) {
                log::error!("API: cannot watch the listening socket again: {e:?}");
            }
        }

        let expired: Vec<RawFd> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in expired {
            // A request may have arrived while the handler kept the loop busy.
            self.service(fd, ops);
            let Some(conn) = self.conns.get_mut(&fd) else {
                continue;
            };
            if conn.deadline > now {
                continue;
            }
            if conn.reading() && (!conn.input.is_empty() || conn.served == 0) {
                conn.reject(&HttpError::Timeout);
                let _ = conn.flush();
            }
            self.close(fd, ops);
        }
    }

    /// Arms the timer for the earliest deadline, or disarms it.
    fn rearm_timer(&mut self) {
        let next = self
            .conns
            .values()
            .map(|c| c.deadline)
            .chain(self.accept_paused_until)
            .min();
        if next == self.timer_deadline {
            return;
        }
        self.timer_deadline = next;
        let result = match next {
            None => self.timer.clear(),
            Some(t) => {
                // A zero duration would disarm the timer.
                let after = t.saturating_duration_since(Instant::now());
                self.timer.reset(after.max(Duration::from_millis(1)), None)
            }
        };
        if let Err(e) = result {
            log::warn!("API: cannot arm the idle timer: {e}; idle connections stay open");
        }
    }
}

/// Reads and drops what the peer sent and nobody will read: closing a Unix socket with
/// unread input makes the peer's next read fail with ECONNRESET instead of seeing the
/// end of the response stream.
fn discard_unread(mut stream: &UnixStream) {
    let mut sink = [0u8; READ_CHUNK];
    for _ in 0..MAX_REQUEST_BYTES / READ_CHUNK + 1 {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// Answers every complete request in the connection's input, in order, one response at a
/// time. Returns false when the connection is finished.
fn drive(conn: &mut Connection, handler: &mut dyn ApiHandler, idle: Duration) -> bool {
    loop {
        if conn.flush().is_err() {
            return false;
        }
        if !conn.output.is_empty() {
            return true;
        }
        if conn.close_after_write {
            return false;
        }
        match http::parse_request(&conn.input) {
            Ok(Parsed::Complete { request, consumed }) => {
                conn.input.drain(..consumed);
                conn.continue_sent = false;
                let response = respond(handler, request);
                conn.queue(&response);
                conn.served += 1;
                conn.deadline = Instant::now() + idle;
            }
            Ok(Parsed::Partial { .. }) if conn.peer_closed => {
                if conn.input.is_empty() {
                    return false;
                }
                conn.reject(&HttpError::Truncated(conn.input.len()));
            }
            Ok(Parsed::Partial { expect_continue }) => {
                if !expect_continue || conn.continue_sent {
                    return true;
                }
                conn.continue_sent = true;
                conn.output.extend_from_slice(http::CONTINUE);
            }
            Err(e) => conn.reject(&e),
        }
    }
}

fn respond(handler: &mut dyn ApiHandler, request: http::Request) -> Response {
    let mut response = match routes::route(&request.method, &request.path, &request.body) {
        Ok(api_request) => {
            let answer = handler.handle(api_request);
            if (200..=599).contains(&answer.status) {
                Response {
                    status: answer.status,
                    body: answer.body,
                    allow: None,
                    close: false,
                    keep_alive_header: false,
                }
            } else {
                log::error!("API: the handler answered with status {}", answer.status);
                Response::error(
                    500,
                    format!(
                        "the VMM answered with invalid HTTP status {}",
                        answer.status
                    ),
                )
            }
        }
        Err(e) => {
            let mut response = Response::error(e.status(), e.to_string());
            response.allow = e.allow();
            response
        }
    };
    log::debug!(
        "API: {} {} -> {}",
        request.method,
        request.path,
        response.status
    );
    response.close = !request.keep_alive;
    response.keep_alive_header = request.http10 && request.keep_alive;
    response
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        let listener = Events::new_raw(self.socket.listener_fd(), EventSet::IN);
        if let Err(e) = ops.add(listener) {
            log::error!(
                "API: cannot watch {}: {e:?}; the API is unreachable",
                self.socket.path().display()
            );
        }
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::warn!("API: cannot watch the idle timer: {e:?}; idle connections stay open");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.socket.listener_fd() {
            self.accept(ops);
        } else if fd == self.timer.as_raw_fd() {
            self.on_timer(ops);
        } else {
            self.service(fd, ops);
        }
        self.rearm_timer();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};

    use super::*;
    use crate::api::{ApiRequest, ApiResponse};

    struct Recorder(Arc<Mutex<Vec<ApiRequest>>>);

    impl ApiHandler for Recorder {
        fn handle(&mut self, req: ApiRequest) -> ApiResponse {
            self.0.lock().unwrap().push(req);
            ApiResponse::ok(serde_json::json!({ "state": "running" }))
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        manager: EventManager<Arc<Mutex<ApiServer>>>,
        server: Arc<Mutex<ApiServer>>,
        seen: Arc<Mutex<Vec<ApiRequest>>>,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("api.sock");
            let seen = Arc::new(Mutex::new(Vec::new()));
            let server = ApiServer::bind(&path, Box::new(Recorder(seen.clone()))).unwrap();
            let server = Arc::new(Mutex::new(server));
            let mut manager = EventManager::new().unwrap();
            manager.add_subscriber(server.clone());
            Fixture {
                _dir: dir,
                path,
                manager,
                server,
                seen,
            }
        }

        fn connect(&mut self) -> UnixStream {
            let stream = UnixStream::connect(&self.path).unwrap();
            stream.set_nonblocking(true).unwrap();
            self.spin();
            stream
        }

        /// Runs the loop until it has nothing more to do right now.
        fn spin(&mut self) {
            while self.manager.run_with_timeout(20).unwrap() > 0 {}
        }

        /// Runs the loop until `stream` has a whole response (or is closed).
        fn exchange(&mut self, stream: &mut UnixStream, bytes: &[u8]) -> String {
            stream.write_all(bytes).unwrap();
            let mut out = Vec::new();
            for _ in 0..200 {
                self.spin();
                let mut buf = [0u8; 4096];
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("read failed: {e}"),
                }
                if complete_response(&out) {
                    break;
                }
            }
            String::from_utf8(out).unwrap()
        }
    }

    fn complete_response(out: &[u8]) -> bool {
        let text = String::from_utf8_lossy(out);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |v| v.parse::<usize>().unwrap());
        body.len() >= len
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let mut fx = Fixture::new();
        let mut s = fx.connect();
        s.write_all(b"PUT /vm/pause HTTP/1.1\r\n\r\nPUT /vm/resume HTTP/1.1\r\n\r\n")
            .unwrap();
        let first = fx.exchange(&mut s, b"GET /vm HTTP/1.1\r\n\r\n");
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
        for _ in 0..10 {
            fx.spin();
        }
        assert_eq!(
            *fx.seen.lock().unwrap(),
            vec![ApiRequest::Pause, ApiRequest::Resume, ApiRequest::Info]
        );
        assert_eq!(fx.server.lock().unwrap().open_connections(), 1);
    }

    #[test]
    fn request_split_into_single_bytes_is_assembled() {
        let mut fx = Fixture::new();
        let mut s = fx.connect();
        let req = b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 13\r\n\r\n{\"dir\": \"/s\"}";
        for b in &req[..req.len() - 1] {
            s.write_all(&[*b]).unwrap();
            fx.spin();
        }
        let resp = fx.exchange(&mut s, &req[req.len() - 1..]);
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert_eq!(
            fx.seen.lock().unwrap()[0],
            ApiRequest::Snapshot {
                dir: "/s".into(),
                keep_paused: false
            }
        );
    }

    #[test]
    fn expect_continue_gets_100_before_the_body() {
        let mut fx = Fixture::new();
        let mut s = fx.connect();
        let head = b"PUT /vm/update HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n";
        let interim = fx.exchange(&mut s, head);
        assert!(
            interim.starts_with("HTTP/1.1 100 Continue\r\n\r\n"),
            "{interim}"
        );
        let resp = fx.exchange(&mut s, b"{}");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }

    #[test]
    fn half_closed_truncated_request_gets_400_and_the_connection_closes() {
        let mut fx = Fixture::new();
        let mut s = fx.connect();
        s.write_all(b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
            .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let resp = fx.exchange(&mut s, b"");
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        assert!(resp.contains("closed in the middle of a request"), "{resp}");
        fx.spin();
        assert_eq!(fx.server.lock().unwrap().open_connections(), 0);
        assert!(fx.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn silent_connection_gets_408_after_the_idle_timeout() {
        let mut fx = Fixture::new();
        fx.server
            .lock()
            .unwrap()
            .set_idle_timeout(Duration::from_millis(100));
        let mut s = fx.connect();
        std::thread::sleep(Duration::from_millis(150));
        let resp = fx.exchange(&mut s, b"");
        assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
        assert_eq!(fx.server.lock().unwrap().open_connections(), 0);
    }

    #[test]
    fn idle_keep_alive_connection_is_closed_without_a_response() {
        let mut fx = Fixture::new();
        fx.server
            .lock()
            .unwrap()
            .set_idle_timeout(Duration::from_millis(100));
        let mut s = fx.connect();
        let resp = fx.exchange(&mut s, b"GET /vm HTTP/1.1\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(fx.exchange(&mut s, b""), "");
        assert_eq!(fx.server.lock().unwrap().open_connections(), 0);
    }

    #[test]
    fn connection_over_the_limit_gets_503_and_the_others_stay() {
        let mut fx = Fixture::new();
        let _held: Vec<_> = (0..MAX_CONNECTIONS).map(|_| fx.connect()).collect();
        let mut extra = fx.connect();
        let resp = fx.exchange(&mut extra, b"");
        assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
        assert_eq!(
            fx.server.lock().unwrap().open_connections(),
            MAX_CONNECTIONS
        );
    }

    #[test]
    fn invalid_handler_status_becomes_500() {
        struct Bad;
        impl ApiHandler for Bad {
            fn handle(&mut self, _: ApiRequest) -> ApiResponse {
                ApiResponse::error(42, "odd")
            }
        }
        let resp = respond(
            &mut Bad,
            http::Request {
                method: "GET".into(),
                path: "/vm".into(),
                body: Vec::new(),
                keep_alive: true,
                http10: false,
            },
        );
        assert_eq!(resp.status, 500);
    }
}
