#!/usr/bin/env bash
# Run a shell command inside a QEMU/TCG guest that has a working /dev/kvm
# (nested AMD SVM emulated by TCG), with the host's / shared over 9p.
#
#   bash tools/nested-kvm/run.sh [options] -- <shell command>
#
# Options:
#   --timeout SECS   kill the guest after SECS seconds (default 1800; 0 = none)
#   --mem SIZE       guest RAM (default 4G)
#   --smp N          guest vCPUs (default 1)
#   --cpu MODEL      QEMU -cpu value (default max)
#   --verbose        copy the guest console (kernel + init) to stderr
#   --rebuild        rebuild the cached kernel/initramfs
#   --build-only     only prepare the kernel/initramfs cache, then exit
#
# A single argument after -- is a shell command string for /bin/bash; several
# arguments are an argv run as is. It runs as root, chrooted onto the host's /
# (9p mount), in the current directory, with the current environment.
# Its stdout/stderr are streamed to ours; our exit code is its exit code
# (124 on timeout, 125 if the guest failed before/without running it).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${TSVM_NESTED_CACHE:-$here/.cache}
timeout_s=${TSVM_NESTED_TIMEOUT:-1800}
mem=${TSVM_NESTED_MEM:-4G}
# One vCPU: with two, TCG guests soft-locked under VM create/close churn (one is stable).
smp=${TSVM_NESTED_SMP:-1}
cpu=${TSVM_NESTED_CPU:-max}
kappend="nowatchdog rcupdate.rcu_cpu_stall_suppress=1 ${TSVM_NESTED_APPEND-}"
verbose=0
rebuild=0
build_only=0
BUILD_VERSION=1   # bump when the initramfs layout changes

log() { echo "nested-kvm: $*" >&2; }
die() { log "$*"; exit 125; }

while [ $# -gt 0 ]; do
	case "$1" in
	--timeout) timeout_s=$2; shift 2 ;;
	--mem) mem=$2; shift 2 ;;
	--smp) smp=$2; shift 2 ;;
	--cpu) cpu=$2; shift 2 ;;
	--verbose) verbose=1; shift ;;
	--rebuild) rebuild=1; shift ;;
	--build-only) build_only=1; shift ;;
	--) shift; break ;;
	-h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) break ;;
	esac
done
if [ $build_only = 0 ] && [ $# -eq 0 ]; then
	die "usage: run.sh [--timeout SECS] [--mem 4G] [--smp 2] [--cpu max] [--verbose] -- <shell command>"
fi
if [ $# -eq 1 ]; then
	user_cmd=$1                     # one argument: a shell command string
else
	user_cmd=$(printf '%q ' "$@")   # several: an argv, passed through exactly
fi

# ---------------------------------------------------------------- host setup
apt_updated=0
apt_update_once() {
	if [ $apt_updated = 0 ]; then
		log "apt-get update"
		apt-get update -qq >&2 || die "apt-get update failed"
		apt_updated=1
	fi
}

ensure_qemu() {
	command -v qemu-system-x86_64 > /dev/null && return 0
	[ "$(id -u)" = 0 ] || die "qemu-system-x86_64 missing and not root: apt-get install qemu-system-x86"
	apt_update_once
	log "installing qemu-system-x86"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2 \
		|| die "apt-get install qemu-system-x86 failed"
}

# Modules the guest needs; their dependencies are resolved from .modinfo.
WANT_MODULES="virtio_pci virtio_console 9pnet_virtio 9p kvm_amd"

build_image() {
	local work kpkg kver deb mdir
	apt_update_once
	kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
	[ -n "$kpkg" ] || die "cannot resolve the kernel package behind linux-image-amd64"
	kver=${kpkg#linux-image-}
	work=$(mktemp -d /tmp/tsvm-nested-build.XXXXXX)
	chmod 755 "$work"
	log "downloading $kpkg and busybox-static (one-time)"
	(cd "$work" && apt-get download -qq "$kpkg" busybox-static >&2 2>/dev/null) \
		|| (cd "$work" && apt-get download "$kpkg" busybox-static >&2) \
		|| die "apt-get download failed"
	mkdir -p "$work/kernel" "$work/bb" "$work/root/bin" "$work/root/lib/modules"
	for deb in "$work"/linux-image-*.deb; do dpkg-deb -x "$deb" "$work/kernel"; done
	for deb in "$work"/busybox-static_*.deb; do dpkg-deb -x "$deb" "$work/bb"; done
	mdir="$work/kernel/lib/modules/$kver"
	[ -f "$work/kernel/boot/vmlinuz-$kver" ] || die "no vmlinuz in $kpkg"
	[ -x "$work/bb/bin/busybox" ] || die "no busybox in busybox-static"

	# name -> path index (module names use '_' where file names may use '-')
	declare -A path_of=()
	local f name
	while IFS= read -r f; do
		name=$(basename "$f"); name=${name%.ko}; name=${name//-/_}
		path_of[$name]=${f#"$mdir"/}
	done < <(find "$mdir/kernel" -name '*.ko')
	[ ${#path_of[@]} -gt 0 ] || die "no uncompressed .ko modules found in $kpkg"

	declare -A done_mod=()
	local order=()
	add_mod() {
		local m=$1 deps d
		[ -n "${done_mod[$m]:-}" ] && return 0
		done_mod[$m]=1
		[ -n "${path_of[$m]:-}" ] || die "module $m not found in $kpkg (built in? check config)"
		deps=$(tr '\0' '\n' < "$mdir/${path_of[$m]}" | sed -n 's/^depends=//p' | head -1)
		for d in ${deps//,/ }; do add_mod "${d//-/_}"; done
		order+=("${path_of[$m]}")
	}
	for name in $WANT_MODULES; do add_mod "$name"; done

	local p
	: > "$work/root/modules.list"
	for p in "${order[@]}"; do
		mkdir -p "$work/root/lib/modules/$(dirname "$p")"
		cp "$mdir/$p" "$work/root/lib/modules/$p"
		echo "$p" >> "$work/root/modules.list"
	done
	cp "$work/bb/bin/busybox" "$work/root/bin/busybox"
	ln -s busybox "$work/root/bin/sh"
	cp "$here/init.sh" "$work/root/init"
	chmod 755 "$work/root/init"

	mkdir -p "$cache"
	(cd "$work/root" && find . | "$work/bb/bin/busybox" cpio -o -H newc 2>/dev/null) > "$cache/initramfs.cpio.tmp"
	cp "$work/kernel/boot/vmlinuz-$kver" "$cache/vmlinuz.tmp"
	mv "$cache/initramfs.cpio.tmp" "$cache/initramfs.cpio"
	mv "$cache/vmlinuz.tmp" "$cache/vmlinuz"
	printf '%s\n' "$stamp" > "$cache/stamp"
	echo "$kver" > "$cache/kernel-version"
	log "cached kernel $kver + initramfs (modules: ${order[*]##*/})"
	rm -rf "$work"
}

stamp="v$BUILD_VERSION $(sha256sum "$here/init.sh" | cut -c1-16) $WANT_MODULES"
if [ $rebuild = 1 ] || [ ! -f "$cache/vmlinuz" ] || [ ! -f "$cache/initramfs.cpio" ] \
	|| [ "$(cat "$cache/stamp" 2>/dev/null)" != "$stamp" ]; then
	[ "$(id -u)" = 0 ] || die "building the image needs root (apt-get)"
	build_image
fi
ensure_qemu
[ $build_only = 1 ] && { log "image ready in $cache"; exit 0; }

# ---------------------------------------------------------------- the job
# One nested TCG guest at a time: two on a 2-core host starve each other and
# the guest kernels soft-lock. Later callers wait here for the lock.
exec 9> "${TSVM_NESTED_LOCK:-/tmp/tsvm-nested.lock}"
if ! flock -n 9; then
	log "another nested guest is running; waiting for it"
	flock 9
fi
job=$(mktemp -d /tmp/tsvm-nested-job.XXXXXX)
chmod 755 "$job"
qemu_pid=
cat_pids=()
cleanup() {
	[ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null || true
	for p in "${cat_pids[@]}"; do kill "$p" 2>/dev/null || true; done
	[ -n "${TSVM_NESTED_KEEP_JOB:-}" ] || rm -rf "$job"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

{
	echo "# generated by tools/nested-kvm/run.sh"
	for v in $(compgen -e); do
		case "$v" in PWD|OLDPWD|SHLVL|_) continue ;; esac
		[[ $v =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
		printf 'export %s=%q\n' "$v" "${!v}"
	done
	printf 'cd %q 2>/dev/null || cd /\n' "$PWD"
	printf '%s\n' "$user_cmd"
} > "$job/cmd.sh"

mkfifo "$job/out" "$job/err"
cat "$job/out" &
cat_pids+=($!)
cat "$job/err" >&2 &
cat_pids+=($!)
: > "$job/console.log"
if [ $verbose = 1 ]; then
	tail -n +1 -f "$job/console.log" >&2 &
	cat_pids+=($!)
fi

qemu_args=(
	-accel tcg -cpu "$cpu" -m "$mem" -smp "$smp"
	-nodefaults -no-user-config -display none -no-reboot
	-monitor none -serial "file:$job/console.log"
	-kernel "$cache/vmlinuz" -initrd "$cache/initramfs.cpio"
	-append "console=ttyS0 quiet loglevel=3 panic=-1 $kappend tsvm.job=$job"
	-virtfs "local,path=/,mount_tag=hostroot,security_model=passthrough,multidevs=remap"
	-device virtio-serial-pci
	-chardev "file,id=tsvmout,path=$job/out"
	-device virtserialport,chardev=tsvmout,name=tsvm.stdout
	-chardev "file,id=tsvmerr,path=$job/err"
	-device virtserialport,chardev=tsvmerr,name=tsvm.stderr
)
start_ns=$(date +%s%N)
if [ "$timeout_s" != 0 ]; then
	timeout -s TERM "$timeout_s" qemu-system-x86_64 "${qemu_args[@]}" 2> "$job/qemu.err" &
else
	qemu-system-x86_64 "${qemu_args[@]}" 2> "$job/qemu.err" &
fi
qemu_pid=$!
set +e
wait "$qemu_pid"
qemu_rc=$?
set -e
qemu_pid=

# let the readers drain; kill them if qemu never opened the fifos
for _ in $(seq 50); do
	alive=0
	for p in "${cat_pids[@]:0:2}"; do kill -0 "$p" 2>/dev/null && alive=1; done
	[ $alive = 0 ] && break
	sleep 0.1
done
for p in "${cat_pids[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
cat_pids=()

elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
rc=
if [ -s "$job/rc" ]; then
	rc=$(tr -dc '0-9' < "$job/rc")
fi
if [ -z "$rc" ]; then
	rc=$(grep -ao '@@TSVM_EXIT_CODE=[0-9]*@@' "$job/console.log" | tail -1 | tr -dc '0-9' || true)
fi
if [ -z "$rc" ]; then
	if [ "$qemu_rc" = 124 ]; then
		log "timed out after ${timeout_s}s"
		rc=124
	else
		log "guest ended without an exit code (qemu status $qemu_rc); console tail:"
		rc=125
	fi
	tail -n 30 "$job/console.log" | sed 's/^/  console: /' >&2
	[ -s "$job/qemu.err" ] && sed 's/^/  qemu: /' "$job/qemu.err" >&2
fi
[ -n "${TSVM_NESTED_TIMING:-}" ] && log "guest wall time ${elapsed_ms}ms, exit $rc"
exit "$rc"
