use super::*;
use crate::devices::virtio::mmio::reg;
use crate::devices::virtio::testutil::{
    memory, negotiate, read_reg, setup_queue, start, write_reg, DriverQueue, RecordingInterrupt,
    TestDevice, DATA,
};

const FEATURES: u64 = TestDevice::FEATURES;

struct Vm {
    t: MmioTransport<TestDevice>,
    irq: Arc<RecordingInterrupt>,
    mem: Memory,
    qs: Vec<DriverQueue>,
}

/// A running device whose queue 0 (of 16) is ready and has used two chains; queue 1 is
/// left unset.
fn running() -> Vm {
    let mem = memory();
    let irq = RecordingInterrupt::new();
    let mut t = MmioTransport::new(TestDevice::new(), mem.clone(), irq.clone());
    let mut qs = vec![DriverQueue::new(16, 0x1_0000)];
    start(&mut t, &qs, FEATURES);
    for _ in 0..2 {
        qs[0].add_chain(&mem, &[(DATA, 8, true)]);
    }
    t.notify_queue(0);
    irq.take();
    Vm { t, irq, mem, qs }
}

fn restore(vm: &Vm, state: &MmioTransportState) -> Result<MmioTransport<TestDevice>, RestoreError> {
    MmioTransport::restore(TestDevice::new(), vm.mem.clone(), vm.irq.clone(), state)
}

#[test]
fn save_keeps_indexes_only_for_ready_queues_in_use() {
    let vm = running();
    let state = vm.t.save();
    let expected = QueueIndexes {
        next_avail: 2,
        next_used: 2,
    };
    assert_eq!(state.queues[0].indexes, Some(expected));
    assert!(state.queues[0].registers.ready);
    assert_eq!(state.queues[1].indexes, None);
    assert!(!state.queues[1].registers.ready);
}

#[test]
fn state_survives_bincode_and_restores_to_the_same_registers() {
    let vm = running();
    let state = vm.t.save();
    let config = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(&state, config).unwrap();
    let (decoded, _): (MmioTransportState, usize) =
        bincode::serde::decode_from_slice(&bytes, config).unwrap();
    let t = restore(&vm, &decoded).unwrap();
    assert_eq!(t.save(), state);
    assert_eq!(t.device().acked, Some(FEATURES));
}

#[test]
fn restored_device_continues_in_the_same_rings() {
    let mut vm = running();
    let mut t = restore(&vm, &vm.t.save()).unwrap();
    vm.qs[0].set_used_event(&vm.mem, 2);
    vm.qs[0].add_chain(&vm.mem, &[(DATA, 8, true)]);
    write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(vm.qs[0].used_idx(&vm.mem), 3);
    assert_eq!(vm.irq.take(), vec![INTERRUPT_VRING]);
}

#[test]
fn process_after_resume_serves_a_request_whose_notification_was_lost() {
    let mut vm = running();
    let state = vm.t.save();
    // Published while the VMM was not listening; its notification went nowhere.
    vm.qs[0].add_chain(&vm.mem, &[(DATA, 8, true)]);
    let mut t = restore(&vm, &state).unwrap();
    assert!(vm.irq.take().is_empty(), "restore alone raises nothing");
    t.process_after_resume();
    assert_eq!(vm.qs[0].used_idx(&vm.mem), 3);
    assert!(vm.irq.take().contains(&INTERRUPT_VRING));
    assert_ne!(read_reg(&mut t, reg::INTERRUPT_STATUS) & INTERRUPT_VRING, 0);
}

#[test]
fn process_after_resume_raises_the_interrupt_with_nothing_new() {
    let vm = running();
    let mut t = restore(&vm, &vm.t.save()).unwrap();
    t.process_after_resume();
    assert_eq!(vm.irq.take(), vec![INTERRUPT_VRING]);
}

#[test]
fn device_in_set_up_restores_and_starts_later() {
    let vm = running();
    let mem = vm.mem.clone();
    let mut t = MmioTransport::new(TestDevice::new(), mem.clone(), vm.irq.clone());
    let q = DriverQueue::new(16, 0x3_0000);
    let status = negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, &q);
    let state = t.save();
    assert_eq!(state.queues[0].indexes, None);

    let mut t = restore(&vm, &state).unwrap();
    assert!(!t.is_running());
    t.process_after_resume();
    assert!(vm.irq.take().is_empty());
    write_reg(&mut t, reg::STATUS, status | STATUS_DRIVER_OK);
    assert!(t.is_running());
}

#[test]
fn broken_device_restores_broken_and_repeats_its_pending_interrupt() {
    let vm = running();
    let mut t = vm.t;
    vm.qs[0].set_avail_idx(&vm.mem, 100);
    t.notify_queue(0);
    assert!(t.needs_reset());
    let mut state = t.save();
    // A broken device's rings are not checked: they may be what broke it.
    state.queues[0].registers.desc_table = 0x7fff_0000_0000;
    let mut t =
        MmioTransport::restore(TestDevice::new(), vm.mem.clone(), vm.irq.clone(), &state).unwrap();
    assert!(t.needs_reset());
    vm.irq.take();
    t.process_after_resume();
    assert_eq!(vm.irq.take(), vec![INTERRUPT_VRING | INTERRUPT_CONFIG]);
}

/// Restores `state` after `damage` and returns the error.
fn refused(damage: impl FnOnce(&mut MmioTransportState, &Vm)) -> RestoreError {
    let vm = running();
    let mut state = vm.t.save();
    damage(&mut state, &vm);
    match restore(&vm, &state) {
        Ok(_) => panic!("damaged state restored: {state:?}"),
        Err(e) => e,
    }
}

#[test]
fn restore_refuses_another_device_type() {
    let e = refused(|s, _| s.device_type = 2);
    assert!(
        matches!(
            e,
            RestoreError::DeviceType {
                saved: 2,
                actual: 42
            }
        ),
        "{e}"
    );
}

#[test]
fn restore_refuses_a_different_queue_count() {
    let e = refused(|s, _| {
        s.queues.pop();
    });
    assert!(
        matches!(
            e,
            RestoreError::QueueCount {
                saved: 1,
                actual: 2
            }
        ),
        "{e}"
    );
}

#[test]
fn restore_refuses_an_impossible_status() {
    let e = refused(|s, _| s.status |= 0x10);
    assert!(matches!(e, RestoreError::Status(_)), "{e}");
    let e = refused(|s, _| s.status &= !STATUS_FEATURES_OK);
    assert!(matches!(e, RestoreError::Status(_)), "{e}");
}

#[test]
fn restore_refuses_unknown_interrupt_status_bits() {
    let e = refused(|s, _| s.interrupt_status = 4);
    assert!(matches!(e, RestoreError::InterruptStatus(4)), "{e}");
}

#[test]
fn restore_refuses_features_the_device_does_not_offer() {
    let e = refused(|s, _| s.acked_features |= 1 << 50);
    assert!(matches!(e, RestoreError::Features { .. }), "{e}");
}

#[test]
fn restore_refuses_queue_sizes_that_are_not_powers_of_two_up_to_the_maximum() {
    for size in [0, 12, 32] {
        let e = refused(|s, _| s.queues[0].registers.size = size);
        assert!(matches!(e, RestoreError::QueueSize { index: 0, .. }), "{e}");
    }
    let e = refused(|s, _| s.queues[1].registers.max_size = 64);
    assert!(
        matches!(e, RestoreError::QueueMaxSize { index: 1, .. }),
        "{e}"
    );
}

#[test]
fn restore_refuses_a_ready_queue_without_its_indexes() {
    let e = refused(|s, _| s.queues[0].indexes = None);
    assert!(
        matches!(e, RestoreError::MissingIndexes { index: 0 }),
        "{e}"
    );
}

#[test]
fn restore_refuses_a_queue_ready_before_features_were_negotiated() {
    let e = refused(|s, _| {
        s.status = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
    });
    assert!(matches!(e, RestoreError::ReadyTooEarly { index: 0 }), "{e}");
}

#[test]
fn restore_refuses_rings_outside_guest_memory() {
    let e = refused(|s, _| s.queues[0].registers.used_ring = 0x4000_0000);
    assert!(
        matches!(e, RestoreError::QueueUnusable { index: 0, .. }),
        "{e}"
    );
    let e = refused(|s, _| s.queues[0].registers.avail_ring = 0x1_0001);
    assert!(
        matches!(e, RestoreError::QueueUnusable { index: 0, .. }),
        "{e}"
    );
}

#[test]
fn restore_refuses_indexes_that_do_not_match_the_rings_in_memory() {
    let e = refused(|s, _| {
        s.queues[0].indexes = Some(QueueIndexes {
            next_avail: 3,
            next_used: 3,
        })
    });
    assert!(
        matches!(
            e,
            RestoreError::UsedIndex {
                saved: 3,
                in_memory: 2,
                ..
            }
        ),
        "{e}"
    );

    let e = refused(|s, vm| {
        vm.qs[0].set_avail_idx(&vm.mem, 40);
        s.queues[0].indexes = Some(QueueIndexes {
            next_avail: 2,
            next_used: 2,
        });
    });
    assert!(
        matches!(e, RestoreError::AvailIndex { avail_idx: 40, .. }),
        "{e}"
    );
}

#[test]
fn restore_refuses_more_chains_in_flight_than_the_queue_holds() {
    let e = refused(|s, vm| {
        vm.qs[0].set_avail_idx(&vm.mem, 30);
        s.queues[0].indexes = Some(QueueIndexes {
            next_avail: 30,
            next_used: 2,
        });
    });
    assert!(
        matches!(e, RestoreError::InFlight { next_avail: 30, .. }),
        "{e}"
    );
}

#[test]
fn restore_reports_a_device_that_will_not_start() {
    let vm = running();
    let mut device = TestDevice::new();
    device.fail_activate = true;
    let result = MmioTransport::restore(device, vm.mem.clone(), vm.irq.clone(), &vm.t.save());
    assert!(matches!(result, Err(RestoreError::Activate(_))));
}
