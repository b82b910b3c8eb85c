//! `kiln-machine`: the host-side building blocks of issue 21's machine image, the same OCI
//! image exported as a reproducible, dm-verity-sealed bootable GPT disk.
//!
//! Each module writes one standard on-disk format, byte for byte the same for the same inputs,
//! and its tests check the output with the standard tool that reads it:
//!
//! - [`verity`]: the dm-verity hash tree of a read-only root (format 1, SHA-256, 4096-byte
//!   blocks, no superblock), its root hash and the kernel's `verity` table line
//!   (`veritysetup format`/`verify`).
//! - [`gpt`]: a GPT disk with a protective MBR, 1 MiB-aligned partitions and partition and
//!   disk GUIDs derived from a seed (`sfdisk`, `sgdisk`).
//! - [`cpio`]: a `newc` cpio archive, the format of a Linux initramfs (GNU `cpio`).
//! - [`crc32`]: the CRC-32 GPT's headers carry.
//! - [`modules`]: the kernel modules the guest init loads, dependencies first.
//! - [`uki`]: the unified kernel image (systemd-boot's stub + kernel + initramfs + command
//!   line), its PE time stamp zeroed.
//! - [`authenticode`]: the UKI's Secure Boot signature (PKCS#7, SHA-256, RSA), reproducible
//!   (no signing time), and the image digest UEFI firmware checks it against.
//! - [`disk`]: the whole disk (`kiln image export --format raw|qcow2`): erofs root,
//!   verity tree, initramfs, UKI on an ESP, GPT, qcow2; [`tools`] finds and runs the
//!   standard programs it drives.
//! - [`guest`] (Linux only): the guest init, `kiln` as PID 1 of the machine: it loads the
//!   modules, sets up and reads the whole verity root, mounts it, brings up the network,
//!   runs the app and powers off. The one module with `unsafe` (in its `sys`).
//!
//! **API boundary:** [`verity`], [`gpt`], [`cpio`], [`crc32`] and [`authenticode`] are pure writers over
//! `Read`/`Write`: no files opened, no processes run, no clock read; nothing holds a whole
//! disk or partition in memory (only a verity tree, 1/128 of its data). [`disk`], [`uki`]
//! and [`tools`] are the one place that runs programs (`mkfs.erofs`, `mkfs.vfat`, `mcopy`,
//! `objcopy`, `objdump`, `qemu-img`, `dpkg-deb`) and writes files: under the work directory
//! and the output path their caller gives. [`guest`] runs only as PID 1 of a machine.

pub mod authenticode;
pub mod cpio;
pub mod crc32;
pub mod disk;
pub mod gpt;
#[cfg(target_os = "linux")]
pub mod guest;
pub mod modules;
pub mod tools;
pub mod uki;
pub mod verity;
