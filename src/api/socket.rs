//! The API's listening socket: created with mode 0600 and no moment when it is more
//! open, never taking over from a live server, replacing a stale socket file, adopted
//! across `execve`, and removed only while it is still the one this process created.
//! Also the few raw socket calls std lacks (a connect that never blocks, a send that
//! never raises SIGPIPE).

use std::fs::{self, DirBuilder, File, Permissions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Longest path a Unix socket address holds (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error(
        "another process already serves an API at {path}; stop it or choose another socket path"
    )]
    InUse { path: PathBuf },
    #[error("cannot create API socket {path}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot check whether a server still listens at {path}")]
    Probe { path: PathBuf, source: io::Error },
    #[error("cannot inspect API socket path {path}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("{path} exists and is not a socket; refusing to replace it with the API socket")]
    NotASocket { path: PathBuf },
    #[error("API socket path {path} is {len} bytes long; the limit is {MAX_SOCKET_PATH_BYTES}")]
    PathTooLong { path: PathBuf, len: usize },
    #[error("API socket path {path} does not name a file")]
    NoFileName { path: PathBuf },
    #[error("inherited descriptor {fd} for API socket {path} is unusable: {reason}")]
    NotAListener {
        fd: RawFd,
        path: PathBuf,
        reason: &'static str,
    },
    #[error("cannot {what} the descriptor of API socket {path}")]
    Descriptor {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot create the API server's idle timer")]
    Timer(#[source] io::Error),
    #[error("cannot remove API socket {path}")]
    Remove { path: PathBuf, source: io::Error },
}

/// A listening, non-blocking API socket and the path clients reach it by.
#[derive(Debug)]
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file this process created or adopted.
    file_id: Option<(u64, u64)>,
}

impl ApiSocket {
    /// Creates the socket at `path` with mode 0600. Fails if a live server answers there
    /// or if `path` is something other than a socket; replaces a stale socket file.
    pub fn bind(path: &Path) -> Result<Self, ApiServerError> {
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH_BYTES {
            return Err(ApiServerError::PathTooLong {
                path: path.into(),
                len,
            });
        }
        if path.file_name().is_none() {
            return Err(ApiServerError::NoFileName { path: path.into() });
        }
        check_replaceable(path)?;

        let listener = bind_private(path).map_err(|source| ApiServerError::Bind {
            path: path.into(),
            source,
        })?;
        let socket = ApiSocket {
            listener,
            path: path.into(),
            file_id: file_id(path),
        };
        socket.set_up_descriptor()?;
        log::info!("API listening on {}", path.display());
        Ok(socket)
    }

    /// Adopts a listening socket inherited across `execve` (see
    /// [`keep_fd_across_exec`]), still reachable at `path`. Sets close-on-exec on it
    /// again.
    pub fn from_listener_fd(fd: OwnedFd, path: &Path) -> Result<Self, ApiServerError> {
        check_listener(&fd).map_err(|reason| ApiServerError::NotAListener {
            fd: fd.as_raw_fd(),
            path: path.into(),
            reason,
        })?;
        let file_id = file_id(path);
        if file_id.is_none() {
            log::warn!(
                "API socket file {} is gone; clients cannot reach the inherited socket",
                path.display()
            );
        }
        let socket = ApiSocket {
            listener: UnixListener::from(fd),
            path: path.into(),
            file_id,
        };
        socket.set_up_descriptor()?;
        log::info!("API listening on {} (inherited socket)", path.display());
        Ok(socket)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Clears close-on-exec on the listener so that an `execve` hands it over; returns
    /// the descriptor number to pass to the new process.
    pub fn keep_across_exec(&self) -> Result<RawFd, ApiServerError> {
        keep_fd_across_exec(self.listener_fd()).map_err(|source| ApiServerError::Descriptor {
            path: self.path.clone(),
            what: "clear close-on-exec on",
            source,
        })?;
        Ok(self.listener_fd())
    }

    /// Removes the socket file if it is still the one this process created or adopted
    /// (not a newer server's). Returns whether it removed it.
    pub fn remove_file(&self) -> Result<bool, ApiServerError> {
        if self.file_id.is_none() || file_id(&self.path) != self.file_id {
            return Ok(false);
        }
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(ApiServerError::Remove {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn set_up_descriptor(&self) -> Result<(), ApiServerError> {
        let err = |what| {
            let path = self.path.clone();
            move |source| ApiServerError::Descriptor { path, what, source }
        };
        self.listener
            .set_nonblocking(true)
            .map_err(err("make non-blocking"))?;
        set_cloexec(self.listener_fd(), true).map_err(err("set close-on-exec on"))
    }
}

/// Clears close-on-exec on `fd`, so that it survives an `execve`.
pub fn keep_fd_across_exec(fd: RawFd) -> io::Result<()> {
    set_cloexec(fd, false)
}

fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD on a descriptor number only reads its flags; a bad number fails
    // with EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: F_SETFD only changes the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Refuses a path held by a live server or by something that is not a socket.
fn check_replaceable(path: &Path) -> Result<(), ApiServerError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {}
        Ok(_) => return Err(ApiServerError::NotASocket { path: path.into() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiServerError::Inspect {
                path: path.into(),
                source,
            })
        }
    }
    match connect_nonblocking(path) {
        // A full backlog (WouldBlock) is a live server too.
        Ok(_) => Err(ApiServerError::InUse { path: path.into() }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            Err(ApiServerError::InUse { path: path.into() })
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("replacing stale API socket {}", path.display());
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ApiServerError::Probe {
            path: path.into(),
            source,
        }),
    }
}

/// Binds in a new 0700 directory beside `path`, makes the socket 0600 there, then
/// renames it onto `path` (replacing a stale socket atomically). Nobody else can reach
/// the socket before it is 0600.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp_dir = make_private_dir(parent)?;
    let tmp_sock = tmp_dir.join("s");

    let result = bind_in(&tmp_dir, &tmp_sock).and_then(|listener| {
        fs::set_permissions(&tmp_sock, Permissions::from_mode(0o600))?;
        fs::rename(&tmp_sock, path)?;
        Ok(listener)
    });

    let _ = fs::remove_file(&tmp_sock);
    let _ = fs::remove_dir(&tmp_dir);
    result
}

fn make_private_dir(parent: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().rotate_left(16);
    let mut last_err = None;
    for _ in 0..32 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            ".wb{:06x}",
            (seed ^ n.wrapping_mul(0x9e37_79b9)) & 0xff_ffff
        );
        let dir = parent.join(name);
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("no free temporary name")))
}

/// Binds at `sock` (inside `dir`); when that path is too long for a socket address,
/// reaches the directory through `/proc/self/fd` instead.
fn bind_in(dir: &Path, sock: &Path) -> io::Result<UnixListener> {
    if sock.as_os_str().len() <= MAX_SOCKET_PATH_BYTES {
        return UnixListener::bind(sock);
    }
    let dir_fd = File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)?;
    UnixListener::bind(format!("/proc/self/fd/{}/s", dir_fd.as_raw_fd()))
}

/// Device and inode of the socket file at `path`, if there is one.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_socket())
        .map(|m| (m.dev(), m.ino()))
}

fn check_listener(fd: &OwnedFd) -> Result<(), &'static str> {
    let opt = |name| sockopt_int(fd.as_raw_fd(), name).map_err(|_| "it is not a socket");
    if opt(libc::SO_DOMAIN)? != libc::AF_UNIX {
        return Err("it is not a Unix socket");
    }
    if opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err("it is not a stream socket");
    }
    if opt(libc::SO_ACCEPTCONN)? == 0 {
        return Err("it is not listening");
    }
    Ok(())
}

fn sockopt_int(fd: RawFd, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` is the size of `value`.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Connects to a Unix stream socket without ever blocking. A full listen backlog gives
/// `WouldBlock`, a socket file nobody listens on `ConnectionRefused`. The stream comes
/// back in non-blocking mode.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: all-zero bytes are a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a valid Unix socket path",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let addr_len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;

    // SAFETY: creating a socket has no memory effects; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un and `addr_len` does not exceed it.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            addr_len as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Writes without raising SIGPIPE when the peer has gone.
pub fn send_nosignal(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length; a bad descriptor fails cleanly.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_creates_a_0600_socket_and_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _socket = ApiSocket::bind(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("api.sock")]);
        assert!(connect_nonblocking(&path).is_ok());
    }

    #[test]
    fn bind_refuses_a_live_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _first = ApiSocket::bind(&path).unwrap();
        let err = ApiSocket::bind(&path).unwrap_err();
        assert!(matches!(err, ApiServerError::InUse { .. }), "{err}");
        assert!(err.to_string().contains(path.to_str().unwrap()));
    }

    #[test]
    fn bind_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let socket = ApiSocket::bind(&path).unwrap();
        assert!(connect_nonblocking(&path).is_ok());
        assert!(socket.remove_file().unwrap());
        assert!(!path.exists());
    }

    #[test]
    fn bind_refuses_to_replace_a_regular_file_or_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        fs::write(&path, b"keep me").unwrap();
        let err = ApiSocket::bind(&path).unwrap_err();
        assert!(matches!(err, ApiServerError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"keep me");

        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(
            ApiSocket::bind(&link),
            Err(ApiServerError::NotASocket { .. })
        ));
    }

    #[test]
    fn bind_refuses_a_path_too_long_for_a_socket_address() {
        let path = PathBuf::from(format!("/tmp/{}", "x".repeat(MAX_SOCKET_PATH_BYTES)));
        let err = ApiSocket::bind(&path).unwrap_err();
        assert!(matches!(err, ApiServerError::PathTooLong { .. }), "{err}");
    }

    #[test]
    fn bind_works_when_only_the_final_path_fits_a_socket_address() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().as_os_str().len() + 1;
        let deep = dir
            .path()
            .join("d".repeat(MAX_SOCKET_PATH_BYTES - base - 4));
        fs::create_dir(&deep).unwrap();
        let path = deep.join("a");
        assert!(path.as_os_str().len() <= MAX_SOCKET_PATH_BYTES);
        let _socket = ApiSocket::bind(&path).unwrap();
        assert!(connect_nonblocking(&path).is_ok());
        assert_eq!(fs::read_dir(&deep).unwrap().count(), 1);
    }

    #[test]
    fn remove_file_leaves_a_newer_servers_socket_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let old = ApiSocket::bind(&path).unwrap();
        fs::remove_file(&path).unwrap();
        let _new = ApiSocket::bind(&path).unwrap();
        assert!(!old.remove_file().unwrap());
        assert!(path.exists());
    }

    #[test]
    fn listener_survives_adoption_through_its_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let socket = ApiSocket::bind(&path).unwrap();
        let fd = socket.keep_across_exec().unwrap();
        // SAFETY: F_GETFD only reads the flags of a descriptor we own.
        assert_eq!(
            unsafe { libc::fcntl(fd, libc::F_GETFD) } & libc::FD_CLOEXEC,
            0
        );

        let owned = OwnedFd::from(socket.listener.try_clone().unwrap());
        let adopted = ApiSocket::from_listener_fd(owned, &path).unwrap();
        // SAFETY: as above.
        let flags = unsafe { libc::fcntl(adopted.listener_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        let _client = connect_nonblocking(&path).unwrap();
        assert!(adopted.listener().accept().is_ok());
        assert!(adopted.remove_file().unwrap());
    }

    #[test]
    fn adoption_refuses_a_descriptor_that_is_not_a_listener() {
        let (a, _b) = UnixStream::pair().unwrap();
        let err = ApiSocket::from_listener_fd(a.into(), Path::new("/x")).unwrap_err();
        assert!(err.to_string().contains("it is not listening"), "{err}");
        let file = File::open("/dev/null").unwrap();
        let err = ApiSocket::from_listener_fd(file.into(), Path::new("/x")).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
    }

    #[test]
    fn connect_to_a_missing_or_stale_socket_says_which() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let e = connect_nonblocking(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        drop(UnixListener::bind(&path).unwrap());
        let e = connect_nonblocking(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }
}
