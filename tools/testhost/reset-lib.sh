# shellcheck shell=busybox disable=SC3028,SC2034 # busybox ash has $EPOCHREALTIME
# Helpers for the host reset scenarios (host-reset, host-reset-soak, recover), which
# reset the test host under running guests: sourced by those scenarios after
# scenario-lib.sh.
#
# A scenario here runs across several boots of the test host. Phase 1 is the boot
# QEMU started; `waterbear host reset` (or `host recover`) kexecs the test host into
# itself with `wb.phase=N+1` added to the command line, and /init runs the same
# scenario again, which finds its phase in RL_PHASE and carries on. Whatever must
# outlive a kexec lives on the pmem state root (RL_MNT): the guests' memory files,
# their state directories (vm.state, console), and the scenario's own records in
# RL_TEST. `wb.run=<uuid>` on the command line names the run: a later phase checks
# that the state root it finds is the one phase 1 made (the pmem was not formatted).
#
# Guests run with `--serial file=<state dir>/console`, so the console before and after
# each reset is one file. A reader per guest (rl_reader) timestamps every line of it
# as it arrives into RL_TEST/<id>.ts.<phase> ("<microseconds> <line>", wall clock);
# the clock of every boot is set to the RTC's second edge first (rl_sync_clock), so
# times compare across a kexec. What a guest printed is checked from the console file
# itself; the timestamps only give the blackout.
#
# Failures: rl_fail prints the VMMs' logs and the consoles' ends, then `fail`s.
# rl_problem records a problem that does not stop the scenario (it still fails, at
# rl_finish, naming every problem).

RL_MNT=/var/lib/waterbear
RL_ROOT=$RL_MNT/vms
RL_MEM=$RL_MNT/mem
RL_TEST=$RL_MNT/test
RL_DEVICE=/dev/pmem0
RL_KERNEL=/boot/vmlinuz
RL_KEXEC_INITRD=/tmp/kexec-initrd.img
RL_READER_POLL_US=100000
RL_VMS=""

# --- the phase, the clock, the state root -----------------------------------------

# rl_cmdline_value KEY: the value of KEY=VALUE on the kernel command line.
rl_cmdline_value() {
    local arg
    # shellcheck disable=SC2013 # words of the command line
    for arg in $(cat /proc/cmdline); do
        case $arg in
        "$1"=*) echo "${arg#*=}" ;;
        esac
    done
}

rl_now_us() {
    local t=$EPOCHREALTIME
    echo "${t%.*}${t#*.}"
}

# rl_sync_clock: sets the wall clock to the RTC at its second edge. The kernel set it
# from the RTC at boot to within half a second; the blackouts measured across a kexec
# compare times of two boots, so both are aligned to the RTC's edge.
rl_sync_clock() {
    local rtc=/sys/class/rtc/rtc0/since_epoch first now t left=400000
    if [ ! -r "$rtc" ]; then
        note "no $rtc: the wall clock stays as the kernel set it (to within 0.5 s)"
        return 0
    fi
    read -r first <"$rtc"
    now=$first
    while [ "$now" = "$first" ] && [ "$left" -gt 0 ]; do
        read -r now <"$rtc"
        left=$((left - 1))
    done
    t=$EPOCHREALTIME
    [ "$now" != "$first" ] || {
        note "the RTC did not tick: the wall clock stays as the kernel set it"
        return 0
    }
    date -u -s "@$now" >/dev/null || {
        note "date -s failed: the wall clock stays as the kernel set it"
        return 0
    }
    note "wall clock set to the RTC's second edge; the kernel's clock was" \
        "$(awk -v a="$now" -v b="$t" 'BEGIN { printf "%+.0f", (b - a) * 1000 }') ms off it"
}

# rl_fs_id: the ext4 magic and UUID of the pmem device's superblock, or "none".
rl_fs_id() {
    local magic
    magic=$(dd if="$RL_DEVICE" bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')
    if [ "$magic" = 53ef ]; then
        echo "ext4-$(dd if="$RL_DEVICE" bs=1 skip=1128 count=16 2>/dev/null | od -An -tx1 | tr -d ' \n')"
    else
        echo none
    fi
}

# rl_prepare: `waterbear host prepare`, then checks that the state root is on DAX.
rl_prepare() {
    local out status=0
    out=$("$WB_BIN" host prepare --device "$RL_DEVICE" --mount "$RL_MNT" 2>&1) || status=$?
    printf '%s\n' "$out" | sed 's/^/prepare| /'
    [ "$status" = 0 ] || fail "waterbear host prepare exited with status $status: $(echo "$out" | tr '\n' ' ')"
    grep " $RL_MNT " /proc/mounts | sed 's/^/mount| /'
    grep " $RL_MNT " /proc/mounts | grep -q -E '[ ,]dax(=always)?[ ,]' ||
        fail "after host prepare, $RL_MNT is not mounted with dax: $(grep " $RL_MNT " /proc/mounts || echo 'not mounted')"
    [ -d "$RL_ROOT" ] || fail "host prepare did not create the state root $RL_ROOT"
}

# rl_begin: the start of every phase. Sets RL_PHASE, RL_RUN, RL_BEGIN_US and
# RL_BOOT_US (when this kernel started, wall clock); prepares the state root and
# checks that a later phase finds phase 1's.
rl_begin() {
    local before after uptime
    RL_PHASE=$(rl_cmdline_value wb.phase)
    RL_PHASE=${RL_PHASE:-1}
    note "phase $RL_PHASE of the scenario (boot $RL_PHASE of the test host)"
    rl_sync_clock
    RL_BEGIN_US=$(rl_now_us)
    read -r uptime _ </proc/uptime
    RL_BOOT_US=$(awk -v n="$RL_BEGIN_US" -v u="$uptime" 'BEGIN { printf "%.0f", n - u * 1000000 }')
    before=$(rl_fs_id)
    rl_prepare
    after=$(rl_fs_id)
    note "pmem filesystem before host prepare: $before; after: $after"
    if [ "$RL_PHASE" = 1 ]; then
        [ "$before" = none ] || fail "the pmem device holds a filesystem ($before) at the first boot"
        [ "$after" != none ] || fail "host prepare left no ext4 filesystem on $RL_DEVICE"
        [ -z "$(ls -A "$RL_ROOT")" ] || fail "the fresh state root $RL_ROOT is not empty"
        mkdir -p "$RL_TEST" "$RL_MEM"
        RL_RUN=$(cat /proc/sys/kernel/random/uuid)
        echo "$RL_RUN" >"$RL_TEST/run-id"
        echo "$after" >"$RL_TEST/fs-id"
        echo "$RL_BEGIN_US" >"$RL_TEST/begin-us"
        : >"$RL_TEST/problems"
    else
        RL_RUN=$(rl_cmdline_value wb.run)
        [ "$before" != none ] || fail "after the kexec the pmem device holds no filesystem: its bytes did not survive"
        [ "$before" = "$(cat "$RL_TEST/fs-id" 2>/dev/null)" ] ||
            fail "pmem filesystem $before is not the one phase 1 made ($(cat "$RL_TEST/fs-id" 2>/dev/null || echo 'no record'))"
        [ "$after" = "$before" ] || fail "host prepare changed the filesystem from $before to $after: it formatted the device holding the saved VMs"
        [ -n "$RL_RUN" ] && [ "$(cat "$RL_TEST/run-id" 2>/dev/null)" = "$RL_RUN" ] ||
            fail "the state root's run id '$(cat "$RL_TEST/run-id" 2>/dev/null)' is not wb.run=$RL_RUN"
        rl_metrics_after_kexec
    fi
}

# The previous phase's reset: its start (RL_TEST/reset-<phase>.us) to this kernel's
# start and to this scenario's start.
rl_metrics_after_kexec() {
    local prev=$((RL_PHASE - 1)) start saved
    start=$(cat "$RL_TEST/reset-$prev.us" 2>/dev/null || true)
    [ -n "$start" ] || {
        rl_problem "phase $prev left no record of when its reset started"
        return 0
    }
    RL_RESET_START_US=$start
    RL_RESET_CMD=$(cat "$RL_TEST/reset-$prev.cmd" 2>/dev/null || echo reset)
    [ ! -s "$RL_TEST/reset-$prev.out" ] || {
        note "what 'host $RL_RESET_CMD' printed before the kexec:"
        sed "s/^/$RL_RESET_CMD| /" "$RL_TEST/reset-$prev.out"
    }
    # When each VM's state was written (the files' mtimes, this clock and the last
    # boot's both set from the RTC): the first and the last.
    saved=$(for f in "$RL_ROOT"/*/vm.state; do
        [ ! -f "$f" ] || rl_mtime_us "$f"
    done | sort -n | sed -n '1p;$p' | tr '\n' ' ')
    # shellcheck disable=SC2086 # two fields
    set -- $saved
    echo "WB-METRIC host_reset_to_new_kernel_ms=$(((RL_BOOT_US - start) / 1000))"
    echo "WB-METRIC host_reset_to_scenario_ms=$(((RL_BEGIN_US - start) / 1000))"
    if [ $# = 2 ]; then
        echo "WB-METRIC host_reset_saved_to_new_kernel_ms=$(((RL_BOOT_US - $2) / 1000))"
        note "reset $prev: 'host $RL_RESET_CMD' started; $((($1 - start) / 1000)) ms later the first VM's" \
            "state was written (loading the kernel with kexec_file_load comes first)," \
            "$((($2 - start) / 1000)) ms the last; $(((RL_BOOT_US - $2) / 1000)) ms from there to the" \
            "new kernel's start (VMMs stopping, sync, kexec, purgatory, decompression), then" \
            "$(((RL_BEGIN_US - RL_BOOT_US) / 1000)) ms to this scenario (kernel boot, /init, modules)"
    else
        note "reset $prev: $(((RL_BOOT_US - start) / 1000)) ms from 'host $RL_RESET_CMD' to the new kernel's" \
            "start, $(((RL_BEGIN_US - RL_BOOT_US) / 1000)) ms from there to this scenario"
    fi
}

# rl_mtime_us FILE: its modification time in microseconds.
rl_mtime_us() {
    stat -c '%Y %y' "$1" | awk '{ f = $3; sub(/^[^.]*\.?/, "", f); f = substr(f "000000", 1, 6); print $1 f }'
}

# rl_problem TEXT: a problem that does not stop the scenario; rl_finish fails on it.
rl_problem() {
    echo "phase $RL_PHASE: $*" >>"$RL_TEST/problems"
    note "PROBLEM: $*"
}

# rl_finish: the end of the last phase. Fails naming the problems recorded.
rl_finish() {
    local begin
    begin=$(cat "$RL_TEST/begin-us" 2>/dev/null || echo "$RL_BEGIN_US")
    echo "WB-METRIC scenario_wall_s=$((($(rl_now_us) - begin) / 1000000))"
    rl_stop_readers
    if [ -s "$RL_TEST/problems" ]; then
        sed 's/^/problem| /' "$RL_TEST/problems"
        fail "$(wc -l <"$RL_TEST/problems") problem(s): $(tr '\n' ';' <"$RL_TEST/problems")"
    fi
}

# --- guests -------------------------------------------------------------------------

rl_dir() { echo "$RL_ROOT/$1"; }
rl_console() { echo "$RL_ROOT/$1/console"; }
rl_ts() { echo "$RL_TEST/$1.ts.${2:-$RL_PHASE}"; }

# rl_pid ID / rl_set_pid ID PID: the pid of ID's VMM in this phase.
rl_pid() { eval "echo \${RL_PID_$1:-}"; }
rl_set_pid() { eval "RL_PID_$1=$2"; }

# rl_start_linux ID: a Linux guest (project kernel, workload mode, 1 vCPU, 256 MiB)
# with its memory file and state directory on the state root.
rl_start_linux() {
    rl_start_vm "$1" --kernel "$GUEST_DIR/vmlinux" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
        --cpus 1 --memory 256M --cmdline "$(guest_cmdline workload) wb.verify_every=4"
}

# rl_start_builtin ID: the built-in test guest, ticking every 0.5 s, 16 MiB.
rl_start_builtin() {
    rl_start_vm "$1" --memory 16M --cmdline "tick_ms=500"
}

# rl_start_vm ID ARGS...: `waterbear run` in the background with ARGS, the memory file
# RL_MEM/ID.mem, the state directory RL_ROOT/ID and the console in the file
# RL_ROOT/ID/console, and a reader for that console.
rl_start_vm() {
    local id=$1 dir
    shift
    dir=$(rl_dir "$id")
    mkdir -p "$dir" "$RL_MEM"
    : >"$dir/console"
    rl_start_reader "$id"
    note "waterbear run --id $id $* (memory $RL_MEM/$id.mem, state $dir)"
    "$WB_BIN" run --id "$id" --memory-file "$RL_MEM/$id.mem" --state-dir "$dir" \
        --serial "file=$dir/console" --log-level info --log-file "$RL_TEST/$id-run.log" \
        "$@" </dev/null >>"$RL_TEST/$id-run.out" 2>&1 &
    rl_set_pid "$id" $!
    RL_VMS="$RL_VMS $id"
}

# rl_start_reader ID: timestamps the lines ID's console gets from now on into
# rl_ts ID (the lines already there are skipped).
rl_start_reader() {
    local id=$1 console skip
    console=$(rl_console "$id")
    [ -e "$console" ] || fail "no console file $console for $id"
    skip=$(wc -l <"$console")
    : >>"$(rl_ts "$id")"
    rl_reader "$id" "$console" "$skip" "$(rl_ts "$id")" &
    eval "RL_READER_$id=$!"
    RL_READERS="${RL_READERS:-} $!"
}

# rl_reader ID FILE SKIP OUT: follows FILE (a regular file another process appends
# to) from line SKIP+1. busybox's `read` takes one byte at a time, so the offset stays
# exact; at the end of the file it returns what it got of an unfinished line, which is
# kept until the rest arrives.
rl_reader() {
    local id=$1 skip=$3 out=$4 line carry="" t
    exec 3<"$2"
    while [ "$skip" -gt 0 ]; do
        IFS= read -r line <&3 || break
        skip=$((skip - 1))
    done
    while :; do
        if IFS= read -r line <&3; then
            t=$EPOCHREALTIME
            # Join first, then drop the \r: when a read stopped right after it (the
            # \n not written yet), the \r is at the end of the carried part.
            line=$carry$line
            line=${line%"$CR"}
            carry=""
            echo "${t%.*}${t#*.} $line" >>"$out"
            echo "|$id| $line"
        else
            carry=$carry$line
            usleep "$RL_READER_POLL_US"
        fi
    done
}

rl_stop_readers() {
    local pid
    for pid in ${RL_READERS:-}; do
        kill "$pid" 2>/dev/null || true
    done
    RL_READERS=""
}

# rl_show_context: what a person needs when a guest did not do what it should.
rl_show_context() {
    local id dir pid
    for id in $RL_VMS; do
        dir=$(rl_dir "$id")
        pid=$(rl_pid "$id")
        note "--- $id: VMM pid ${pid:-?} ($( [ -n "$pid" ] && proc_alive "$pid" && echo running || echo 'not running'))"
        for f in "$RL_TEST/$id-run.out" "$RL_TEST/$id-run.log" "$dir/vmm.log"; do
            [ -s "$f" ] || continue
            note "$f (last 30 lines):"
            tail -n 30 "$f" | sed "s/^/$id log| /"
        done
        [ ! -f "$dir/console" ] || {
            note "$dir/console (last 8 lines):"
            tail -n 8 "$dir/console" | tr -d '\r' | sed "s/^/$id console| /"
        }
    done
    "$WB_BIN" host --state-root "$RL_ROOT" status 2>&1 | sed 's/^/status| /' || true
}

rl_fail() {
    rl_show_context
    fail "$*"
}

# rl_wait ID ERE TIMEOUT_S [AFTER_US]: waits for a line of ID's console (this phase)
# matching ERE, arriving after AFTER_US. Sets RL_LINE and RL_LINE_US. Fails early when
# ID's VMM has exited.
rl_wait() {
    local id=$1 ere=$2 timeout_s=$3 after=${4:-0} ts deadline hit pid
    ts=$(rl_ts "$id")
    pid=$(rl_pid "$id")
    deadline=$(($(rl_now_us) + timeout_s * 1000000))
    while :; do
        hit=$(awk -v t="$after" -v re="$ere" '
            $1 + 0 > t + 0 { line = $0; sub(/^[0-9]+ /, "", line); if (line ~ re) { print; exit } }
        ' "$ts")
        if [ -n "$hit" ]; then
            RL_LINE_US=${hit%% *}
            RL_LINE=${hit#* }
            return 0
        fi
        if [ -n "$pid" ] && ! proc_alive "$pid"; then
            usleep 500000
            hit=$(awk -v t="$after" -v re="$ere" '
                $1 + 0 > t + 0 { line = $0; sub(/^[0-9]+ /, "", line); if (line ~ re) { print; exit } }
            ' "$ts")
            [ -n "$hit" ] || rl_fail "$id: its VMM (pid $pid) exited before the guest printed /$ere/"
            continue
        fi
        [ "$(rl_now_us)" -lt "$deadline" ] ||
            rl_fail "$id: no console line matching /$ere/ within $timeout_s s"
        usleep 250000
    done
}

# rl_wait_linux_healthy ID: booted, ticking, memory checked.
rl_wait_linux_healthy() {
    rl_wait "$1" '^WB-INIT' "$BOOT_TIMEOUT_S"
    note "$1: guest init after $(((RL_LINE_US - RL_BEGIN_US) / 1000)) ms of this phase"
    rl_wait "$1" '^WB-CSUM ok' 180
    rl_wait "$1" '^WB-TICK n=6 ' 60
}

rl_wait_builtin_healthy() {
    rl_wait "$1" '^tick [0-9]+ sum [0-9a-f]+ ok$' 120
    rl_wait "$1" '^tick 4 sum [0-9a-f]+ ok$' 60
}

# --- host commands ------------------------------------------------------------------

# rl_status: `waterbear host status` into RL_STATUS (and on the console).
rl_status() {
    local status=0
    RL_STATUS=$("$WB_BIN" host --state-root "$RL_ROOT" status 2>&1) || status=$?
    printf '%s\n' "$RL_STATUS" | sed 's/^/status| /'
    [ "$status" = 0 ] || fail "waterbear host status exited with status $status"
}

# rl_expect_status STATE ID...: each ID is listed in STATE with its memory surviving a
# host reset (RESET yes; not checked with STATE `saved-corrupt`, listed as `saved`:
# a state file that cannot be read tells nothing about the memory). Call rl_status
# first.
rl_expect_status() {
    local want=$1 check_reset=yes id row
    shift
    if [ "$want" = saved-corrupt ]; then
        want=saved
        check_reset=no
    fi
    for id in "$@"; do
        row=$(printf '%s\n' "$RL_STATUS" | awk -v id="$id" '$1 == id { print $2, $3, $5 }')
        [ -n "$row" ] || rl_fail "host status does not list VM $id"
        # shellcheck disable=SC2086 # fields
        set -- $row
        [ "$1" = "$want" ] || rl_fail "host status lists VM $id as $1, expected $want"
        [ "$check_reset" = no ] || [ "$3" = yes ] ||
            rl_fail "host status says VM $id does not survive a host reset (RESET $3)"
        if [ "$want" = running ] && [ -n "$(rl_pid "$id")" ] && [ "$2" != "$(rl_pid "$id")" ]; then
            rl_fail "host status gives VM $id pid $2, its VMM is pid $(rl_pid "$id")"
        fi
    done
}

# rl_kexec_append NEXT: this boot's command line for the next boot, in phase NEXT.
rl_kexec_append() {
    local arg out=""
    # shellcheck disable=SC2013 # words of the command line
    for arg in $(cat /proc/cmdline); do
        case $arg in
        wb.phase=* | wb.run=*) ;;
        *) out="$out $arg" ;;
        esac
    done
    echo "${out# } wb.phase=$1 wb.run=$RL_RUN"
}

# rl_prepare_kexec: the kernel and initrd to kexec into (the test host itself).
rl_prepare_kexec() {
    local t0
    t0=$(rl_now_us)
    testhost_kexec_initrd "$RL_KEXEC_INITRD"
    note "kexec initrd $RL_KEXEC_INITRD: $(($(wc -c <"$RL_KEXEC_INITRD") >> 20)) MiB, written in $((($(rl_now_us) - t0) / 1000)) ms"
    [ -s "$RL_KERNEL" ] || fail "no kernel $RL_KERNEL to kexec into"
}

# rl_host_reset_cmd ACTION ARGS...: `waterbear host ACTION --kernel --initrd --append
# ARGS...`, which kexecs the test host into phase RL_PHASE+1 and so never returns
# when it works. Records its start on the state root first.
rl_host_reset_cmd() {
    local action=$1 next=$((RL_PHASE + 1)) append out status=0
    shift
    rl_prepare_kexec
    append=$(rl_kexec_append "$next")
    note "host $action: kexec into phase $next with: $append (uptime $(cut -d' ' -f1 /proc/uptime) s)"
    echo "$action" >"$RL_TEST/reset-$RL_PHASE.cmd"
    rl_now_us >"$RL_TEST/reset-$RL_PHASE.us"
    sync
    "$WB_BIN" host --state-root "$RL_ROOT" "$action" --kernel "$RL_KERNEL" \
        --initrd "$RL_KEXEC_INITRD" --append "$append" "$@" \
        >"$RL_TEST/reset-$RL_PHASE.out" 2>&1 || status=$?
    out=$(cat "$RL_TEST/reset-$RL_PHASE.out")
    printf '%s\n' "$out" | sed "s/^/$action| /"
    rl_fail "waterbear host $action returned (status $status) instead of kexecing the test host: $(printf '%s' "$out" | tr '\n' ' ' | cut -c1-600)"
}

# --- after a reset ------------------------------------------------------------------

# rl_before_restore ID: reads, from ID's console file as the reset left it, the last
# tick before the reset (RL_PRE_N_ID, RL_PRE_BOOT_ID, RL_PRE_UP_ID) and when it arrived
# (RL_PRE_US_ID, from the previous phase's timestamps), and starts this phase's
# reader. Call before restore-all.
rl_before_restore() {
    local id=$1 console skip last n boot up us prev=$((RL_PHASE - 1))
    console=$(rl_console "$id")
    [ -s "$console" ] || fail "$id: its console file $console is missing or empty after the reset"
    skip=$(wc -l <"$console")
    last=$(head -n "$skip" "$console" | tr -d '\r' | grep -E '^WB-TICK n=' | tail -n 1 || true)
    [ -n "$last" ] || fail "$id: no WB-TICK line in its console before the reset"
    n=$(echo "$last" | sed -n -E 's/^WB-TICK n=([0-9]+) .*/\1/p')
    boot=$(echo "$last" | sed -n -E 's/.* boot_id=([^ ]+) .*/\1/p')
    up=$(echo "$last" | sed -n -E 's/.* uptime=([0-9.]+)$/\1/p')
    us=$(grep -E "^[0-9]+ WB-TICK n=$n " "$(rl_ts "$id" "$prev")" | tail -n 1 | cut -d' ' -f1 || true)
    if [ -z "$us" ]; then
        rl_problem "$id: the last tick before reset $prev (n=$n) is in its console but the reader missed it: no blackout figure"
    fi
    note "$id: last tick before reset $prev: n=$n boot_id=$boot uptime=$up" \
        "(the console ends $( [ "$(tail -c 1 "$console" | od -An -c | tr -d ' ')" = '\n' ] && echo 'with a whole line' || echo 'in the middle of a line'))"
    eval "RL_PRE_N_$id=$n RL_PRE_BOOT_$id=$boot RL_PRE_UP_$id=$up RL_PRE_US_$id=$us"
    rl_start_reader "$id"
    RL_VMS="$RL_VMS $id"
}

# rl_restore_all "OK_IDS" "BAD_IDS": `waterbear host restore-all`; the VMs in OK_IDS
# must come back (their pids are taken from its output), those in BAD_IDS must be
# reported as not restored, and the exit status must say whether any was not. Prints
# each restored VM's latency. Sets RL_RESTORE_T0_US and RL_RESTORE_T1_US.
rl_restore_all() {
    local ok=$1 bad=$2 out status=0 id line ms vmm pid want
    RL_RESTORE_T0_US=$(rl_now_us)
    out=$("$WB_BIN" host --state-root "$RL_ROOT" restore-all 2>&1) || status=$?
    RL_RESTORE_T1_US=$(rl_now_us)
    printf '%s\n' "$out" >"$RL_TEST/restore-all.$RL_PHASE.out"
    printf '%s\n' "$out" | sed 's/^/restore-all| /'
    note "host restore-all exited with status $status after $(((RL_RESTORE_T1_US - RL_RESTORE_T0_US) / 1000)) ms"
    echo "WB-METRIC restore_all_wall_ms=$(((RL_RESTORE_T1_US - RL_RESTORE_T0_US) / 1000))"
    for id in $ok; do
        line=$(printf '%s\n' "$out" | grep -E "^$id +" | head -n 1 || true)
        case $line in
        *" restored in "*) ;;
        *) rl_fail "host restore-all did not bring $id back: ${line:-no line for it}" ;;
        esac
        ms=$(echo "$line" | sed -n -E 's/.* restored in ([0-9.]+) ms.*/\1/p')
        pid=$(echo "$line" | sed -n -E 's/.*\(pid ([0-9]+),.*/\1/p')
        vmm=$(echo "$line" | sed -n -E 's/.*, ([0-9.]+|NaN) ms in the VMM.*/\1/p')
        echo "WB-METRIC restore_latency_ms_$id=$ms"
        echo "WB-METRIC restore_vmm_startup_ms_$id=$vmm"
        echo "$ms" >>"$RL_TEST/metric-restore_latency_ms"
        ms=$(sed -n 's/.* restored from .* in \([0-9.]*\) ms.*/\1/p' "$(rl_dir "$id")/vmm.log" 2>/dev/null | tail -n 1)
        echo "WB-METRIC restore_vmm_restore_ms_$id=${ms:-none}"
        if [ -z "$pid" ] || ! proc_alive "$pid"; then
            rl_fail "$id: restored VMM pid '$pid' is not running"
        fi
        rl_set_pid "$id" "$pid"
    done
    for id in $bad; do
        line=$(printf '%s\n' "$out" | grep -E "^$id +" | head -n 1 || true)
        case $line in
        *" NOT restored: "*) note "$id reported as not restored: ${line#*NOT restored: }" ;;
        *) rl_fail "host restore-all does not report $id (corrupt state) as not restored: ${line:-no line for it}" ;;
        esac
        # The operator must learn why: the state is corrupt.
        echo "$line" | grep -q -i -E 'corrupt|checksum' ||
            rl_problem "host restore-all reports $id (a flipped byte in its vm.state) as '${line#*NOT restored: }', which does not say that its state is corrupt"
    done
    want=0
    [ -z "$bad" ] || want=1
    [ "$status" = "$want" ] ||
        rl_problem "host restore-all exited with status $status; expected $want (VMs not restored: ${bad:-none})"
}

# rl_console_log ID OUT: ID's whole console in the "<stamp> <line>" form check_ticks
# and check_guest_memory read; the stamp is the line number: the order matters there,
# the times come from the readers. The guest is running: a last line without its
# newline is still being written and is left out.
rl_console_log() {
    local console lines
    console=$(rl_console "$1")
    lines=$(wc -l <"$console")
    head -n "$lines" "$console" | tr -d '\r' | awk '{ print NR, $0 }' >"$2"
}

# rl_check_restored ID: the guest carried on after restore-all: its first tick is the
# last before the reset + 1 with the same boot_id and an uptime that did not go back
# (nor restart), a later WB-CSUM is ok, it ticks on, and its whole console since boot
# has one boot, consecutive ticks and only good checksums. Prints the blackout (last
# tick before to first tick after, wall clock) and the uptime gap.
rl_check_restored() {
    local id=$1 pre_n pre_boot pre_up pre_us n boot up first_us log blackout
    eval "pre_n=\$RL_PRE_N_$id pre_boot=\$RL_PRE_BOOT_$id pre_up=\$RL_PRE_UP_$id pre_us=\$RL_PRE_US_$id"
    rl_wait "$id" '^WB-TICK n=' 120 "$RL_RESTORE_T0_US"
    first_us=$RL_LINE_US
    n=$(echo "$RL_LINE" | sed -n -E 's/^WB-TICK n=([0-9]+) .*/\1/p')
    boot=$(echo "$RL_LINE" | sed -n -E 's/.* boot_id=([^ ]+) .*/\1/p')
    up=$(echo "$RL_LINE" | sed -n -E 's/.* uptime=([0-9.]+)$/\1/p')
    note "$id: first tick after the reset: n=$n boot_id=$boot uptime=$up"
    [ "$boot" = "$pre_boot" ] || rl_fail "$id: boot_id changed from $pre_boot to $boot across the reset: the guest rebooted"
    [ "$n" = $((pre_n + 1)) ] || rl_fail "$id: the first tick after the reset is n=$n, the last before was n=$pre_n"
    awk -v a="$pre_up" -v b="$up" 'BEGIN { exit !(b + 0 >= a + 0) }' ||
        rl_fail "$id: guest uptime went back from $pre_up to $up across the reset"
    rl_wait "$id" '^WB-CSUM ok' 60 "$first_us"
    rl_wait "$id" "^WB-TICK n=$((n + 4)) " 60
    if [ -n "$pre_us" ]; then
        blackout=$(((first_us - pre_us) / 1000))
        echo "WB-METRIC host_reset_blackout_ms_$id=$blackout"
        echo "$blackout" >>"$RL_TEST/metric-blackout_ms"
    fi
    echo "WB-METRIC host_reset_uptime_gap_ms_$id=$(awk -v a="$pre_up" -v b="$up" 'BEGIN { printf "%.0f", (b - a) * 1000 }')"
    note "$id: time from the reset command to its first tick after: $(((first_us - ${RL_RESET_START_US:-$first_us}) / 1000)) ms"

    log=/tmp/$id-console.log
    rl_console_log "$id" "$log"
    check_ticks "$log"
    check_guest_memory "$log"
    note "$id: whole console: $TICKS ticks n=$TICK_FIRST_N..$TICK_LAST_N, one boot_id $TICK_BOOT_ID," \
        "one WB-INIT, $CSUM_OKS WB-CSUM ok, none bad"
}

# rl_check_api ID: the VM's API answers from its VMM and says running.
rl_check_api() {
    local id=$1 out status=0
    out=$("$WB_BIN" ctl --api-socket "$(rl_dir "$id")/api.sock" info 2>&1) || status=$?
    [ "$status" = 0 ] || rl_fail "$id: ctl info exited with status $status: $(echo "$out" | tr '\n' ' ')"
    echo "$out" | grep -q '"state": "running"' || rl_fail "$id: ctl info does not say running: $(echo "$out" | tr '\n' ' ')"
    echo "$out" | grep -q "\"pid\": $(rl_pid "$id")[,}]\{0,1\}\$" ||
        rl_fail "$id: the API answers from another process than $(rl_pid "$id"): $(echo "$out" | grep '"pid"')"
}

# rl_corrupt_state ID: flips one byte of ID's saved state (in the payload, past the
# 32-byte header) and records the file's checksum.
rl_corrupt_state() {
    local file byte
    file=$(rl_dir "$1")/vm.state
    [ -s "$file" ] || fail "$1 has no saved state $file to corrupt"
    byte=$(dd if="$file" bs=1 skip=100 count=1 2>/dev/null | od -An -tu1 | tr -d ' ')
    # shellcheck disable=SC2059 # an octal escape built on purpose
    printf "\\$(printf %o $((byte ^ 255)))" | dd of="$file" bs=1 seek=100 count=1 conv=notrunc 2>/dev/null
    sync
    RL_CORRUPT_SUM=$(md5sum <"$file")
    note "$1: flipped byte 100 of $file ($byte -> $((byte ^ 255)))"
}

# rl_restore_and_check "IDS" "CORRUPT": `host restore-all` after a reset brings every VM
# in IDS back where it was (rl_before_restore, rl_restore_all, rl_check_restored), they all
# run and answer their APIs; CORRUPT (or "") is the one restore-all must report.
rl_restore_and_check() {
    local vm
    for vm in $1; do
        rl_before_restore "$vm"
    done
    rl_restore_all "$1" "$2"
    for vm in $1; do
        rl_check_restored "$vm"
    done
    rl_status
    # shellcheck disable=SC2086 # a list of ids
    rl_expect_status running $1
    for vm in $1; do
        rl_check_api "$vm"
    done
}

# rl_check_left_alone ID: restore-all left the corrupt VM as it was: still saved, its
# state file unchanged, its memory file and marker in place, no VMM running for it.
rl_check_left_alone() {
    local id=$1 dir
    dir=$(rl_dir "$id")
    [ "$(md5sum <"$dir/vm.state")" = "$RL_CORRUPT_SUM" ] || rl_problem "$id: restore-all changed its corrupt vm.state"
    [ -f "$RL_MEM/$id.mem" ] || rl_problem "$id: its memory file $RL_MEM/$id.mem is gone"
    [ -f "$RL_MEM/$id.mem.waterbear-saved" ] || rl_problem "$id: the saved-memory marker of $RL_MEM/$id.mem is gone"
    rl_expect_status saved-corrupt "$id"
    if [ -s "$dir/vmm.log" ]; then
        note "$id: its vmm.log after restore-all:"
        sed "s/^/$id vmm.log| /" "$dir/vmm.log"
    fi
}

# rl_summary NAME: median and max of the values collected in RL_TEST/metric-NAME.
rl_summary() {
    [ -s "$RL_TEST/metric-$1" ] || return 0
    # shellcheck disable=SC2046 # two fields
    set -- "$1" $(median_max <"$RL_TEST/metric-$1")
    echo "WB-METRIC $1_median=$2"
    echo "WB-METRIC $1_max=$3"
}
