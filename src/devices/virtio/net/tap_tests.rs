//! Tests against real tap interfaces. Each runs on a thread of its own that first moves
//! into a new, empty network namespace (`unshare(CLONE_NEWNET)` affects only the calling
//! thread), creates its taps there and sends traffic only there; the namespace and its
//! taps vanish when the thread's descriptors close. They need root and /dev/net/tun and
//! print `SKIPPED: <reason>` otherwise.

use std::ffi::CString;
use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, NetConfig, NetError, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN};
use crate::devices::virtio::testutil::{memory, start, DriverQueue, RecordingInterrupt};
use crate::devices::virtio::{Memory, VirtioDevice};

const TAP: &str = "wbtap0";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 7, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 7, 2);

/// Why the real-tap tests cannot run here, if they cannot.
fn skip_reason() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun does not exist");
    }
    None
}

/// Runs `f` on a new thread inside a new network namespace; `Err` says why there is none.
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare only takes flags; CLONE_NEWNET moves just this thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            return Err(format!("unshare(CLONE_NEWNET) failed: {e}"));
        }
        let ours = std::fs::read_link("/proc/thread-self/ns/net").map_err(|e| e.to_string())?;
        let host = std::fs::read_link("/proc/self/ns/net").map_err(|e| e.to_string())?;
        if ours == host {
            return Err("the thread is still in the process's network namespace".into());
        }
        Ok(f())
    });
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Runs `f` in a new network namespace, or says why it was skipped.
fn run_in_netns(f: impl FnOnce() + Send + 'static) {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    if let Err(reason) = in_new_netns(f) {
        eprintln!("SKIPPED: {reason}");
    }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeros is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr
}

/// Creates a persistent tun or tap interface `name` in the thread's namespace.
fn create_persistent(name: &str, kind: libc::c_int) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_flags = (kind | libc::IFF_NO_PI) as i16;
    // SAFETY: TUNSETIFF reads and writes `ifr`, alive for the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    assert_eq!(ret, 0, "TUNSETIFF {name}: {}", io::Error::last_os_error());
    // SAFETY: TUNSETPERSIST takes its argument by value.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    assert_eq!(
        ret,
        0,
        "TUNSETPERSIST {name}: {}",
        io::Error::last_os_error()
    );
}

fn exists(name: &str) -> bool {
    let c_name = CString::new(name).unwrap();
    // SAFETY: `c_name` is NUL-terminated and outlives the call.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) != 0 }
}

/// Gives `name` the address HOST_IP/24 and brings it up.
fn configure_host_side(name: &str) {
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    let fd = sock.as_raw_fd();
    let set = |request, ifr: &mut libc::ifreq, what: &str| {
        // SAFETY: these SIOC ioctls read and write one ifreq, alive for the call.
        let ret = unsafe { libc::ioctl(fd, request, ifr as *mut libc::ifreq) };
        assert_eq!(ret, 0, "{what} on {name}: {}", io::Error::last_os_error());
    };
    for (request, addr, what) in [
        (libc::SIOCSIFADDR, HOST_IP, "SIOCSIFADDR"),
        (
            libc::SIOCSIFNETMASK,
            Ipv4Addr::new(255, 255, 255, 0),
            "SIOCSIFNETMASK",
        ),
    ] {
        let mut ifr = ifreq(name);
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(addr).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in and sockaddr are both 16 bytes; the kernel reads it as the
        // address family says.
        ifr.ifr_ifru.ifru_addr =
            unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) };
        set(request, &mut ifr, what);
    }
    let mut ifr = ifreq(name);
    set(libc::SIOCGIFFLAGS, &mut ifr, "SIOCGIFFLAGS");
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as i16 };
    set(libc::SIOCSIFFLAGS, &mut ifr, "SIOCSIFFLAGS");
}

fn fd_flag(fd: &impl AsRawFd, cmd: libc::c_int) -> libc::c_int {
    // SAFETY: F_GETFL and F_GETFD only read the descriptor's flags.
    unsafe { libc::fcntl(fd.as_raw_fd(), cmd) }
}

#[test]
fn open_refuses_invalid_names_without_looking_them_up() {
    let long = "x".repeat(16);
    for name in [
        "",
        long.as_str(),
        "a/b",
        "tap 0",
        "tap\t0",
        "tap\u{0}0",
        "tap%d",
        "a:b",
        "..",
    ] {
        let e = Tap::open(name).unwrap_err();
        assert!(matches!(e, TapError::InvalidName { .. }), "{name:?}: {e}");
        assert!(e.to_string().contains(&format!("{name:?}")), "{e}");
    }
}

#[test]
fn open_attaches_to_an_existing_tap_and_explains_each_refusal() {
    run_in_netns(|| {
        create_persistent(TAP, libc::IFF_TAP);
        let tap = Tap::open(TAP).unwrap();
        assert_eq!(tap.name(), TAP);
        assert_ne!(fd_flag(&tap, libc::F_GETFL) & libc::O_NONBLOCK, 0);
        assert_ne!(fd_flag(&tap, libc::F_GETFD) & libc::FD_CLOEXEC, 0);
        let mut hdr_len: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int through the pointer.
        let ret = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut hdr_len) };
        assert_eq!((ret, hdr_len), (0, VNET_HDR_LEN as libc::c_int));

        let e = Tap::open(TAP).unwrap_err();
        assert!(matches!(e, TapError::Busy { .. }), "{e}");
        assert!(e.to_string().contains(TAP) && e.to_string().contains("another process"));

        let e = Tap::open("wbnope0").unwrap_err();
        assert!(matches!(e, TapError::NotFound { .. }), "{e}");
        assert!(
            e.to_string().contains("ip tuntap add dev wbnope0 mode tap"),
            "{e}"
        );
        assert!(!exists("wbnope0"), "opening a missing tap created it");

        create_persistent("wbtun0", libc::IFF_TUN);
        for name in ["lo", "wbtun0"] {
            let e = Tap::open(name).unwrap_err();
            assert!(matches!(e, TapError::NotATap { .. }), "{name}: {e}");
        }

        drop(tap);
        Tap::open(TAP).expect("the tap is free again once closed");
    });
}

/// A receive ring with `count` 2 KiB buffers posted.
fn post_rx(q: &mut DriverQueue, mem: &Memory, count: u64) {
    for i in 0..count {
        q.add_chain(mem, &[(0x8_0000 + i * 0x800, 0x800, true)]);
    }
}

/// Frames the guest has received since used entry `*seen`, without their headers.
fn new_frames(q: &DriverQueue, mem: &Memory, seen: &mut u16) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while *seen != q.used_idx(mem) {
        let (head, len) = q.used_elem(mem, *seen);
        let mut frame = vec![0; len as usize];
        let addr = 0x8_0000 + u64::from(head) * 0x800;
        mem.read_slice(&mut frame, GuestAddress(addr)).unwrap();
        assert_eq!(frame[..VNET_HDR_LEN], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        out.push(frame.split_off(VNET_HDR_LEN));
        *seen += 1;
    }
    out
}

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

/// An ARP reply from the guest (`mac`, GUEST_IP) to the host side (`host_mac`, HOST_IP).
fn arp_reply(mac: [u8; 6], host_mac: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(host_mac);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&GUEST_IP.octets());
    f.extend_from_slice(host_mac);
    f.extend_from_slice(&HOST_IP.octets());
    f.resize(60, 0);
    f
}

#[test]
fn frames_cross_a_real_tap_in_both_directions() {
    run_in_netns(|| {
        create_persistent(TAP, libc::IFF_TAP);
        let config = NetConfig {
            tap: TAP.to_string(),
            mac: "02:00:00:00:00:02".parse().unwrap(),
        };
        let net = Net::open(&config).unwrap();
        let features = net.features();
        let mem = memory();
        let mut t = MmioTransport::new(net, mem.clone(), RecordingInterrupt::new());
        let queues = [
            DriverQueue::new(256, 0x1_0000),
            DriverQueue::new(256, 0x2_0000),
        ];
        start(&mut t, &queues, features);
        let [mut rxq, mut txq] = queues;
        post_rx(&mut rxq, &mem, 64);
        configure_host_side(TAP);

        // The host asks who has GUEST_IP; the guest side answers; the host then sends the
        // datagram it held back to the guest's MAC address.
        let sock = UdpSocket::bind((HOST_IP, 0)).unwrap();
        sock.send_to(b"waterbear", (GUEST_IP, 9)).unwrap();
        let mut seen = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut received = |t: &mut MmioTransport<Net>, want: u16| loop {
            t.notify_queue(RX_QUEUE as u32);
            let frames = new_frames(&rxq, &mem, &mut seen);
            if let Some(f) = frames.into_iter().find(|f| ethertype(f) == want) {
                return f;
            }
            assert!(Instant::now() < deadline, "no frame of type {want:#06x}");
            std::thread::sleep(Duration::from_millis(10));
        };
        let request = received(&mut t, 0x0806);
        assert_eq!(request[..6], [0xff; 6]);
        assert_eq!(request[38..42], GUEST_IP.octets());

        let mut bytes = vec![0; VNET_HDR_LEN];
        bytes.extend(arp_reply(config.mac.bytes(), &request[6..12]));
        mem.write_slice(&bytes, GuestAddress(0xc_0000)).unwrap();
        txq.add_chain(&mem, &[(0xc_0000, bytes.len() as u32, false)]);
        t.notify_queue(TX_QUEUE as u32);
        let c = t.device().counters();
        assert_eq!((c.tx_frames, c.tx_errors), (1, 0), "{c:?}");

        let datagram = received(&mut t, 0x0800);
        assert_eq!(datagram[..6], config.mac.bytes());
        assert!(datagram.ends_with(b"waterbear"));
    });
}

#[test]
fn restore_reattaches_to_the_same_tap_and_keeps_counting() {
    run_in_netns(|| {
        create_persistent(TAP, libc::IFF_TAP);
        let config = NetConfig {
            tap: TAP.to_string(),
            mac: "02:00:00:00:00:03".parse().unwrap(),
        };
        let mut state = Net::open(&config).unwrap().state();
        state.counters.rx_frames = 7;
        let net = Net::restore(&config, &state).unwrap();
        assert_eq!(net.counters().rx_frames, 7);
        assert!(net.as_raw_fd() >= 0);
        let e = Net::restore(&config, &state).err().unwrap();
        assert!(matches!(e, NetError::Tap(TapError::Busy { .. })), "{e}");
    });
}
