#!/usr/bin/env bash
# The knockgate baseline at work, in throwaway network namespaces.
#
#   laptop ── server (knockgated) ── internet (a mirror on 80/443)
#
# Never touches the host's own network or firewall: everything happens in
# namespaces this script creates (names start with kgdemo-) and removes on exit.
# Needs root. Run it as `make demo`, or: sudo examples/lab-demo.sh [path/to/knockgated]
set -euo pipefail

daemon=${1:-target/debug/knockgated}
[ "$(id -u)" = 0 ] || { echo "lab-demo: needs root (network namespaces)" >&2; exit 2; }
[ -x "$daemon" ] || { echo "lab-demo: $daemon not built; run 'cargo build' first" >&2; exit 2; }
for tool in ip nft python3 ping; do
  command -v "$tool" >/dev/null || { echo "lab-demo: $tool missing; run 'make deps'" >&2; exit 2; }
done

p="kgdemo-$$"
laptop="$p-laptop" server="$p-server" internet="$p-internet"
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "$laptop" "$server" "$internet"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "/etc/netns/$server" "$work"
}
trap cleanup EXIT

for ns in "$laptop" "$server" "$internet"; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
ip -n "$laptop" link add eth0 type veth peer name eth0 netns "$server"
ip -n "$server" link add eth1 type veth peer name eth0 netns "$internet"
ip -n "$laptop" addr add 10.77.1.2/24 dev eth0
ip -n "$server" addr add 10.77.1.1/24 dev eth0
ip -n "$server" addr add 10.77.2.1/24 dev eth1
ip -n "$internet" addr add 10.77.2.2/24 dev eth0
ip -n "$internet" addr add 10.77.2.53/24 dev eth0
for pair in "$laptop eth0" "$server eth0" "$server eth1" "$internet eth0"; do
  set -- $pair; ip -n "$1" link set "$2" up
done
ip -n "$laptop" route add default via 10.77.1.1
ip -n "$internet" route add default via 10.77.2.1
ip netns exec "$server" sysctl -qw net.ipv4.ip_forward=1
# The server's resolver, as its /etc/resolv.conf would name it.
mkdir -p "/etc/netns/$server"
echo "nameserver 10.77.2.53" > "/etc/netns/$server/resolv.conf"

serve() { # serve NS PORT...: a tiny TCP server answering "hello" on each port
  local ns=$1; shift
  for port in "$@"; do
    ip netns exec "$ns" python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1]))); s.listen(); s.settimeout(120)
while True:
    c, _ = s.accept(); c.sendall(b"hello\n"); c.close()
' "$port" & pids+=($!)
  done
}
serve "$server" 22 80 443 8080
serve "$internet" 80 443 53
sleep 1

unexpected=0
check() { # check NS WHAT IP PORT EXPECT
  local ns=$1 what=$2 ip=$3 port=$4 expect=$5 got
  if ip netns exec "$ns" timeout 1 bash -c "exec 3<>/dev/tcp/$ip/$port && head -c5 <&3" >/dev/null 2>&1; then got=open; else got=closed; fi
  local mark="ok"; [ "$got" = "$expect" ] || { mark="UNEXPECTED"; unexpected=$((unexpected + 1)); }
  printf '  %-44s %-7s (%s)\n' "$what" "$got" "$mark"
}
probe_all() {
  check "$laptop" "laptop  -> server:80   (web)" 10.77.1.1 80 "$1"
  check "$laptop" "laptop  -> server:443  (web)" 10.77.1.1 443 "$1"
  check "$laptop" "laptop  -> server:22   (ssh)" 10.77.1.1 22 "${3:-$2}"
  check "$laptop" "laptop  -> server:8080 (anything else)" 10.77.1.1 8080 "$2"
  check "$server" "server  -> internet:443 (new outbound)" 10.77.2.2 443 "$2"
  check "$server" "server  -> resolver:53 (DNS over TCP)" 10.77.2.53 53 open
  check "$server" "server  -> internet:53 (DNS elsewhere)" 10.77.2.2 53 "$2"
  check "$laptop" "laptop  -> internet:80 (forwarded)" 10.77.2.2 80 "$2"
}

echo "== before knockgated: everything is open"
probe_all open open

cfg="$work/knockgate.toml"
cp examples/knockgate.toml "$cfg"
bin=$(dirname "$daemon")
# A knock key for the laptop, as `knockgate keygen` makes it.
"$bin/knockgate" keygen demo-laptop --dir "$work/keys" --config "$cfg" >/dev/null
printf '\n[[keys]]\nid = "demo-laptop"\nfile = "%s"\n' "$work/keys/demo-laptop.key" >> "$cfg"
export KNOCKGATE_KNOCK__SERVER_ID=demo
echo
echo "== starting knockgated with examples/knockgate.toml"
# `ip netns exec` mounts a fresh /sys without cgroup2; mount it again (in that mount
# namespace only) so the daemon can read egress-window's cgroup, as on a real host.
KNOCKGATE_KNOCK__STATE_DIR="$work/state" KNOCKGATE_ADMIN__SOCKET="$work/admin.sock" ip netns exec "$server" sh -c 'mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null; exec "$@"' sh "$daemon" --config "$cfg" 2>"$work/daemon.log" & dpid=$!; pids+=("$dpid")
for _ in $(seq 100); do grep -q "listening for knocks" "$work/daemon.log" && break; sleep 0.05; done
sed 's/^/  log: /' "$work/daemon.log"
echo
echo "== with the baseline: web in, nothing else; DNS out to the resolver only"
probe_all open closed
if ip netns exec "$laptop" ping -c1 -W1 10.77.1.1 >/dev/null; then echo "  laptop  -> server ping                       answered"; fi
echo
echo "== the laptop knocks (one UDP datagram, never answered) and SSH opens for it alone"
ip netns exec "$laptop" "$bin/knock" --server 10.77.1.1 --key-id demo-laptop \
  --key-file "$work/keys/demo-laptop.key" --server-id demo --ttl 1m --wait 2>&1 | sed 's/^/  /'
check "$laptop" "laptop  -> server:22   (ssh, after the knock)" 10.77.1.1 22 open
check "$internet" "internet -> server:22  (ssh, someone else)" 10.77.2.1 22 closed
"$bin/knockgate" --socket "$work/admin.sock" grants | sed 's/^/  /'
grep 'knock accepted' "$work/daemon.log" | sed 's/^/  log: /'

echo
echo "== egress-window: outbound HTTPS for one command (and its children), nobody else"
probe443="timeout 1 bash -c 'exec 3<>/dev/tcp/10.77.2.2/443'"
nsenter --net="/run/netns/$server" "$bin/egress-window" --socket "$work/admin.sock" 10s -- \
  bash -c "$probe443 && echo '  inside the window: server -> internet:443        open    (ok)'" \
  || { echo "  inside the window: server -> internet:443        closed  (UNEXPECTED)"; unexpected=$((unexpected + 1)); }
check "$server" "server  -> internet:443 (after the window)" 10.77.2.2 443 closed

echo
echo "== knockgated stopped with SIGTERM: the baseline stays (fail closed), and the"
echo "   laptop's grant stays until its TTL ends — the kernel times it, not the daemon"
kill -TERM "$dpid"; wait "$dpid" || true
probe_all open closed open
echo
echo "== the table it left (nft list table inet knockgate, first lines)"
ip netns exec "$server" nft list table inet knockgate | sed -n '1,5p;/chain input/,/^\t}/p' | sed 's/^/  /'

if [ "$unexpected" -ne 0 ]; then
  echo "lab-demo: $unexpected unexpected results" >&2
  exit 1
fi
