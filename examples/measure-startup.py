#!/usr/bin/env python3
"""Start-up time and idle footprint of knockgated, in a throwaway namespace.

    sudo python3 examples/measure-startup.py [path/to/knockgated] [runs]

Start-up = from spawning `ip netns exec NS knockgated` to its "baseline applied"
log line, minus the median cost of `ip netns exec NS true` (reported too).
Idle = VmRSS and context switches (all threads) over 10 s after start-up.
Touches only the namespace it creates (kgbench-<pid>), which it deletes.
"""
import os, statistics, subprocess, sys, tempfile, time

daemon = sys.argv[1] if len(sys.argv) > 1 else "target/release/knockgated"
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 20
ns = f"kgbench-{os.getpid()}"
state_dir = tempfile.mkdtemp(prefix="kgbench-state-")
example = os.path.join(os.path.dirname(os.path.abspath(__file__)), "knockgate.toml")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def spawn():
    env = dict(os.environ, KNOCKGATE_DNS__RESOLVERS="192.0.2.53", RUST_LOG="info",
               KNOCKGATE_KNOCK__STATE_DIR=state_dir,
               KNOCKGATE_ADMIN__SOCKET=os.path.join(state_dir, "admin.sock"))
    return subprocess.Popen(["ip", "netns", "exec", ns, daemon, "--config", example],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True)


def started(proc, deadline=10.0):
    end = time.monotonic() + deadline
    for line in proc.stderr:
        if "baseline applied" in line:
            return True
        if time.monotonic() > end:
            break
    return False


subprocess.run(["ip", "netns", "add", ns], check=True)
try:
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    base = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", ns, "true"], check=True)
        base.append((time.perf_counter() - t) * 1000)
    total = []
    for _ in range(runs):
        t = time.perf_counter()
        p = spawn()
        ok = started(p)
        total.append((time.perf_counter() - t) * 1000)
        p.terminate(); p.wait(5)
        assert ok, "knockgated did not apply its baseline"
    b = statistics.median(base)
    net = [x - b for x in total]
    print(f"runs: {runs}")
    print(f"spawn -> baseline applied: median {statistics.median(total):.2f} ms, p90 {pct(total, 90):.2f} ms")
    print(f"`ip netns exec NS true` alone: median {b:.2f} ms")
    print(f"knockgated start -> baseline applied (difference): median {statistics.median(net):.2f} ms, p90 {pct(net, 90):.2f} ms")

    p = spawn()
    assert started(p)
    def switches():
        n = 0
        for task in os.listdir(f"/proc/{p.pid}/task"):
            with open(f"/proc/{p.pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        n += int(line.split()[1])
        return n
    time.sleep(1)
    s0 = switches()
    time.sleep(10)
    s1 = switches()
    with open(f"/proc/{p.pid}/status") as f:
        fields = dict(l.split(":", 1) for l in f if ":" in l)
    print(f"idle: VmRSS {fields['VmRSS'].strip()}, VmHWM {fields['VmHWM'].strip()}, threads {fields['Threads'].strip()}, "
          f"wake-ups {(s1 - s0) / 10:.1f}/s over 10 s")
    p.terminate(); p.wait(5)
finally:
    subprocess.run(["ip", "netns", "del", ns])
