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
//! - [`guest`] (Linux only): the guest init, `kiln` as PID 1 of the machine: it sets up the
//!   verity root and runs the app. The one module here that does I/O (and the one with
//!   `unsafe`, in its `sys`).
//!
//! **Still missing** (the next sessions): the EFI system partition and its unified kernel image
//! (kernel + initramfs + command line with the root hash), the root filesystem image itself
//! (erofs or squashfs), the `kiln image export --format raw|qcow2` command that assembles
//! them, and the test that boots the disk under QEMU.
//!
//! **API boundary:** except [`guest`], pure writers over `Read`/`Write`: no files opened, no processes run, no
//! clock read. Nothing holds a whole disk or partition in memory; only a verity tree
//! (1/128 of its data) is kept whole.

pub mod cpio;
pub mod crc32;
pub mod gpt;
#[cfg(target_os = "linux")]
pub mod guest;
pub mod verity;
