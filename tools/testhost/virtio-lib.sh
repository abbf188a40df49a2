# shellcheck shell=busybox
# Helpers of the virtio scenarios (disk, net, disk-restore, net-update,
# boot-stock-virtio), sourced by each after scenario-lib.sh.

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
