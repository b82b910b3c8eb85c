//! The guest init: `kiln` as PID 1 of a machine image (`/init` in its initramfs).
//!
//! What it does, in order ([`run::main`]): mounts `devtmpfs`, `proc` and `sysfs`; reads the
//! kernel command line's `kiln.*` keys and `/kiln/machine.json` ([`config`]); loads the
//! kernel modules the initramfs carries, in their order ([`modules`]); waits (at most 10 s)
//! for the root partition `/dev/vda2` and its hash partition `/dev/vda3`; creates the
//! dm-verity device `root` over them with the root hash from the command line ([`dm`]);
//! **reads the whole device once**, so that every block is checked against the root hash
//! before anything of the image runs; mounts it (erofs, read-only) at `/sysroot` with a
//! size-capped tmpfs at each writable path and `/dev` and `/proc` moved in ([`mounts`]);
//! switches root to it; brings up `lo` and `eth0` with the command line's address and
//! default route ([`net`]); starts the app with the image's argv, env, working directory,
//! uid and gid; reaps every child; and powers the machine off when the app exits, or after
//! stopping the app (SIGTERM, the grace period, SIGKILL) when the ACPI power button is
//! pressed.
//!
//! What it refuses: a root partition (or hash tree) that does not match the command line's
//! root hash (`kiln: the root partition does not match its root hash (dm-verity): refusing
//! to boot`, then power off); an unknown or repeated `kiln.*` key, a malformed
//! `machine.json` (unknown fields included), a module path outside `/lib/modules`, a
//! writable path that is not absolute and clean. Every failed step prints `kiln: <what
//! failed>: <why>` to the console and powers off: the init never exits and never panics
//! (PID 1 exiting panics the kernel), and it restarts nothing (an immutable machine is
//! replaced, not repaired).
//!
//! **API boundary:** unlike the rest of this crate, this module does I/O: it is a whole
//! operating system's first process. Its pure parts ([`config`], the byte layouts in [`dm`]
//! and [`net`]) are tested on the host; the rest is proved by booting a disk under QEMU.
//! All `unsafe` (the raw ioctls) is in `sys`.

pub mod cgroup;
pub mod config;
pub mod dhcp;
pub mod dm;
pub mod efi;
pub mod modules;
pub mod mounts;
pub mod net;
pub mod run;
pub mod secrets;
pub mod status;
#[allow(unsafe_code)]
mod sys;

pub use run::main;
