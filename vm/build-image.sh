#!/bin/bash
# Build a bootable Debian guest image for the knockgate VM lab.
#
#   vm/build-image.sh SUITE OUTDIR        SUITE = bookworm (kernel 6.1) | trixie (kernel 6.12)
#
# Produces in OUTDIR: vmlinuz, initrd.img, rootfs.ext4 (2 GiB sparse ext4, LABEL=vmlab-root),
# kernel-version, packages.txt (dpkg -l of the guest), stamp.
# Skips the build when OUTDIR/stamp matches the hash of this script + vm/guest/* + SUITE.
# Needs root and the packages from vm/deps.sh. Only Debian's archive is contacted.
set -euo pipefail

usage() { echo "usage: $0 bookworm|trixie OUTDIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
suite=$1; outdir=$2
case "$suite" in bookworm|trixie) ;; *) usage ;; esac
[ "$(id -u)" = 0 ] || { echo "build-image.sh: must run as root (mmdebstrap root mode)" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
guest=$here/guest
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)

# Stamp: everything that determines the image content (except the archive's current state).
stamp=$( { echo "suite=$suite"; sha256sum "$here/build-image.sh"; (cd "$guest" && sha256sum $(ls | sort)); } | sha256sum | cut -d' ' -f1)
if [ -f "$outdir/stamp" ] && [ "$(cat "$outdir/stamp")" = "$stamp" ] \
   && [ -s "$outdir/vmlinuz" ] && [ -s "$outdir/initrd.img" ] && [ -s "$outdir/rootfs.ext4" ] && [ -s "$outdir/kernel-version" ]; then
    echo "build-image.sh: $outdir is up to date ($suite, kernel $(cat "$outdir/kernel-version")); skipping"
    exit 0
fi
rm -f "$outdir/stamp"   # an interrupted build must not look complete

start=$(date +%s.%N)
work=$(mktemp -d "$outdir/.build.XXXXXX")
cleanup() { rm -rf --one-file-system "$work"; }
trap cleanup EXIT
root=$work/root

# libpam-systemd: users' own systemd managers (a standard Debian install has it);
# a non-root member's command-scoped egress-window asks theirs for a scope.
# iptables: the flush scenario keeps conntrack registered with a legacy rule, as a host
# with Docker or an iptables script has it (nft flush ruleset does not touch those).
pkgs=(
    systemd systemd-sysv udev dbus
    nftables libnftnl11 libmnl0 iproute2 iputils-ping
    openssh-server openssh-client curl procps python3 kmod adduser
    linux-image-cloud-amd64 initramfs-tools
    openssl e2fsprogs util-linux bsdutils less
    iptables
    libpam-systemd
)
# The cloud kernel has virtio_pci/virtio_blk as modules: the initrd is required.
# trixie is merged-/usr only; the hook sets the symlinks up before any package is unpacked
# (for bookworm the usrmerge/usr-is-merged dependency of init-system-helpers does it).
hookdirs=()
[ "$suite" = trixie ] && hookdirs=(--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)

mirror=http://deb.debian.org/debian
secmirror=http://deb.debian.org/debian-security

export VMLAB_GUEST_DIR=$guest   # read by the customize hooks below
echo "build-image.sh: mmdebstrap $suite -> $root"
timeout 1200 mmdebstrap --mode=root --variant=minbase --quiet \
    "${hookdirs[@]}" \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --include="$(IFS=,; echo "${pkgs[*]}")" \
    --customize-hook='echo vmlab >"$1/etc/hostname"' \
    --customize-hook='printf "127.0.0.1\tlocalhost\n127.0.1.1\tvmlab\n::1\tlocalhost ip6-localhost ip6-loopback\n" >"$1/etc/hosts"' \
    --customize-hook='printf "LABEL=vmlab-root / ext4 rw,errors=remount-ro 0 1\n" >"$1/etc/fstab"' \
    --customize-hook='chroot "$1" passwd -d root' \
    --customize-hook='chroot "$1" ssh-keygen -A' \
    --customize-hook='install -m 0755 "$VMLAB_GUEST_DIR/vmlab-run" "$1/usr/local/sbin/vmlab-run"' \
    --customize-hook='install -m 0644 "$VMLAB_GUEST_DIR/vmlab-run.service" "$1/etc/systemd/system/vmlab-run.service"' \
    --customize-hook='mkdir -p "$1/test"' \
    --customize-hook='chroot "$1" systemctl enable vmlab-run.service' \
    --customize-hook='chroot "$1" systemctl enable ssh.service' \
    `# No network and throw-away disks: periodic maintenance only adds noise to test boots.` \
    --customize-hook='chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer 2>/dev/null || true' \
    `# Make sure an initrd exists even if the kernel was configured before initramfs-tools.` \
    --customize-hook='ls "$1"/boot/initrd.img-* >/dev/null 2>&1 || chroot "$1" update-initramfs -c -k all' \
    --customize-hook='chroot "$1" dpkg-query -W -f="\${Package} \${Version}\n" >"$1/root/packages.txt"' \
    "$suite" "$root" \
    "deb $mirror $suite main" \
    "deb $mirror $suite-updates main" \
    "deb $secmirror $suite-security main"

# Kernel + initrd: exactly one of each is expected.
kver=$(ls "$root/usr/lib/modules")
[ "$(echo "$kver" | wc -l)" = 1 ] || { echo "build-image.sh: expected one kernel, got: $kver" >&2; exit 1; }
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
chmod 0644 "$work/vmlinuz" "$work/initrd.img"
echo "$kver" >"$work/kernel-version"
mv "$root/root/packages.txt" "$work/packages.txt"

# ext4 filled straight from the directory (no loop mount); sparse 2 GiB.
mke2fs -q -t ext4 -L vmlab-root -d "$root" "$work/rootfs.ext4" 2G

for f in vmlinuz initrd.img kernel-version packages.txt rootfs.ext4; do mv -f "$work/$f" "$outdir/$f"; done
echo "$stamp" >"$outdir/stamp"

end=$(date +%s.%N)
printf 'build-image.sh: built %s in %.1f s: kernel %s, %s packages, rootfs.ext4 %s allocated (%s apparent), vmlinuz %s, initrd %s\n' \
    "$suite" "$(awk -v a="$start" -v b="$end" 'BEGIN{print b-a}')" "$kver" "$(wc -l <"$outdir/packages.txt")" \
    "$(du -h "$outdir/rootfs.ext4" | cut -f1)" "$(du -h --apparent-size "$outdir/rootfs.ext4" | cut -f1)" \
    "$(du -h "$outdir/vmlinuz" | cut -f1)" "$(du -h "$outdir/initrd.img" | cut -f1)"
