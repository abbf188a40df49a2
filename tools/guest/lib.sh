# shellcheck shell=bash
# Shared helpers for the tools/guest/* scripts. Sourced, not run.
#
# Provides logging, installing missing Debian packages, a per-artifact lock (so two
# scripts, say build-all and the test host's runner, never build the same artifact at
# once) and small cache-key helpers. The artifact locations come from ./paths.

# shellcheck source=paths
. "$(dirname "${BASH_SOURCE[0]}")/paths"

WB_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck disable=SC2034 # used by the scripts that source this file
WB_GUEST_RESOURCES="$WB_REPO_ROOT/resources/guest"

wb_log() {
    printf '[%s] %s\n' "$(basename "$0")" "$*" >&2
}

wb_die() {
    printf '[%s] error: %s\n' "$(basename "$0")" "$*" >&2
    exit 1
}

# wb_require_packages PKG...: installs the packages that are not installed yet.
# Checks with dpkg-query first so a machine that has them never touches apt.
wb_require_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
            missing+=("$pkg")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0

    wb_log "installing missing Debian packages: ${missing[*]}"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || wb_die "need root (or sudo) to install: ${missing[*]}"
        sudo=(sudo)
    fi
    # Wait for another apt run rather than failing on its lock.
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get
        -o DPkg::Lock::Timeout=600 -y --no-install-recommends)
    if ! "${apt[@]}" install "${missing[@]}"; then
        # A fresh machine may have stale or empty package lists.
        wb_log "apt-get install failed; running apt-get update and retrying once"
        "${apt[@]}" update
        "${apt[@]}" install "${missing[@]}" || wb_die "could not install: ${missing[*]}"
    fi
}

# wb_lock NAME: holds an exclusive lock on $WB_GUEST_DIR/NAME.lock until the script exits.
wb_lock() {
    mkdir -p "$WB_GUEST_DIR"
    exec {WB_LOCK_FD}>"$WB_GUEST_DIR/$1.lock"
    if ! flock -n "$WB_LOCK_FD"; then
        wb_log "waiting for another build holding $WB_GUEST_DIR/$1.lock"
        flock "$WB_LOCK_FD"
    fi
}

# wb_pkg_version PKG: prints the installed version of a Debian package.
wb_pkg_version() {
    dpkg-query -W -f='${Version}' "$1"
}

# wb_hash: sha256 of stdin, first 16 hex digits (a cache key, not a security boundary).
wb_hash() {
    sha256sum | cut -c1-16
}

# wb_size PATH: human-readable size of a file.
wb_size() {
    du -hL --apparent-size "$1" | cut -f1
}
