# shellcheck shell=busybox disable=SC3028 # busybox ash has $EPOCHREALTIME
# Helpers for the scenarios that run inside the nested test host (busybox sh).
#
# /init sources this file and then scenarios/<name>.sh in a subshell with `set -eu`.
# A scenario passes when its script ends normally; it fails through `fail REASON`,
# which hands the reason to /init for the verdict line. Guest output is shown on the
# test host console as it arrives, prefixed with "| ".
#
# One waterbear at a time: wb_start runs it in the background with
#   stdin  <- a fifo the scenario writes to (wb_send); held open, so no EOF;
#   stdout and stderr -> a reader that timestamps every line into $WB_DIR/log
#                        as "<microseconds> <text>".
# wb_expect then polls that log. Timing comes from the reader's timestamps, so the
# poll interval does not blur the measurements.

WB_BIN=/usr/bin/waterbear
GUEST_DIR=/guest
WB_RUNS=/tmp/wb-runs
# Linux guests reach init in 5-20 s in a test host with working nested
# virtualization; under TCG on a busy machine allow much more.
BOOT_TIMEOUT_S=300
CR=$(printf '\r')

note() { echo "scenario: $*"; }

fail() {
    echo "$*" >"$FAIL_REASON"
    exit 1
}

# show_exit_context: after waterbear exited unexpectedly, the end of its log (when the
# scenario keeps one in VMM_LOG) and of the guest's console, to tell why.
show_exit_context() {
    if [ -n "${VMM_LOG:-}" ] && [ -f "$VMM_LOG" ]; then
        note "the end of waterbear's log ($VMM_LOG):"
        tail -n 15 "$VMM_LOG" | sed 's/^/log| /'
    fi
    if [ -f "$WB_DIR/log" ]; then
        note "the end of the guest console:"
        tail -n 15 "$WB_DIR/log" | sed 's/^/console| /'
    fi
}

# us_of $EPOCHREALTIME: "seconds.micros" as integer microseconds. Reading
# $EPOCHREALTIME needs no fork, so timestamps are taken where they are wanted; the
# hot paths convert inline instead of paying for a command substitution.
us_of() { echo "${1%.*}${1#*.}"; }

# Succeeds while process $1 runs. `kill -0` is not enough: it also succeeds on a
# zombie the shell has not reaped yet.
proc_alive() {
    local state
    [ -r "/proc/$1/stat" ] || return 1
    read -r _ _ state _ <"/proc/$1/stat" 2>/dev/null || return 1
    [ "$state" != Z ]
}

wb_reader() {
    local line t
    while IFS= read -r line || [ -n "$line" ]; do
        t=$EPOCHREALTIME
        line=${line%"$CR"}
        echo "${t%.*}${t#*.} $line" >>"$WB_DIR/log"
        echo "| $line"
    done
}

# wb_start NAME ARGS...: starts `waterbear run ARGS...` as described at the top.
# Sets WB_DIR, WB_PID, WB_T0_US.
wb_start() {
    local name=$1 t0
    shift
    WB_DIR=$WB_RUNS/$name
    rm -rf "$WB_DIR"
    mkdir -p "$WB_DIR"
    mkfifo "$WB_DIR/in" "$WB_DIR/out"
    : >"$WB_DIR/log"
    # Opening the fifo read-write never blocks and keeps a writer present.
    exec 8<>"$WB_DIR/in"
    WB_RSS_KIB=0
    WB_STATUS=""
    note "waterbear run $*"

    t0=$EPOCHREALTIME
    "$WB_BIN" run "$@" <"$WB_DIR/in" >"$WB_DIR/out" 2>&1 8<&- &
    WB_PID=$!
    WB_T0_US=${t0%.*}${t0#*.}
    wb_reader <"$WB_DIR/out" 8<&- &
    WB_READER=$!
}

# Records the peak of waterbear's own resident memory, guest RAM excluded. Guest RAM
# is a shared mapping of a memfd (or of --memory-file, WB_MEMORY_FILE); every other
# mapping is the VMM's. Not RssAnon + RssFile from /proc/PID/status: in the test host
# the binary and its libraries live on the initramfs, which is shmem, so their pages
# count as RssShmem together with guest RAM. Called at the milestones the scenarios
# wait for, not in the poll loop: parsing smaps costs CPU the nested guest needs.
sample_rss() {
    local perms path key value skip=0 rss=0
    {
        while read -r key value _ _ _ path; do
            case $key in
            *-*)
                # A mapping's header: "start-end perms offset dev inode path".
                perms=$value
                skip=0
                case $perms in
                *s)
                    case $path in
                    /memfd:* | "${WB_MEMORY_FILE:-/nonexistent}"*) skip=1 ;;
                    esac
                    ;;
                esac
                ;;
            Rss:) [ "$skip" = 1 ] || rss=$((rss + value)) ;;
            esac
        done <"/proc/$WB_PID/smaps"
    } 2>/dev/null || return 0
    [ "$rss" -le "$WB_RSS_KIB" ] || WB_RSS_KIB=$rss
}

# Reaps waterbear once it has exited and sets WB_STATUS to its exit status.
wb_reap() {
    [ -z "$WB_STATUS" ] || return 0
    WB_STATUS=0
    wait "$WB_PID" || WB_STATUS=$?
}

# wb_expect ERE TIMEOUT_S: waits for an output line matching ERE. Sets WB_LINE (its
# text) and WB_LINE_US (when it arrived).
wb_expect() {
    local ere=$1 timeout_s=$2 deadline hit reader_done=0
    deadline=$(($(us_of "$EPOCHREALTIME") + timeout_s * 1000000))
    while :; do
        # Whether the reader is still running is checked before the grep: once it has
        # finished, the log is complete and a miss is final.
        proc_alive "$WB_READER" || reader_done=1
        hit=$(grep -m1 -E -- "$ere" "$WB_DIR/log" || true)
        if [ -n "$hit" ]; then
            WB_LINE_US=${hit%% *}
            WB_LINE=${hit#* }
            sample_rss
            return 0
        fi
        if [ "$reader_done" = 1 ]; then
            wb_reap
            show_exit_context
            fail "waterbear exited with status $WB_STATUS before printing /$ere/"
        fi
        [ "$(us_of "$EPOCHREALTIME")" -lt "$deadline" ] ||
            fail "no output line matching /$ere/ within $timeout_s s"
        usleep 200000
    done
}

# wb_value TOKEN: the word after TOKEN in WB_LINE ("WB-NPROC 2" -> 2).
wb_value() {
    echo "$WB_LINE" | sed -n "s/.*$1[ =]\([^ ]*\).*/\1/p"
}

wb_count() { grep -c -E -- "$1" "$WB_DIR/log" || true; }

wb_send() {
    note "typing: $1"
    printf '%s\n' "$1" >&8
}

# wb_wait_exit TIMEOUT_S: waits for waterbear to exit and its output to drain; sets
# WB_STATUS.
wb_wait_exit() {
    local left=$(($1 * 5))
    while proc_alive "$WB_PID" || proc_alive "$WB_READER"; do
        [ "$left" -gt 0 ] || {
            kill -KILL "$WB_PID" 2>/dev/null || true
            fail "waterbear still running $1 s after the guest should have stopped"
        }
        left=$((left - 1))
        usleep 200000
    done
    wb_reap
    wait "$WB_READER" || true
    note "waterbear exited with status $WB_STATUS"
}

# Ends a waterbear whose guest runs forever: SIGTERM, then SIGKILL after 10 s.
wb_stop() {
    local left=50
    kill -TERM "$WB_PID" 2>/dev/null || true
    while proc_alive "$WB_PID"; do
        [ "$left" -gt 0 ] || kill -KILL "$WB_PID" 2>/dev/null || true
        left=$((left - 1))
        usleep 200000
    done
    wb_reap
    wait "$WB_READER" || true
    note "waterbear stopped with status $WB_STATUS"
}

# metric_time_since_start NAME: prints NAME=<ms from waterbear's start to WB_LINE>.
metric_time_since_start() {
    echo "WB-METRIC $1=$(((WB_LINE_US - WB_T0_US) / 1000))"
}

metric_vmm_rss() {
    [ "$WB_RSS_KIB" -gt 0 ] || fail "could not read waterbear's memory use from /proc/$WB_PID/smaps"
    echo "WB-METRIC vmm_rss_kib=$WB_RSS_KIB"
}

# Waits for the guest init's first line and reports the boot time.
expect_guest_init() {
    wb_expect 'WB-INIT' "$BOOT_TIMEOUT_S"
    metric_time_since_start time_to_init_ms
    note "guest init reports uptime $(wb_value uptime) s"
}

# The guest kernel command line for init mode $1. `quiet`: serial output roughly
# halves boot speed under emulation.
guest_cmdline() {
    echo "console=ttyS0 reboot=k panic=-1 quiet wb.mode=$1"
}

# boot_and_check KERNEL: the boot and boot-stock scenarios. Boots KERNEL with two
# vCPUs and 512 MiB in wb.mode=boot and checks what the guest reports about itself,
# then that waterbear exits 0 when the guest reboots.
boot_and_check() {
    local kernel=$1 value boot_ids
    wb_start boot --kernel "$kernel" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
        --cpus 2 --memory 512M --cmdline "$(guest_cmdline boot)" --serial stdio
    expect_guest_init

    wb_expect 'WB-NPROC' 60
    value=$(wb_value WB-NPROC)
    [ "$value" = 2 ] || fail "guest sees $value CPUs, expected 2"

    # 512 MiB minus what the kernel keeps for itself; below 3/4 of it something
    # is wrong with the e820 map.
    wb_expect 'WB-MEMTOTAL-KB' 60
    value=$(wb_value WB-MEMTOTAL-KB)
    [ "$value" -gt 393216 ] && [ "$value" -le 524288 ] ||
        fail "guest MemTotal is $value kB, implausible for 512 MiB"

    wb_expect 'WB-BOOT-OK' 180
    value=$(wb_count 'WB-TICK')
    [ "$value" -ge 2 ] || fail "guest printed $value WB-TICK lines before WB-BOOT-OK, expected at least 2"
    boot_ids=$(grep -o 'WB-TICK .*boot_id=[^ ]*' "$WB_DIR/log" | sed 's/.*boot_id=//' | sort -u | wc -l)
    [ "$boot_ids" = 1 ] || fail "WB-TICK lines carry $boot_ids different boot_ids, expected 1"
    [ "$(wb_count 'WB-CSUM ok')" -ge 1 ] || fail "no 'WB-CSUM ok' line before WB-BOOT-OK"
    [ "$(wb_count 'WB-CSUM')" = "$(wb_count 'WB-CSUM ok')" ] ||
        fail "guest memory checksum failed: $(grep 'WB-CSUM' "$WB_DIR/log" | grep -v -m1 'WB-CSUM ok')"

    wb_wait_exit 60
    [ "$WB_STATUS" = 0 ] || fail "waterbear exited with status $WB_STATUS after the guest rebooted"
    metric_vmm_rss
}

# testhost_kexec_initrd OUT: writes to OUT an initrd that boots this test host again
# (with /boot/vmlinuz), laid out as tools/testhost/build does: the root archive
# (/boot/initrd.img) followed by an archive holding that same file.
testhost_kexec_initrd() {
    {
        cat /boot/initrd.img
        (cd / && echo boot/initrd.img | cpio -o -H newc 2>/dev/null)
    } >"$1"
}

# --- Snapshot, restore and live update (scenarios restore, live-update) -----------
#
# These scenarios run one guest through several waterbear processes (run, then
# restore) or through live updates of one process, and check from the guest's WB-*
# lines that it continued: resources/guest/README.md "How tests use them".

# The API socket wb_ctl talks to.
WB_API=""
# The guest's tick period in ms (resources/guest/README.md: a WB-TICK every 0.5 s).
TICK_PERIOD_MS=500

# As wb_reader, but when the output ends in the middle of a line (waterbear exited
# while the guest was printing it), that line is logged as it is and
# $WB_DIR/partial-tail is created: the rest of it comes from the next process that
# runs the same guest (see wb_join_logs).
wb_reader_marking() {
    local line t partial
    while :; do
        partial=0
        if ! IFS= read -r line; then
            [ -n "$line" ] || break
            partial=1
        fi
        t=$EPOCHREALTIME
        line=${line%"$CR"}
        echo "${t%.*}${t#*.} $line" >>"$WB_DIR/log"
        echo "| $line"
        if [ "$partial" = 1 ]; then
            : >"$WB_DIR/partial-tail"
            break
        fi
    done
}

# wb_start_cmd NAME SUBCOMMAND ARGS...: as wb_start, but runs `waterbear SUBCOMMAND
# ARGS...` (run, restore) and marks a last line cut short (wb_reader_marking). Give
# each process of one guest its own NAME: the earlier logs stay for wb_join_logs.
wb_start_cmd() {
    local name=$1 cmd=$2 t0
    shift 2
    WB_DIR=$WB_RUNS/$name
    rm -rf "$WB_DIR"
    mkdir -p "$WB_DIR"
    mkfifo "$WB_DIR/in" "$WB_DIR/out"
    : >"$WB_DIR/log"
    exec 8<>"$WB_DIR/in"
    WB_RSS_KIB=0
    WB_STATUS=""
    note "waterbear $cmd $*"

    t0=$EPOCHREALTIME
    "$WB_BIN" "$cmd" "$@" <"$WB_DIR/in" >"$WB_DIR/out" 2>&1 8<&- &
    WB_PID=$!
    WB_T0_US=${t0%.*}${t0#*.}
    wb_reader_marking <"$WB_DIR/out" 8<&- &
    WB_READER=$!
}

# wb_ctl ACTION ARGS...: `waterbear ctl --api-socket $WB_API ACTION ARGS...`. Sets
# WB_CTL_OUT (its JSON), WB_CTL_STATUS, WB_CTL_T0_US/WB_CTL_T1_US (start and end) and
# WB_CTL_MS (wall time). Does not fail by itself; stderr goes to $WB_DIR/ctl.err and
# is shown when the command failed.
wb_ctl() {
    local t0 t1
    t0=$EPOCHREALTIME
    WB_CTL_STATUS=0
    WB_CTL_OUT=$("$WB_BIN" ctl --api-socket "$WB_API" "$@" 2>"$WB_DIR/ctl.err") ||
        WB_CTL_STATUS=$?
    t1=$EPOCHREALTIME
    WB_CTL_T0_US=${t0%.*}${t0#*.}
    WB_CTL_T1_US=${t1%.*}${t1#*.}
    WB_CTL_MS=$(((WB_CTL_T1_US - WB_CTL_T0_US) / 1000))
    if [ "$WB_CTL_STATUS" != 0 ]; then
        note "ctl $* exited with status $WB_CTL_STATUS after $WB_CTL_MS ms:"
        printf '%s\n' "$WB_CTL_OUT" | sed 's/^/ctl| /'
        sed 's/^/ctl| /' "$WB_DIR/ctl.err"
    fi
}

# ctl_json KEY: a top-level scalar of the JSON wb_ctl printed (pretty-printed, so
# top-level keys are indented by two spaces), without quotes; empty if absent.
ctl_json() {
    printf '%s\n' "$WB_CTL_OUT" |
        sed -n "s/^  \"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p" | head -n 1
}

# wb_expect_after US ERE TIMEOUT_S: as wb_expect, for a line that arrived after the
# time US (microseconds, as in the log).
wb_expect_after() {
    local after=$1 ere=$2 timeout_s=$3 deadline hit reader_done=0
    deadline=$(($(us_of "$EPOCHREALTIME") + timeout_s * 1000000))
    while :; do
        proc_alive "$WB_READER" || reader_done=1
        hit=$(awk -v t="$after" -v re="$ere" '
            $1 + 0 > t + 0 { line = $0; sub(/^[0-9]+ /, "", line); if (line ~ re) { print; exit } }
        ' "$WB_DIR/log")
        if [ -n "$hit" ]; then
            WB_LINE_US=${hit%% *}
            WB_LINE=${hit#* }
            sample_rss
            return 0
        fi
        if [ "$reader_done" = 1 ]; then
            wb_reap
            show_exit_context
            fail "waterbear exited with status $WB_STATUS before printing /$ere/"
        fi
        [ "$(us_of "$EPOCHREALTIME")" -lt "$deadline" ] ||
            fail "no output line matching /$ere/ within $timeout_s s"
        usleep 200000
    done
}

# wb_join_logs OUT DIR...: the logs of successive waterbear processes that ran one
# guest (oldest first), as one log in OUT. A line cut short when a process exited
# (DIR/partial-tail) is joined with the first line of the next process's log, and
# takes that line's time.
wb_join_logs() {
    local out=$1 dir carry="" first line
    shift
    : >"$out"
    for dir in "$@"; do
        first=1
        while IFS= read -r line; do
            if [ "$first" = 1 ] && [ -n "$carry" ]; then
                line="${line%% *} $carry${line#* }"
                carry=""
            fi
            first=0
            printf '%s\n' "$line" >>"$out"
        done <"$dir/log"
        if [ -f "$dir/partial-tail" ]; then
            # Take the cut line back out of OUT; it goes in front of the next line.
            carry=$(tail -n 1 "$out")
            carry=${carry#* }
            sed -i '$d' "$out"
            note "$dir ended in the middle of a line: '$carry'"
        fi
    done
    [ -z "$carry" ] || echo "0 $carry" >>"$out"
}

# ticks_of LOG: the well-formed WB-TICK lines of a log as "us n boot_id uptime".
ticks_of() {
    sed -n -E 's/^([0-9]+) WB-TICK n=([0-9]+) boot_id=([0-9a-f-]{36}|unknown) uptime=([0-9]+\.[0-9]+)$/\1 \2 \3 \4/p' "$1"
}

# check_ticks LOG [UPDATES]: the guest ticked on without a reset through LOG: every
# WB-TICK line is well formed, all carry one boot_id (not `unknown`), n grows by
# exactly 1 from line to line, uptime never goes back. Sets TICKS (count),
# TICK_FIRST_N, TICK_LAST_N, TICK_BOOT_ID, TICK_MAX_GAP_MS and TICK_MAX_GAP_AT (the
# largest time between two ticks arriving, and the n of the later one), and
# TICK_MAX_UPTIME_GAP_MS (the same by the guest's own uptime).
#
# UPDATES, if given, holds one "t0_us t1_us" line per event that paused the guest
# (a live update, from ctl's start to its end). A gap between two ticks may then be
# at most TICK_PERIOD_MS + GAP_SLACK_MS + the time of the events that overlap it.
GAP_SLACK_MS=2000
check_ticks() {
    local log=$1 updates=${2:-/dev/null} result
    [ -f "$updates" ] || updates=/dev/null
    result=$(
        {
            [ "$updates" = /dev/null ] || sed 's/^/U /' "$updates"
            ticks_of "$log" | sed 's/^/T /'
            grep -E '^[0-9]+ WB-TICK' "$log" | grep -v -E \
                '^[0-9]+ WB-TICK n=[0-9]+ boot_id=([0-9a-f-]{36}|unknown) uptime=[0-9]+\.[0-9]+$' |
                sed 's/^/M /' || true
        } | awk -v period="$TICK_PERIOD_MS" -v slack="$GAP_SLACK_MS" '
            function err(msg) { if (!bad) print "ERR " msg; bad = 1 }
            $1 == "U" { nu++; u0[nu] = $2 + 0; u1[nu] = $3 + 0; next }
            $1 == "M" { sub(/^M [0-9]+ /, ""); err("malformed tick line: " $0); next }
            $1 == "T" {
                ts = $2 + 0; n = $3 + 0; id = $4; up = $5 + 0
                if (count == 0) { first = n; boot = id }
                else {
                    if (id != boot) err("boot_id changed from " boot " to " id " at n=" n)
                    if (n != last + 1) err("tick n=" last " was followed by n=" n)
                    if (up < lastup) err("uptime went back from " lastup " to " up " at n=" n)
                    gap = (ts - lastts) / 1000
                    allowed = period + slack
                    for (i = 1; i <= nu; i++)
                        if (u0[i] < ts && u1[i] > lastts) allowed += (u1[i] - u0[i]) / 1000
                    if (gap > allowed)
                        err(sprintf("%.0f ms between ticks n=%d and n=%d, more than the %.0f ms the tick period, slack and pauses explain", gap, last, n, allowed))
                    if (gap > maxgap) { maxgap = gap; maxat = n }
                    ug = (up - lastup) * 1000
                    if (ug > maxug) maxug = ug
                }
                if (id == "unknown") err("the guest could not read its boot_id")
                count++; last = n; lastup = up; lastts = ts
            }
            END {
                if (count == 0) err("no WB-TICK lines")
                if (!bad) printf "OK %d %d %d %s %.0f %d %.0f\n", count, first, last, boot, maxgap, maxat, maxug
            }'
    )
    case $result in
    OK*) ;;
    *) fail "ticks: ${result#ERR }" ;;
    esac
    # shellcheck disable=SC2086 # split into fields on purpose
    set -- $result
    # shellcheck disable=SC2034 # read by the scenarios
    TICKS=$2 TICK_FIRST_N=$3 TICK_LAST_N=$4 TICK_BOOT_ID=$5 \
        TICK_MAX_GAP_MS=$6 TICK_MAX_GAP_AT=$7 TICK_MAX_UPTIME_GAP_MS=$8
}

# check_guest_memory LOG: the guest booted once (one WB-INIT), started its workload
# once, and every WB-CSUM in LOG is `ok` with the checksum the workload filled in.
# Sets CSUM_OKS (how many).
check_guest_memory() {
    local log=$1 expected value
    value=$(grep -c -E '^[0-9]+ WB-INIT ' "$log" || true)
    [ "$value" = 1 ] || fail "guest printed WB-INIT $value times: it booted again"
    value=$(grep -c -E '^[0-9]+ WB-WORKLOAD ' "$log" || true)
    [ "$value" = 1 ] || fail "guest started its workload $value times"
    expected=$(sed -n -E 's/^[0-9]+ WB-WORKLOAD .*csum=([0-9a-f]{16}).*/\1/p' "$log")
    [ -n "$expected" ] || fail "no csum= in the WB-WORKLOAD line"
    value=$(grep -E '^[0-9]+ WB-CSUM' "$log" | grep -v -E "^[0-9]+ WB-CSUM ok $expected\$" | head -n 1 || true)
    [ -z "$value" ] || fail "guest memory check failed: '${value#* }' (expected WB-CSUM ok $expected)"
    # shellcheck disable=SC2034 # read by the scenarios
    CSUM_OKS=$(grep -c -E "^[0-9]+ WB-CSUM ok $expected\$" "$log" || true)
}

# median_max: reads numbers, one per line; prints "median max".
median_max() {
    sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "0 0"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.3f %.3f\n", m, v[NR] }'
}

# ms_between US1 US2: milliseconds from US1 to US2 (microseconds), one decimal.
ms_between() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1000 }'
}
