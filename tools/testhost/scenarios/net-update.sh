# shellcheck shell=busybox
# net-update: a ping from the test host to the guest runs across a live update and
# loses at most a few packets.
#
# The guest is the net one (tap wbtap0, project kernel, 10.0.2.2/24, its checks as in
# the net scenario). Then UPDATES times: the test host pings the guest every 0.2 s,
# PINGS packets in all, and about 4 s in `ctl update` re-executes waterbear; the update
# must say `updated` with the next generation and the same pid, and the ping must lose
# at most MAX_LOST packets. Afterwards the guest still serves its file intact over TCP,
# pings the test host itself (typed on its console), and typed `reboot -f` ends the
# updated waterbear with 0.
#
# Metrics per update: net_update_blackout_ms (ctl's blackout_ms), net_update_ping_sent,
# net_update_ping_lost; then net_update_ping_lost_max.

# shellcheck source=../virtio-lib.sh
. /testhost/virtio-lib.sh

UPDATES=3
PINGS=60
MAX_LOST=5
VMM_LOG=/run/net-update-vmm.log
WB_API=/run/net-update.sock

net_tap_up
wb_start_cmd net-update run --kernel "$GUEST_DIR/vmlinux" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
    --cpus 1 --memory 256M --cmdline "$(guest_cmdline net) $(net_guest_cmdline)" \
    --net "tap=$TAP" --api-socket "$WB_API" --serial stdio --log-level info --log-file "$VMM_LOG"
expect_guest_init
expect_guest_net_checks "" 'LNRO0005:[0-9A-Fa-f]+'
wb_expect 'WB-CONSOLE-READY' 60
metric_vmm_rss

lost_max=0
u=1
while [ "$u" -le "$UPDATES" ]; do
    out=/tmp/ping-update-$u.out
    ping -c "$PINGS" -i 0.2 -w $((PINGS + 30)) "$GUEST_IP" >"$out" 2>&1 &
    ping_pid=$!
    sleep 4
    wb_ctl update
    if [ "$WB_CTL_STATUS" != 0 ] || [ "$(ctl_json outcome)" != updated ]; then
        sed 's/^/log| /' "$VMM_LOG" 2>/dev/null | tail -n 40
        fail "update $u: ctl update exited with status $WB_CTL_STATUS, outcome '$(ctl_json outcome)', error: $(ctl_json error)"
    fi
    [ "$(ctl_json generation)" = "$u" ] || fail "update $u: reported generation $(ctl_json generation)"
    proc_alive "$WB_PID" || fail "update $u: waterbear (pid $WB_PID) is gone"
    blackout=$(ctl_json blackout_ms)
    wait "$ping_pid" || true
    ping_stats "$out"
    lost=$((PING_SENT - PING_RECEIVED))
    echo "WB-METRIC net_update_blackout_ms=$blackout"
    echo "WB-METRIC net_update_ping_sent=$PING_SENT"
    echo "WB-METRIC net_update_ping_lost=$lost"
    note "update $u: blackout $blackout ms (ctl took $WB_CTL_MS ms); ping: $PING_SENT sent, $PING_RECEIVED received," \
        "no reply to seq ${PING_LOST_SEQS:-none}"
    tail -n 3 "$out" | sed 's/^/ping| /'
    [ "$PING_SENT" -ge 50 ] || fail "update $u: the ping sent only $PING_SENT packets"
    [ "$lost" -le "$MAX_LOST" ] ||
        fail "update $u: the ping across the live update lost $lost of $PING_SENT packets (at most $MAX_LOST allowed; no reply to seq $PING_LOST_SEQS)"
    [ "$lost" -le "$lost_max" ] || lost_max=$lost
    u=$((u + 1))
done
echo "WB-METRIC net_update_ping_lost_max=$lost_max"

# The guest's network still works both ways after the updates.
host_fetch_g2h "after $UPDATES live updates"
wb_send "ping -c 3 -w 30 $HOST_IP >/dev/null && echo pinged-host-\$((6*7))"
wb_expect 'pinged-host-42' 60
[ "$(grep -c 'WB-INIT' "$WB_DIR/log" || true)" = 1 ] || fail "the guest booted again during the updates"

wb_send 'reboot -f'
wb_wait_exit 60
[ "$WB_STATUS" = 0 ] || fail "the updated waterbear exited with status $WB_STATUS after the guest rebooted"
kill "$HTTPD_PID" 2>/dev/null || true
