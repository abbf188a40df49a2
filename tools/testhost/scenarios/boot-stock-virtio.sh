# shellcheck shell=busybox
# boot-stock-virtio: Debian's stock cloud kernel, which has virtio-mmio, virtio-blk and
# virtio-net only as modules and finds virtio-mmio devices only through ACPI, boots
# with two disks (the second read-only) and a NIC and the default discovery (ACPI
# DSDT, LNRO0005). Its init loads the modules from the initramfs; the disks and eth0
# must be found through ACPI (LNRO0005:NN, not virtio-mmio.N). The guest mounts the
# data disk, reads and writes files, checks the read-only disk, pings the test host
# and moves a file each way over the tap, as in disk and net; after typed `reboot -f`
# waterbear exits 0, the data disk checks clean with the guest's files on it and the
# read-only disk's image is unchanged.
#
# Metrics: time_to_init_ms, stock_virtio_ready_ms (WB-INIT to WB-NET-READY: modules,
# disk and network checks), net_ping_avg_ms, net_fetch_512kib_ms, vmm_rss_kib.

# shellcheck source=../virtio-lib.sh
. /testhost/virtio-lib.sh

disk_prepare_images
net_tap_up
wb_start boot-stock-virtio --kernel "$GUEST_DIR/vmlinuz-stock" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
    --cpus 2 --memory 512M \
    --cmdline "$(guest_cmdline disk-net) wb.ro_disk=vdb $(net_guest_cmdline)" \
    --disk "path=$DISK_DIR/data.img,id=stockdisk" \
    --disk "path=$DISK_DIR/golden.img,readonly=on,id=golden" \
    --net "tap=$TAP" --serial stdio
expect_guest_init
init_us=$WB_LINE_US
wb_expect_ok 'WB-MODULES virtio_mmio virtio_blk virtio_net' 120
expect_block_device vda stockdisk 0 $((64 * 2048)) 'LNRO0005:[0-9A-Fa-f]+'
expect_block_device vdb golden 1 $((16 * 2048)) 'LNRO0005:[0-9A-Fa-f]+'
expect_guest_disk_checks
expect_guest_ro_checks
wb_expect_ok 'WB-DISK-OK' 120
expect_guest_net_checks "" 'LNRO0005:[0-9A-Fa-f]+'
echo "WB-METRIC stock_virtio_ready_ms=$(($(grep -m1 ' WB-NET-READY' "$WB_DIR/log" | cut -d' ' -f1) / 1000 - init_us / 1000))"
wb_expect 'WB-CONSOLE-READY' 60
wb_send 'reboot -f'
wb_wait_exit 60
[ "$WB_STATUS" = 0 ] || fail "waterbear exited with status $WB_STATUS after the guest rebooted"
metric_vmm_rss
kill "$HTTPD_PID" 2>/dev/null || true
check_golden_after
check_data_disk_after "$DISK_DIR/data.img"
