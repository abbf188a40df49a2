# shellcheck shell=busybox
# host-reset-soak: two Linux guests through RESETS host resets in a row.
#
# As host-reset without the corrupt VM: phase 1 starts two Linux guests (1 vCPU,
# 256 MiB each, memory and state on the DAX state root) and resets the test host;
# every later phase N checks that `host prepare` found the same filesystem,
# `host status` lists both saved, `host restore-all` (exit 0) brings both back and each
# carried on (next tick n, same boot_id, uptime not back, a later WB-CSUM ok, its whole
# console one boot with consecutive ticks and good checksums, API answering), then
# resets again until RESETS resets have passed.
#
# Metrics per reset as in host-reset plus host_reset_cycle_ms (the reset command's
# start to both guests checked, their next four ticks included), then
# restore_latency_ms_median/_max and blackout_ms_median/_max over all resets and
# guests, and scenario_wall_s (phase 1's start to the end, every boot included).

# shellcheck source=../reset-lib.sh
. /testhost/reset-lib.sh

LINUX_VMS="linux1 linux2"
RESETS=5

rl_begin
if [ "$RL_PHASE" = 1 ]; then
    for vm in $LINUX_VMS; do
        rl_start_linux "$vm"
    done
    for vm in $LINUX_VMS; do
        rl_wait_linux_healthy "$vm"
    done
    rl_status
    # shellcheck disable=SC2086 # a list of ids
    rl_expect_status running $LINUX_VMS
    rl_host_reset_cmd reset
fi

note "after reset $((RL_PHASE - 1)) of $RESETS"
rl_status
# shellcheck disable=SC2086 # a list of ids
rl_expect_status saved $LINUX_VMS
rl_restore_and_check "$LINUX_VMS" ""
echo "WB-METRIC host_reset_cycle_ms=$((($(rl_now_us) - ${RL_RESET_START_US:-0}) / 1000))"

if [ "$RL_PHASE" -le "$RESETS" ]; then
    rl_host_reset_cmd reset
fi
rl_summary restore_latency_ms
rl_summary blackout_ms
rl_finish
