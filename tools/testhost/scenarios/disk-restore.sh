# shellcheck shell=busybox
# disk-restore: a guest writing to its virtio-blk disk survives a snapshot and restore
# in a new process, a live update and a host reset, and every write it saw
# acknowledged is on the disk.
#
# The guest (project kernel, 1 vCPU, 256 MiB) runs the disk writer
# (resources/guest/README.md, mode disk-writer): numbered 64-byte records appended to
# /records on its ext4 data disk, each followed by fsync and only then a
# `WB-DISK-ACK n` line. Its memory file, state directory, console and the disk image
# all live on the DAX state root on /dev/pmem0, as in host-reset, so they outlive the
# kexec.
#
# Phase 1: once the acks run, (a) `ctl snapshot --keep-paused` (no ack while paused),
# `ctl shutdown`, and a copy of the disk image as the stopped VMM left it must, after
# its journal is replayed, check clean with every acknowledged record; then `waterbear
# restore --from` in a new process; (b) `ctl update`; (c) `host reset`, which kexecs the
# test host. After each the acks must go on past the last one seen.
# Phase 2 (after the kexec): before anything runs, a copy of the image as the kexec
# left it is checked the same way (what the guest had flushed survived the reset); then
# `host restore-all` brings the writer back and its acks go on. At the end the VMM is
# killed (SIGKILL) mid-write, like a power cut: the image's journal is replayed,
# e2fsck -fn is clean and every acknowledged record is there. Throughout, the acks on
# the console count up by one from 1 with a single boot.
#
# Metrics: disk_ack_gap_ms_<event> (the last ack before each event to the first after,
# as the test host saw them arrive), disk_acks_total, the host reset figures of
# reset-lib (restore_latency_ms_writer, ...), scenario_wall_s.

# shellcheck source=../virtio-lib.sh
. /testhost/virtio-lib.sh

# shellcheck source=../reset-lib.sh
. /testhost/reset-lib.sh

VM=writer
DISK=$RL_MNT/disks/$VM.img
SNAP=$RL_MNT/snaps/$VM
# Short, so that requests are often in flight when the VM is paused.
INTERVAL_MS=100
# shellcheck disable=SC2034 # read by wb_ctl
WB_API=$RL_ROOT/$VM/api.sock
# wb_ctl keeps ctl's stderr in WB_DIR.
WB_DIR=$WB_RUNS/disk-restore
mkdir -p "$WB_DIR"

# console_lines: the whole lines of the writer's console (a last line still being
# written is left out), without the serial port's \r.
console_lines() {
    local console lines
    console=$(rl_console "$VM")
    lines=$(wc -l <"$console")
    head -n "$lines" "$console" | tr -d '\r'
}

# last_ack: the last acknowledged record on the console (0 before the first).
last_ack() {
    local n
    n=$(console_lines | sed -n -E 's/^WB-DISK-ACK ([0-9]+)$/\1/p' | tail -n 1)
    echo "${n:-0}"
}

# check_console: one boot, the writer started once, no error, and the acks count up by
# exactly one from 1. Sets ACKS (the last).
check_console() {
    local result bad
    console_lines >/tmp/writer-console.txt
    bad=$(grep -E '^WB-(ERROR|DISK-ERROR|DISK-WRITER-EXIT)' /tmp/writer-console.txt | head -n 1 || true)
    [ -z "$bad" ] || rl_fail "the guest reported: $bad"
    [ "$(grep -c '^WB-INIT ' /tmp/writer-console.txt || true)" = 1 ] || rl_fail "the guest booted more than once"
    [ "$(grep -c '^WB-DISK-WRITER ' /tmp/writer-console.txt || true)" = 1 ] || rl_fail "the disk writer started more than once"
    result=$(grep 'WB-DISK-ACK' /tmp/writer-console.txt | awk '
        $0 !~ /^WB-DISK-ACK [0-9]+$/ { print "ERR malformed ack line: " $0; exit }
        { if ($2 + 0 != last + 1) { print "ERR ack " last " was followed by ack " $2; exit } last = $2 + 0 }
        END { print "OK " last + 0 }' | head -n 1)
    case $result in
    OK*) ACKS=${result#OK } ;;
    *) rl_fail "acks on the console: ${result#ERR }" ;;
    esac
}

# wait_ack_beyond N TIMEOUT_S WHAT: waits until an ack past N is on the console.
# Sets ACK (the last ack then).
wait_ack_beyond() {
    local deadline pid
    deadline=$(($(rl_now_us) + $2 * 1000000))
    pid=$(rl_pid "$VM")
    while :; do
        ACK=$(last_ack)
        [ "$ACK" -le "$1" ] || return 0
        console_lines | grep -q -E '^WB-(ERROR|DISK-ERROR)' &&
            rl_fail "$3: the guest reported: $(console_lines | grep -E '^WB-(ERROR|DISK-ERROR)' | head -n 1)"
        if [ -n "$pid" ] && ! proc_alive "$pid"; then
            usleep 500000
            ACK=$(last_ack)
            [ "$ACK" -le "$1" ] || return 0
            rl_fail "$3: the VMM (pid $pid) exited with no ack past $1"
        fi
        [ "$(rl_now_us)" -lt "$deadline" ] || rl_fail "$3: no ack past $1 within $2 s"
        usleep 250000
    done
}

# ack_us N: when ack N arrived (the readers' timestamps, this phase or the last).
ack_us() {
    cat "$RL_TEST/$VM".ts.* 2>/dev/null | grep -E "^[0-9]+ WB-DISK-ACK $1\$" | head -n 1 | cut -d' ' -f1
}

# metric_ack_gap EVENT BEFORE: the time from ack BEFORE to ack BEFORE+1. The console
# reader polls, so it may take a moment to timestamp ack BEFORE+1.
metric_ack_gap() {
    local t0 t1 left=30
    t0=$(ack_us "$2")
    t1=$(ack_us $(($2 + 1)))
    while [ -z "$t1" ] && [ "$left" -gt 0 ]; do
        usleep 100000
        left=$((left - 1))
        t1=$(ack_us $(($2 + 1)))
    done
    if [ -n "$t0" ] && [ -n "$t1" ]; then
        echo "WB-METRIC disk_ack_gap_ms_$1=$(((t1 - t0) / 1000))"
    else
        note "$1: no timestamps for acks $2 and $(($2 + 1)): no gap figure"
    fi
}

# wait_vmm_exit TIMEOUT_S WHAT: waits for the writer's VMM to exit.
wait_vmm_exit() {
    local pid left=$(($1 * 5))
    pid=$(rl_pid "$VM")
    while proc_alive "$pid"; do
        [ "$left" -gt 0 ] || rl_fail "$2: the VMM (pid $pid) is still running $1 s later"
        left=$((left - 1))
        usleep 200000
    done
}

rl_begin
case $RL_PHASE in
1)
    mkdir -p "$(dirname "$DISK")" "$(dirname "$SNAP")"
    disk_image "$DISK" 64
    rl_start_vm "$VM" --kernel "$GUEST_DIR/vmlinux" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
        --cpus 1 --memory 256M --cmdline "$(guest_cmdline disk-writer) wb.interval_ms=$INTERVAL_MS" \
        --disk "path=$DISK,id=data"
    rl_wait "$VM" '^WB-INIT' "$BOOT_TIMEOUT_S"
    rl_wait "$VM" '^WB-DISK-WRITER ' 180
    wait_ack_beyond 5 120 "after boot"

    # (a) snapshot, stop, restore in a new process.
    wb_ctl snapshot "$SNAP" --keep-paused
    [ "$WB_CTL_STATUS" = 0 ] || rl_fail "ctl snapshot exited with status $WB_CTL_STATUS"
    [ "$(ctl_json restorable)" = true ] || rl_fail "the snapshot is not restorable: $(ctl_json restorable)"
    before=$(last_ack)
    usleep 1500000
    [ "$(last_ack)" = "$before" ] || rl_fail "acks went on while the VM was paused by the snapshot ($before, then $(last_ack))"
    wb_ctl shutdown
    [ "$WB_CTL_STATUS" = 0 ] || rl_fail "ctl shutdown after the snapshot exited with status $WB_CTL_STATUS"
    wait_vmm_exit 60 "after the snapshot"
    status=0
    wait "$(rl_pid "$VM")" || status=$?
    [ "$status" = 0 ] || rl_fail "waterbear exited with status $status after ctl shutdown"
    before=$(last_ack)
    note "snapshot taken and VMM stopped at ack $before"
    disk_crash_check "$DISK" "$before" "after the snapshot and shutdown"
    note "waterbear restore --from $SNAP"
    "$WB_BIN" restore --from "$SNAP" --serial "file=$(rl_console "$VM")" --log-level info \
        --log-file "$RL_TEST/$VM-restore.log" </dev/null >>"$RL_TEST/$VM-restore.out" 2>&1 &
    rl_set_pid "$VM" $!
    wait_ack_beyond "$before" 120 "after the restore in a new process"
    metric_ack_gap snapshot_restore "$before"
    note "acks go on after the restore: $ACK"

    # (b) live update.
    before=$(last_ack)
    wb_ctl update
    [ "$WB_CTL_STATUS" = 0 ] && [ "$(ctl_json outcome)" = updated ] ||
        rl_fail "ctl update exited with status $WB_CTL_STATUS, outcome '$(ctl_json outcome)', error: $(ctl_json error)"
    echo "WB-METRIC disk_live_update_blackout_ms=$(ctl_json blackout_ms)"
    wait_ack_beyond "$(last_ack)" 120 "after the live update"
    wait_ack_beyond $((ACK + 3)) 60 "after the live update"
    check_console
    note "acks go on after the live update: $ACK"

    # (c) host reset.
    rl_status
    rl_expect_status running "$VM"
    rl_host_reset_cmd reset
    ;;
2)
    rl_status
    rl_expect_status saved "$VM"
    check_console
    before=$ACKS
    note "last ack before the host reset: $before"
    disk_crash_check "$DISK" "$before" "after the host reset, before the restore"
    rl_start_reader "$VM"
    RL_VMS="$RL_VMS $VM"
    rl_restore_all "$VM" ""
    wait_ack_beyond "$before" 120 "after restore-all"
    metric_ack_gap host_reset "$before"
    wait_ack_beyond $((ACK + 5)) 60 "after restore-all"
    check_console
    rl_check_api "$VM"

    # The end: kill the VMM under the running writer (SIGKILL: nothing in it gets to
    # flush or tidy up), like a power cut for the guest.
    kill -KILL "$(rl_pid "$VM")" || rl_fail "cannot kill the VMM (pid $(rl_pid "$VM"))"
    wait_vmm_exit 60 "after SIGKILL"
    rl_stop_readers
    check_console
    echo "WB-METRIC disk_acks_total=$ACKS"
    disk_crash_check "$DISK" "$ACKS" "at the end"
    rl_finish
    ;;
*) fail "disk-restore has no phase $RL_PHASE" ;;
esac
