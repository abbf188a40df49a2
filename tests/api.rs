//! The control API on a real Unix socket: a server in a thread with a fake VM behind it,
//! driven by the client, by raw and malformed bytes, by misbehaving connections, and by
//! curl when it is installed. Needs neither `/dev/kvm` nor root.

mod api_support;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use waterbear::api::{ApiClient, ApiClientError, ApiRequest, ApiServer, ApiServerError};

use api_support::*;

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
