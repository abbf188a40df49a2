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

# --- virtio devices: disks and taps (disk, net, disk-restore, net-update, -----------
# --- boot-stock-virtio) -------------------------------------------------------------
#
# The guest side is resources/guest/init in modes disk, net, disk-net and disk-writer;
# resources/guest/README.md documents the WB-DISK-*, WB-BLOCK and WB-NET-* lines these
# helpers wait for. Disk images are ext4 made here with mkfs.ext4 and read back after
# the guest stopped with e2fsck and debugfs, never mounted in the test host.

DISK_DIR=/tmp/wb-disks
TAP=wbtap0
HOST_IP=10.0.2.1
GUEST_IP=10.0.2.2
NET_PREFIX=24
HTTP_PORT=8080
WWW_DIR=/tmp/wb-www
# Bytes moved each way over the network and written to the data disk (KiB).
XFER_KIB=512

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# random_file PATH KIB
random_file() {
    mkdir -p "$(dirname "$1")"
    head -c $(($2 * 1024)) /dev/urandom >"$1"
}

# wb_expect_ok ERE TIMEOUT_S: wb_expect, but a WB-ERROR line from the guest fails at
# once, naming it, instead of waiting for the timeout.
wb_expect_ok() {
    wb_expect "$1| WB-ERROR | WB-DISK-ERROR " "$2"
    case $WB_LINE in
    WB-ERROR* | WB-DISK-ERROR*) fail "guest: $WB_LINE" ;;
    esac
}

# wb_field KEY: the value of KEY=VALUE in WB_LINE.
wb_field() {
    echo "$WB_LINE" | tr ' ' '\n' | sed -n "s/^$1=//p" | head -n 1
}

# disk_image PATH SIZE_MIB [DIR]: a fresh ext4 image (4 KiB blocks), holding a copy of
# DIR's files when given.
disk_image() {
    local img=$1 mib=$2 dir=${3:-}
    mkdir -p "$(dirname "$img")"
    rm -f "$img"
    truncate -s $((mib * 1048576)) "$img" || fail "truncate of $img failed"
    if [ -n "$dir" ]; then
        mkfs.ext4 -q -F -b 4096 -d "$dir" "$img" || fail "mkfs.ext4 -d $dir $img failed"
    else
        mkfs.ext4 -q -F -b 4096 "$img" || fail "mkfs.ext4 $img failed"
    fi
}

# disk_cat IMAGE PATH: a file's bytes from the ext4 image, read with debugfs.
disk_cat() {
    debugfs -R "cat $2" "$1" 2>/dev/null
}

# disk_state IMAGE: the superblock's state and features, as "state 'clean', features
# 'has_journal ... needs_recovery ...'".
disk_state() {
    debugfs -R stats "$1" 2>/dev/null | awk -F': *' '
        /^Filesystem state:/ { s = $2 }
        /^Filesystem features:/ { f = $2 }
        END { printf "state '\''%s'\'', features '\''%s'\''\n", s, f }'
}

# disk_fsck_clean IMAGE LABEL: e2fsck -fn must find nothing wrong (exit status 0).
disk_fsck_clean() {
    local status=0
    e2fsck -fn "$1" >/tmp/fsck.out 2>&1 || status=$?
    sed 's/^/fsck| /' /tmp/fsck.out
    [ "$status" = 0 ] || fail "$2: e2fsck -fn $1 exited with status $status: $(grep -v -E '^(Pass|e2fsck) ' /tmp/fsck.out | tr '\n' ' ' | cut -c1-400)"
    note "$2: e2fsck -fn $1 is clean"
}

# disk_replay_journal IMAGE LABEL: what a mount does first after a crash, replaying
# the journal, and nothing else (e2fsck -E journal_only). Sets DISK_REPLAYED.
disk_replay_journal() {
    local status=0
    e2fsck -y -E journal_only "$1" >/tmp/replay.out 2>&1 || status=$?
    sed 's/^/replay| /' /tmp/replay.out
    [ "$status" -le 1 ] || fail "$2: e2fsck -E journal_only $1 exited with status $status"
    DISK_REPLAYED=no
    ! grep -q 'recovering journal' /tmp/replay.out || DISK_REPLAYED=yes
}

# The disk writer's records (resources/guest/README.md, mode disk-writer): record n is
# "rec " + n in 10 digits + " " + 48 times the letter 'a' + n % 26, one line each.
# Prints "GOOD BAD TOTAL BADLINE": GOOD records in a row from 1 are right, BAD is the
# line number of the first wrong one (0: none), TOTAL the lines in the file.
# shellcheck disable=SC2016 # an awk program
records_awk='
    BEGIN { letters = "abcdefghijklmnopqrstuvwxyz"; good = 0; bad = 0 }
    {
        want = sprintf("rec %010d ", NR)
        c = substr(letters, NR % 26 + 1, 1)
        for (i = 0; i < 48; i++) want = want c
        if (!bad && $0 == want) { good = NR; next }
        if (!bad) { bad = NR; badline = substr($0, 1, 70) }
    }
    END { printf "%d %d %d %s\n", good, bad, NR, badline }'

# disk_check_records IMAGE ACKED LABEL: the records file holds records 1..ACKED intact
# (each was acknowledged by the guest after its fsync returned). Records after ACKED
# may or may not be there (not acknowledged yet); they are reported, not checked.
disk_check_records() {
    local img=$1 acked=$2 label=$3 result good bad total badline
    disk_cat "$img" /records >/tmp/records.bin
    result=$(awk "$records_awk" /tmp/records.bin)
    # shellcheck disable=SC2086 # fields
    set -- $result
    good=$1 bad=$2 total=$3
    shift 3
    badline=$*
    note "$label: the records file has $(wc -c </tmp/records.bin) bytes, $total lines; records 1..$good intact" \
        "$([ "$bad" = 0 ] || echo "; line $bad is '$badline'")"
    [ "$good" -ge "$acked" ] ||
        fail "$label: record $((good + 1)) is missing or wrong on the disk ('$badline', line $bad of $total) although the guest acknowledged records up to $acked after their fsync"
    note "$label: all $acked acknowledged records are on the disk ($((good - acked)) more, written but not yet acknowledged)"
}

# disk_crash_check IMAGE ACKED LABEL: a copy of IMAGE as a power cut would leave it:
# its journal replayed, e2fsck -fn clean, the acknowledged records there.
disk_crash_check() {
    local copy=/tmp/crash-check.img
    cp "$1" "$copy" || fail "$3: cannot copy $1"
    note "$3: checking a copy of $1 (state: $(disk_state "$copy"))"
    disk_replay_journal "$copy" "$3"
    note "$3: journal replayed: $DISK_REPLAYED"
    disk_fsck_clean "$copy" "$3"
    disk_check_records "$copy" "$2" "$3"
    rm -f "$copy"
}

# disk_prepare_images: the images of the disk and boot-stock-virtio scenarios, each
# with a random file the guest reads back: $DISK_DIR/data.img (64 MiB, seed.bin) and
# $DISK_DIR/golden.img (16 MiB, golden.bin), the read-only disk. Sets SEED_SHA,
# GOLDEN_SHA and GOLDEN_IMG_SHA.
disk_prepare_images() {
    random_file "$DISK_DIR/seed/seed.bin" 256
    random_file "$DISK_DIR/golden/golden.bin" 128
    SEED_SHA=$(sha256_of "$DISK_DIR/seed/seed.bin")
    GOLDEN_SHA=$(sha256_of "$DISK_DIR/golden/golden.bin")
    disk_image "$DISK_DIR/data.img" 64 "$DISK_DIR/seed"
    disk_image "$DISK_DIR/golden.img" 16 "$DISK_DIR/golden"
    GOLDEN_IMG_SHA=$(sha256_of "$DISK_DIR/golden.img")
    note "images: data.img with seed.bin $SEED_SHA; golden.img ($GOLDEN_IMG_SHA) with golden.bin $GOLDEN_SHA"
}

# expect_block_device NAME SERIAL RO SECTORS VIA_ERE: the guest's WB-BLOCK line for
# /dev/NAME.
expect_block_device() {
    local value
    wb_expect_ok "WB-BLOCK $1 " 120
    [ "$(wb_field serial)" = "$2" ] || fail "/dev/$1: the guest sees serial '$(wb_field serial)', the disk's id is '$2' ($WB_LINE)"
    [ "$(wb_field ro)" = "$3" ] || fail "/dev/$1: the guest sees ro=$(wb_field ro), expected $3"
    [ "$(wb_field sectors)" = "$4" ] || fail "/dev/$1: the guest sees $(wb_field sectors) sectors, the image has $4"
    value=$(wb_field via)
    echo "$value" | grep -q -E "^($5)\$" || fail "/dev/$1 was found through '$value', expected /$5/"
    note "/dev/$1: serial $2, ro=$3, $4 sectors, found through $value"
}

# expect_guest_disk_checks: the guest's data disk checks (mode disk or disk-net): it
# read seed.bin as the test host wrote it and wrote guest.bin, read back from the
# device. Sets GUEST_BIN_SHA.
expect_guest_disk_checks() {
    wb_expect_ok 'WB-DISK-SEED ' 180
    [ "$(wb_field sha256)" = "$SEED_SHA" ] ||
        fail "the guest read seed.bin as $(wb_field sha256), the test host wrote $SEED_SHA"
    wb_expect_ok 'WB-DISK-WROTE ' 180
    GUEST_BIN_SHA=$(wb_field sha256)
    [ "$(wb_field reread)" = ok ] || fail "the guest's re-read of guest.bin failed: $WB_LINE"
}

# expect_guest_ro_checks: the guest's checks of the read-only disk (wb.ro_disk=vdb):
# a write to it failed, golden.bin reads as the test host wrote it, and the whole disk
# read the same before and after, and the same as the image.
expect_guest_ro_checks() {
    wb_expect_ok 'WB-DISK-RO-WRITE ' 180
    note "guest: $WB_LINE"
    wb_expect_ok 'WB-DISK-RO ' 180
    [ "$(wb_field golden_sha256)" = "$GOLDEN_SHA" ] ||
        fail "the guest read golden.bin from the read-only disk as $(wb_field golden_sha256), it is $GOLDEN_SHA"
    [ "$(wb_field unchanged)" = yes ] || fail "the guest saw the read-only disk change: $WB_LINE"
    [ "$(wb_field dev_sha256)" = "$GOLDEN_IMG_SHA" ] ||
        fail "the guest read the read-only disk as $(wb_field dev_sha256), the image is $GOLDEN_IMG_SHA"
}

# check_golden_after: the read-only disk's image is byte for byte what it was.
check_golden_after() {
    local value
    value=$(sha256_of "$DISK_DIR/golden.img")
    [ "$value" = "$GOLDEN_IMG_SHA" ] || fail "the read-only disk's image changed: sha256 $value, was $GOLDEN_IMG_SHA"
    note "golden.img unchanged ($value)"
}

# check_data_disk_after IMAGE: after the guest unmounted the data disk and stopped:
# the filesystem is clean and e2fsck -fn finds nothing; guest.bin and the small files
# hold what the guest wrote; seed.bin is intact.
check_data_disk_after() {
    local img=$1 state i got
    state=$(disk_state "$img")
    note "data disk after the guest: $state"
    case $state in
    *needs_recovery*) fail "the data disk still needs journal recovery: the guest's unmount did not reach it ($state)" ;;
    esac
    case $state in
    "state 'clean',"*) ;;
    *) fail "the data disk's state is not clean after the guest unmounted it: $state" ;;
    esac
    disk_fsck_clean "$img" "data disk"
    got=$(disk_cat "$img" /wb/guest.bin | sha256sum | cut -d' ' -f1)
    [ "$got" = "$GUEST_BIN_SHA" ] || fail "guest.bin on the disk has sha256 $got, the guest wrote $GUEST_BIN_SHA"
    [ "$(disk_cat "$img" /wb/guest.bin | wc -c)" = $((XFER_KIB * 1024)) ] || fail "guest.bin on the disk has the wrong size"
    i=1
    while [ "$i" -le 20 ]; do
        got=$(disk_cat "$img" "/wb/small-$i.txt")
        [ "$got" = "small file $i" ] || fail "/wb/small-$i.txt on the disk holds '$got'"
        i=$((i + 1))
    done
    got=$(disk_cat "$img" /seed.bin | sha256sum | cut -d' ' -f1)
    [ "$got" = "$SEED_SHA" ] || fail "seed.bin on the disk changed: $got, was $SEED_SHA"
    note "data disk: guest.bin ($GUEST_BIN_SHA), 20 small files and seed.bin read back in the test host"
}

# net_tap_up: the tap $TAP with $HOST_IP/$NET_PREFIX, up, and an HTTP server on
# $HOST_IP:$HTTP_PORT serving $WWW_DIR/h2g.bin (random). Sets H2G_SHA and HTTPD_PID.
net_tap_up() {
    [ -c /dev/net/tun ] || fail "no /dev/net/tun: the tun module did not load"
    tunctl -t "$TAP" >/dev/null || fail "tunctl -t $TAP failed"
    ip addr add "$HOST_IP/$NET_PREFIX" dev "$TAP" || fail "ip addr add $HOST_IP/$NET_PREFIX dev $TAP failed"
    ip link set "$TAP" up || fail "ip link set $TAP up failed"
    random_file "$WWW_DIR/h2g.bin" "$XFER_KIB"
    H2G_SHA=$(sha256_of "$WWW_DIR/h2g.bin")
    httpd -f -p "$HOST_IP:$HTTP_PORT" -h "$WWW_DIR" &
    HTTPD_PID=$!
    note "tap $TAP up with $HOST_IP/$NET_PREFIX; serving h2g.bin ($H2G_SHA) on port $HTTP_PORT (pid $HTTPD_PID)"
}

net_guest_cmdline() {
    echo "wb.ip=$GUEST_IP/$NET_PREFIX wb.host_ip=$HOST_IP wb.xfer_kib=$XFER_KIB"
}

# host_ping COUNT INTERVAL OUT: pings the guest from the test host; sets PING_SENT,
# PING_RECEIVED, PING_AVG_MS and PING_LOST_SEQS (the sequence numbers with no reply).
host_ping() {
    ping -c "$1" -i "$2" -w $(($1 * 2 + 30)) "$GUEST_IP" >"$3" 2>&1 || true
    ping_stats "$3"
}

ping_stats() {
    PING_SENT=$(sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p' "$1")
    PING_RECEIVED=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' "$1")
    PING_AVG_MS=$(sed -n 's|^round-trip min/avg/max = [0-9.]*/\([0-9.]*\)/.*|\1|p' "$1")
    PING_SENT=${PING_SENT:-0} PING_RECEIVED=${PING_RECEIVED:-0}
    # shellcheck disable=SC2034 # read by the scenarios
    PING_LOST_SEQS=$(sed -n 's/.* seq=\([0-9]*\) .*/\1/p' "$1" | sort -n -u |
        awk -v n="$PING_SENT" '{ got[$1] = 1 } END { for (i = 0; i < n; i++) if (!(i in got)) printf "%d ", i }')
}

# host_fetch_g2h LABEL: fetches the file the guest serves and compares it with the
# checksum the guest printed (G2H_SHA). Sets FETCH_MS.
host_fetch_g2h() {
    local t0 t1 got
    rm -f /tmp/g2h.bin
    t0=$EPOCHREALTIME
    timeout 120 wget -q -O /tmp/g2h.bin "http://$GUEST_IP:$HTTP_PORT/g2h.bin" ||
        fail "$1: wget http://$GUEST_IP:$HTTP_PORT/g2h.bin from the test host failed"
    t1=$EPOCHREALTIME
    FETCH_MS=$((($(us_of "$t1") - $(us_of "$t0")) / 1000))
    got=$(sha256_of /tmp/g2h.bin)
    [ "$got" = "$G2H_SHA" ] || fail "$1: g2h.bin arrived with sha256 $got, the guest serves $G2H_SHA"
    note "$1: fetched g2h.bin ($(wc -c </tmp/g2h.bin) bytes) from the guest in $FETCH_MS ms, checksum matches"
}

# expect_guest_net_checks MAC VIA_ERE: the guest's network checks (mode net or
# disk-net): eth0 has MAC (any MAC when empty) and was found through VIA_ERE; it pinged
# the test host and fetched h2g.bin intact; then the test host pings the guest and
# fetches g2h.bin from it. Sets G2H_SHA.
expect_guest_net_checks() {
    local mac via
    wb_expect_ok 'WB-NET-IF eth0 ' 180
    mac=$(wb_field mac) via=$(wb_field via)
    echo "$mac" | grep -q -E '^[0-9a-f]{2}(:[0-9a-f]{2}){5}$' || fail "eth0 has a malformed MAC '$mac'"
    [ -z "$1" ] || [ "$mac" = "$1" ] || fail "eth0 has MAC $mac, --net gave $1"
    echo "$via" | grep -q -E "^($2)\$" || fail "eth0 was found through '$via', expected /$2/"
    note "eth0: MAC $mac, found through $via"
    wb_expect_ok 'WB-NET-PING ' 120
    [ "$(wb_field received)" = 3 ] || fail "the guest got $(wb_field received) of 3 ping replies from the test host"
    wb_expect_ok 'WB-NET-H2G ' 180
    [ "$(wb_field sha256)" = "$H2G_SHA" ] ||
        fail "the guest fetched h2g.bin with sha256 $(wb_field sha256), the test host serves $H2G_SHA"
    wb_expect_ok 'WB-NET-SERVE ' 120
    G2H_SHA=$(wb_field sha256)
    wb_expect_ok 'WB-NET-READY' 60

    host_ping 5 1 /tmp/ping-guest.out
    sed 's/^/ping| /' /tmp/ping-guest.out
    [ "$PING_RECEIVED" = 5 ] || fail "the test host got $PING_RECEIVED of 5 ping replies from the guest"
    echo "WB-METRIC net_ping_avg_ms=$PING_AVG_MS"
    host_fetch_g2h "after boot"
    echo "WB-METRIC net_fetch_${XFER_KIB}kib_ms=$FETCH_MS"
}
