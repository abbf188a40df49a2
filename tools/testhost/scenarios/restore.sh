# shellcheck shell=busybox
# restore: a Linux guest moves to a new waterbear process and carries on where it
# stopped, twice in a row (the restored VM is snapshotted and restored again).
#
# Phase 1, workload: the guest (2 vCPUs, 256 MiB on a tmpfs memory file) ticks and
# checks its memory. Each generation: `ctl snapshot DIR --keep-paused`, check that
# the guest prints nothing while paused, `ctl shutdown` (exit 0), `waterbear restore
# --from DIR` in a new process. Then the first WB-TICK is the last one before the
# snapshot + 1 with the same boot_id, uptime did not go back, a later WB-CSUM is ok.
#
# Phase 2, console: the workload mode runs no shell (resources/guest/init runs
# wb-workload in the foreground and nothing reads the console), so console input
# after a restore is checked with the console-mode guest: a command typed after the
# restore runs, and typed `reboot -f` ends the restored waterbear with 0.
#
# Metrics: snapshot_blackout_ms (ctl's blackout_ms), restore_to_first_tick_ms (the
# restore process's start to the first WB-TICK it passed on; includes the rest of
# the guest's 0.5 s tick sleep), restore_vmm_ms (waterbear's own "restored ... in"
# figure from its log), restore_uptime_gap_ms (uptime difference between the last
# tick before and the first after, as the guest saw it).

GENERATIONS=2
MEM=/dev/shm/restore-guest.mem
SNAPS=/run/restore-snaps
VMM_LOG=/run/restore-vmm.log
JOINED=$WB_RUNS/restore-joined.log
WINDOWS=$WB_RUNS/restore-windows
WB_MEMORY_FILE=$MEM
WB_API=/run/restore.sock
RUN_DIRS=""

show_vmm_log() {
    note "waterbear's log ($VMM_LOG):"
    sed 's/^/log| /' "$VMM_LOG" 2>/dev/null || true
}

# snapshot_and_stop GEN: snapshots the running VM into $SNAPS/genGEN, keeping it
# paused, checks that it stays quiet, and shuts that waterbear down.
snapshot_and_stop() {
    local snap=$SNAPS/gen$1 count
    wb_ctl snapshot "$snap" --keep-paused
    SNAP_T0_US=$WB_CTL_T0_US
    [ "$WB_CTL_STATUS" = 0 ] || fail "generation $1: ctl snapshot exited with status $WB_CTL_STATUS"
    [ "$(ctl_json paused)" = true ] || fail "generation $1: snapshot --keep-paused answered paused=$(ctl_json paused)"
    [ "$(ctl_json restorable)" = true ] ||
        fail "generation $1: snapshot answered restorable=$(ctl_json restorable)"
    echo "WB-METRIC snapshot_blackout_ms=$(ctl_json blackout_ms)"
    note "generation $1: ctl snapshot took $WB_CTL_MS ms"
    [ -s "$snap/vm.state" ] && [ -s "$snap/vm.json" ] || fail "generation $1: $snap lacks vm.state or vm.json"
    [ -f "$MEM.waterbear-saved" ] || fail "generation $1: no marker $MEM.waterbear-saved after the snapshot"

    # Paused: after what was in flight, no new tick for three tick periods.
    usleep 300000
    count=$(wb_count 'WB-TICK')
    usleep $((3 * TICK_PERIOD_MS * 1000))
    [ "$(wb_count 'WB-TICK')" = "$count" ] ||
        fail "generation $1: the guest printed WB-TICK lines while paused by snapshot --keep-paused"

    wb_ctl shutdown
    [ "$WB_CTL_STATUS" = 0 ] || fail "generation $1: ctl shutdown exited with status $WB_CTL_STATUS"
    wb_wait_exit 60
    [ "$WB_STATUS" = 0 ] || fail "generation $1: waterbear exited with status $WB_STATUS after ctl shutdown"
    [ -f "$MEM.waterbear-saved" ] || fail "generation $1: the marker went away with the shutdown"
    [ -f "$MEM" ] || fail "generation $1: the memory file $MEM went away with the shutdown"
}

# restore_and_check GEN: restores $SNAPS/genGEN in a new process and checks the guest
# carried on from the last tick of the previous process.
restore_and_check() {
    local snap=$SNAPS/gen$1 last first last_n last_id last_up n id up ms
    # The last tick the previous processes passed on (a line cut short at the end
    # is joined with the new process's output below, so it is not the last yet).
    # shellcheck disable=SC2086 # a list of directories
    wb_join_logs "$JOINED" $RUN_DIRS
    last=$(ticks_of "$JOINED" | grep -v '^0 ' | tail -n 1)
    [ -n "$last" ] || fail "generation $1: no WB-TICK before the snapshot"
    # shellcheck disable=SC2086 # fields
    set -- "$1" $last
    last_n=$3 last_id=$4 last_up=$5

    wb_start_cmd "restore-$1" restore --from "$snap" --serial stdio \
        --log-level info --log-file "$VMM_LOG"
    RUN_DIRS="$RUN_DIRS $WB_DIR"
    wb_expect 'WB-TICK ' 120
    ms=$(ms_between "$WB_T0_US" "$WB_LINE_US")
    echo "WB-METRIC restore_to_first_tick_ms=$ms"
    # From the snapshot to this tick the guest is not expected to tick.
    echo "$SNAP_T0_US $WB_LINE_US" >>"$WINDOWS"
    wb_expect 'WB-CSUM ok' 60
    wb_expect "WB-TICK n=$((last_n + 5)) " 60
    [ ! -e "$MEM.waterbear-saved" ] || fail "generation $1: the marker is still there after the restored guest ran"

    # shellcheck disable=SC2086 # a list of directories
    wb_join_logs "$JOINED" $RUN_DIRS
    first=$(ticks_of "$JOINED" | awk -v t="$WB_T0_US" '$1 + 0 >= t + 0 { print; exit }')
    # shellcheck disable=SC2086 # fields
    set -- "$1" $first
    n=$3 id=$4 up=$5
    note "generation $1: last tick before: n=$last_n uptime=$last_up; first after: n=$n uptime=$up"
    [ "$n" = $((last_n + 1)) ] || fail "generation $1: first tick after the restore is n=$n, expected n=$((last_n + 1))"
    [ "$id" = "$last_id" ] || fail "generation $1: boot_id changed from $last_id to $id: the guest rebooted"
    awk -v a="$last_up" -v b="$up" 'BEGIN { exit !(b + 0 >= a + 0) }' ||
        fail "generation $1: guest uptime went back from $last_up to $up"
    echo "WB-METRIC restore_uptime_gap_ms=$(awk -v a="$last_up" -v b="$up" 'BEGIN { printf "%.0f", (b - a) * 1000 }')"
    ms=$(sed -n 's/.* restored from .* in \([0-9.]*\) ms.*/\1/p' "$VMM_LOG" | tail -n 1)
    [ -n "$ms" ] || {
        show_vmm_log
        fail "generation $1: waterbear's log has no 'restored from ... in N ms' line"
    }
    echo "WB-METRIC restore_vmm_ms=$ms"

    check_ticks "$JOINED" "$WINDOWS"
    check_guest_memory "$JOINED"
    note "generation $1: $TICKS ticks n=$TICK_FIRST_N..$TICK_LAST_N, one boot_id, $CSUM_OKS WB-CSUM ok;" \
        "largest gap $TICK_MAX_GAP_MS ms (before n=$TICK_MAX_GAP_AT), by uptime $TICK_MAX_UPTIME_GAP_MS ms"
}

# Phase 1: the workload through GENERATIONS snapshot/restore cycles.
mkdir -p "$SNAPS" "$WB_RUNS"
: >"$WINDOWS"
wb_start_cmd restore-0 run --kernel "$GUEST_DIR/vmlinux" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
    --cpus 2 --memory 256M --memory-file "$MEM" --api-socket "$WB_API" \
    --cmdline "$(guest_cmdline workload) wb.verify_every=4" --serial stdio \
    --log-level info --log-file "$VMM_LOG"
RUN_DIRS=$WB_DIR
expect_guest_init
wb_expect 'WB-CSUM ok' 120
wb_expect 'WB-TICK n=6 ' 60
metric_vmm_rss

gen=1
while [ "$gen" -le "$GENERATIONS" ]; do
    snapshot_and_stop "$gen"
    restore_and_check "$gen"
    gen=$((gen + 1))
done
metric_vmm_rss

wb_ctl shutdown
[ "$WB_CTL_STATUS" = 0 ] || fail "ctl shutdown of the restored VM exited with status $WB_CTL_STATUS"
wb_wait_exit 60
[ "$WB_STATUS" = 0 ] || fail "the restored waterbear exited with status $WB_STATUS after ctl shutdown"
rm -f "$MEM"

# Phase 2: console input after a restore.
MEM=/dev/shm/restore-console.mem
# shellcheck disable=SC2034 # read by sample_rss
WB_MEMORY_FILE=$MEM
WB_API=/run/restore-console.sock
wb_start_cmd restore-console-0 run --kernel "$GUEST_DIR/vmlinux" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
    --cpus 1 --memory 256M --memory-file "$MEM" --api-socket "$WB_API" \
    --cmdline "$(guest_cmdline console)" --serial stdio --log-level info --log-file "$VMM_LOG"
wb_expect 'WB-INIT' "$BOOT_TIMEOUT_S"
wb_expect 'WB-CONSOLE-READY' 120
# shellcheck disable=SC2016 # the guest expands it
wb_send 'echo before-$((6*7))'
wb_expect 'before-42' 60

snapshot_and_stop console
wb_start_cmd restore-console-1 restore --from "$SNAPS/genconsole" --serial stdio \
    --log-level info --log-file "$VMM_LOG"
# shellcheck disable=SC2016 # the guest expands it
wb_send 'echo restored-$((6*7))'
wb_expect 'restored-42' 60
[ "$(grep -c 'WB-INIT' "$WB_DIR/log" || true)" = 0 ] || fail "the restored console guest booted again"
wb_send 'reboot -f'
wb_wait_exit 60
[ "$WB_STATUS" = 0 ] || fail "the restored waterbear exited with status $WB_STATUS after the guest rebooted"
rm -f "$MEM"
