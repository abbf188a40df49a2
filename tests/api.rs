//! The control API on a real Unix socket: a server in a thread with a fake VM behind it,
//! driven by the client, by raw and malformed bytes, by misbehaving connections, and by
//! curl when it is installed. Needs neither `/dev/kvm` nor root.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use serde_json::{json, Value};
use waterbear::api::{
    ApiClient, ApiClientError, ApiHandler, ApiRequest, ApiResponse, ApiServer, ApiServerError,
    MAX_BODY_BYTES, MAX_CONNECTIONS, MAX_HEADER_BYTES,
};

/// A VM that only remembers what it was asked.
struct FakeVm {
    paused: bool,
    seen: Arc<Mutex<Vec<ApiRequest>>>,
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
struct TestServer {
    _dir: tempfile::TempDir,
    path: PathBuf,
    server: Arc<Mutex<ApiServer>>,
    seen: Arc<Mutex<Vec<ApiRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start() -> Self {
        Self::start_with_idle_timeout(None)
    }

    fn start_with_idle_timeout(idle: Option<Duration>) -> Self {
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

    fn run(&mut self) {
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

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(&self.path).with_timeouts(Duration::from_secs(2), Duration::from_secs(5))
    }

    fn open_connections(&self) -> usize {
        self.server.lock().unwrap().open_connections()
    }

    fn assert_still_serving(&self) {
        let info = self
            .client()
            .info()
            .expect("the server should still answer GET /vm");
        assert!(info.get("state").is_some(), "{info}");
    }

    /// Waits up to 10 s for `cond`.
    fn wait_for(&self, what: &str, cond: impl Fn(&Self) -> bool) {
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
struct RawResponse {
    status: u16,
    head: String,
    body: Value,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn error(&self) -> &str {
        self.body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message in {}", self.body))
    }
}

fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads one response; `None` if the server closed without sending one.
fn read_response(s: &mut UnixStream) -> Option<RawResponse> {
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
fn raw(path: &Path, bytes: &[u8]) -> RawResponse {
    let mut s = connect(path);
    s.write_all(bytes).unwrap();
    read_response(&mut s).expect("a response")
}

fn assert_closed(s: &mut UnixStream) {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
}

#[test]
fn client_drives_every_endpoint_in_order() {
    let server = TestServer::start();
    let c = server.client();

    assert_eq!(c.info().unwrap(), json!({ "state": "running" }));
    assert_eq!(c.pause().unwrap(), json!({ "state": "paused" }));
    assert_eq!(c.resume().unwrap(), json!({ "state": "running" }));
    let snap = c.snapshot(Path::new("/srv/snap"), true).unwrap();
    assert_eq!(snap["dir"], "/srv/snap");
    c.update(None).unwrap();
    assert_eq!(
        c.update(Some(Path::new("/usr/bin/wb"))).unwrap(),
        json!({ "binary": "/usr/bin/wb" })
    );
    c.shutdown().unwrap();

    assert_eq!(
        *server.seen.lock().unwrap(),
        vec![
            ApiRequest::Info,
            ApiRequest::Pause,
            ApiRequest::Resume,
            ApiRequest::Snapshot {
                dir: "/srv/snap".into(),
                keep_paused: true
            },
            ApiRequest::Update { binary: None },
            ApiRequest::Update {
                binary: Some("/usr/bin/wb".into())
            },
            ApiRequest::Shutdown,
        ]
    );
}

#[test]
fn handler_error_reaches_the_client_with_its_status_and_message() {
    let server = TestServer::start();
    let c = server.client();
    c.pause().unwrap();

    let err = c.pause().unwrap_err();

    match &err {
        ApiClientError::Refused {
            status, message, ..
        } => assert_eq!(
            (*status, message.as_str()),
            (409, "the VM is already paused")
        ),
        other => panic!("expected Refused, got {other}"),
    }
    assert!(err.to_string().contains(server.path.to_str().unwrap()));
}

#[test]
fn responses_carry_json_content_type_and_length() {
    let server = TestServer::start();
    let resp = raw(&server.path, b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("Content-Type"), Some("application/json"));
    assert!(resp.header("Content-Length").is_some());
}

#[test]
fn unknown_path_gets_404_naming_it() {
    let server = TestServer::start();
    let resp = raw(&server.path, b"GET /vm/nothing HTTP/1.1\r\n\r\n");
    assert_eq!(resp.status, 404);
    assert!(resp.error().contains("/vm/nothing"), "{}", resp.error());
    server.assert_still_serving();
}

#[test]
fn wrong_method_gets_405_with_an_allow_header() {
    let server = TestServer::start();
    let resp = raw(&server.path, b"DELETE /vm/pause HTTP/1.1\r\n\r\n");
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("Allow"), Some("PUT"));
    assert!(resp.error().contains("DELETE"), "{}", resp.error());

    let (status, _) = server.client().send("PUT", "/vm", None).unwrap();
    assert_eq!(status, 405);
    assert!(server.seen.lock().unwrap().is_empty());
}

#[test]
fn bad_json_gets_400_and_the_connection_stays_usable() {
    let server = TestServer::start();
    let mut s = connect(&server.path);
    let bad = b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 9\r\n\r\n{\"dir\": /";
    s.write_all(bad).unwrap();
    let resp = read_response(&mut s).unwrap();
    assert_eq!(resp.status, 400);
    assert!(resp
        .error()
        .contains("invalid JSON body for PUT /vm/snapshot"));

    s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
}

#[test]
fn unknown_or_missing_fields_get_400_naming_the_field() {
    let server = TestServer::start();
    let c = server.client();
    let cases = [
        (
            "/vm/snapshot",
            json!({ "dir": "/s", "keep": true }),
            "unknown field `keep`",
        ),
        (
            "/vm/snapshot",
            json!({ "keep_paused": true }),
            "missing field `dir`",
        ),
        (
            "/vm/snapshot",
            json!({ "dir": "relative" }),
            "absolute path",
        ),
        ("/vm/update", json!({ "binary": 7 }), "invalid type"),
        (
            "/vm/pause",
            json!({ "force": true }),
            "unknown field `force`",
        ),
    ];
    for (uri, body, needle) in cases {
        let (status, reply) = c.send("PUT", uri, Some(&body)).unwrap();
        assert_eq!(status, 400, "{uri} {body}");
        let message = reply["error"].as_str().unwrap();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
    assert!(server.seen.lock().unwrap().is_empty());
}

#[test]
fn oversized_body_gets_413_and_server_keeps_serving() {
    let server = TestServer::start();

    let head = format!(
        "PUT /vm/update HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        MAX_BODY_BYTES + 1
    );
    let mut s = connect(&server.path);
    s.write_all(head.as_bytes()).unwrap();
    let resp = read_response(&mut s).unwrap();
    assert_eq!(resp.status, 413);
    assert!(resp.error().contains(&(MAX_BODY_BYTES + 1).to_string()));
    assert_eq!(resp.header("Connection"), Some("close"));
    assert_closed(&mut s);

    // The whole oversized body sent at once: the server must not wait to read it all.
    let mut request = head.into_bytes();
    request.resize(request.len() + MAX_BODY_BYTES + 1, b' ');
    let mut s = connect(&server.path);
    let _ = s.write_all(&request);
    assert_eq!(read_response(&mut s).unwrap().status, 413);

    server.assert_still_serving();
}

#[test]
fn body_at_the_limit_is_accepted() {
    let server = TestServer::start();
    let mut body = br#"{"dir": "/s"}"#.to_vec();
    body.resize(MAX_BODY_BYTES, b' ');
    let mut request = format!(
        "PUT /vm/snapshot HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    assert_eq!(raw(&server.path, &request).status, 200);
}

#[test]
fn oversized_header_block_gets_413_and_server_keeps_serving() {
    let server = TestServer::start();
    let mut request = b"GET /vm HTTP/1.1\r\nX-Fill: ".to_vec();
    request.resize(MAX_HEADER_BYTES + 100, b'a');
    request.extend_from_slice(b"\r\n\r\n");
    let resp = raw(&server.path, &request);
    assert_eq!(resp.status, 413);
    assert!(resp.error().contains("headers"), "{}", resp.error());
    server.assert_still_serving();
}

#[test]
fn truncated_request_gets_400_when_the_client_stops_sending() {
    let server = TestServer::start();
    let mut s = connect(&server.path);
    s.write_all(b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"dir\":")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();

    let resp = read_response(&mut s).unwrap();

    assert_eq!(resp.status, 400);
    assert!(
        resp.error().contains("closed in the middle"),
        "{}",
        resp.error()
    );
    assert_closed(&mut s);
    assert!(server.seen.lock().unwrap().is_empty());
    server.assert_still_serving();
}

#[test]
fn garbage_gets_400_and_the_connection_is_closed() {
    let server = TestServer::start();
    let mut s = connect(&server.path);
    s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut s).unwrap();
    assert_eq!(resp.status, 400);
    assert!(resp.error().starts_with("malformed HTTP request"));
    assert_closed(&mut s);
    server.assert_still_serving();
}

#[test]
fn random_bytes_never_stop_the_server() {
    let server = TestServer::start();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let prefixes: [&[u8]; 4] = [b"", b"GET /vm HTTP/1.1\r\n", b"PUT /vm/snapshot ", b"GET "];
    for _ in 0..100 {
        let mut bytes = prefixes[(next() % 4) as usize].to_vec();
        let len = (next() % 300) as usize;
        bytes.extend((0..len).map(|_| next() as u8));
        let mut s = connect(&server.path);
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        if let Some(resp) = read_response(&mut s) {
            assert!((400..500).contains(&resp.status), "{bytes:?} got {resp:?}");
            resp.error();
        }
    }
    server.assert_still_serving();
    server.wait_for("every connection to close", |s| s.open_connections() == 0);
}

#[test]
fn silent_client_does_not_delay_another() {
    let server = TestServer::start();
    let _silent = connect(&server.path);
    server.wait_for("the silent connection", |s| s.open_connections() == 1);

    let start = Instant::now();
    server.assert_still_serving();
    // Blocked behind the silent client, the answer would take the 10 s idle timeout.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn silent_client_gets_408_after_the_idle_timeout() {
    let server = TestServer::start_with_idle_timeout(Some(Duration::from_millis(300)));
    let start = Instant::now();
    let mut s = connect(&server.path);

    let resp = read_response(&mut s).unwrap();

    assert_eq!(resp.status, 408);
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_closed(&mut s);
    server.assert_still_serving();
}

#[test]
fn slow_client_dripping_bytes_is_cut_off_at_the_deadline() {
    let server = TestServer::start_with_idle_timeout(Some(Duration::from_millis(300)));
    let mut s = connect(&server.path);
    let start = Instant::now();
    for b in b"GET /vm HTTP/1.1\r\nX-Slow: 1234567890" {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    let resp = read_response(&mut s).unwrap();
    assert_eq!(resp.status, 408);
    // Dripping a byte every 30 ms takes over a second to finish the headers; the
    // deadline does not move with each byte.
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn client_that_never_reads_responses_does_not_block_others() {
    let server = TestServer::start_with_idle_timeout(Some(Duration::from_secs(3)));
    let hog = connect(&server.path);
    hog.set_nonblocking(true).unwrap();
    // Pipelined requests whose responses it never reads: far more than its socket
    // buffer holds, so that the server's writes to it block.
    let batch = b"GET /vm HTTP/1.1\r\n\r\n".repeat(1000);
    let mut sent = 0;
    for _ in 0..100 {
        match (&hog).write(&batch) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(sent > 100_000, "only {sent} bytes of requests fit");

    let start = Instant::now();
    server.assert_still_serving();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(server.open_connections(), 1, "the hog is still connected");
    server.wait_for("the hog to be closed", |s| s.open_connections() == 0);
}

#[test]
fn seventeenth_connection_gets_503_and_a_freed_slot_is_reused() {
    let server = TestServer::start();
    let mut held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let mut s = connect(&server.path);
            s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
            assert_eq!(read_response(&mut s).unwrap().status, 200);
            s
        })
        .collect();

    let mut extra = connect(&server.path);
    let resp = read_response(&mut extra).unwrap();
    assert_eq!(resp.status, 503);
    assert!(resp.error().contains("too many"), "{}", resp.error());
    match server.client().info().unwrap_err() {
        ApiClientError::Refused { status: 503, .. } => {}
        other => panic!("expected a 503, got {other}"),
    }

    held.pop();
    server.wait_for("a free slot", |s| s.open_connections() < MAX_CONNECTIONS);
    server.assert_still_serving();
    let s = &mut held[0];
    s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(s).unwrap().status, 200);
}

#[test]
fn keep_alive_serves_several_requests_and_connection_close_ends_it() {
    let server = TestServer::start();
    let mut s = connect(&server.path);
    for _ in 0..3 {
        s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
        let resp = read_response(&mut s).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("Connection"), None);
    }
    s.write_all(b"GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut s).unwrap();
    assert_eq!(resp.header("Connection"), Some("close"));
    assert_closed(&mut s);
}

#[test]
fn http10_request_is_answered_and_closed() {
    let server = TestServer::start();
    let mut s = connect(&server.path);
    s.write_all(b"GET /vm HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    assert_closed(&mut s);
}

#[test]
fn second_server_on_a_live_socket_is_refused() {
    let server = TestServer::start();
    let vm = FakeVm {
        paused: false,
        seen: Default::default(),
    };
    let err = ApiServer::bind(&server.path, Box::new(vm)).err().unwrap();
    assert!(matches!(err, ApiServerError::InUse { .. }), "{err}");
    server.assert_still_serving();
}

#[test]
fn restarted_server_replaces_its_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let fake = || {
        Box::new(FakeVm {
            paused: false,
            seen: Default::default(),
        })
    };
    drop(ApiServer::bind(&path, fake()).unwrap());
    assert!(
        path.exists(),
        "the socket file outlives its server until removed"
    );
    assert!(matches!(
        ApiClient::new(&path).info(),
        Err(ApiClientError::NotListening { .. })
    ));

    let second = ApiServer::bind(&path, fake()).unwrap();

    assert!(second.remove_socket_file().unwrap());
    assert!(!path.exists());
}

#[test]
fn adopted_listener_serves_clients_that_connected_during_the_hand_over() {
    let mut old = TestServer::start();
    old.assert_still_serving();
    let fd: OwnedFd = old
        .server
        .lock()
        .unwrap()
        .socket()
        .listener()
        .try_clone()
        .unwrap()
        .into();
    old.halt();

    // Connected while no process serves: waits in the listen backlog.
    let mut waiting = connect(&old.path);
    waiting.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let vm = FakeVm {
        paused: true,
        seen: seen.clone(),
    };
    let new = ApiServer::from_listener_fd(fd, &old.path, Box::new(vm)).unwrap();
    old.server = Arc::new(Mutex::new(new));
    old.stop.store(false, Ordering::Relaxed);
    old.run();

    let resp = read_response(&mut waiting).unwrap();
    assert_eq!(resp.body, json!({ "state": "paused" }));
    assert_eq!(old.client().info().unwrap(), json!({ "state": "paused" }));
}

#[test]
fn curl_talks_to_the_server() {
    let version = std::process::Command::new("curl").arg("--version").output();
    if !matches!(&version, Ok(o) if o.status.success()) {
        eprintln!("SKIPPED curl_talks_to_the_server: curl is not installed or does not run");
        return;
    }
    let server = TestServer::start();
    let curl = |args: &[&str]| -> (u16, Value) {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "5", "--unix-socket"])
            .arg(&server.path)
            .args(["-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "curl {args:?}: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.trim_end().rsplit_once('\n').unwrap();
        (code.parse().unwrap(), serde_json::from_str(body).unwrap())
    };

    assert_eq!(
        curl(&["http://localhost/vm"]),
        (200, json!({ "state": "running" }))
    );
    assert_eq!(curl(&["-X", "PUT", "http://localhost/vm/pause"]).0, 200);
    let (status, body) = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"dir": "/srv/snap", "keep_paused": true}"#,
        "http://localhost/vm/snapshot",
    ]);
    assert_eq!((status, &body["dir"]), (200, &json!("/srv/snap")));
    let (status, body) = curl(&["-X", "POST", "http://localhost/vm/resume"]);
    assert_eq!(status, 405);
    assert!(body["error"].as_str().unwrap().contains("POST"));
    assert_eq!(curl(&["http://localhost/nope"]).0, 404);
}
