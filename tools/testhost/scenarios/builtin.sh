# shellcheck shell=busybox
# builtin: waterbear's built-in test guest (no Linux) ticks inside the test host.
# The smallest check that waterbear, its libraries and /dev/kvm work here; the
# guest runs until stopped, so the scenario stops waterbear itself.
wb_start builtin --serial stdio
wb_expect 'tick [0-9]' 60
metric_time_since_start time_to_first_tick_ms
wb_expect 'tick 3' 60
proc_alive "$WB_PID" || fail "waterbear exited after the guest's third tick"
metric_vmm_rss
wb_stop
