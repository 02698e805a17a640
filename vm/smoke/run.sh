#!/bin/bash
# Smoke test for the VM lab (runs inside the guest via vmlab-run; see vm/boot.sh).
# SMOKE_REBOOT=1 (boot.sh --env SMOKE_REBOOT=1): boot 1 records boot_id and exits 100
# (= reboot request); boot 2 checks the boot_id changed.
# SMOKE_PERSIST=write|check: for boot.sh --disk / --snapshot-of: "write" stores a marker in
# the root fs (/var/lib/vmlab-smoke/marker), "check" expects it from an earlier qemu run.
# Last line: "N passed, N failed".
set -uo pipefail
pass=0 fail=0
check() {   # check NAME CMD...: run CMD, count and print the result
    local name=$1 out; shift
    if out=$("$@" 2>&1); then pass=$((pass + 1)); echo "PASS $name${out:+: ${out//$'\n'/ | }}"
    else fail=$((fail + 1)); echo "FAIL $name: ${out//$'\n'/ | }"; fi
}
boot=${VMLAB_BOOT:-1} out=${VMLAB_OUT:-/test/out}
echo "smoke: boot $boot, kernel $(uname -r), $(. /etc/os-release; echo "$PRETTY_NAME"), systemd $(systemctl --version | awk 'NR==1{print $2}'), nft $(nft --version | awk '{print $2}')"

check "pid1-is-systemd" bash -c '[ "$(cat /proc/1/comm)" = systemd ] && readlink /proc/1/exe'
check "cgroup2" bash -c '[ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] && cat /sys/fs/cgroup/cgroup.controllers'
check "system-state" bash -c 's=$(systemctl is-system-running); echo "$s"; [ "$s" = running ]'
check "nft-table" bash -c 'nft add table inet smoke && nft add set inet smoke s "{ type ipv4_addr; flags timeout; }" \
    && nft add element inet smoke s "{ 192.0.2.1 timeout 30s }" && nft list set inet smoke s | grep -q expires && nft delete table inet smoke'
check "netns-veth-ping" bash -c 'set -e
    ip netns add smoke_a; ip netns add smoke_b
    ip link add va netns smoke_a type veth peer name vb netns smoke_b
    ip -n smoke_a addr add 10.99.0.1/24 dev va; ip -n smoke_b addr add 10.99.0.2/24 dev vb
    ip -n smoke_a link set va up; ip -n smoke_b link set vb up
    ip netns exec smoke_a ping -c 2 -i 0.2 -W 3 10.99.0.2 | grep -o "[0-9]* received"
    ip netns del smoke_a; ip netns del smoke_b'
check "systemd-run-scope" systemd-run --quiet --scope true
check "sshd-active" bash -c 'systemctl is-active ssh.service && timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/22; head -c 7 <&3"'
check "no-network-device" bash -c 'n=$(ls /sys/class/net | grep -v "^lo$" || true); [ -z "$n" ] || { echo "unexpected: $n"; false; }'

case "${SMOKE_PERSIST:-}" in
    write) check "persist-write" bash -c 'mkdir -p /var/lib/vmlab-smoke && cat /proc/sys/kernel/random/boot_id >/var/lib/vmlab-smoke/marker && sync && cat /var/lib/vmlab-smoke/marker' ;;
    check) check "persist-check" bash -c 'm=$(cat /var/lib/vmlab-smoke/marker) && b=$(cat /proc/sys/kernel/random/boot_id) && echo "marker $m, now $b" && [ "$m" != "$b" ]' ;;
esac

if [ "${SMOKE_REBOOT:-0}" = 1 ]; then
    if [ "$boot" = 1 ]; then
        cat /proc/sys/kernel/random/boot_id >"$out/smoke-boot-id.1"
        echo "smoke: boot 1: $pass passed, $fail failed so far; requesting reboot"
        [ "$fail" = 0 ] && exit 100
    else
        check "reboot-boot-id-changed" bash -c 'a=$(cat '"$out"'/smoke-boot-id.1); b=$(cat /proc/sys/kernel/random/boot_id); echo "$a -> $b"; [ -n "$a" ] && [ "$a" != "$b" ]'
        check "reboot-boot-number" test "$boot" = 2
    fi
fi
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
