# shellcheck shell=busybox
# live-update: 20 live updates in a row (`ctl update`, waterbear re-executes itself
# and keeps the guest) leave a Linux guest healthy.
#
# Phase 1, workload: the guest (2 vCPUs, 256 MiB memfd) ticks and checks its
# memory. Every update must exit 0 with outcome `updated`, the next generation and
# the same process id. Afterwards: the WB-TICK counter went on by exactly 1 per line
# with one boot_id, no gap between ticks beyond what the tick period, the update
# times and a slack for the emulated test host explain (the largest is printed), a
# later WB-CSUM is ok, and `ctl shutdown` ends waterbear with 0.
#
# Phase 2, console: the workload mode runs no shell (resources/guest/init runs
# wb-workload in the foreground), so console input is checked with the console-mode
# guest: a command typed after 5 updates runs, so does one typed while a sixth update
# is under way, and typed `reboot -f` ends the updated waterbear with 0.
#
# Metrics: live_update_blackout_ms per update (ctl's blackout_ms), then
# live_update_blackout_ms_median and _max, live_update_ctl_ms_median and _max (the
# whole `ctl update` command), live_update_max_tick_gap_ms and
# live_update_max_uptime_gap_ms.

UPDATES=20
CONSOLE_UPDATES=5
VMM_LOG=/run/live-update-vmm.log
WB_API=/run/live-update.sock

show_vmm_log() {
    note "waterbear's log ($VMM_LOG):"
    sed 's/^/log| /' "$VMM_LOG" 2>/dev/null || true
}

# update_once I: one `ctl update`, checked; appends its window to $WB_DIR/windows and
# its blackout to $WB_DIR/blackouts.
update_once() {
    local gen blackout
    wb_ctl update
    if [ "$WB_CTL_STATUS" != 0 ]; then
        show_vmm_log
        if ! proc_alive "$WB_PID"; then
            wb_reap
            note "waterbear (pid $WB_PID) has exited with status $WB_STATUS"
        fi
        fail "update $1: ctl update exited with status $WB_CTL_STATUS (outcome '$(ctl_json outcome)', error: $(ctl_json error))"
    fi
    [ "$(ctl_json outcome)" = updated ] || fail "update $1: outcome '$(ctl_json outcome)', error: $(ctl_json error)"
    gen=$(ctl_json generation)
    [ "$gen" = "$1" ] || fail "update $1: reported generation $gen"
    proc_alive "$WB_PID" || fail "update $1: waterbear (pid $WB_PID) is gone"
    blackout=$(ctl_json blackout_ms)
    echo "WB-METRIC live_update_blackout_ms=$blackout"
    note "update $1: ctl update took $WB_CTL_MS ms"
    echo "$WB_CTL_T0_US $WB_CTL_T1_US" >>"$WB_DIR/windows"
    echo "$blackout" >>"$WB_DIR/blackouts"
    echo "$WB_CTL_MS" >>"$WB_DIR/ctl-ms"
}

# check_info GEN: GET /vm answers from the same process, running, at generation GEN.
check_info() {
    wb_ctl info
    [ "$WB_CTL_STATUS" = 0 ] || fail "ctl info exited with status $WB_CTL_STATUS after the updates"
    [ "$(ctl_json pid)" = "$WB_PID" ] || fail "after the updates the API answers from pid $(ctl_json pid), not $WB_PID"
    [ "$(ctl_json generation)" = "$1" ] || fail "after the updates generation is $(ctl_json generation), expected $1"
    [ "$(ctl_json state)" = running ] || fail "after the updates the VM is $(ctl_json state)"
}

# Phase 1: the workload through UPDATES live updates.
wb_start_cmd live-update run --kernel "$GUEST_DIR/vmlinux" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
    --cpus 2 --memory 256M --api-socket "$WB_API" \
    --cmdline "$(guest_cmdline workload) wb.verify_every=4" --serial stdio \
    --log-level info --log-file "$VMM_LOG"
expect_guest_init
wb_expect 'WB-CSUM ok' 120
wb_expect 'WB-TICK n=6 ' 60
metric_vmm_rss
: >"$WB_DIR/windows"
: >"$WB_DIR/blackouts"
: >"$WB_DIR/ctl-ms"

i=1
while [ "$i" -le "$UPDATES" ]; do
    update_once "$i"
    i=$((i + 1))
done
end_us=$WB_CTL_T1_US
# shellcheck disable=SC2046 # two fields
set -- $(median_max <"$WB_DIR/blackouts")
echo "WB-METRIC live_update_blackout_ms_median=$1"
echo "WB-METRIC live_update_blackout_ms_max=$2"
# shellcheck disable=SC2046 # two fields
set -- $(median_max <"$WB_DIR/ctl-ms")
echo "WB-METRIC live_update_ctl_ms_median=$1"
echo "WB-METRIC live_update_ctl_ms_max=$2"
check_info "$UPDATES"
note "waterbear's log of the last update:"
awk '/ paused in / { buf = "" } { buf = buf "log| " $0 "\n" } END { printf "%s", buf }' "$VMM_LOG"

# The guest goes on: ticks and a memory check after the last update.
wb_expect_after "$end_us" 'WB-TICK n=' 60
last_n=$(echo "$WB_LINE" | sed -n 's/.*WB-TICK n=\([0-9]*\) .*/\1/p')
wb_expect_after "$end_us" 'WB-CSUM ok' 60
wb_expect "WB-TICK n=$((last_n + 4)) " 60
metric_vmm_rss

check_ticks "$WB_DIR/log" "$WB_DIR/windows"
check_guest_memory "$WB_DIR/log"
note "$TICKS ticks n=$TICK_FIRST_N..$TICK_LAST_N, one boot_id $TICK_BOOT_ID, $CSUM_OKS WB-CSUM ok"
echo "WB-METRIC live_update_max_tick_gap_ms=$TICK_MAX_GAP_MS"
note "largest gap between ticks: $TICK_MAX_GAP_MS ms, before n=$TICK_MAX_GAP_AT"
echo "WB-METRIC live_update_max_uptime_gap_ms=$TICK_MAX_UPTIME_GAP_MS"
grep -q 'guest blackout' "$VMM_LOG" || {
    show_vmm_log
    fail "waterbear's log has no 'guest blackout' line for the updates"
}

wb_ctl shutdown
[ "$WB_CTL_STATUS" = 0 ] || fail "ctl shutdown exited with status $WB_CTL_STATUS after the updates"
wb_wait_exit 60
[ "$WB_STATUS" = 0 ] || fail "waterbear exited with status $WB_STATUS after ctl shutdown (after $UPDATES updates)"

# Phase 2: console input across live updates.
WB_API=/run/live-update-console.sock
wb_start_cmd live-update-console run --kernel "$GUEST_DIR/vmlinux" \
    --initrd "$GUEST_DIR/initramfs.cpio.gz" --cpus 1 --memory 256M --api-socket "$WB_API" \
    --cmdline "$(guest_cmdline console)" --serial stdio --log-level info --log-file "$VMM_LOG"
wb_expect 'WB-INIT' "$BOOT_TIMEOUT_S"
wb_expect 'WB-CONSOLE-READY' 120
# shellcheck disable=SC2016 # the guest expands these
wb_send 'echo before-$((6*7))'
wb_expect 'before-42' 60
: >"$WB_DIR/windows"
: >"$WB_DIR/blackouts"
: >"$WB_DIR/ctl-ms"
i=1
while [ "$i" -le "$CONSOLE_UPDATES" ]; do
    update_once "$i"
    i=$((i + 1))
done
# shellcheck disable=SC2016
wb_send 'echo after-$((6*7))'
wb_expect 'after-42' 60

# Typed while an update is under way: ctl first asks GET /vm, then starts the update,
# so the line lands around the pause; it must not be lost either way.
"$WB_BIN" ctl --api-socket "$WB_API" update >"$WB_DIR/during.out" 2>&1 &
ctl_pid=$!
usleep 50000
# shellcheck disable=SC2016
wb_send 'echo during-$((6*7))'
status=0
wait "$ctl_pid" || status=$?
sed 's/^/ctl| /' "$WB_DIR/during.out"
[ "$status" = 0 ] || fail "update $i (typed into during it): ctl update exited with status $status"
wb_expect 'during-42' 60
check_info "$i"
[ "$(grep -c 'WB-INIT' "$WB_DIR/log" || true)" = 1 ] || fail "the console guest booted again during the updates"

wb_send 'reboot -f'
wb_wait_exit 60
[ "$WB_STATUS" = 0 ] || fail "the updated waterbear exited with status $WB_STATUS after the guest rebooted"
