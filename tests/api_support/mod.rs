//! The harness shared by the API tests: a real server on a temporary Unix socket, run
//! by an event loop in a thread, with a fake VM behind it; raw connections and response
//! parsing for malformed-traffic tests.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use serde_json::{json, Value};
use waterbear::api::{ApiClient, ApiHandler, ApiRequest, ApiResponse, ApiServer};

/// A VM that only remembers what it was asked.
pub struct FakeVm {
    pub paused: bool,
    pub seen: Arc<Mutex<Vec<ApiRequest>>>,
}

impl ApiHandler for FakeVm {
    fn handle(&mut self, req: ApiRequest) -> ApiResponse {
        self.seen.lock().unwrap().push(req.clone());
        match req {
            ApiRequest::Info => ApiResponse::ok(json!({
                "state": if self.paused { "paused" } else { "running" }
            })),
            ApiRequest::Pause if self.paused => ApiResponse::error(409, "the VM is already paused"),
            ApiRequest::Pause => {
                self.paused = true;
                ApiResponse::ok(json!({ "state": "paused" }))
            }
            ApiRequest::Resume => {
                self.paused = false;
                ApiResponse::ok(json!({ "state": "running" }))
            }
            ApiRequest::Snapshot { dir, .. } => {
                ApiResponse::ok(json!({ "dir": dir, "blackout_us": 1234 }))
            }
            ApiRequest::Update { binary } => ApiResponse::ok(json!({ "binary": binary })),
            ApiRequest::Shutdown => ApiResponse::ok(json!({ "state": "stopping" })),
        }
    }
}

/// A server running its own event loop in a thread; stopped and joined on drop.
pub struct TestServer {
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub server: Arc<Mutex<ApiServer>>,
    pub seen: Arc<Mutex<Vec<ApiRequest>>>,
    pub stop: Arc<AtomicBool>,
    pub thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start() -> Self {
        Self::start_with_idle_timeout(None)
    }

    pub fn start_with_idle_timeout(idle: Option<Duration>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let vm = FakeVm {
            paused: false,
            seen: seen.clone(),
        };
        let mut server = ApiServer::bind(&path, Box::new(vm)).unwrap();
        if let Some(idle) = idle {
            server.set_idle_timeout(idle);
        }
        let mut test = TestServer {
            _dir: dir,
            path,
            server: Arc::new(Mutex::new(server)),
            seen,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        test.run();
        test
    }

    pub fn run(&mut self) {
        let server = self.server.clone();
        let stop = self.stop.clone();
        self.thread = Some(std::thread::spawn(move || {
            let mut manager = EventManager::<Arc<Mutex<ApiServer>>>::new().unwrap();
            manager.add_subscriber(server);
            while !stop.load(Ordering::Relaxed) {
                manager.run_with_timeout(20).unwrap();
            }
        }));
    }

    pub fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::new(&self.path).with_timeouts(Duration::from_secs(2), Duration::from_secs(5))
    }

    pub fn open_connections(&self) -> usize {
        self.server.lock().unwrap().open_connections()
    }

    pub fn assert_still_serving(&self) {
        let info = self
            .client()
            .info()
            .expect("the server should still answer GET /vm");
        assert!(info.get("state").is_some(), "{info}");
    }

    /// Waits up to 10 s for `cond`.
    pub fn wait_for(&self, what: &str, cond: impl Fn(&Self) -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond(self) {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.halt();
    }
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Value,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn error(&self) -> &str {
        self.body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message in {}", self.body))
    }
}

pub fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads one response; `None` if the server closed without sending one.
pub fn read_response(s: &mut UnixStream) -> Option<RawResponse> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .expect("every response has a Content-Length")
                .parse()
                .unwrap();
            if rest.len() >= len {
                let status = head[9..12].parse().unwrap();
                return Some(RawResponse {
                    status,
                    head: head.to_string(),
                    body: serde_json::from_str(&rest[..len]).expect("the body is JSON"),
                });
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                assert!(buf.is_empty(), "closed mid-response: {text:?}");
                return None;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset && buf.is_empty() => return None,
            Err(e) => panic!("reading the response failed: {e}"),
        }
    }
}

/// Sends `bytes` on a new connection and reads one response.
pub fn raw(path: &Path, bytes: &[u8]) -> RawResponse {
    let mut s = connect(path);
    s.write_all(bytes).unwrap();
    read_response(&mut s).expect("a response")
}

pub fn assert_closed(s: &mut UnixStream) {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
}
