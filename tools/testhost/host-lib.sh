# shellcheck shell=bash disable=SC2034 # the variables are used by the scripts sourcing this
# Shared by tools/testhost/build and tools/testhost/run (sourced, not executed).
#
# Defines where things live and small helpers. Everything the test host is built
# from or into sits in a cache outside the repository, so rebuilding the checkout
# does not throw away the guest kernels or the test host image.

TESTHOST_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$TESTHOST_SRC/../.." && pwd)

WATERBEAR_CACHE=${WATERBEAR_CACHE:-$HOME/.cache/waterbear}

# Guest artifacts come from tools/guest/build-all; tools/guest/paths says where
# they land (WB_GUEST_VMLINUX, WB_STOCK_VMLINUZ, ...).
# shellcheck source=../guest/paths
source "$REPO_ROOT/tools/guest/paths"

TESTHOST_DIR=$WATERBEAR_CACHE/testhost
# The test host boots the same stock cloud kernel that boot-stock runs as a guest.
TESTHOST_KERNEL=$WB_STOCK_VMLINUZ
TESTHOST_INITRD=$TESTHOST_DIR/initramfs.cpio

# The binary that goes into the test host. WATERBEAR_BIN lets a developer try the
# test host with another build (or a stand-in) without touching target/.
WATERBEAR_BIN=${WATERBEAR_BIN:-$REPO_ROOT/target/release/waterbear}

log() { printf 'testhost: %s\n' "$*" >&2; }
die() {
    printf 'testhost: error: %s\n' "$*" >&2
    exit 1
}

# Scenario names are the file names under scenarios/, without the .sh suffix.
list_scenarios() {
    local f
    for f in "$TESTHOST_SRC"/scenarios/*.sh; do
        basename "$f" .sh
    done
}

# The guest artifacts the test host carries.
guest_artifacts() {
    printf '%s\n' "$WB_GUEST_VMLINUX" "$WB_STOCK_VMLINUZ" "$WB_GUEST_INITRAMFS" \
        "$WB_STOCK_VERSION_FILE"
}
