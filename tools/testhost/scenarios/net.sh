# shellcheck shell=busybox
# net: virtio-net on a tap. The test host has the tap wbtap0 with 10.0.2.1/24 and
# serves a random file over HTTP; the guest (project kernel, default ACPI discovery)
# gets 10.0.2.2/24 on eth0 with the MAC given to --net, pings the test host, fetches
# that file and serves one of its own. The test host pings the guest and fetches the
# guest's file; both checksums must match. Typed `reboot -f` ends waterbear with 0.
#
# Bad input that needs real taps: while the guest runs, a second waterbear given the
# same tap (busy) and one given a tap that does not exist must both refuse to start
# (exit 1, naming the tap) and must not create that tap; the guest's network still
# works afterwards.
#
# Metrics: time_to_init_ms, net_ping_avg_ms (test host to guest), net_fetch_512kib_ms
# (the test host's wget of the guest's file), vmm_rss_kib.

# shellcheck source=../virtio-lib.sh
. /testhost/virtio-lib.sh

MAC=52:54:00:12:34:56
net_tap_up
wb_start net --kernel "$GUEST_DIR/vmlinux" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
    --cpus 1 --memory 256M --cmdline "$(guest_cmdline net) $(net_guest_cmdline)" \
    --net "tap=$TAP,mac=$MAC" --serial stdio
expect_guest_init
expect_guest_net_checks "$MAC" 'LNRO0005:[0-9A-Fa-f]+'
wb_expect 'WB-CONSOLE-READY' 60

# refused_tap TAP WHAT: `waterbear run` (the built-in guest, which would stop by
# itself after one tick) with --net tap=TAP must exit 1 before the VM starts.
refused_tap() {
    local status=0
    timeout 60 "$WB_BIN" run --id "bad-$1" --memory 16M --cmdline "ticks=1" --serial stdio \
        --net "tap=$1" </dev/null >/tmp/bad-tap.out 2>&1 || status=$?
    sed 's/^/bad-tap| /' /tmp/bad-tap.out
    [ "$status" = 1 ] || fail "waterbear run with $2 --net tap=$1 exited with status $status, expected 1 (refused)"
    grep -q "$1" /tmp/bad-tap.out || fail "waterbear's error for $2 tap $1 does not name it: $(tr '\n' ' ' </tmp/bad-tap.out)"
    ! grep -q '^tick ' /tmp/bad-tap.out || fail "the VM with $2 tap $1 started"
    note "$2 tap $1 refused: $(grep -m1 'error' /tmp/bad-tap.out || head -n 1 /tmp/bad-tap.out)"
}
refused_tap "$TAP" "the busy"
refused_tap wbtap-missing "a missing"
! ip link show wbtap-missing >/dev/null 2>&1 || fail "waterbear created the tap wbtap-missing it was asked to open"
host_ping 3 1 /tmp/ping-after.out
[ "$PING_RECEIVED" = 3 ] || fail "after the refused starts the test host got $PING_RECEIVED of 3 ping replies from the guest"
wb_send 'reboot -f'
wb_wait_exit 60
[ "$WB_STATUS" = 0 ] || fail "waterbear exited with status $WB_STATUS after the guest rebooted"
metric_vmm_rss
kill "$HTTPD_PID" 2>/dev/null || true
