//! The dm-verity hash tree of a read-only partition: format version 1, SHA-256, 4096-byte
//! data and hash blocks, a salt, and no superblock, exactly as `veritysetup format
//! --no-superblock` writes it and the kernel's `verity` target reads it.
//!
//! Each data block's hash is `SHA-256(salt ‖ block)`; 128 such hashes fill a hash block
//! (the last one zero-padded), and each level of hash blocks is hashed the same way into
//! the level above until one block remains, whose hash is the root hash. On the hash device
//! the levels are laid out **top level first** (the kernel's `hash_level_block[levels - 1]`
//! is at the start), the level of data-block hashes last.
//!
//! A single data block has no tree at all: the kernel computes zero levels, the hash device
//! is empty and the root hash is that block's own hash (`veritysetup` agrees). A GPT
//! partition cannot be empty, so the disk writer's caller must give the hash partition at
//! least one (unused) block in that case.
//!
//! **API boundary:** reads the data once, sequentially, from a `Read`; keeps the tree (1/128
//! of the data's size) in memory and hands it back; writes nothing itself.

use std::fmt::Write as _;
use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

/// The size of a data block and of a hash block, in bytes.
pub const BLOCK_SIZE: u64 = 4096;
/// Bytes in one SHA-256 hash, and in its slot in a hash block.
const HASH_SIZE: usize = 32;
/// Hashes in one hash block.
const HASHES_PER_BLOCK: u64 = BLOCK_SIZE / HASH_SIZE as u64;
/// The longest salt `veritysetup` and the kernel accept.
pub const MAX_SALT: usize = 256;

/// Why a tree or a table could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data is not a whole number of blocks.
    #[error(
        "verity data of {len} bytes is not a whole number of {BLOCK_SIZE}-byte blocks (pad it to {padded})"
    )]
    PartialBlock {
        /// The data's length.
        len: u64,
        /// The next whole-block length.
        padded: u64,
    },
    /// A tree over nothing.
    #[error("verity data must have at least one block")]
    Empty,
    /// More blocks than a 64-bit byte count (and a device-mapper sector count) can hold.
    #[error("verity data of {0} blocks is too large")]
    TooLarge(u64),
    /// A salt longer than the kernel takes.
    #[error("verity salt of {len} bytes is longer than {MAX_SALT}")]
    SaltTooLong {
        /// The salt's length.
        len: usize,
    },
    /// The data ended early.
    #[error("verity data ended at block {block} of {data_blocks}")]
    ShortData {
        /// The first block that could not be read whole.
        block: u64,
        /// The blocks promised.
        data_blocks: u64,
    },
    /// Reading the data failed.
    #[error("reading verity data block {block}")]
    Read {
        /// The block being read.
        block: u64,
        /// The reader's error.
        #[source]
        source: io::Error,
    },
    /// A device name the table line cannot carry.
    #[error("verity device name {0:?} is empty or contains whitespace")]
    DeviceName(String),
}

/// The number of whole blocks in `len` bytes of data, refusing a partial last block.
pub fn data_blocks(len: u64) -> Result<u64, Error> {
    if len == 0 {
        return Err(Error::Empty);
    }
    if !len.is_multiple_of(BLOCK_SIZE) {
        return Err(Error::PartialBlock {
            len,
            padded: len.div_ceil(BLOCK_SIZE) * BLOCK_SIZE,
        });
    }
    Ok(len / BLOCK_SIZE)
}

/// The number of hash blocks in each level of the tree over `data_blocks` blocks, lowest
/// level (the data blocks' hashes) first, as the kernel numbers them. Empty for one block.
pub fn level_blocks(data_blocks: u64) -> Vec<u64> {
    let mut levels = Vec::new();
    let mut below = data_blocks;
    while below > 1 {
        below = below.div_ceil(HASHES_PER_BLOCK);
        levels.push(below);
    }
    levels
}

/// A dm-verity hash tree: the hash device's bytes and the root hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// The hash device: every level, top first, `hash_blocks * BLOCK_SIZE` bytes.
    bytes: Vec<u8>,
    root_hash: [u8; 32],
    data_blocks: u64,
    salt: Vec<u8>,
}

impl Tree {
    /// The root hash, the one value the guest must trust (it goes in the signed command line).
    pub fn root_hash(&self) -> [u8; 32] {
        self.root_hash
    }

    /// The root hash in lowercase hex, as `veritysetup` prints it.
    pub fn root_hex(&self) -> String {
        hex::encode(self.root_hash)
    }

    /// The hash device's contents (every level, top first, no superblock).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The hash device's size in blocks (zero for a single data block).
    pub fn hash_blocks(&self) -> u64 {
        self.bytes.len() as u64 / BLOCK_SIZE
    }

    /// The data blocks the tree covers.
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks
    }

    /// Writes the hash device's contents to `out`.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(&self.bytes)
    }

    /// The device-mapper table line for this tree with the hash device starting at its
    /// block 0 (see [`table`]), for `dmsetup create` or the kernel's `dm-mod.create=`.
    pub fn table(&self, data_dev: &str, hash_dev: &str) -> Result<String, Error> {
        table(
            data_dev,
            hash_dev,
            self.data_blocks,
            &self.root_hash,
            &self.salt,
        )
    }
}

/// The device-mapper table line of a verity device over `data_blocks` blocks whose hash
/// device starts at its block 0: `0 <sectors> verity 1 <data_dev> <hash_dev> 4096 4096
/// <data_blocks> 0 sha256 <root> <salt>` (the salt `-` when empty). The host builds it from
/// a [`Tree`]; the guest init from the root hash, salt and block count its command line
/// carries, so both sides write the same line.
pub fn table(
    data_dev: &str,
    hash_dev: &str,
    data_blocks: u64,
    root_hash: &[u8; 32],
    salt: &[u8],
) -> Result<String, Error> {
    for dev in [data_dev, hash_dev] {
        if dev.is_empty() || dev.chars().any(char::is_whitespace) {
            return Err(Error::DeviceName(dev.to_owned()));
        }
    }
    if data_blocks == 0 {
        return Err(Error::Empty);
    }
    let sectors = data_blocks
        .checked_mul(BLOCK_SIZE / 512)
        .ok_or(Error::TooLarge(data_blocks))?;
    if salt.len() > MAX_SALT {
        return Err(Error::SaltTooLong { len: salt.len() });
    }
    let salt = if salt.is_empty() {
        "-".to_owned()
    } else {
        hex::encode(salt)
    };
    let mut line = String::new();
    // A String's fmt::Write cannot fail.
    let _ = write!(
        line,
        "0 {sectors} verity 1 {data_dev} {hash_dev} {BLOCK_SIZE} {BLOCK_SIZE} {data_blocks} 0 sha256 {root} {salt}",
        root = hex::encode(root_hash),
    );
    Ok(line)
}

/// Hashes one block (or one hash block) the way format version 1 does: salt first.
fn salted(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// Builds the tree over exactly `data_blocks` 4096-byte blocks read from `data` (see
/// [`data_blocks`] for a length in bytes).
pub fn hash_tree(data: &mut impl Read, data_blocks: u64, salt: &[u8]) -> Result<Tree, Error> {
    if data_blocks == 0 {
        return Err(Error::Empty);
    }
    if data_blocks > u64::MAX / BLOCK_SIZE {
        return Err(Error::TooLarge(data_blocks));
    }
    if salt.len() > MAX_SALT {
        return Err(Error::SaltTooLong { len: salt.len() });
    }
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    // The lowest level: one hash per data block, read as it goes. Reserved up to 64 MiB
    // (an 8 GiB root's) so a wrong block count fails at its first missing block rather than
    // in the allocator.
    let mut level = Vec::with_capacity(level_len(data_blocks).min(64 << 20));
    let mut single = None;
    for n in 0..data_blocks {
        data.read_exact(&mut block).map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                Error::ShortData {
                    block: n,
                    data_blocks,
                }
            } else {
                Error::Read { block: n, source }
            }
        })?;
        let hash = salted(salt, &block);
        if data_blocks == 1 {
            single = Some(hash);
        }
        level.extend_from_slice(&hash);
    }
    if let Some(root_hash) = single {
        return Ok(Tree {
            bytes: Vec::new(),
            root_hash,
            data_blocks,
            salt: salt.to_vec(),
        });
    }
    pad_to_block(&mut level);
    let mut levels = vec![level];
    // Each level above hashes the blocks of the one below, until one block is left.
    while let Some(below) = levels.last().filter(|l| l.len() as u64 > BLOCK_SIZE) {
        let blocks = below.len() as u64 / BLOCK_SIZE;
        let mut above = Vec::with_capacity(level_len(blocks));
        for b in below.chunks(BLOCK_SIZE as usize) {
            above.extend_from_slice(&salted(salt, b));
        }
        pad_to_block(&mut above);
        levels.push(above);
    }
    let top = levels.last().map(|l| salted(salt, l)).unwrap_or_default();
    let bytes = levels.into_iter().rev().flatten().collect();
    Ok(Tree {
        bytes,
        root_hash: top,
        data_blocks,
        salt: salt.to_vec(),
    })
}

/// The byte length of the level of hashes over `blocks` blocks, padded.
fn level_len(blocks: u64) -> usize {
    (blocks.div_ceil(HASHES_PER_BLOCK) * BLOCK_SIZE) as usize
}

fn pad_to_block(level: &mut Vec<u8>) {
    let len = (level.len() as u64).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    level.resize(len as usize, 0);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn level_sizes_around_the_128_boundaries() {
        let none: Vec<u64> = Vec::new();
        assert_eq!(level_blocks(1), none);
        assert_eq!(level_blocks(2), vec![1]);
        assert_eq!(level_blocks(128), vec![1]);
        assert_eq!(level_blocks(129), vec![2, 1]);
        assert_eq!(level_blocks(128 * 128), vec![128, 1]);
        assert_eq!(level_blocks(128 * 128 + 1), vec![129, 2, 1]);
    }

    #[test]
    fn tree_size_matches_the_levels() {
        for n in [1u64, 2, 127, 128, 129, 300] {
            let data = vec![7u8; (n * BLOCK_SIZE) as usize];
            let tree = hash_tree(&mut data.as_slice(), n, b"salt").unwrap();
            assert_eq!(
                tree.hash_blocks(),
                level_blocks(n).iter().sum::<u64>(),
                "{n}"
            );
        }
    }

    #[test]
    fn one_block_is_its_own_root() {
        let data = [3u8; 4096];
        let tree = hash_tree(&mut data.as_slice(), 1, &[0, 0x11]).unwrap();
        assert_eq!(tree.root_hash(), salted(&[0, 0x11], &data));
        assert!(tree.bytes().is_empty());
    }

    #[test]
    fn two_blocks_hash_one_padded_block() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i / 4096) as u8).collect();
        let tree = hash_tree(&mut data.as_slice(), 2, b"").unwrap();
        let mut expected = Vec::new();
        expected.extend_from_slice(&salted(b"", &data[..4096]));
        expected.extend_from_slice(&salted(b"", &data[4096..]));
        expected.resize(4096, 0);
        assert_eq!(tree.bytes(), expected.as_slice());
        assert_eq!(tree.root_hash(), salted(b"", &expected));
    }

    #[test]
    fn refuses_bad_input() {
        assert!(matches!(
            data_blocks(4097),
            Err(Error::PartialBlock { padded: 8192, .. })
        ));
        assert!(matches!(data_blocks(0), Err(Error::Empty)));
        assert_eq!(data_blocks(8192).unwrap(), 2);
        let data = [0u8; 4096];
        assert!(matches!(
            hash_tree(&mut data.as_slice(), 2, b""),
            Err(Error::ShortData {
                block: 1,
                data_blocks: 2
            })
        ));
        assert!(matches!(
            hash_tree(&mut data.as_slice(), u64::MAX, b""),
            Err(Error::TooLarge(u64::MAX))
        ));
        assert!(matches!(
            hash_tree(&mut data.as_slice(), 1 << 40, b""),
            Err(Error::ShortData { block: 1, .. })
        ));
        assert!(matches!(
            hash_tree(&mut data.as_slice(), 1, &[0; 257]),
            Err(Error::SaltTooLong { len: 257 })
        ));
    }

    #[test]
    fn table_from_the_command_lines_values() {
        // The guest has no tree, only what the command line carries; the line must be the
        // host's.
        let data = vec![7u8; 3 * 4096];
        let tree = hash_tree(&mut data.as_slice(), 3, &[1, 2]).unwrap();
        assert_eq!(
            table("/dev/vda2", "/dev/vda3", 3, &tree.root_hash(), &[1, 2]).unwrap(),
            tree.table("/dev/vda2", "/dev/vda3").unwrap()
        );
        assert!(matches!(
            table("a", "b", 0, &[0; 32], &[]),
            Err(Error::Empty)
        ));
        assert!(matches!(
            table("a", "b", u64::MAX / 4, &[0; 32], &[]),
            Err(Error::TooLarge(_))
        ));
    }

    #[test]
    fn table_line() {
        let data = vec![0u8; 3 * 4096];
        let tree = hash_tree(&mut data.as_slice(), 3, &[0xab, 0xcd]).unwrap();
        assert_eq!(
            tree.table("/dev/vda2", "/dev/vda3").unwrap(),
            format!(
                "0 24 verity 1 /dev/vda2 /dev/vda3 4096 4096 3 0 sha256 {} abcd",
                tree.root_hex()
            )
        );
        let unsalted = hash_tree(&mut data.as_slice(), 3, b"").unwrap();
        assert!(unsalted.table("a", "b").unwrap().ends_with(" -"));
        assert!(matches!(
            tree.table("/dev/vda 2", "b"),
            Err(Error::DeviceName(_))
        ));
    }
}
