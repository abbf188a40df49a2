# shellcheck shell=busybox
# console: the guest runs a shell on its serial console; what the scenario types on
# waterbear's stdin reaches it, and its answers come back on stdout. Typing
# `reboot -f` ends the guest, and waterbear exits 0. waterbear's log goes to VMM_LOG so
# that an unexpected exit shows why (show_exit_context).
VMM_LOG=/run/console-vmm.log
wb_start console --kernel "$GUEST_DIR/vmlinux" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
    --cpus 1 --memory 256M --cmdline "$(guest_cmdline console)" --serial stdio \
    --log-level info --log-file "$VMM_LOG"
expect_guest_init
wb_expect 'WB-CONSOLE-READY' 120

# The shell, not the test host, must do the arithmetic: the echoed command line
# contains "hello-$((6*7))", only the shell's answer contains "hello-42".
# shellcheck disable=SC2016 # the guest expands it
wb_send 'echo hello-$((6*7))'
wb_expect 'hello-42' 60

wb_send 'reboot -f'
wb_wait_exit 60
[ "$WB_STATUS" = 0 ] || fail "waterbear exited with status $WB_STATUS after the guest rebooted"
metric_vmm_rss
