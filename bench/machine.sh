#!/usr/bin/env bash
# Export time of the example app's bootable disk (`kiln image export --format raw`) against
# the build a Packer user would script on this machine for the same artefact, in one run.
#
# kiln: `kiln build` of the example (untimed), then the timed export: a GPT disk with an ESP
# holding one unified kernel image (Debian's kernel + kiln's initramfs + the command line with
# the verity root hash), an erofs root and its dm-verity hash partition.
#
# The peer: Debian's mkosi (bookworm: v14) would be the natural tool, but it mounts the ESP it
# formats (vfat) and the rootfs through loop devices, which a container kernel without vfat
# refuses; PEER=mkosi tries it anyway. The default peer is a debootstrap script, doing what
# mkosi does in the same order with the same Debian tools: `debootstrap --variant=minbase
# bookworm`, then in the chroot `apt-get install` of the same kernel package (which pulls
# initramfs-tools and runs update-initramfs) and systemd-sysv, the hello binary and a systemd
# unit that starts it; then the same sealing kiln does: mkfs.erofs, veritysetup, a unified
# kernel image by objcopy on systemd's stub with the root hash in its command line, a vfat ESP
# (mtools, no mount) and a GPT (sfdisk). Every rep starts from an empty rootfs; only the
# downloaded .deb files are kept (debootstrap's --cache-dir and the chroot's apt archives),
# as kiln keeps its kernel .deb.
#
# Target: kiln / peer <= 0.2.
#
# Usage: bench/machine.sh   (REPS=3 by default; WORK=/tmp/kiln-bench-machine;
#        KILN=path to kiln, default the release build else the debug one in target/;
#        KERNEL=a linux-image-*.deb, default /tmp/kern/linux-image-*.deb, else one
#        `apt-get download`ed into $WORK/kernel; MIRROR=http://deb.debian.org/debian).
#        Needs root, debootstrap, erofs-utils, cryptsetup-bin, dosfstools, mtools, fdisk,
#        binutils, systemd-boot-efi and the hello binary (cargo build --release -p hello).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-/tmp/kiln-bench-machine}"
REPS="${REPS:-3}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
PEER="${PEER:-debootstrap}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu"
HELLO="${HELLO:-$OUT/release/hello}"
STUB=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
if [ -z "${KILN:-}" ]; then
  KILN="$OUT/release/kiln"
  [ -x "$KILN" ] || KILN="$OUT/debug/kiln"
fi
[ "$(id -u)" = 0 ] || { echo "the peer needs root (debootstrap, chroot)" >&2; exit 1; }
[ -x "$HELLO" ] || { echo "build the example first: cargo build --release -p hello" >&2; exit 1; }
"$KILN" image export --help | grep -q 'raw' \
  || { echo "$KILN has no \`image export --format raw\`: rebuild it" >&2; exit 1; }
missing=""
for p in debootstrap mkfs.erofs veritysetup mkfs.vfat mcopy sfdisk objcopy; do
  command -v "$p" >/dev/null || [ -x "/usr/sbin/$p" ] || missing="$missing $p"
done
[ -f "$STUB" ] || missing="$missing systemd-boot-efi"
[ -z "$missing" ] || { echo "missing:$missing (apt-get install debootstrap erofs-utils cryptsetup-bin dosfstools mtools fdisk binutils systemd-boot-efi)" >&2; exit 1; }
export PATH="$PATH:/usr/sbin:/sbin"

mkdir -p "$WORK/debs" "$WORK/archives" "$WORK/kernel"
KERNEL="${KERNEL:-}"
if [ -z "$KERNEL" ]; then
  for k in /tmp/kern/linux-image-*.deb "$WORK"/kernel/linux-image-*.deb; do
    [ -f "$k" ] && KERNEL="$k"
  done
fi
if [ -z "$KERNEL" ]; then
  pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[^<]*\)$/\1/p' | head -1)
  (cd "$WORK/kernel" && apt-get download "$pkg")
  KERNEL=$(ls "$WORK"/kernel/linux-image-*.deb)
fi
echo "kiln: $KILN ($("$KILN" --version 2>/dev/null | head -1))" >&2
echo "kernel: $KERNEL" >&2

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# --- kiln ---------------------------------------------------------------------------------
cat >"$WORK/kiln.toml" <<EOF
name = "hello"

[image]
base = "scratch"
entrypoint = ["/hello"]
env = { HELLO_VERSION = "bench" }

[[image.copy]]
from = "$HELLO"
to = "/hello"
mode = "0755"
allow_outside = true

[service]
port = 8080
writable = ["/tmp"]
EOF
rm -rf "$WORK/state"
"$KILN" --state "$WORK/state" build -q -f "$WORK/kiln.toml" >/dev/null
t_kiln() {
  local s
  rm -f "$WORK/kiln.raw"
  s=$(now)
  "$KILN" --state "$WORK/state" image export hello:latest --format raw --kernel "$KERNEL" \
    -f "$WORK/kiln.toml" -o "$WORK/kiln.raw" >"$WORK/kiln.out" 2>"$WORK/kiln.err"
  echo "$(now) - $s" | bc
}

# --- the peer: debootstrap + the same sealing tools ----------------------------------------
R="$WORK/rootfs"
unmount_rootfs() {
  local m
  for m in var/cache/apt/archives dev/pts dev sys proc; do
    if mountpoint -q "$R/$m" 2>/dev/null; then umount -l "$R/$m"; fi
  done
}
trap unmount_rootfs EXIT

peer_debootstrap() {
  local p="$WORK/peer"
  unmount_rootfs
  rm -rf "$R" "$p"; mkdir -p "$p"
  debootstrap --variant=minbase --cache-dir="$WORK/debs" bookworm "$R" "$MIRROR" >"$p/debootstrap.log" 2>&1
  mount -t proc proc "$R/proc"; mount -t sysfs sys "$R/sys"
  mount --bind /dev "$R/dev"; mount --bind /dev/pts "$R/dev/pts"
  mount --bind "$WORK/archives" "$R/var/cache/apt/archives"
  cp /etc/resolv.conf "$R/etc/resolv.conf"
  cp "$KERNEL" "$R/tmp/kernel.deb"
  chroot "$R" env DEBIAN_FRONTEND=noninteractive sh -c \
    'apt-get update -q && apt-get install -y -q --no-install-recommends /tmp/kernel.deb systemd-sysv' \
    >"$p/apt.log" 2>&1
  unmount_rootfs
  rm -f "$R/tmp/kernel.deb"
  rm -rf "$R"/var/lib/apt/lists/* "$R"/var/log/*
  install -m 0755 "$HELLO" "$R/usr/local/bin/hello"
  cat >"$R/etc/systemd/system/hello.service" <<'UNIT'
[Service]
ExecStart=/usr/local/bin/hello
Environment=HELLO_VERSION=bench
DynamicUser=yes
[Install]
WantedBy=multi-user.target
UNIT
  ln -sf /etc/systemd/system/hello.service "$R/etc/systemd/system/multi-user.target.wants/hello.service"
  # Seal it as kiln does: erofs root, dm-verity, a UKI on systemd's stub, ESP, GPT.
  mkfs.erofs --quiet -T0 -x -1 "$p/root.erofs" "$R"
  local hash vmlinuz initrd
  hash=$(veritysetup format "$p/root.erofs" "$p/root.verity" | sed -n 's/^Root hash:[[:space:]]*//p')
  vmlinuz=$(ls "$R"/boot/vmlinuz-*); initrd=$(ls "$R"/boot/initrd.img-*)
  printf 'root=PARTLABEL=root ro roothash=%s systemd.verity_root_data=PARTLABEL=root systemd.verity_root_hash=PARTLABEL=verity console=ttyS0' "$hash" >"$p/cmdline"
  cp "$R/etc/os-release" "$p/osrel"
  local ksize initrd_vma
  ksize=$(stat -c %s "$vmlinuz")
  initrd_vma=$(printf '%#x' $(( (0x2000000 + ksize + 0xfff) / 0x1000 * 0x1000 )))
  objcopy --add-section .osrel="$p/osrel" --change-section-vma .osrel=0x20000 \
    --add-section .cmdline="$p/cmdline" --change-section-vma .cmdline=0x30000 \
    --add-section .linux="$vmlinuz" --change-section-vma .linux=0x2000000 \
    --add-section .initrd="$initrd" --change-section-vma .initrd="$initrd_vma" \
    "$STUB" "$p/linux.efi"
  local esp_mb=$(( ($(stat -c %s "$p/linux.efi") / 1048576) + 8 ))
  mkfs.vfat -C "$p/esp.img" $((esp_mb * 1024)) >/dev/null
  mmd -i "$p/esp.img" ::EFI ::EFI/BOOT
  mcopy -i "$p/esp.img" "$p/linux.efi" ::EFI/BOOT/BOOTX64.EFI
  local esp root verity
  esp=$(( $(stat -c %s "$p/esp.img") / 512 ))
  root=$(( ($(stat -c %s "$p/root.erofs") + 511) / 512 ))
  verity=$(( ($(stat -c %s "$p/root.verity") + 511) / 512 ))
  rm -f "$WORK/peer.raw"
  truncate -s $(( (2048 + esp + root + verity + 2048) * 512 )) "$WORK/peer.raw"
  sfdisk -q "$WORK/peer.raw" <<EOF
label: gpt
start=2048, size=$esp, type=uefi, name=esp
size=$root, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name=root
size=$verity, type=2c7357ed-ebd2-46d9-aec1-23d437ec2bf5, name=verity
EOF
  dd if="$p/esp.img" of="$WORK/peer.raw" bs=512 seek=2048 conv=notrunc status=none
  dd if="$p/root.erofs" of="$WORK/peer.raw" bs=512 seek=$((2048 + esp)) conv=notrunc status=none
  dd if="$p/root.verity" of="$WORK/peer.raw" bs=512 seek=$((2048 + esp + root)) conv=notrunc status=none
}

# mkosi 14 from Debian, for a machine whose kernel lets it mount vfat and loop devices.
peer_mkosi() {
  local p="$WORK/peer"
  rm -rf "$p" "$WORK/mkosi-cache" /var/tmp/mkosi-*; mkdir -p "$p/extra/usr/local/bin"
  install -m 0755 "$HELLO" "$p/extra/usr/local/bin/hello"
  rm -f "$WORK/peer.raw"
  (cd "$p" && mkosi --distribution debian --release bookworm --mirror "$MIRROR" \
    --format gpt_squashfs --bootable --verity --extra-tree "$p/extra" \
    --output "$WORK/peer.raw" --force >"$p/mkosi.log" 2>&1)
}

t_peer() { local s; s=$(now); "peer_$PEER"; echo "$(now) - $s" | bc; }

: >"$WORK/kiln.times"; : >"$WORK/peer.times"
for rep in $(seq 1 "$REPS"); do
  echo "run $rep/$REPS…" >&2
  # Alternate the order, so neither always runs on the other's page cache.
  if [ $((rep % 2)) -eq 1 ]; then
    t_kiln >>"$WORK/kiln.times"; t_peer >>"$WORK/peer.times"
  else
    t_peer >>"$WORK/peer.times"; t_kiln >>"$WORK/kiln.times"
  fi
done
k=$(median <"$WORK/kiln.times"); p=$(median <"$WORK/peer.times")
case "$PEER" in
  debootstrap) name="debootstrap minbase + kernel/initramfs-tools + systemd-sysv, erofs + verity + UKI" ;;
  *) name="mkosi $(mkosi --version 2>/dev/null | awk '{print $2}') gpt_squashfs --bootable --verity" ;;
esac
mb() { echo "$(( ($(stat -c %s "$1") + 524288) / 1048576 )) MB"; }
echo
echo "kiln: $KILN; kernel $(basename "$KERNEL"); load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "kiln runs: $(tr '\n' ' ' <"$WORK/kiln.times"); peer runs: $(tr '\n' ' ' <"$WORK/peer.times")"
echo "disk sizes: kiln $(mb "$WORK/kiln.raw"); peer $(mb "$WORK/peer.raw")"
printf 'kiln export: %.2f s (median of %s); %s: %.2f s; ratio kiln/peer: %.3f (goal <= 0.2)\n' \
  "$k" "$REPS" "$name" "$p" "$(echo "$k / $p" | bc -l)"
