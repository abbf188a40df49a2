//! The control API under abuse: oversized, truncated, garbage and random requests,
//! silent, slow and non-reading clients, too many connections. The server must answer
//! with a 4xx or close, and keep serving everyone else. Needs neither `/dev/kvm` nor
//! root.

mod api_support;

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use waterbear::api::{ApiClientError, MAX_BODY_BYTES, MAX_CONNECTIONS, MAX_HEADER_BYTES};

use api_support::*;

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
