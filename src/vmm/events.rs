//! The device event loop: one thread (the VMM's main thread) waits on the guest-exit
//! and reset events, the serial input, and the termination signals.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::vcpu::{ExitSignal, GuestExit};
use super::VmmError;
use crate::devices::serial::{SerialDevice, SerialInput};

/// Signals that stop the VMM in an orderly way (the terminal is restored, the state
/// directory cleaned) instead of killing it outright.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

pub enum LoopEnd {
    Guest(GuestExit),
    Signal(i32),
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Watches the exit and reset events and the termination signals.
struct Lifecycle {
    exit: Arc<ExitSignal>,
    reset_evt: EventFd,
    signal_fd: Option<OwnedFd>,
    ended: Option<LoopEnd>,
}

impl MutEventSubscriber for Lifecycle {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![self.exit.eventfd().as_raw_fd(), self.reset_evt.as_raw_fd()];
        fds.extend(self.signal_fd.as_ref().map(|f| f.as_raw_fd()));
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch a lifecycle event: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.exit.request(GuestExit::Reset("i8042 reset"));
        } else if fd == self.exit.eventfd().as_raw_fd() {
            let _ = self.exit.eventfd().read();
            if let Some(reason) = self.exit.take() {
                self.ended.get_or_insert(LoopEnd::Guest(reason));
            }
        } else if let Some(sfd) = self.signal_fd.as_ref().filter(|s| s.as_raw_fd() == fd) {
            let mut info: libc::signalfd_siginfo = unsafe_zeroed_siginfo();
            // SAFETY: reading one siginfo record into a buffer of exactly its size from
            // a signalfd we own.
            let n = unsafe {
                libc::read(
                    sfd.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    std::mem::size_of::<libc::signalfd_siginfo>(),
                )
            };
            if n > 0 {
                log::info!("received signal {}; stopping the VM", info.ssi_signo);
                self.ended
                    .get_or_insert(LoopEnd::Signal(info.ssi_signo as i32));
            }
        }
    }
}

fn unsafe_zeroed_siginfo() -> libc::signalfd_siginfo {
    // SAFETY: signalfd_siginfo is a plain C struct of integers; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and every thread it starts
/// afterwards, so that they reach the event loop's signalfd and not a default handler.
/// Call it first thing in `main`, before any thread exists.
pub fn block_stop_signals() {
    let set = stop_signal_set();
    // SAFETY: a valid, initialised signal set and a null old-set pointer.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// A signalfd receiving the stop signals (pending ones included).
fn stop_signal_fd() -> Option<OwnedFd> {
    let set = stop_signal_set();
    // SAFETY: a valid signal set; the returned descriptor is checked before use.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        log::warn!("cannot create a signalfd; SIGTERM will kill the VMM without clean-up");
        return None;
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub struct EventLoop {
    manager: EventManager<Subscriber>,
    lifecycle: Arc<Mutex<Lifecycle>>,
}

impl EventLoop {
    /// Sets up the loop. The stop signals must already be blocked in every thread
    /// (see `block_stop_signals`) for the signalfd to see them.
    pub fn new(
        exit: Arc<ExitSignal>,
        reset_evt: &EventFd,
        serial_input: Option<(Arc<Mutex<SerialDevice>>, &EventFd)>,
    ) -> Result<Self, VmmError> {
        let mut manager = EventManager::<Subscriber>::new().map_err(VmmError::EventLoop)?;
        let dup = |e: &EventFd| {
            e.try_clone().map_err(|source| VmmError::Setup {
                what: "the event loop",
                source,
            })
        };
        let lifecycle = Arc::new(Mutex::new(Lifecycle {
            exit,
            reset_evt: dup(reset_evt)?,
            signal_fd: stop_signal_fd(),
            ended: None,
        }));
        manager.add_subscriber(lifecycle.clone());
        if let Some((serial, ready)) = serial_input {
            let input = SerialInput::new(serial, libc::STDIN_FILENO, dup(ready)?);
            manager.add_subscriber(Arc::new(Mutex::new(input)));
        }
        Ok(EventLoop { manager, lifecycle })
    }

    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Dispatches events until the guest stops or a stop signal arrives.
    pub fn run_until_exit(&mut self) -> Result<LoopEnd, VmmError> {
        loop {
            match self.manager.run() {
                Ok(_) => {}
                Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(VmmError::EventLoop(e)),
            }
            if let Some(end) = crate::devices::bus::lock(&self.lifecycle).ended.take() {
                return Ok(end);
            }
        }
    }
}
