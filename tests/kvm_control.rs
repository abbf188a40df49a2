//! KVM tests of the control API and of pause/resume on a real VM with the built-in
//! guest: malformed requests leave the VM running, a paused VM does not tick.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::{ctl_ok, last_tick, read_console, shm_tempdir, start_builtin_vm, text};

const BOOT: Duration = Duration::from_secs(30);
const TICKS: Duration = Duration::from_secs(20);

/// Sends `bytes` on a new connection and returns the status of the response (and its
/// text), or None if the server closed without answering.
fn raw_request(api: &Path, bytes: &[u8]) -> Option<(u16, String)> {
    let mut s = UnixStream::connect(api).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // The server may answer and close before reading all of an oversized request.
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("reading the response failed: {e}"),
        }
        if let Some(end) = find_response_end(&buf) {
            buf.truncate(end);
            break;
        }
    }
    let response = text(&buf);
    let status = response.get(9..12)?.parse().ok()?;
    Some((status, response))
}

/// Where a complete response with a Content-Length ends in `buf`.
fn find_response_end(buf: &[u8]) -> Option<usize> {
    let t = String::from_utf8_lossy(buf);
    let head_end = t.find("\r\n\r\n")? + 4;
    let len: usize = t[..head_end].lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })?;
    (buf.len() >= head_end + len).then_some(head_end + len)
}

#[test]
fn malformed_requests_on_a_real_vms_api_socket_get_4xx_and_the_vm_keeps_running() {
    require_kvm!();
    let dir = shm_tempdir();
    let d = dir.path();
    let console = d.join("console");
    let mut vm = start_builtin_vm(d, &[], &[]);
    let info = vm.wait_api(BOOT);
    vm.wait_tick(2, TICKS);

    let oversized_body = {
        let mut r =
            b"PUT /vm/snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n".to_vec();
        r.extend(std::iter::repeat_n(b'{', 70000));
        r
    };
    let oversized_head = {
        let mut r = b"GET /vm HTTP/1.1\r\nX-Filler: ".to_vec();
        r.extend(std::iter::repeat_n(b'a', 10_000));
        r.extend_from_slice(b"\r\n\r\n");
        r
    };
    let cases: Vec<(&str, Vec<u8>, u16)> =
        vec![
        ("garbage bytes", b"\x00\xff\xfe\x01 garbage\r\n\r\n".to_vec(), 400),
        (
            "a declared body over the limit",
            b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n".to_vec(),
            413,
        ),
        ("an oversized body", oversized_body, 413),
        ("oversized headers", oversized_head, 413),
        (
            "a body that is not JSON",
            b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{not json"
                .to_vec(),
            400,
        ),
        (
            "a negative Content-Length",
            b"PUT /vm/pause HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
            400,
        ),
    ];
    for (what, bytes, want) in cases {
        let before = last_tick(&read_console(&console));
        let got = raw_request(&vm.api, &bytes);
        let (status, response) =
            got.unwrap_or_else(|| panic!("{what}: the server closed without a response"));
        assert_eq!(status, want, "{what}: {response}");
        assert!(
            response.contains("\"error\""),
            "{what}: no JSON error: {response}"
        );
        let now = ctl_ok(&vm.api, &["info"]);
        assert_eq!(now["state"], "running", "{what}: {now}");
        assert_eq!(now["pid"], info["pid"], "{what}: {now}");
        vm.wait_tick(before + 1, TICKS);
    }
    vm.shutdown();
    common::assert_one_boot_with_ok_ticks(&console, "the guest booted again");
}

#[test]
fn a_paused_vm_does_not_tick_and_ticks_again_after_resume() {
    require_kvm!();
    let dir = shm_tempdir();
    let d = dir.path();
    let console = d.join("console");
    let mut vm = start_builtin_vm(d, &[], &[]);
    vm.wait_api(BOOT);
    vm.wait_tick(3, TICKS);

    let paused = ctl_ok(&vm.api, &["pause"]);
    assert_eq!(paused["state"], "paused", "{paused}");
    assert_eq!(ctl_ok(&vm.api, &["info"])["state"], "paused");
    // A tick line being written when the pause landed may still reach the file.
    let at_pause = last_tick(&read_console(&console));
    std::thread::sleep(Duration::from_millis(1200));
    let after_wait = last_tick(&read_console(&console));
    assert!(
        after_wait <= at_pause + 1,
        "the guest ticked while paused: tick {at_pause} at the pause, {after_wait} 1.2 s later"
    );

    let resumed = ctl_ok(&vm.api, &["resume"]);
    assert_eq!(resumed["state"], "running", "{resumed}");
    vm.wait_tick(after_wait + 5, TICKS);
    vm.shutdown();
    common::assert_one_boot_with_ok_ticks(&console, "the guest booted again");
}
