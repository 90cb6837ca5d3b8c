#!/usr/bin/env bash
# Boot a real Debian Linux kernel under QEMU whose netconsole sends its log over UDP to
# 127.0.0.1:PORT inside a network namespace, then run a scenario in the guest and power off.
#
# usage: kernel-netconsole.sh --port PORT [--extended] [--release] [--netns NAME]
#                             [--dump FILE] --scenario hello|long|flood N|crash|sysrq-l
#   --netns NAME  run QEMU in that existing namespace (start the receiver there first:
#                 `ip netns exec NAME twistd -n tempesta-ts ...`); without it a namespace is made
#   --dump FILE   start a listener that writes every datagram (Python repr, one a line) to FILE
#   --console FILE  keep the guest's serial console output there
#   --prepare     only install QEMU and fetch the kernel package (needs the registries), then exit
# Everything installs and builds at run time; downloads are cached under $TS_KERNEL_CACHE.
# With TS_KERNEL_NO_INSTALL=1 nothing is installed or downloaded: what is missing ends it
# with status 3.
set -euo pipefail
PORT=""; EXT=""; REL=""; NETNS=""; DUMP=""; SCEN=""; ARG=""; CONS=""; PREP=""
while [ $# -gt 0 ]; do case "$1" in
  --prepare) PREP=1; shift;; --port) PORT=$2; shift 2;; --extended) EXT=1; shift;; --release) echo "release prepend needs Linux 6.6+; this kernel is 6.1" >&2; exit 2;;
  --netns) NETNS=$2; shift 2;; --dump) DUMP=$2; shift 2;; --console) CONS=$2; shift 2;;
  --scenario) SCEN=$2; shift 2; if [ "$SCEN" = flood ]; then ARG=$1; shift; fi;;
  *) echo "unknown argument $1" >&2; exit 2;; esac; done
[ -n "$PREP" ] || { [ -n "$PORT" ] && [ -n "$SCEN" ]; } || { sed -n '2,14p' "$0"; exit 2; }
CACHE=${TS_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tempesta-ts-kernel}; mkdir -p "$CACHE"
missing() { echo "$1 is missing and TS_KERNEL_NO_INSTALL is set" >&2; exit 3; }
need() { command -v "$1" >/dev/null || { [ -z "${TS_KERNEL_NO_INSTALL:-}" ] || missing "$1"; apt-get update -qq; apt-get install -y -qq --no-install-recommends "${@:2}" >/dev/null; }; }
need qemu-system-x86_64 qemu-system-x86
need cpio cpio
[ -x /bin/busybox ] || need busybox busybox-static
if [ ! -d "$CACHE/root/boot" ]; then
  [ -z "${TS_KERNEL_NO_INSTALL:-}" ] || missing "the kernel under $CACHE"
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  (cd "$CACHE" && apt-get download "$pkg" >/dev/null 2>&1 && dpkg -x linux-image-*.deb root)
fi
[ -z "$PREP" ] || exit 0
KVER=$(ls "$CACHE/root/lib/modules" | head -1); KMOD="$CACHE/root/lib/modules/$KVER/kernel"
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/i/bin" "$WORK/i/proc" "$WORK/i/sys" "$WORK/i/dev" "$WORK/i/lib"
cp /bin/busybox "$WORK/i/bin/"; for c in sh insmod ip echo sleep seq poweroff cat mount dmesg; do ln -s busybox "$WORK/i/bin/$c"; done
cp "$KMOD/drivers/net/ethernet/intel/e1000/e1000.ko" "$KMOD/fs/configfs/configfs.ko" "$KMOD/drivers/net/netconsole.ko" "$WORK/i/lib/"
FLAGS="${EXT:++}${REL:+r}"
case "$SCEN" in
  hello) S='echo test-message > /dev/kmsg; echo "WARNING test message" > /dev/kmsg; echo "after the warning" > /dev/kmsg';;
  long) S='L=$(printf "%0975d" 0); echo "start $L end" > /dev/kmsg';;  # /dev/kmsg takes <= 992 bytes; the header pushes it past 1000
  flood) S="for i in \$(seq 1 $ARG); do echo \"flood line \$i of $ARG\" > /dev/kmsg; done";;
  crash) S='echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger';;
  sysrq-l) S='echo 1 > /proc/sys/kernel/sysrq; echo l > /proc/sysrq-trigger';;
  *) echo "unknown scenario $SCEN" >&2; exit 2;;
esac
cat > "$WORK/i/init" <<INIT
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo 8 > /proc/sys/kernel/printk
insmod /lib/configfs.ko; insmod /lib/e1000.ko; ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0
sleep 1
insmod /lib/netconsole.ko netconsole=${FLAGS}6665@10.0.2.15/eth0,${PORT}@10.0.2.2/52:55:0a:00:02:02
# netconsole replays the boot log at once; let that queue drain before a crash can cut it off
sleep 4
$S
sleep 2
echo "scenario $SCEN done" > /dev/kmsg
sleep 1
poweroff -f
INIT
chmod +x "$WORK/i/init"; (cd "$WORK/i" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$WORK/initrd")
OWN=""; if [ -z "$NETNS" ]; then NETNS="tskern$$"; ip netns add "$NETNS"; OWN=1; fi
ip netns exec "$NETNS" ip link set lo up
LPID=""
cleanup() { [ -n "$LPID" ] && kill "$LPID" 2>/dev/null; [ -n "$OWN" ] && ip netns del "$NETNS" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
if [ -n "$DUMP" ]; then
  ip netns exec "$NETNS" python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", int(sys.argv[1])))
f = open(sys.argv[2], "w", buffering=1)
while True:
    d, a = s.recvfrom(65535); f.write(repr(d) + "\n")' "$PORT" "$DUMP" & LPID=$!
  sleep 0.5
fi
ACC=""  # KVM here fails (MSR errors, silent hangs); TCG boots in ~9 s
T0=$(date +%s.%N)
ip netns exec "$NETNS" timeout 240 qemu-system-x86_64 $ACC -m 256 -nographic -no-reboot -monitor none -serial file:"$WORK/console.log" \
  -kernel "$CACHE/root/boot/vmlinuz-$KVER" -initrd "$WORK/initrd" \
  -append "console=ttyS0 panic=1 oops=panic quiet loglevel=8" \
  -netdev user,id=n0 -device e1000,netdev=n0 >/dev/null 2>&1 || true
T1=$(date +%s.%N)
[ -n "$CONS" ] && tr -d '\r' < "$WORK/console.log" > "$CONS"
sleep 0.5
echo "kernel $KVER, scenario $SCEN, extended=${EXT:-0} release=${REL:-0}, guest ran $(echo "$T1 - $T0" | bc) s"
