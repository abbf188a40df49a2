use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::testutil::{
    memory, negotiate, read_reg, setup_queue, start, write_reg, DriverQueue, RecordingInterrupt,
    TestDevice, DATA, DESC_F_NEXT,
};
use crate::devices::virtio::{FEATURE_VERSION_1, INTERRUPT_VRING};

const FEATURES: u64 = TestDevice::FEATURES;

fn transport() -> (MmioTransport<TestDevice>, Arc<RecordingInterrupt>, Memory) {
    let mem = memory();
    let irq = RecordingInterrupt::new();
    let t = MmioTransport::new(TestDevice::new(), mem.clone(), irq.clone());
    (t, irq, mem)
}

fn queues() -> Vec<DriverQueue> {
    vec![
        DriverQueue::new(16, 0x1_0000),
        DriverQueue::new(8, 0x2_0000),
    ]
}

/// A started transport with both queues ready.
fn running() -> (
    MmioTransport<TestDevice>,
    Arc<RecordingInterrupt>,
    Memory,
    Vec<DriverQueue>,
) {
    let (mut t, irq, mem) = transport();
    let qs = queues();
    start(&mut t, &qs, FEATURES);
    assert!(t.is_running());
    (t, irq, mem, qs)
}

#[test]
fn registers_identify_a_modern_virtio_mmio_device() {
    let (mut t, _, _) = transport();
    assert_eq!(read_reg(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(read_reg(&mut t, reg::VERSION), 2);
    assert_eq!(read_reg(&mut t, reg::DEVICE_ID), 42);
    assert_eq!(read_reg(&mut t, reg::VENDOR_ID), VENDOR_ID);
}

#[test]
fn device_features_are_read_through_the_selector() {
    let (mut t, _, _) = transport();
    write_reg(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(read_reg(&mut t, reg::DEVICE_FEATURES), FEATURES as u32);
    write_reg(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        read_reg(&mut t, reg::DEVICE_FEATURES),
        (FEATURES >> 32) as u32
    );
    write_reg(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(read_reg(&mut t, reg::DEVICE_FEATURES), 0);
}

#[test]
fn features_ok_is_refused_for_a_feature_not_offered() {
    let (mut t, _, _) = transport();
    let status = negotiate(&mut t, FEATURES | 1 << 40);
    assert_eq!(status & STATUS_FEATURES_OK, 0);
    assert_eq!(status, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
}

#[test]
fn features_ok_is_refused_without_version_1() {
    let (mut t, _, _) = transport();
    let status = negotiate(&mut t, FEATURES & !FEATURE_VERSION_1);
    assert_eq!(status & STATUS_FEATURES_OK, 0);
}

#[test]
fn driver_features_cannot_change_after_features_ok() {
    let (mut t, _, _, _) = running();
    write_reg(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    write_reg(&mut t, reg::DRIVER_FEATURES, 0);
    assert_eq!(t.save().acked_features, FEATURES);
}

#[test]
fn driver_ok_starts_the_device_with_the_accepted_features() {
    let (t, _, _, _) = running();
    assert_eq!(t.device().acked, Some(FEATURES));
}

#[test]
fn driver_ok_without_features_ok_is_ignored() {
    let (mut t, _, _) = transport();
    write_reg(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write_reg(
        &mut t,
        reg::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
    );
    assert_eq!(
        read_reg(&mut t, reg::STATUS),
        STATUS_ACKNOWLEDGE | STATUS_DRIVER
    );
    assert_eq!(t.device().acked, None);
}

#[test]
fn queue_num_max_is_zero_for_a_queue_the_device_lacks() {
    let (mut t, _, _) = transport();
    write_reg(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(read_reg(&mut t, reg::QUEUE_NUM_MAX), 16);
    write_reg(&mut t, reg::QUEUE_SEL, 2);
    assert_eq!(read_reg(&mut t, reg::QUEUE_NUM_MAX), 0);
    assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0);
}

#[test]
fn queue_size_that_is_not_a_power_of_two_or_too_big_is_ignored() {
    let (mut t, _, _) = transport();
    negotiate(&mut t, FEATURES);
    write_reg(&mut t, reg::QUEUE_SEL, 0);
    for bad in [0, 12, 32, 0x1_0010] {
        write_reg(&mut t, reg::QUEUE_NUM, bad);
    }
    assert_eq!(t.save().queues[0].registers.size, 16);
    write_reg(&mut t, reg::QUEUE_NUM, 4);
    assert_eq!(t.save().queues[0].registers.size, 4);
}

#[test]
fn queue_registers_are_ignored_once_the_device_runs() {
    let (mut t, _, _, _) = running();
    write_reg(&mut t, reg::QUEUE_SEL, 0);
    write_reg(&mut t, reg::QUEUE_READY, 0);
    write_reg(&mut t, reg::QUEUE_DESC_LOW, 0x5000);
    assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 1);
    assert_eq!(t.save().queues[0].registers.desc_table, 0x1_0000);
}

#[test]
fn notify_processes_the_queue_and_raises_a_used_buffer_interrupt() {
    let (mut t, irq, mem, mut qs) = running();
    qs[1].add_chain(&mem, &[(DATA, 8, true)]);
    write_reg(&mut t, reg::QUEUE_NOTIFY, 1);
    assert_eq!(t.device().processed, vec![1]);
    assert_eq!(qs[1].used_idx(&mem), 1);
    assert_eq!(irq.take(), vec![INTERRUPT_VRING]);
    assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), INTERRUPT_VRING);
    write_reg(&mut t, reg::INTERRUPT_ACK, INTERRUPT_VRING);
    assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn ioeventfd_notification_works_like_a_register_write() {
    let (mut t, irq, mem, mut qs) = running();
    qs[0].add_chain(&mem, &[(DATA, 8, true)]);
    t.notify_queue(0);
    assert_eq!(qs[0].used_idx(&mem), 1);
    assert_eq!(irq.take(), vec![INTERRUPT_VRING]);
}

#[test]
fn notify_before_driver_ok_or_for_an_absent_queue_does_nothing() {
    let (mut t, irq, mem) = transport();
    let mut qs = queues();
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, &qs[0]);
    qs[0].add_chain(&mem, &[(DATA, 8, true)]);
    t.notify_queue(0);
    assert_eq!(qs[0].used_idx(&mem), 0);

    let (mut t, _, _, _) = running();
    t.notify_queue(7);
    assert!(t.device().processed.is_empty());
    assert!(irq.take().is_empty());
}

#[test]
fn no_interrupt_when_the_driver_asks_for_none_with_used_event() {
    let (mut t, irq, mem, mut qs) = running();
    qs[0].set_used_event(&mem, 5);
    qs[0].add_chain(&mem, &[(DATA, 8, true)]);
    t.notify_queue(0);
    assert_eq!(qs[0].used_idx(&mem), 1);
    assert!(irq.take().is_empty());
}

#[test]
fn writing_zero_to_status_resets_the_device() {
    let (mut t, _, mem, mut qs) = running();
    qs[0].add_chain(&mem, &[(DATA, 8, true)]);
    t.notify_queue(0);
    let resets = t.device().resets;
    write_reg(&mut t, reg::STATUS, 0);
    assert_eq!(read_reg(&mut t, reg::STATUS), 0);
    assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0);
    assert_eq!(t.device().resets, resets + 1);
    let saved = t.save();
    assert_eq!(saved.acked_features, 0);
    assert!(saved
        .queues
        .iter()
        .all(|q| !q.registers.ready && q.indexes.is_none()));
}

#[test]
fn driver_cannot_clear_status_bits_without_a_reset() {
    let (mut t, _, _, _) = running();
    write_reg(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
    assert!(t.is_running());
}

#[test]
fn config_space_is_passed_to_the_device_at_its_offset() {
    let (mut t, _, _) = transport();
    let mut data = [0u8; 2];
    t.read(reg::CONFIG + 2, &mut data);
    assert_eq!(data, [3, 4]);
    t.write(reg::CONFIG + 7, &[0xaa]);
    let mut byte = [0u8];
    t.read(reg::CONFIG + 7, &mut byte);
    assert_eq!(byte, [0xaa]);
    t.read(MMIO_WINDOW_SIZE - 1, &mut data);
    assert_eq!(data, [0, 0], "a read past the window reads zero");
}

#[test]
fn config_change_bumps_the_generation_and_interrupts() {
    let (mut t, irq, _, _) = running();
    let before = read_reg(&mut t, reg::CONFIG_GENERATION);
    t.config_changed();
    assert_eq!(read_reg(&mut t, reg::CONFIG_GENERATION), before + 1);
    assert_eq!(irq.take(), vec![INTERRUPT_CONFIG]);
}

#[test]
fn register_access_that_is_not_32_bits_wide_is_ignored() {
    let (mut t, _, _) = transport();
    let mut narrow = [0xffu8; 2];
    t.read(reg::MAGIC_VALUE, &mut narrow);
    assert_eq!(narrow, [0, 0]);
    t.write(reg::STATUS, &[1]);
    assert_eq!(read_reg(&mut t, reg::STATUS), 0);
}

#[test]
fn no_shared_memory_regions_are_reported() {
    let (mut t, _, _) = transport();
    assert_eq!(read_reg(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    assert_eq!(read_reg(&mut t, reg::SHM_LEN_HIGH), u32::MAX);
}

/// Asserts the device is broken and told the driver with one config interrupt.
fn assert_broken(t: &mut MmioTransport<TestDevice>, irq: &RecordingInterrupt) {
    assert!(t.needs_reset());
    assert!(!t.is_running());
    let status = read_reg(t, reg::STATUS);
    assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(irq.take(), vec![INTERRUPT_CONFIG]);
    assert_ne!(read_reg(t, reg::INTERRUPT_STATUS) & INTERRUPT_CONFIG, 0);
}

#[test]
fn out_of_range_avail_index_breaks_the_device_until_reset() {
    let (mut t, irq, mem, qs) = running();
    qs[0].set_avail_idx(&mem, 200);
    t.notify_queue(0);
    assert_broken(&mut t, &irq);

    // Further notifications are ignored rather than retried.
    t.notify_queue(0);
    assert_eq!(t.device().processed, vec![0]);
    assert!(irq.take().is_empty());

    // The driver's reset brings it back.
    let mut qs = queues();
    mem.write_slice(&[0u8; 0x3000], GuestAddress(qs[0].desc))
        .unwrap();
    start(&mut t, &qs, FEATURES);
    assert!(t.is_running());
    qs[0].add_chain(&mem, &[(DATA, 8, true)]);
    t.notify_queue(0);
    assert_eq!(qs[0].used_idx(&mem), 1);
}

#[test]
fn bogus_descriptor_breaks_the_device() {
    let (mut t, irq, mem, mut qs) = running();
    DriverQueue::write_desc(&mem, qs[0].desc, 0, (DATA, 8, DESC_F_NEXT, 999));
    qs[0].publish(&mem, 0);
    t.notify_queue(0);
    assert_broken(&mut t, &irq);
    assert_eq!(qs[0].used_idx(&mem), 0);
}

#[test]
fn driver_status_writes_keep_needs_reset() {
    let (mut t, irq, mem, qs) = running();
    qs[0].set_avail_idx(&mem, 200);
    t.notify_queue(0);
    assert_broken(&mut t, &irq);
    let status = read_reg(&mut t, reg::STATUS);
    write_reg(&mut t, reg::STATUS, status & !STATUS_DEVICE_NEEDS_RESET);
    assert!(t.needs_reset());
}

#[test]
fn rings_outside_guest_memory_break_the_device_at_driver_ok() {
    let (mut t, irq, _) = transport();
    let qs = vec![DriverQueue::new(16, 0x1_0000_0000)];
    start(&mut t, &qs, FEATURES);
    assert_broken(&mut t, &irq);
    assert_eq!(t.device().acked, None);
}

#[test]
fn misaligned_descriptor_table_breaks_the_device_at_driver_ok() {
    let (mut t, irq, _) = transport();
    let mut q = DriverQueue::new(16, 0x1_0000);
    q.desc += 8;
    start(&mut t, &[q], FEATURES);
    assert_broken(&mut t, &irq);
}

#[test]
fn failed_activation_breaks_the_device() {
    let (mut t, irq, _) = transport();
    t.device_mut().fail_activate = true;
    start(&mut t, &queues(), FEATURES);
    assert_broken(&mut t, &irq);
}
