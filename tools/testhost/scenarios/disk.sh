# shellcheck shell=busybox
# disk: virtio-blk. The guest (project kernel, devices found through
# `--virtio-discovery cmdline`, so the kernel's virtio_mmio.device= path) mounts an
# ext4 image as its data disk, reads the file the test host put there, writes files
# and reads them back from the device; a second disk given `readonly=on` is read-only
# in the guest (/sys/block/vdb/ro = 1, a write fails, a read-only mount works) and
# stays byte for byte what it was. Both disks carry their ids as serials. After the
# guest unmounted the data disk and rebooted (waterbear exits 0): the filesystem is
# clean, e2fsck -fn finds nothing, and the test host reads the guest's files.
#
# Metrics: time_to_init_ms, disk_checks_ms (WB-INIT to WB-DISK-OK: mount, 512 KiB
# written and read back, the read-only disk read twice), vmm_rss_kib.

# shellcheck source=../virtio-lib.sh
. /testhost/virtio-lib.sh

disk_prepare_images
wb_start disk --kernel "$GUEST_DIR/vmlinux" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
    --cpus 1 --memory 256M --cmdline "$(guest_cmdline disk) wb.ro_disk=vdb wb.xfer_kib=$XFER_KIB" \
    --disk "path=$DISK_DIR/data.img,id=data" \
    --disk "path=$DISK_DIR/golden.img,readonly=on,id=golden" \
    --virtio-discovery cmdline --serial stdio
expect_guest_init
init_us=$WB_LINE_US

# Found through the command line: platform devices virtio-mmio.N (ACPI ones are
# LNRO0005:NN), sizes in 512-byte sectors.
expect_block_device vda data 0 $((64 * 2048)) 'virtio-mmio\.[0-9]+'
expect_block_device vdb golden 1 $((16 * 2048)) 'virtio-mmio\.[0-9]+'
expect_guest_disk_checks
expect_guest_ro_checks
wb_expect_ok 'WB-DISK-OK' 120
echo "WB-METRIC disk_checks_ms=$(((WB_LINE_US - init_us) / 1000))"
wb_wait_exit 60
[ "$WB_STATUS" = 0 ] || fail "waterbear exited with status $WB_STATUS after the guest rebooted"
metric_vmm_rss

check_golden_after
check_data_disk_after "$DISK_DIR/data.img"
