#!/usr/bin/env bash
# Installs what the KVM side needs (QEMU, qemu-img/qemu-io/qemu-storage-daemon, the libnbd tools, libvirtd and
# virsh) and builds the tiny test guest: Debian's cloud kernel plus a busybox initramfs whose /init is
# kvm/guest/init.sh, all taken from Debian's archive (nothing is installed into /boot). The guest goes into
# .cache/kvm-guest/<kernel-version>/ (vmlinuz, initrd.gz, and a marker written last, so an interrupted build is
# redone). Prints that directory on its
# last line; everything else goes to stderr.
#
# The kernel version is resolved once and remembered in .cache/kvm-guest/current, so a warm run needs no apt
# metadata (apt-cache takes over a second here). PF_KVM_GUEST_REFRESH=1 resolves it again, e.g. after a Debian
# kernel update. Changing init.sh or this script rebuilds the initramfs.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache="$root/.cache/kvm-guest"
init_script="$root/kvm/guest/init.sh"
host_packages=(qemu-system-x86 qemu-utils libnbd-bin libvirt-daemon-system libvirt-clients)
# In load order: virtio_blk for /dev/vda; evdev and button so that busybox acpid sees the ACPI power button.
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk evdev button)

# shellcheck source=lib/apt.sh
source "$root/scripts/lib/apt.sh"

# 1. Host packages.
apt_ensure "${host_packages[@]}"

# 2. The guest. Its recipe is this script plus init.sh: a change to either rebuilds it.
recipe=$(cat "${BASH_SOURCE[0]}" "$init_script" | sha256sum | cut -c1-16)
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9 # test files run in parallel processes, and each may call this

guest_ready() { # guest_ready DIR: it holds a complete build of this recipe
  [ -f "$1/vmlinuz" ] && [ -f "$1/initrd.gz" ] && grep -qx "recipe=$recipe" "$1/built" 2>/dev/null
}

if [ -z "${PF_KVM_GUEST_REFRESH:-}" ] && [ -f "$cache/current" ]; then
  dir="$cache/$(cat "$cache/current")"
  if guest_ready "$dir"; then
    log "Test guest already built."
    echo "$dir"
    exit 0
  fi
fi

resolve_kernel() { # the versioned package behind linux-image-cloud-amd64, e.g. linux-image-6.1.0-57-cloud-amd64
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
kernel_package=$(resolve_kernel || true)
if [ -z "$kernel_package" ]; then
  log "linux-image-cloud-amd64 is unknown to apt; updating the package lists..."
  as_root apt-get update >&2
  kernel_package=$(resolve_kernel || true)
fi
if [ -z "$kernel_package" ]; then
  log "error: cannot resolve the kernel behind linux-image-cloud-amd64 (apt-cache depends linux-image-cloud-amd64)."
  exit 1
fi
kernel_version=${kernel_package#linux-image-}
dir="$cache/$kernel_version"

if guest_ready "$dir"; then
  echo "$kernel_version" >"$cache/current"
  log "Test guest already built."
  echo "$dir"
  exit 0
fi

log "Building the test guest ($kernel_package, busybox-static) into $dir..."
start=$(date +%s%N)
rm -rf "$cache"/.build.* # left by a build that was killed (we hold the lock, so none is running)
work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# apt-get download needs no root; running as root, apt would warn that its _apt sandbox user cannot write here.
(cd "$work" && apt-get download -q -o "APT::Sandbox::User=$(id -un)" "$kernel_package" busybox-static >&2)
mkdir "$work/kernel" "$work/busybox"
dpkg-deb -x "$work/$kernel_package"_*.deb "$work/kernel"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
busybox="$work/busybox/bin/busybox"
vmlinuz="$work/kernel/boot/vmlinuz-$kernel_version"
module_dir="$work/kernel/lib/modules/$kernel_version"
[ -f "$vmlinuz" ] || {
  log "error: $kernel_package has no boot/vmlinuz-$kernel_version"
  exit 1
}

rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,etc,lib/modules}
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list-full); do
  [ -e "$rootfs/$applet" ] || ln -s /bin/busybox "$rootfs/$applet"
done

# Modules are stored decompressed, so that busybox insmod never depends on its compression support.
for module in "${modules[@]}"; do
  file=$(find "$module_dir" \( -name "$module.ko" -o -name "$module.ko.xz" -o -name "$module.ko.gz" \
    -o -name "$module.ko.zst" \) -print -quit)
  case "$file" in
    *.ko) cp "$file" "$rootfs/lib/modules/$module.ko" ;;
    *.ko.xz) "$busybox" unxz -c "$file" >"$rootfs/lib/modules/$module.ko" ;;
    *.ko.gz) "$busybox" gunzip -c "$file" >"$rootfs/lib/modules/$module.ko" ;;
    *.ko.zst) zstd -q -d -c "$file" >"$rootfs/lib/modules/$module.ko" ;;
    *)
      log "error: module $module not found under $module_dir"
      exit 1
      ;;
  esac
  echo "$module" >>"$rootfs/lib/modules/load-order"
done
install -m 755 "$init_script" "$rootfs/init"

# No cpio binary on a stock Debian: busybox's writes the newc format the kernel wants.
(cd "$rootfs" && find . | "$busybox" cpio -o -H newc) | gzip -1 >"$work/initrd.gz"

rm -rf "$dir"
mkdir -p "$dir"
cp "$vmlinuz" "$dir/vmlinuz"
mv "$work/initrd.gz" "$dir/initrd.gz"
busybox_version=$(dpkg-deb -f "$work"/busybox-static_*.deb Version)
kernel_package_version=$(dpkg-deb -f "$work/$kernel_package"_*.deb Version)
printf 'recipe=%s\nkernel=%s %s\nbusybox=%s\n' "$recipe" "$kernel_package" "$kernel_package_version" \
  "$busybox_version" >"$dir/built"
echo "$kernel_version" >"$cache/current"
# Earlier kernels' guests are not used any more (a running QEMU keeps its open files).
find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name "$kernel_version" ! -name '.build.*' -exec rm -rf {} +
log "Built in $((($(date +%s%N) - start) / 1000000)) ms."
echo "$dir"
