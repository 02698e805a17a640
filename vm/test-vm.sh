#!/bin/bash
# make test-vm: the VM lab. Builds the package, a Debian 12 (kernel 6.1) and a Debian
# 13 (kernel 6.12) image, and boots each once under qemu (TCG, no network device),
# rebooting inside that run through three groups of checks (vm/lab/run.sh: install,
# service, life). Prints every check as "<suite> CHECK PASS|FAIL group/name", the
# guest's knockgated journal for a suite with a failure, and a last line
# "N passed, N failed", after the failed checks once more. VMLAB_SUITES narrows the suites (e.g. "bookworm").
set -euo pipefail
cd "$(dirname "$0")/.."
suites=${VMLAB_SUITES:-bookworm trixie}
bash vm/deps.sh
deb=$(ls -t target/debian/knockgate_*.deb 2>/dev/null | head -n 1)
[ -n "$deb" ] || { echo "test-vm: no package; run make package first" >&2; exit 2; }
total_pass=0 total_fail=0 broken= failed_lines=
for suite in $suites; do
    started=$SECONDS
    bash vm/build-image.sh "$suite" "target/vm/$suite"
    built=$SECONDS
    payload="target/vm/payload-$suite" run="target/vm/runs/lab-$suite"
    rm -rf "$payload" "$run"; mkdir -p "$payload"
    cp vm/lab/run.sh vm/lab/probe.py vm/lab/vmlab-net vm/lab/vmlab-net.service "$deb" "$payload/"
    rc=0
    bash vm/boot.sh --quiet --timeout 3000 --env VMLAB_GUEST_TIMEOUT=1500 \
        "target/vm/$suite" "$payload" "$run" || rc=$?
    log="$run/out/run.log"
    pass=$(grep -c '^CHECK PASS' "$log" 2>/dev/null || true)
    fail=$(grep -c '^CHECK FAIL' "$log" 2>/dev/null || true)
    grep -E '^(CHECK |flush result|=== boot)' "$log" 2>/dev/null | sed "s/^/$suite /" || true
    mkdir -p "$run"
    if [ "$rc" != 0 ] && [ "$fail" = 0 ]; then
        fail=1; echo "$suite CHECK FAIL vm/guest-run :: boot.sh exit $rc (see $run)" >>"$run/failed"
    fi
    grep '^CHECK FAIL' "$log" 2>/dev/null | sed "s/^/$suite /" >>"$run/failed" || true
    [ -s "$run/failed" ] && failed_lines="$failed_lines$(cut -c1-600 "$run/failed")"$'\n'
    echo "$suite: image $((built - started)) s, boots and checks $((SECONDS - built)) s, $pass passed, $fail failed"
    if [ "$fail" != 0 ]; then
        broken="$broken $suite"
        echo "---- $suite: knockgated's journal (all boots) ----"
        cat "$run"/out/journal.*.txt 2>/dev/null | grep -E 'knockgate|vmlab' | tail -n 150 || true
        echo "---- $suite: end of serial console ----"
        tail -n 40 "$run/serial.log" 2>/dev/null || true
    fi
    total_pass=$((total_pass + pass)) total_fail=$((total_fail + fail))
done
# The failures again, last, where a truncated log (CI's tail) still shows them.
[ -n "$failed_lines" ] && printf 'test-vm: failed checks\n%s' "$failed_lines"
echo "test-vm:$broken"
echo "test-vm: $total_pass passed, $total_fail failed"
[ "$total_fail" = 0 ]
