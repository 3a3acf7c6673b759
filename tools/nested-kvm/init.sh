#!/bin/busybox sh
# /init of the nested-kvm initramfs (runs inside the TCG guest, busybox only).
#
# 1. mount proc/sys/dev, load the modules listed in /modules.list (in order)
# 2. mount the host's / (9p tag "hostroot") on /host, bind proc/sys/dev into it
# 3. chroot /host and run <job>/cmd.sh with bash, stdout/stderr going to the
#    virtio ports named tsvm.stdout / tsvm.stderr
# 4. write the exit code to <job>/rc, print a marker on the console, power off
#
# <job> (a host directory, visible through 9p) comes from tsvm.job= on the
# kernel command line.

/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp /host
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp

say() { echo "tsvm-init: $*" > /dev/console; }

finish() {
	rc=$1
	echo "@@TSVM_EXIT_CODE=$rc@@" > /dev/console
	sync
	poweroff -f
	# poweroff should not return; fall back to a reset (qemu runs with -no-reboot)
	reboot -f
	sleep 5
}

job=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	tsvm.job=*) job=${arg#tsvm.job=} ;;
	esac
done

while read -r mod; do
	[ -n "$mod" ] || continue
	insmod "/lib/modules/$mod" 2> /dev/console || say "insmod $mod failed"
done < /modules.list

[ -e /dev/kvm ] || say "warning: /dev/kvm missing after loading kvm_amd"

msize=${TSVM_MSIZE:-512000}
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=$msize,cache=loose,access=any hostroot /host; then
	say "mounting the host filesystem failed"
	finish 125
fi

mount -o bind /proc /host/proc
mount -o bind /sys /host/sys
mount -o bind /dev /host/dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
ip link set lo up 2> /dev/null

port() {
	for p in /sys/class/virtio-ports/*; do
		if [ "$(cat "$p/name" 2>/dev/null)" = "$1" ]; then
			echo "/dev/${p##*/}"
			return 0
		fi
	done
	echo /dev/console
}
out=$(port tsvm.stdout)
err=$(port tsvm.stderr)

if [ -z "$job" ] || [ ! -f "/host$job/cmd.sh" ]; then
	say "no job script (tsvm.job=$job)"
	finish 125
fi

echo "@@TSVM_START@@" > /dev/console
chroot /host /bin/bash "$job/cmd.sh" < /dev/null > "$out" 2> "$err"
rc=$?
echo "$rc" > "/host$job/rc"
finish "$rc"
