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
