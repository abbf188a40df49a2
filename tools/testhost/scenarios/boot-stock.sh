# shellcheck shell=busybox
# boot-stock: as boot, with Debian's stock cloud kernel (bzImage), a kernel nobody
# in this project configured.
boot_and_check "$GUEST_DIR/vmlinuz-stock"
