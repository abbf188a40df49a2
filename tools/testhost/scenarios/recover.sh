# shellcheck shell=busybox
# recover: `waterbear host recover` escalates through the three recovery phases and
# both guests survive.
#
# Phase 1 (the boot QEMU started): two Linux guests (1 vCPU, 256 MiB each, memory and
# state on the DAX state root) tick with good memory checks; then `host recover
# --inject-failure phase1 --kernel /boot/vmlinuz --initrd <this test host's initrd>
# --append "<this command line> wb.phase=2 wb.run=<id>" --bundle B --timeline T`, with
# B and T on the state root's filesystem so they outlive the kexec. Recovery phase 1
# live-updates both VMMs and the injected failure fails the first one's health check;
# recovery phase 2 writes the bundle; recovery phase 3 resets the host.
#
# Phase 2 (after the kexec): the timeline lists recovery phase 1 with the first VM
# failed (the injected failure) and the second ok, phase 2 ok, and phase 3; the
# bundle's summary.json names the phase 1 failure as its first finding and the bundle
# holds both VMs and the host's kernel log. `host restore-all` (exit 0) brings both
# guests back with the checks of host-reset.
#
# Metrics: as host-reset (host_reset_to_new_kernel_ms here counts from `host recover`'s
# start, its live updates and bundle included), plus recover_phase<N>_ms per timeline
# step.

# shellcheck source=../reset-lib.sh
. /testhost/reset-lib.sh

LINUX_VMS="linux1 linux2"
BUNDLE=$RL_MNT/diagnostics/bundle
TIMELINE=$RL_MNT/diagnostics/timeline.json

# timeline_steps: the timeline as "phase|step|outcome|duration_ms" lines.
timeline_steps() {
    awk '
        /"phase":/ { v = $0; sub(/.*"phase": */, "", v); sub(/,.*/, "", v); phase = v }
        /"step":/ { v = $0; sub(/.*"step": "/, "", v); sub(/",?$/, "", v); step = v }
        /"outcome":/ { v = $0; sub(/.*"outcome": "/, "", v); sub(/",?$/, "", v); outcome = v }
        /"duration_ms":/ { v = $0; sub(/.*"duration_ms": */, "", v); sub(/,.*/, "", v); dur = v }
        /^ *}/ { print phase "|" step "|" outcome "|" dur; phase = step = outcome = dur = "" }
    ' "$TIMELINE"
}

check_timeline() {
    local steps first
    [ -s "$TIMELINE" ] || rl_fail "no timeline $TIMELINE after the kexec"
    note "timeline $TIMELINE:"
    awk '{ print "timeline| " $0 }' "$TIMELINE"
    steps=$(timeline_steps)
    printf '%s\n' "$steps" | awk -F'|' '$1 != "" { printf "WB-METRIC recover_phase%s_ms=%.0f\n", $1, $4 }'

    first=$(echo "$LINUX_VMS" | cut -d' ' -f1)
    printf '%s\n' "$steps" | grep -q -E "^1\|[^|]*$first\|failed: [^|]*inject" ||
        rl_problem "the timeline has no failed recovery phase 1 step for $first naming the injected failure"
    for vm in $LINUX_VMS; do
        [ "$vm" != "$first" ] || continue
        printf '%s\n' "$steps" | grep -q -E "^1\|[^|]*$vm\|ok\|" ||
            rl_problem "the timeline has no successful recovery phase 1 step for $vm"
    done
    printf '%s\n' "$steps" | grep -q -E '^2\|[^|]*\|ok\|' ||
        rl_problem "the timeline has no successful recovery phase 2 (diagnostics bundle) step"
    printf '%s\n' "$steps" | grep -q -E '^3\|' ||
        rl_problem "the timeline has no recovery phase 3 step: the host reset that did happen is not recorded (steps: $(printf '%s' "$steps" | cut -d'|' -f1,2,3 | tr '\n' ';'))"
    printf '%s\n' "$steps" | grep -q -E '^3\|.*\|failed' &&
        rl_problem "the timeline records recovery phase 3 as failed although the host was reset"
    return 0
}

check_bundle() {
    local summary=$BUNDLE/summary.json first what
    [ -s "$summary" ] || rl_fail "the bundle $BUNDLE has no summary.json after the kexec"
    note "$summary:"
    awk '{ print "summary| " $0 }' "$summary" | head -n 60
    first=$(echo "$LINUX_VMS" | cut -d' ' -f1)
    # The first finding: the first "what" after "findings".
    what=$(awk '/"findings":/ { f = 1 } f && /"what":/ { sub(/.*"what": "/, ""); sub(/",?$/, ""); print; exit }' "$summary")
    case $what in
    *"phase 1"*"$first"*) note "the bundle's first finding: $what" ;;
    *) rl_problem "the bundle's first finding is '${what:-none}', not recovery phase 1's failure of $first" ;;
    esac
    grep -q 'inject' "$summary" || rl_problem "summary.json does not mention the injected failure"
    for vm in $LINUX_VMS; do
        [ -d "$BUNDLE/vms/$vm" ] || rl_problem "the bundle has no vms/$vm"
    done
    [ -s "$BUNDLE/host/kernel.log" ] || rl_problem "the bundle has no host/kernel.log"
}

rl_begin
case $RL_PHASE in
1)
    for vm in $LINUX_VMS; do
        rl_start_linux "$vm"
    done
    for vm in $LINUX_VMS; do
        rl_wait_linux_healthy "$vm"
    done
    rl_status
    # shellcheck disable=SC2086 # a list of ids
    rl_expect_status running $LINUX_VMS
    mkdir -p "$(dirname "$BUNDLE")"
    rl_host_reset_cmd recover --inject-failure phase1 --bundle "$BUNDLE" --timeline "$TIMELINE"
    ;;
2)
    check_timeline
    check_bundle
    rl_status
    # shellcheck disable=SC2086 # a list of ids
    rl_expect_status saved $LINUX_VMS
    rl_restore_and_check "$LINUX_VMS" ""
    rl_finish
    ;;
*) fail "recover has no phase $RL_PHASE" ;;
esac
