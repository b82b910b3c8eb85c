//! The unified kernel image: systemd-boot's EFI stub with the kernel, the initramfs, the
//! command line and an os-release added as PE sections (`.osrel`, `.cmdline`, `.linux`,
//! `.initrd`), each at the next 4 KiB-aligned virtual address after the one before, the
//! first after the stub's last section — the recipe systemd 252's `ukify` follows.
//!
//! `objcopy` stamps the PE header with the time it ran; [`reproducible`] sets that stamp to
//! zero and recomputes the PE checksum, so the same inputs give the same bytes.
//!
//! **API boundary:** [`plan`] and [`reproducible`] are pure; [`build`] runs `objdump` and
//! `objcopy` on files in a directory the caller owns.

use std::path::Path;

use crate::tools::{self, Failed};

/// Section alignment of the added sections.
pub const ALIGN: u64 = 4096;

/// Why the image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tool failed.
    #[error(transparent)]
    Tool(#[from] Failed),
    /// The stub's section table could not be read.
    #[error("cannot read the sections of the EFI stub {0}: objdump listed none")]
    NoSections(String),
    /// A file could not be read or written.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `objcopy` wrote something that is not a PE image.
    #[error("{0} is not a PE image")]
    NotPe(String),
    /// The Secure Boot signature could not be made.
    #[error("signing the unified kernel image for Secure Boot")]
    Sign(#[from] crate::authenticode::Error),
}

/// The end (VMA + size) of the last section in `objdump -h` output.
pub fn sections_end(objdump_h: &str) -> Option<u64> {
    objdump_h
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() != 7 || f[0].parse::<u32>().is_err() {
                return None;
            }
            let size = u64::from_str_radix(f[2], 16).ok()?;
            let vma = u64::from_str_radix(f[3], 16).ok()?;
            vma.checked_add(size)
        })
        .max()
}

/// The virtual addresses of sections of `sizes` bytes placed in order from `end`, each
/// aligned to [`ALIGN`].
pub fn plan(end: u64, sizes: &[u64]) -> Vec<u64> {
    let mut next = end;
    sizes
        .iter()
        .map(|size| {
            let at = next.next_multiple_of(ALIGN);
            next = at + size;
            at
        })
        .collect()
}

/// Sets the PE header's `TimeDateStamp` to zero and its `CheckSum` to the image's checksum
/// (the algorithm of Windows' `CheckSumMappedFile`, which `sbsign` and firmware that check
/// it use).
pub fn reproducible(pe: &mut [u8]) -> Result<(), &'static str> {
    let lfanew = pe
        .get(0x3c..0x40)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("too short for a DOS header")?;
    if pe.get(lfanew..lfanew + 4) != Some(b"PE\0\0".as_slice()) {
        return Err("no PE signature");
    }
    let stamp = lfanew + 8;
    let checksum = lfanew + 24 + 64;
    if pe.len() < checksum + 4 {
        return Err("too short for a PE optional header");
    }
    pe[stamp..stamp + 4].fill(0);
    pe[checksum..checksum + 4].fill(0);
    let sum = pe_checksum(pe, checksum);
    pe[checksum..checksum + 4].copy_from_slice(&sum.to_le_bytes());
    Ok(())
}

/// The PE checksum of `pe`, skipping the 4 bytes of the field at `field` (also the checksum
/// of a signed image, [`crate::authenticode::sign`]).
pub(crate) fn pe_checksum(pe: &[u8], field: usize) -> u32 {
    let mut sum: u64 = 0;
    for (i, chunk) in pe.chunks(2).enumerate() {
        let at = i * 2;
        if at >= field && at < field + 4 {
            continue;
        }
        let word = u64::from(chunk[0]) | (u64::from(*chunk.get(1).unwrap_or(&0)) << 8);
        sum += word;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u32).wrapping_add(pe.len() as u32)
}

/// The os-release the image carries (`.osrel`), which boot menus show.
pub const OS_RELEASE: &str = "ID=kiln\nNAME=\"kiln\"\nPRETTY_NAME=\"kiln machine image\"\n";

/// What a unified kernel image is made of.
#[derive(Debug, Clone, Copy)]
pub struct Parts<'a> {
    /// The EFI stub ([`crate::tools::STUB`]).
    pub stub: &'a Path,
    /// The kernel (`vmlinuz`).
    pub kernel: &'a Path,
    /// The initramfs.
    pub initrd: &'a Path,
    /// The kernel command line.
    pub cmdline: &'a str,
}

/// Writes the unified kernel image of `parts` at `out` with `objdump` and `objcopy`, with
/// scratch files in `work`; signed for Secure Boot by `signer` when one is given (the
/// signature covers the kernel, the initramfs and the command line with its root hash).
pub fn build(
    objdump: &Path,
    objcopy: &Path,
    parts: &Parts<'_>,
    signer: Option<&crate::authenticode::Signer>,
    work: &Path,
    out: &Path,
) -> Result<(), Error> {
    let Parts {
        stub,
        kernel,
        initrd,
        cmdline,
    } = *parts;
    let io = |what: &'static str, path: &Path| {
        let path = path.display().to_string();
        move |source| Error::Io { what, path, source }
    };
    let osrel = work.join("osrel");
    std::fs::write(&osrel, OS_RELEASE).map_err(io("write", &osrel))?;
    let cmd = work.join("cmdline");
    std::fs::write(&cmd, cmdline).map_err(io("write", &cmd))?;
    let listing = tools::run(objdump, [Path::new("-h"), stub], &[])?;
    let end = sections_end(&String::from_utf8_lossy(&listing))
        .ok_or_else(|| Error::NoSections(stub.display().to_string()))?;
    let files = [
        (".osrel", osrel.as_path()),
        (".cmdline", cmd.as_path()),
        (".linux", kernel),
        (".initrd", initrd),
    ];
    let mut sizes = Vec::new();
    for (_, f) in &files {
        sizes.push(std::fs::metadata(f).map_err(io("stat", f))?.len());
    }
    let vmas = plan(end, &sizes);
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    for ((section, file), vma) in files.iter().zip(&vmas) {
        let mut add = std::ffi::OsString::from(format!("--add-section={section}="));
        add.push(file.as_os_str());
        args.push(add);
        args.push(format!("--change-section-vma={section}={vma:#x}").into());
    }
    args.push(stub.as_os_str().to_owned());
    args.push(out.as_os_str().to_owned());
    tools::run(objcopy, &args, &[])?;
    let mut pe = std::fs::read(out).map_err(io("read", out))?;
    reproducible(&mut pe).map_err(|_| Error::NotPe(out.display().to_string()))?;
    if let Some(signer) = signer {
        pe = crate::authenticode::sign(&pe, signer)?;
    }
    std::fs::write(out, &pe).map_err(io("write", out))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn sections_after_the_stub_aligned() {
        // systemd 252's linuxx64.efi.stub, as `objdump -h` lists it (two lines a section).
        let listing = "
Idx Name          Size      VMA               LMA               File off  Algn
  6 .sbat         000000e2  0000000000019000  0000000000019000  00011000  2**2
                  CONTENTS, ALLOC, LOAD, READONLY, DATA
  7 .sdmagic      00000034  0000000000019100  0000000000019100  00011200  2**2
                  CONTENTS, ALLOC, LOAD, READONLY, DATA
";
        let end = sections_end(listing).unwrap();
        assert_eq!(end, 0x19134);
        // The spike's image: .osrel 0x1a000, .cmdline 0x1b000, .linux 0x1c000, .initrd
        // after the kernel's 0x7dd7c0 bytes.
        assert_eq!(
            plan(end, &[0x35, 0xd, 0x7dd7c0, 0x13b26f]),
            [0x1a000, 0x1b000, 0x1c000, 0x7fa000]
        );
    }

    #[test]
    fn stamp_zeroed_and_checksum_recomputed() {
        let mut pe = vec![0u8; 512];
        pe[0x3c] = 0x80;
        pe[0x80..0x84].copy_from_slice(b"PE\0\0");
        pe[0x88..0x8c].copy_from_slice(&0x6930_0000u32.to_le_bytes());
        pe[300] = 0xff;
        reproducible(&mut pe).unwrap();
        assert_eq!(&pe[0x88..0x8c], &[0, 0, 0, 0]);
        let sum = u32::from_le_bytes(pe[0xd8..0xdc].try_into().unwrap());
        // "PE\0\0" = 0x4550 + 0; 0x80 at 0x3c; 0xff at an even offset; plus the length.
        assert_eq!(sum, 0x4550 + 0x80 + 0xff + 512);
        let mut not_pe = vec![0u8; 512];
        assert!(reproducible(&mut not_pe).is_err());
    }
}
