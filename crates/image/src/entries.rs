//! Reading tar entries with bounded extension headers and a bounded stream.
//!
//! tar's own iterator reads a GNU long name or a PAX extension header into memory whole,
//! whatever size the header claims: a 2 MB `.tar.gz` claiming a 2 GiB PAX header costs
//! 2 GiB of memory. Here tar's raw iterator is used instead, each extension header's size is
//! checked against [`Limits::max_header_bytes`](crate::Limits) before a byte of it is read,
//! and the long name, long link name and PAX `path`/`linkpath`/`uid`/`gid` are applied to the
//! entry they describe, as tar does. A PAX `size` that disagrees with the header is refused
//! (raw reading follows the header's size; honouring the PAX one would read a different
//! archive than other tools). [`Bounded`] caps the bytes a whole stream may yield.
//! This module never writes; [`crate::unpack`] and [`crate::archive`] build on it.

use std::io::{self, Read};

use crate::unpack::UnpackError;

/// The marker inside the `io::Error` a [`Bounded`] reader returns past its limit.
#[derive(Debug, thiserror::Error)]
#[error("the stream yields more than {limit} bytes")]
pub(crate) struct StreamTooLong {
    /// The limit.
    pub(crate) limit: u64,
}

/// A reader that fails once it has yielded more than `limit` bytes, so decompressing a bomb
/// stops at the limit instead of at the end of the disk or of memory.
pub(crate) struct Bounded<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Bounded<R> {
    pub(crate) fn new(inner: R, limit: u64) -> Self {
        Bounded {
            inner,
            left: limit,
            limit,
        }
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            // At the limit: one more byte means the stream is too long; none means it ended.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::other(StreamTooLong { limit: self.limit })),
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// The limit a [`Bounded`] reader hit, if that is what `e` is.
pub(crate) fn stream_too_long(e: &io::Error) -> Option<u64> {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<StreamTooLong>())
        .map(|s| s.limit)
}

/// Maps a tar reading error: a [`Bounded`] limit stays recognisable, the rest is malformed.
pub(crate) fn read_error(source: io::Error) -> UnpackError {
    match stream_too_long(&source) {
        Some(limit) => UnpackError::StreamTooLong { limit },
        None => UnpackError::Malformed { source },
    }
}

/// One entry with its extension headers applied.
pub(crate) struct Entry<'a, R: Read> {
    /// The entry's data, `size` bytes.
    pub(crate) data: tar::Entry<'a, R>,
    /// Its header (type, mode, mtime; uid/gid with PAX values applied).
    pub(crate) header: tar::Header,
    /// Its full name.
    pub(crate) name: Vec<u8>,
    /// Its link target, for symlinks and hardlinks.
    pub(crate) link: Option<Vec<u8>>,
    /// Bytes of data.
    pub(crate) size: u64,
    /// Offset of its data in the (uncompressed) archive.
    pub(crate) offset: u64,
}

/// Entries of a tar stream, each extension header bounded by `max_header`.
pub(crate) struct Entries<'a, R: Read> {
    inner: tar::Entries<'a, R>,
    max_header: u64,
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn extension_kind(kind: tar::EntryType) -> Option<&'static str> {
    match kind {
        tar::EntryType::XHeader => Some("PAX extension"),
        tar::EntryType::XGlobalHeader => Some("PAX global"),
        tar::EntryType::GNULongName => Some("GNU long name"),
        tar::EntryType::GNULongLink => Some("GNU long link"),
        _ => None,
    }
}

impl<'a, R: Read> Entries<'a, R> {
    pub(crate) fn new(
        archive: &'a mut tar::Archive<R>,
        max_header: u64,
    ) -> Result<Self, UnpackError> {
        let inner = archive.entries().map_err(read_error)?.raw(true);
        Ok(Entries { inner, max_header })
    }

    /// The next entry, or `None` at the end of the archive.
    pub(crate) fn next_entry(&mut self) -> Result<Option<Entry<'a, R>>, UnpackError> {
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Vec<u8>> = None;
        loop {
            let Some(entry) = self.inner.next() else {
                if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    return Err(UnpackError::Malformed {
                        source: io::Error::other(
                            "the archive ends with extension headers describing no entry",
                        ),
                    });
                }
                return Ok(None);
            };
            let mut entry = entry.map_err(read_error)?;
            let kind = entry.header().entry_type();
            let size = entry.header().entry_size().map_err(read_error)?;
            if let Some(what) = extension_kind(kind) {
                if size > self.max_header {
                    return Err(UnpackError::HeaderTooLarge {
                        kind: what,
                        offset: entry.raw_header_position(),
                        size,
                        limit: self.max_header,
                    });
                }
                // Bounded above, so reading it whole is fine.
                let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
                (&mut entry)
                    .take(size)
                    .read_to_end(&mut bytes)
                    .map_err(read_error)?;
                let slot = match kind {
                    tar::EntryType::XHeader => &mut pax,
                    tar::EntryType::GNULongName => &mut long_name,
                    tar::EntryType::GNULongLink => &mut long_link,
                    // A global header applies to every later entry; kiln keeps none of its
                    // keys, as tar's own reader does not.
                    _ => continue,
                };
                if slot.is_some() {
                    return Err(UnpackError::Malformed {
                        source: io::Error::other(format!(
                            "two {what} headers describe the same entry"
                        )),
                    });
                }
                *slot = Some(bytes);
                continue;
            }
            let mut header = entry.header().clone();
            let mut name = long_name.take().map(trim_nul);
            let mut link = long_link.take().map(trim_nul);
            if let Some(pax) = pax.take() {
                for field in tar::PaxExtensions::new(&pax) {
                    let field = field.map_err(read_error)?;
                    let value = field.value_bytes();
                    match field.key_bytes() {
                        b"path" if name.is_none() => name = Some(value.to_vec()),
                        b"linkpath" if link.is_none() => link = Some(value.to_vec()),
                        b"size" => {
                            let pax_size = std::str::from_utf8(value)
                                .ok()
                                .and_then(|s| s.parse::<u64>().ok());
                            if pax_size != Some(size) {
                                return Err(UnpackError::Malformed {
                                    source: io::Error::other(format!(
                                        "entry {:?}: its PAX size {:?} disagrees with its \
                                         header's {size}",
                                        String::from_utf8_lossy(
                                            name.as_deref().unwrap_or(&header.path_bytes())
                                        ),
                                        String::from_utf8_lossy(value),
                                    )),
                                });
                            }
                        }
                        b"uid" => {
                            if let Some(v) = std::str::from_utf8(value)
                                .ok()
                                .and_then(|s| s.parse::<u64>().ok())
                            {
                                header.set_uid(v);
                            }
                        }
                        b"gid" => {
                            if let Some(v) = std::str::from_utf8(value)
                                .ok()
                                .and_then(|s| s.parse::<u64>().ok())
                            {
                                header.set_gid(v);
                            }
                        }
                        _ => {}
                    }
                }
            }
            let name = name.unwrap_or_else(|| header.path_bytes().into_owned());
            let link = link.or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
            let offset = entry.raw_file_position();
            return Ok(Some(Entry {
                data: entry,
                header,
                name,
                link,
                size,
                offset,
            }));
        }
    }
}
