#!/bin/bash
# Boot a knockgate VM lab guest once (qemu TCG, no network) and run a test payload in it.
#
#   vm/boot.sh [options] IMAGE_DIR PAYLOAD_DIR OUT_DIR
#
#   IMAGE_DIR    output of vm/build-image.sh (vmlinuz, initrd.img, rootfs.ext4)
#   PAYLOAD_DIR  copied onto the io disk (ext4, LABEL=vmlab-io, mounted at /test in the guest);
#                must contain run.sh; optional env (sourced by the guest runner, e.g.
#                VMLAB_GUEST_TIMEOUT=600). run.sh exiting 100 = "reboot me and run me again"
#                (it sees VMLAB_BOOT=1,2,...). See vm/guest/vmlab-run.
#   OUT_DIR      gets serial.log (host-timestamped serial console) and out/ (the guest's
#                /test/out: rc, run.log, journal.txt, systemd-analyze.N, ...)
#
# Options:
#   --timeout S          bound for the whole qemu run (default 1200)
#   --disk FILE.qcow2    persistent root: a qcow2 overlay over IMAGE_DIR/rootfs.ext4 (created
#                        if missing); guest writes stay in FILE
#   --snapshot-of FILE   boot FILE (a qcow2 made with --disk) with snapshot=on: FILE stays as is
#   --no-reboot          a guest reboot (or panic) ends qemu instead of rebooting
#   --max-boots N        kill qemu when the kernel starts more than N times (default 5;
#                        catches panic/reboot loops early)
#   --mem MB / --smp N   guest memory (default 1536) / CPUs (default 2)
#   --append ARGS        extra kernel command line
#   --io-size SIZE       io disk size (default 512M)
#   --env KEY=VALUE      append to the io disk's env file (repeatable), e.g. VMLAB_GUEST_TIMEOUT=300
#   --quiet              print only VMLAB lines of the console (serial.log has everything)
#
# Exit code: the guest's run.sh rc (OUT_DIR/out/rc); 124 if qemu hit --timeout without an rc;
# 125 if qemu ended without an rc; 2 on usage errors.
# The guest has no network device (-nic none); the host's network is not touched.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

timeout_s=1200 disk= snapshot_of= noreboot= max_boots=5 mem=1536 smp=2 append_extra= io_size=512M quiet= envs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) timeout_s=$2; shift 2 ;;
        --disk) disk=$2; shift 2 ;;
        --snapshot-of) snapshot_of=$2; shift 2 ;;
        --no-reboot) noreboot=1; shift ;;
        --max-boots) max_boots=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --append) append_extra=$2; shift 2 ;;
        --io-size) io_size=$2; shift 2 ;;
        --quiet) quiet=1; shift ;;
        --env) envs+=("$2"); shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "boot.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -eq 3 ] || usage
image=$(cd "$1" && pwd); payload=$(cd "$2" && pwd); mkdir -p "$3"; outdir=$(cd "$3" && pwd)
[ -n "$disk" ] && [ -n "$snapshot_of" ] && { echo "boot.sh: --disk and --snapshot-of exclude each other" >&2; exit 2; }
for f in vmlinuz initrd.img rootfs.ext4; do
    [ -s "$image/$f" ] || { echo "boot.sh: $image/$f missing (run vm/build-image.sh)" >&2; exit 2; }
done
[ -f "$payload/run.sh" ] || { echo "boot.sh: $payload/run.sh missing" >&2; exit 2; }

t0=$EPOCHREALTIME
tmp=$(mktemp -d "${TMPDIR:-/tmp}/vmlab.XXXXXX")
qpid= stopsig=
stop_qemu() {
    # Signal qemu itself (its pid from -pidfile) and the timeout wrapper; bounded wait.
    local p qemupid
    qemupid=$(cat "$tmp/qemu.pid" 2>/dev/null || true)
    for p in $qemupid $qpid; do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do
        [ -n "$qemupid" ] && kill -0 "$qemupid" 2>/dev/null || break; sleep 0.1
    done
}
cleanup() {
    [ -n "$qpid" ] && stop_qemu
    rm -rf "$tmp"
}
trap cleanup EXIT
# On INT/TERM only note it and stop qemu: the console loop then sees EOF and the script
# exits through the normal path (no half-finished trap-in-the-middle-of-read semantics).
trap 'stopsig=130; stop_qemu' INT
trap 'stopsig=143; stop_qemu' TERM

# Root disk: throw-away snapshot of the raw image (default), a persistent qcow2 overlay, or
# a throw-away snapshot of such an overlay.
rootdrive="file=$image/rootfs.ext4,format=raw,if=virtio,snapshot=on"
if [ -n "$disk" ]; then
    if [ ! -e "$disk" ]; then
        qemu-img create -q -f qcow2 -b "$image/rootfs.ext4" -F raw "$disk"
        echo "boot.sh: created overlay $disk over $image/rootfs.ext4"
    fi
    rootdrive="file=$disk,format=qcow2,if=virtio"
elif [ -n "$snapshot_of" ]; then
    [ -f "$snapshot_of" ] || { echo "boot.sh: $snapshot_of missing" >&2; exit 2; }
    rootdrive="file=$snapshot_of,format=qcow2,if=virtio,snapshot=on"
fi
# An overlay over a since-rebuilt rootfs.ext4 would boot a corrupt mix: refuse it.
ovl=${disk:-$snapshot_of}
if [ -n "$ovl" ] && [ "$image/rootfs.ext4" -nt "$ovl" ]; then
    echo "boot.sh: $ovl is older than $image/rootfs.ext4 (image rebuilt?); delete it and retry" >&2; exit 2
fi

# io disk: payload in, results (/out) back; filled without mounting (staged copy so the
# payload directory itself is never modified).
mkdir "$tmp/io"
cp -a "$payload/." "$tmp/io/"
rm -rf "$tmp/io/out"
for kv in "${envs[@]}"; do printf '%s\n' "$kv" >>"$tmp/io/env"; done
mke2fs -q -t ext4 -L vmlab-io -d "$tmp/io" "$tmp/io.ext4" "$io_size" >/dev/null

qemu=(qemu-system-x86_64
    -accel tcg -cpu max -smp "$smp" -m "$mem"   # TCG: KVM here cannot run a stock kernel
    -nographic -nic none                        # serial on stdio; no network device at all
    -kernel "$image/vmlinuz" -initrd "$image/initrd.img"
    -append "root=LABEL=vmlab-root rw console=ttyS0 panic=-1 $append_extra"
    -drive "$rootdrive"
    -drive "file=$tmp/io.ext4,format=raw,if=virtio"
    -pidfile "$tmp/qemu.pid")
[ -n "$noreboot" ] && qemu+=(-no-reboot)

rm -rf "$outdir/out" "$outdir/serial.log"
mkfifo "$tmp/console"
timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null >"$tmp/console" 2>&1 &
qpid=$!

# Timestamp each console line (seconds since boot.sh started); stop a reboot/panic loop.
boots=0
while IFS= read -r line || [ -n "$line" ]; do
    line=${line//$'\r'/}
    now=$EPOCHREALTIME; d=$(( 10#${now//[.,]/} - 10#${t0//[.,]/} ))   # microseconds, no fork
    printf -v stamped '[%4d.%03d] %s' $((d / 1000000)) $((d / 1000 % 1000)) "$line"
    printf '%s\n' "$stamped" >>"$outdir/serial.log"
    if [ -z "$quiet" ] || [[ $line == *VMLAB* ]]; then printf '%s\n' "$stamped"; fi
    if [[ $line == *"Linux version "* ]]; then
        boots=$((boots + 1))
        if [ "$boots" -gt "$max_boots" ]; then
            echo "boot.sh: kernel started $boots times (> --max-boots $max_boots); stopping qemu" >&2
            kill "$qpid" 2>/dev/null || true
        fi
    fi
done <"$tmp/console"
qrc=0; wait "$qpid" || qrc=$?
[ -n "$stopsig" ] && { echo "boot.sh: interrupted" >&2; exit "$stopsig"; }
qpid=

# Results back without mounting; replay the journal first if qemu was killed mid-write.
e2fsck -p "$tmp/io.ext4" >/dev/null 2>&1 || e2fsck -fy "$tmp/io.ext4" >/dev/null 2>&1 || true
if debugfs -R "stat /out" "$tmp/io.ext4" >/dev/null 2>&1 && debugfs -R "stat /out" "$tmp/io.ext4" 2>/dev/null | grep -q 'Type: directory'; then
    debugfs -R "rdump /out \"$outdir\"" "$tmp/io.ext4" >/dev/null 2>&1 || true
fi

t1=$EPOCHREALTIME
el() { awk -v a="$t0" -v b="$1" 'BEGIN{printf "%.1f", b-a}'; }
echo "---- boot.sh summary ($(basename "$image"), $outdir)"
grep -E 'VMLAB: (runner-start|system-ready)' "$outdir/serial.log" 2>/dev/null \
    | sed -E 's/^\[ *([0-9.]+)\] .*VMLAB: ([a-z-]+) (boot=[0-9]+)(.*)$/  \2 \3 at host +\1 s (\4 )/' || true
[ -f "$outdir/out/uname-r" ] && echo "  kernel: $(cat "$outdir/out/uname-r")"
echo "  qemu exit: $qrc; total wall: $(el "$t1") s"
if [ -s "$outdir/out/rc" ]; then
    rc=$(cat "$outdir/out/rc")
    echo "  run.sh rc: $rc"
    exit "$rc"
elif [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    echo "  no rc: qemu timed out after ${timeout_s} s" >&2; exit 124
else
    echo "  no rc came back from the guest (see $outdir/serial.log)" >&2; exit 125
fi
