# shellcheck shell=busybox
# host-reset: `waterbear host reset` kexecs the test host under running guests, and
# after the new kernel boots `waterbear host restore-all` brings them back in place.
#
# Phase 1 (the boot QEMU started): `host prepare` formats the pmem device and mounts it
# with DAX; two Linux guests (project kernel, workload mode, 1 vCPU, 256 MiB each) and
# the built-in test guest run with their memory files, state directories and consoles
# on it. Once each ticks with a good memory check, `host status` must list all three
# running and surviving a reset, and `host reset --kernel /boot/vmlinuz --initrd
# <this test host's initrd> --append "<this command line> wb.phase=2 wb.run=<id>"`
# saves them and kexecs the test host.
#
# Phase 2 (after the kexec): `host prepare` must mount the same filesystem without
# formatting it; `host status` lists the three VMs saved. The built-in guest's
# vm.state gets one byte flipped. `host restore-all` must report that VM as not
# restored (exit status 1), leave its files alone, and bring both Linux guests back:
# for each, the first tick after is the last before + 1 with the same boot_id and an
# uptime that did not go back, a later WB-CSUM is ok, it ticks on, its whole console
# shows one boot, consecutive ticks and only good checksums, and its API answers from
# the restored VMM.
#
# Metrics (wall clock, each boot's clock set from the RTC): host_reset_to_new_kernel_ms
# (the reset command's start to the new kernel's start: loading the kernel, saving the
# VMs, sync, kexec), host_reset_saved_to_new_kernel_ms (the last vm.state written to
# the new kernel's start), host_reset_to_scenario_ms (to this scenario's phase 2);
# from restore-all: restore_all_wall_ms, restore_latency_ms_<id> (its figure: spawn to
# the API answering with vCPUs running), restore_vmm_startup_ms_<id> (the VMM process's
# age when its vCPUs ran), restore_vmm_restore_ms_<id> (the VMM's own "restored ... in"
# figure from vmm.log); per guest host_reset_blackout_ms_<id> (its last tick before
# the reset to its first tick after, as the test host saw them arrive) and
# host_reset_uptime_gap_ms_<id> (the same by the guest's uptime); scenario_wall_s
# (phase 1's start to the end, both test host boots).

# shellcheck source=../reset-lib.sh
. /testhost/reset-lib.sh

LINUX_VMS="linux1 linux2"
CORRUPT_VM=builtin

rl_begin
case $RL_PHASE in
1)
    for vm in $LINUX_VMS; do
        rl_start_linux "$vm"
    done
    rl_start_builtin "$CORRUPT_VM"
    for vm in $LINUX_VMS; do
        rl_wait_linux_healthy "$vm"
    done
    rl_wait_builtin_healthy "$CORRUPT_VM"
    rl_status
    # shellcheck disable=SC2086 # a list of ids
    rl_expect_status running $LINUX_VMS "$CORRUPT_VM"
    rl_host_reset_cmd reset
    ;;
2)
    rl_status
    # shellcheck disable=SC2086 # a list of ids
    rl_expect_status saved $LINUX_VMS "$CORRUPT_VM"
    rl_corrupt_state "$CORRUPT_VM"
    rl_restore_and_check "$LINUX_VMS" "$CORRUPT_VM"
    rl_check_left_alone "$CORRUPT_VM"
    rl_finish
    ;;
*) fail "host-reset has no phase $RL_PHASE" ;;
esac
