# shellcheck shell=busybox
# boot: waterbear boots the project's guest kernel (ELF vmlinux, PVH entry) with two
# vCPUs and 512 MiB; the guest checks itself and reboots; waterbear exits 0.
boot_and_check "$GUEST_DIR/vmlinux"
