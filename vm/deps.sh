#!/bin/bash
# Install the host packages the VM lab needs (Debian 12 host, run as root).
# Idempotent: only calls apt when something is missing.
#
# Why each package:
#   qemu-system-x86  the emulator (TCG; KVM on this machine kind cannot run a stock kernel)
#   qemu-utils       qemu-img, for the persistent qcow2 overlays (boot.sh --disk)
#   mmdebstrap       builds the guest rootfs without loop mounts
#   e2fsprogs        mke2fs -d (fill an ext4 image from a directory), debugfs (read results back)
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "deps.sh: must run as root" >&2; exit 1; }

missing() {
    local pkg
    for pkg in qemu-system-x86 qemu-utils mmdebstrap e2fsprogs; do
        # dpkg-query prints "install ok installed" only for a fully installed package.
        if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]; then
            echo "$pkg"
        fi
    done
}

# Two passes at most: on hosts that ship qemu-utils from bookworm-backports, installing
# bookworm's qemu-system-x86 *removes* that qemu-utils (seen on this machine kind), so the
# second pass puts bookworm's qemu-utils (qemu-img 7.2) back.
updated=no
for pass in 1 2; do
    mapfile -t need < <(missing)
    [ "${#need[@]}" -eq 0 ] && break
    echo "deps.sh: pass $pass: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$updated" = no ]; then timeout 300 apt-get update -qq; updated=yes; fi
    log=$(mktemp)
    if ! timeout 600 apt-get install -y -qq --no-install-recommends "${need[@]}" >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"; exit 1
    fi
    grep -E '^(Removing|Setting up) (qemu|mmdebstrap|e2fsprogs)' "$log" || true
    rm -f "$log"
done

# The swap described above can also happen later; check the binaries, not just the packages.
for bin in qemu-system-x86_64 qemu-img mmdebstrap mke2fs debugfs e2fsck; do
    command -v "$bin" >/dev/null || { echo "deps.sh: $bin missing after install" >&2; exit 1; }
done
echo "deps.sh: ok ($(qemu-system-x86_64 --version | head -1); qemu-img $(qemu-img --version | head -1 | awk '{print $3}'); mmdebstrap $(mmdebstrap --version | awk '{print $2}'))"
