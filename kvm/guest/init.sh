#!/bin/sh
# /init of the tiny test guest (busybox sh, PID 1). scripts/install-kvm.sh copies it into the initramfs.
#
# The workload is a checkable writer on /dev/vda, made for testing replication and failover:
#   - Canary: the first 4 KiB block of the disk holds "PFCANARY v1 seq=<n>\n", padded with NUL bytes, where <n> is
#     the last iteration whose data is known to be on the disk. Anything else there (a zeroed disk) means 0.
#   - Iteration n (starting at canary+1): pf.blocks data blocks, 4 KiB each, at pseudo-random block numbers
#     1 + ((n * 2654435761 + k * 2246822519) mod 2^32 / 256) mod (disk blocks - 1) for k = 0..blocks-1, each
#     holding "PFDATA v1 seq=<n> k=<k> block=<block>\n" padded with NUL bytes; then the canary with seq=n. Every
#     write is fsynced, so a canary of n implies the data of iteration n (and earlier) reached the disk.
#   - Serial console: "pf-guest: ready disk=<bytes> resume=<canary>" once acpid listens, "pf-guest: seq=<n>"
#     every pf.every iterations, and on the ACPI power button, after finishing the current iteration,
#     "pf-guest: clean-shutdown seq=<n>" (n equals the canary on the disk) before powering off.
#     Errors print "pf-guest: error: ..." and power off at once.
# Kernel command line options: pf.pause=<seconds between iterations> pf.blocks=<data blocks per iteration>
# pf.every=<print every n-th sequence number>.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console node, so the kernel started us without stdio: take the console now.
exec </dev/console >/dev/console 2>&1

say() { echo "pf-guest: $*"; }

# poweroff -f does not wait for the serial port: drain it first (stty applies settings with TCSADRAIN), or the
# last lines could be lost.
drain_console() { stty -F /dev/console "$(stty -F /dev/console -g)" 2>/dev/null || sleep 0.2; }

power_off() {
  sync
  drain_console
  poweroff -f
  while :; do sleep 1; done # PID 1 must not exit: that would panic the kernel
}

fail() {
  say "error: $*"
  power_off
}

pause=0.2
blocks=4
every=10
# shellcheck disable=SC2013 # the command line is split into words on purpose
for word in $(cat /proc/cmdline); do
  case "$word" in
    pf.pause=*) pause=${word#*=} ;;
    pf.blocks=*) blocks=${word#*=} ;;
    pf.every=*) every=${word#*=} ;;
  esac
done
case "$pause" in '' | *[!0-9.]*) fail "pf.pause must be a number of seconds, not '$pause'" ;; esac
case "$blocks" in '' | *[!0-9]*) fail "pf.blocks must be a whole number, not '$blocks'" ;; esac
case "$every" in '' | 0 | *[!0-9]*) fail "pf.every must be a positive whole number, not '$every'" ;; esac

while read -r module; do
  insmod "/lib/modules/$module.ko" || fail "could not load $module"
done </lib/modules/load-order

# virtio_blk probes synchronously, but devtmpfs may publish the node a moment later.
tries=0
while [ ! -b /dev/vda ]; do
  tries=$((tries + 1))
  [ "$tries" -le 100 ] || fail "no /dev/vda after 10 s"
  sleep 0.1
done

disk_bytes=$(blockdev --getsize64 /dev/vda) || fail "cannot size /dev/vda"
disk_blocks=$((disk_bytes / 4096))
[ "$disk_blocks" -ge 2 ] || fail "/dev/vda is too small ($disk_bytes bytes)"

canary=$(dd if=/dev/vda bs=4096 count=1 2>/dev/null | head -c 64 | tr -d '\000' | head -n 1)
case "$canary" in
  'PFCANARY v1 seq='*)
    seq=${canary#PFCANARY v1 seq=}
    case "$seq" in '' | *[!0-9]*) fail "corrupt canary '$canary'" ;; esac
    ;;
  *) seq=0 ;;
esac

# The power button: acpid runs /etc/acpi/PWRF/00000080, which tells us to stop after this iteration.
stop=0
trap 'stop=1' USR1
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\nkill -USR1 1\n' >/etc/acpi/PWRF/00000080
chmod 755 /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /dev/null || fail "acpid did not start"

say "ready disk=$disk_bytes resume=$seq"

while [ "$stop" = 0 ]; do
  next=$((seq + 1))
  k=0
  while [ "$k" -lt "$blocks" ]; do
    hash=$(((next * 2654435761 + k * 2246822519) % 4294967296))
    block=$((1 + (hash / 256) % (disk_blocks - 1)))
    printf 'PFDATA v1 seq=%d k=%d block=%d\n' "$next" "$k" "$block" |
      dd of=/dev/vda bs=4096 seek="$block" count=1 conv=notrunc,fsync,sync 2>/dev/null ||
      fail "writing block $block failed"
    k=$((k + 1))
  done
  printf 'PFCANARY v1 seq=%d\n' "$next" | dd of=/dev/vda bs=4096 count=1 conv=notrunc,fsync,sync 2>/dev/null ||
    fail "writing the canary failed"
  seq=$next
  [ $((seq % every)) -ne 0 ] || say "seq=$seq"
  # A background sleep, because wait returns at once on a trapped signal (a foreground sleep would delay it).
  if [ "$stop" = 0 ]; then
    sleep "$pause" &
    wait $!
  fi
done

sync
say "clean-shutdown seq=$seq"
power_off
