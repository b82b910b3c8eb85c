//! Passing listening sockets between router processes over a Unix socket (`SCM_RIGHTS`):
//! one byte carries them, so they arrive together or not at all.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The most sockets one handover passes: one per listen address.
pub(crate) const MAX_SOCKETS: usize = 200;

/// Sends `fds` with one byte on `stream`.
pub(crate) fn send(stream: &UnixStream, fds: &[OwnedFd]) -> io::Result<()> {
    if fds.len() > MAX_SOCKETS {
        return Err(io::Error::other(format!(
            "{} listening sockets are more than a handover passes ({MAX_SOCKETS})",
            fds.len()
        )));
    }
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(io::Error::other("the sockets do not fit one message"));
    }
    let byte = [u8::try_from(fds.len()).unwrap_or(u8::MAX)];
    rustix::net::sendmsg(
        stream,
        &[IoSlice::new(&byte)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// Receives the sockets [`send`] sent (close-on-exec).
pub(crate) fn recv(stream: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let got = rustix::net::recvmsg(
        stream,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    if got.bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the old router closed the connection before passing its sockets",
        ));
    }
    if got.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::other("the passed sockets were cut short"));
    }
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(passed) = message {
            fds.extend(passed);
        }
    }
    if fds.len() != usize::from(byte[0]) {
        return Err(io::Error::other(format!(
            "the old router announced {} sockets and passed {}",
            byte[0],
            fds.len()
        )));
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_cross_with_their_identity() -> io::Result<()> {
        let (a, b) = UnixStream::pair()?;
        let l1 = std::net::TcpListener::bind("127.0.0.1:0")?;
        let l2 = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addrs = [l1.local_addr()?, l2.local_addr()?];
        send(&a, &[OwnedFd::from(l1), OwnedFd::from(l2)])?;
        let got = recv(&b)?;
        let got: Vec<std::net::SocketAddr> = got
            .into_iter()
            .map(|fd| std::net::TcpListener::from(fd).local_addr())
            .collect::<io::Result<_>>()?;
        assert_eq!(got, addrs);
        Ok(())
    }

    #[test]
    fn none_is_a_valid_handover() -> io::Result<()> {
        let (a, b) = UnixStream::pair()?;
        send(&a, &[])?;
        assert!(recv(&b)?.is_empty());
        Ok(())
    }

    #[test]
    fn a_closed_peer_is_an_error() -> io::Result<()> {
        let (a, b) = UnixStream::pair()?;
        drop(a);
        assert!(recv(&b).is_err());
        Ok(())
    }
}
