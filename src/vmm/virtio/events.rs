//! The event-loop subscriber that processes the queues: each queue's ioeventfd, and a
//! network device's tap (edge-triggered), while the VM is not paused.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::transport::Transport;
use crate::devices::bus::lock;

pub(super) enum Source {
    /// A queue's ioeventfd.
    Notify(EventFd),
    /// A backend's fd (a tap), watched edge-triggered.
    Backend(RawFd),
}

pub(super) struct Watched {
    pub(super) transport: Arc<Mutex<Transport>>,
    pub(super) queue: u32,
    pub(super) source: Source,
}

impl Watched {
    fn fd(&self) -> RawFd {
        match &self.source {
            Source::Notify(evt) => evt.as_raw_fd(),
            Source::Backend(fd) => *fd,
        }
    }
}

/// Processes a queue when its notification or its backend fires, unless the VM is paused.
pub struct QueueEvents {
    pub(super) watched: Vec<Watched>,
    pub(super) active: Arc<AtomicBool>,
}

impl MutEventSubscriber for QueueEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for w in &self.watched {
            let events = match w.source {
                Source::Notify(_) => EventSet::IN,
                // Edge-triggered: a frame the guest has no buffer for stays in the tap
                // without waking the loop again; the guest's next RX notification
                // carries on reading.
                Source::Backend(_) => EventSet::IN | EventSet::EDGE_TRIGGERED,
            };
            if let Err(e) = ops.add(Events::new_raw(w.fd(), events)) {
                log::error!("cannot watch a virtio queue event: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        let Some(w) = self.watched.iter().find(|w| w.fd() == fd) else {
            return;
        };
        if let Source::Notify(evt) = &w.source {
            let _ = evt.read();
        }
        // While paused the notification is dropped: resume processes every queue.
        if self.active.load(Ordering::SeqCst) {
            lock(&w.transport).notify_queue(w.queue);
        }
    }
}
