//! A GPT disk writer: a protective MBR, the primary header and partition entries at LBA 1
//! and 2, 1 MiB-aligned partitions, then the backup entries and header in the last 33
//! sectors, with 512-byte logical sectors and the CRC-32s the UEFI specification asks for.
//!
//! Partitions start and end on 1 MiB boundaries. The disk is planned first ([`layout`]: pure arithmetic, no content) and then streamed
//! front to back ([`Layout::write`]) to any `Write`, each partition's content copied from
//! its own `Read`, gaps written as zeros: a disk is never held in memory and the output
//! needs no seeking, so it can go to a file, a pipe or a hasher alike.
//!
//! Every GUID is derived from a caller's seed (see [`Guid::derive`]), never random, so the
//! same inputs give the same bytes. The disk is sized to the next whole MiB after its last
//! partition and the backup structures (the backup's 33 sectors cost one more MiB after
//! the last partition).
//!
//! **API boundary:** no files, no ioctl, no partition-table re-reading: the caller decides
//! where the bytes go.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::crc32::crc32;

/// The logical sector size, in bytes.
pub const SECTOR: u64 = 512;
/// Partition alignment, in sectors (1 MiB).
pub const ALIGN: u64 = (1 << 20) / SECTOR;
/// Entries in each partition entry array (the minimum the UEFI specification allows).
const ENTRIES: u64 = 128;
/// Bytes in one partition entry.
const ENTRY_SIZE: u64 = 128;
/// Sectors taken by one partition entry array.
const ENTRY_SECTORS: u64 = ENTRIES * ENTRY_SIZE / SECTOR;
/// Bytes in a GPT header (the rest of its sector is zero).
const HEADER_SIZE: u32 = 92;
/// UTF-16 code units in a partition name.
pub const NAME_UNITS: usize = 36;

/// Why a disk could not be planned or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A partition name longer than GPT's 36 UTF-16 units or containing NUL.
    #[error("partition {index} name {name:?} is not 1 to {NAME_UNITS} UTF-16 units without NUL")]
    Name {
        /// The partition's position.
        index: usize,
        /// The name given.
        name: String,
    },
    /// A partition with no content.
    #[error("partition {index} ({name:?}) is empty")]
    EmptyPartition {
        /// The partition's position.
        index: usize,
        /// Its name.
        name: String,
    },
    /// Partitions too large for a 64-bit sector count.
    #[error("partition {index} ({name:?}) of {len} bytes does not fit on a disk")]
    TooLarge {
        /// The partition's position.
        index: usize,
        /// Its name.
        name: String,
        /// Its length.
        len: u64,
    },
    /// More partitions than one entry array holds.
    #[error("{0} partitions is more than the {ENTRIES} a GPT entry array holds")]
    TooManyPartitions(usize),
    /// Two partitions with the same unique GUID.
    #[error("partitions {first} and {second} have the same unique GUID {guid}")]
    DuplicateGuid {
        /// The first partition with it.
        first: usize,
        /// The second.
        second: usize,
        /// The GUID.
        guid: Guid,
    },
    /// A different number of contents than partitions.
    #[error("the layout has {expected} partitions but {got} contents were given")]
    ContentCount {
        /// Partitions in the layout.
        expected: usize,
        /// Contents given.
        got: usize,
    },
    /// A partition's content ended before its length.
    #[error("partition {index} ({name:?}) content ended after {got} of {len} bytes")]
    ShortContent {
        /// The partition's position.
        index: usize,
        /// Its name.
        name: String,
        /// The length the layout was planned with.
        len: u64,
        /// The bytes read.
        got: u64,
    },
    /// Reading a partition's content failed.
    #[error("reading partition {index} ({name:?}) content")]
    Read {
        /// The partition's position.
        index: usize,
        /// Its name.
        name: String,
        /// The reader's error.
        #[source]
        source: io::Error,
    },
    /// Writing the disk failed.
    #[error("writing the disk at byte {offset}")]
    Write {
        /// Where the write was.
        offset: u64,
        /// The writer's error.
        #[source]
        source: io::Error,
    },
}

/// A GUID, held in its textual (RFC 4122) byte order; [`Guid::to_gpt_bytes`] gives the
/// mixed-endian order GPT stores.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid([u8; 16]);

/// The EFI system partition.
pub const ESP: Guid = Guid::from_u128(0xC12A7328_F81F_11D2_BA4B_00A0C93EC93B);
/// A Linux root partition for x86-64 (the Discoverable Partitions Specification).
pub const ROOT_X86_64: Guid = Guid::from_u128(0x4F68BCE3_E8CD_4DB1_96E7_FBCAF984B709);
/// The dm-verity hash partition of an x86-64 root (the Discoverable Partitions
/// Specification).
pub const ROOT_VERITY_X86_64: Guid = Guid::from_u128(0x2C7357ED_EBD2_46D9_AEC1_23D437EC2BF5);

impl Guid {
    /// The GUID whose text is `v` in hex (`0xC12A7328_F81F_…` for `C12A7328-F81F-…`).
    pub const fn from_u128(v: u128) -> Guid {
        Guid(v.to_be_bytes())
    }

    /// The GUID from its 16 bytes in textual order.
    pub const fn from_bytes(bytes: [u8; 16]) -> Guid {
        Guid(bytes)
    }

    /// A version-4-shaped GUID derived from `seed` and `what`: the first 16 bytes of
    /// `SHA-256(seed ‖ 0x00 ‖ what)` with the RFC 4122 version (4) and variant bits set,
    /// as systemd-repart shapes its derived UUIDs. The same seed and purpose always give
    /// the same GUID; different purposes give unrelated ones.
    pub fn derive(seed: &[u8], what: &str) -> Guid {
        let mut h = Sha256::new();
        h.update(seed);
        h.update([0]);
        h.update(what.as_bytes());
        let hash = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&hash[..16]);
        b[6] = (b[6] & 0x0F) | 0x40;
        b[8] = (b[8] & 0x3F) | 0x80;
        Guid(b)
    }

    /// The bytes in textual order.
    pub fn bytes(&self) -> [u8; 16] {
        self.0
    }

    /// The bytes as GPT stores them: the first three fields little-endian, the last two
    /// as written.
    pub fn to_gpt_bytes(&self) -> [u8; 16] {
        let b = self.0;
        [
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15],
        ]
    }
}

impl fmt::Display for Guid {
    /// Uppercase, as `sfdisk` and the specifications print GUIDs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = hex::encode_upper(self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// Text that is not a GUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid GUID {0:?}: expected 8-4-4-4-12 hex digits")]
pub struct InvalidGuid(pub String);

impl FromStr for Guid {
    type Err = InvalidGuid;

    fn from_str(s: &str) -> Result<Guid, InvalidGuid> {
        let bad = || InvalidGuid(s.to_owned());
        let groups: Vec<&str> = s.split('-').collect();
        if groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
            return Err(bad());
        }
        let mut b = [0u8; 16];
        hex::decode_to_slice(groups.concat(), &mut b).map_err(|_| bad())?;
        Ok(Guid(b))
    }
}

/// One partition to lay out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its type GUID ([`ESP`], [`ROOT_X86_64`], [`ROOT_VERITY_X86_64`], …).
    pub type_guid: Guid,
    /// Its name (GPT's label), at most 36 UTF-16 units.
    pub name: String,
    /// Its content's length in bytes; the partition is that rounded up to whole MiB, the
    /// rest zero.
    pub len: u64,
    /// Its unique GUID when the caller must choose it (the Discoverable Partitions
    /// Specification derives a verity pair's from the root hash); `None` derives one from
    /// the layout's seed and the partition's position.
    pub unique_guid: Option<Guid>,
}

/// One partition as placed on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Its type GUID.
    pub type_guid: Guid,
    /// Its name.
    pub name: String,
    /// Its unique GUID.
    pub unique_guid: Guid,
    /// Its first sector (a multiple of [`ALIGN`]).
    pub first_lba: u64,
    /// Its size in sectors (a multiple of [`ALIGN`]).
    pub sectors: u64,
    /// Its content's length in bytes.
    pub len: u64,
}

impl Placed {
    /// Its last sector (inclusive, as GPT stores it).
    pub fn last_lba(&self) -> u64 {
        self.first_lba + self.sectors - 1
    }

    /// Its first byte on the disk.
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }
}

/// A planned disk: where everything goes, before any content is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The disk's GUID.
    pub disk_guid: Guid,
    /// The partitions, in the order given (and in disk order).
    pub partitions: Vec<Placed>,
    /// The disk's size in sectors (a whole number of MiB).
    pub total_sectors: u64,
}

/// Plans a disk of `partitions`, in order, each starting on a 1 MiB boundary; GUIDs not
/// given are derived from `seed` (the disk's from `"disk"`, partition `i`'s from
/// `"partition i"`, see [`Guid::derive`]).
pub fn layout(seed: &[u8], partitions: &[Partition]) -> Result<Layout, Error> {
    if partitions.len() as u64 > ENTRIES {
        return Err(Error::TooManyPartitions(partitions.len()));
    }
    // The first sector after the primary header and entries; partitions start aligned.
    let mut next = 2 + ENTRY_SECTORS;
    let mut placed: Vec<Placed> = Vec::with_capacity(partitions.len());
    for (index, p) in partitions.iter().enumerate() {
        let units = p.name.encode_utf16().count();
        if units == 0 || units > NAME_UNITS || p.name.contains('\0') {
            return Err(Error::Name {
                index,
                name: p.name.clone(),
            });
        }
        if p.len == 0 {
            return Err(Error::EmptyPartition {
                index,
                name: p.name.clone(),
            });
        }
        let unique_guid = p
            .unique_guid
            .unwrap_or_else(|| Guid::derive(seed, &format!("partition {index}")));
        if let Some(first) = placed.iter().position(|q| q.unique_guid == unique_guid) {
            return Err(Error::DuplicateGuid {
                first,
                second: index,
                guid: unique_guid,
            });
        }
        let first_lba = next.next_multiple_of(ALIGN);
        // Whole MiB, so every partition also ends on a boundary (`sgdisk -v` cautions
        // otherwise); the space would be a gap before the next partition anyway.
        let sectors = p.len.div_ceil(ALIGN * SECTOR) * ALIGN;
        // The disk's size in bytes, with this partition and the backup after it, must fit
        // in 64 bits.
        next = first_lba
            .checked_add(sectors)
            .filter(|n| {
                n.checked_add(2 * ALIGN)
                    .and_then(|n| n.checked_mul(SECTOR))
                    .is_some()
            })
            .ok_or_else(|| Error::TooLarge {
                index,
                name: p.name.clone(),
                len: p.len,
            })?;
        placed.push(Placed {
            type_guid: p.type_guid,
            name: p.name.clone(),
            unique_guid,
            first_lba,
            sectors,
            len: p.len,
        });
    }
    // Room for the backup entries and header after the last partition, rounded to a MiB.
    let total_sectors = (next + ENTRY_SECTORS + 1).next_multiple_of(ALIGN);
    Ok(Layout {
        disk_guid: Guid::derive(seed, "disk"),
        partitions: placed,
        total_sectors,
    })
}

impl Layout {
    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.total_sectors * SECTOR
    }

    /// The first sector a partition may use.
    pub fn first_usable_lba(&self) -> u64 {
        2 + ENTRY_SECTORS
    }

    /// The last sector a partition may use.
    pub fn last_usable_lba(&self) -> u64 {
        self.total_sectors - 2 - ENTRY_SECTORS
    }

    /// The protective MBR: one partition of type `0xEE` covering the disk from LBA 1.
    pub fn protective_mbr(&self) -> [u8; SECTOR as usize] {
        let mut mbr = [0u8; SECTOR as usize];
        let size = u32::try_from(self.total_sectors - 1).unwrap_or(u32::MAX);
        let entry = &mut mbr[446..462];
        entry[0] = 0x00; // not bootable
        entry[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
        entry[4] = 0xEE;
        entry[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
        entry[8..12].copy_from_slice(&1u32.to_le_bytes());
        entry[12..16].copy_from_slice(&size.to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        mbr
    }

    /// The partition entry array (the same in both copies).
    pub fn entries(&self) -> Vec<u8> {
        let mut out = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
        for (p, e) in self
            .partitions
            .iter()
            .zip(out.chunks_mut(ENTRY_SIZE as usize))
        {
            e[0..16].copy_from_slice(&p.type_guid.to_gpt_bytes());
            e[16..32].copy_from_slice(&p.unique_guid.to_gpt_bytes());
            e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
            e[40..48].copy_from_slice(&p.last_lba().to_le_bytes());
            // Attributes (48..56) stay zero.
            for (unit, slot) in p.name.encode_utf16().zip(e[56..128].chunks_mut(2)) {
                slot.copy_from_slice(&unit.to_le_bytes());
            }
        }
        out
    }

    /// A GPT header sector: the primary (`backup == false`, at LBA 1) or the backup (at
    /// the last LBA), for an entry array whose CRC-32 is `entries_crc`.
    pub fn header(&self, backup: bool, entries_crc: u32) -> [u8; SECTOR as usize] {
        let last = self.total_sectors - 1;
        let (my_lba, alternate_lba, entries_lba) = if backup {
            (last, 1, last - ENTRY_SECTORS)
        } else {
            (1, last, 2)
        };
        let mut h = [0u8; SECTOR as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
        // 16..20: the header's CRC-32, computed with the field zero; 20..24 reserved.
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
        h[40..48].copy_from_slice(&self.first_usable_lba().to_le_bytes());
        h[48..56].copy_from_slice(&self.last_usable_lba().to_le_bytes());
        h[56..72].copy_from_slice(&self.disk_guid.to_gpt_bytes());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
        h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32(&h[..HEADER_SIZE as usize]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Writes the whole disk to `out`, front to back, reading partition `i`'s content
    /// (exactly its `len` bytes) from `contents[i]`.
    pub fn write(&self, out: &mut impl Write, contents: &mut [&mut dyn Read]) -> Result<(), Error> {
        if contents.len() != self.partitions.len() {
            return Err(Error::ContentCount {
                expected: self.partitions.len(),
                got: contents.len(),
            });
        }
        let entries = self.entries();
        let entries_crc = crc32(&entries);
        let mut out = Counting { out, offset: 0 };
        out.put(&self.protective_mbr())?;
        out.put(&self.header(false, entries_crc))?;
        out.put(&entries)?;
        for (index, (p, content)) in self.partitions.iter().zip(contents.iter_mut()).enumerate() {
            out.zeros_to(p.offset())?;
            copy_exact(content, &mut out, p.len).map_err(|e| match e {
                CopyError::Short(got) => Error::ShortContent {
                    index,
                    name: p.name.clone(),
                    len: p.len,
                    got,
                },
                CopyError::Read(source) => Error::Read {
                    index,
                    name: p.name.clone(),
                    source,
                },
                CopyError::Write(e) => e,
            })?;
        }
        out.zeros_to((self.total_sectors - 1 - ENTRY_SECTORS) * SECTOR)?;
        out.put(&entries)?;
        out.put(&self.header(true, entries_crc))?;
        out.out.flush().map_err(|source| Error::Write {
            offset: out.offset,
            source,
        })
    }
}

/// A writer that knows how far it has written, so gaps can be filled and errors placed.
struct Counting<'a, W: Write> {
    out: &'a mut W,
    offset: u64,
}

impl<W: Write> Counting<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.out.write_all(bytes).map_err(|source| Error::Write {
            offset: self.offset,
            source,
        })?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn zeros_to(&mut self, end: u64) -> Result<(), Error> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        while self.offset < end {
            let n = (end - self.offset).min(ZEROS.len() as u64) as usize;
            self.put(&ZEROS[..n])?;
        }
        Ok(())
    }
}

enum CopyError {
    Short(u64),
    Read(io::Error),
    Write(Error),
}

/// Copies exactly `len` bytes from `from`, then zeros to the end of the sector.
fn copy_exact<W: Write>(
    from: &mut dyn Read,
    out: &mut Counting<'_, W>,
    len: u64,
) -> Result<(), CopyError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut copied = 0u64;
    while copied < len {
        let want = (len - copied).min(buf.len() as u64) as usize;
        let n = match from.read(&mut buf[..want]) {
            Ok(0) => return Err(CopyError::Short(copied)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        out.put(&buf[..n]).map_err(CopyError::Write)?;
        copied += n as u64;
    }
    let end = out.offset.next_multiple_of(SECTOR);
    out.zeros_to(end).map_err(CopyError::Write)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn part(name: &str, len: u64) -> Partition {
        Partition {
            type_guid: ROOT_X86_64,
            name: name.to_owned(),
            len,
            unique_guid: None,
        }
    }

    #[test]
    fn guid_text_and_gpt_byte_order() {
        // The ESP's type GUID as it appears on every GPT disk.
        assert_eq!(ESP.to_string(), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(
            ESP.to_gpt_bytes(),
            [
                0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E,
                0xC9, 0x3B
            ]
        );
        assert_eq!(
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709".parse::<Guid>(),
            Ok(ROOT_X86_64)
        );
        assert!(
            "4f68bce3e8cd-4db1-96e7-fbcaf984b709"
                .parse::<Guid>()
                .is_err()
        );
        assert!(
            "zf68bce3-e8cd-4db1-96e7-fbcaf984b709"
                .parse::<Guid>()
                .is_err()
        );
    }

    #[test]
    fn derived_guids_are_stable_version_4() {
        let a = Guid::derive(b"seed", "partition 0");
        assert_eq!(a, Guid::derive(b"seed", "partition 0"));
        assert_ne!(a, Guid::derive(b"seed", "partition 1"));
        assert_ne!(a, Guid::derive(b"seeds", "partition 0"));
        let text = a.to_string();
        assert_eq!(&text[14..15], "4", "{text}");
        assert!("89AB".contains(&text[19..20]), "{text}");
    }

    #[test]
    fn layout_aligns_partitions_and_sizes_the_disk() {
        let l = layout(
            b"s",
            &[part("a", 1), part("b", (1 << 20) + 1), part("c", 4096)],
        )
        .unwrap();
        let placed: Vec<(u64, u64)> = l
            .partitions
            .iter()
            .map(|p| (p.first_lba, p.sectors))
            .collect();
        // a: 1 MiB at 1 MiB; b: 2 MiB at 2 MiB; c: 1 MiB at 4 MiB.
        assert_eq!(placed, [(2048, 2048), (4096, 4096), (8192, 2048)]);
        // c ends at sector 10239; the backup's 33 sectors take one more MiB.
        assert_eq!(l.total_sectors, 12288);
        assert_eq!(l.size(), 6 << 20);
        assert_eq!(l.last_usable_lba(), 12288 - 34);
        assert_eq!(l.first_usable_lba(), 34);
        assert_eq!(l.partitions[2].last_lba(), 10239);
    }
}
