//! Who sent an API request, for the ledger's `actor`: taken from the connection, never from
//! what the request says, since any client can write any name in a body.
//!
//! Over the Unix socket the kernel vouches for the peer's uid (`SO_PEERCRED`), named from this
//! host's `/etc/passwd` (`uid:N` when it has no entry) and followed by this host's name:
//! `root@vm`, the form the CLI used to claim. Over TCP the one thing a client has proven is
//! that it holds the bearer token: `token@<client address>`.

use std::io::Read;
use std::net::IpAddr;

/// The most of `/etc/passwd` that is read: a bigger file names nobody.
const MAX_PASSWD: u64 = 4 << 20;

/// The actor of a request over the Unix socket from a process running as `uid`.
pub(crate) fn unix_actor(uid: u32) -> String {
    let passwd = read_bounded("/etc/passwd", MAX_PASSWD);
    format!(
        "{}@{}",
        user_name(uid, passwd.as_deref().unwrap_or("")),
        host_name()
    )
}

/// This process's own user on this host (`root@vm`): the actor of what the daemon is told
/// at its start, such as `--accept-broken-ledger`.
pub fn local_actor() -> String {
    unix_actor(rustix::process::getuid().as_raw())
}

/// The actor of a request over TCP, which proved only that it holds the token.
pub(crate) fn tcp_actor(client: IpAddr) -> String {
    format!("{TOKEN_PREFIX}{}", client.to_canonical())
}

/// The actor of an action taken on the dashboard, which proved it holds the token: a token
/// actor as far as [`is_token`] goes.
pub(crate) fn dashboard_actor(client: IpAddr) -> String {
    format!("{} (dashboard)", tcp_actor(client))
}

const TOKEN_PREFIX: &str = "token@";

/// Whether `actor` (made here) came over TCP with the token rather than from a user of this
/// host on the unix socket: such a client must not make the daemon read its host's files or
/// run commands (secret sources).
pub(crate) fn is_token(actor: &str) -> bool {
    actor.starts_with(TOKEN_PREFIX)
}

/// The name `/etc/passwd` (its text) gives `uid`, else `uid:N`.
fn user_name(uid: u32, passwd: &str) -> String {
    passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let _password = fields.next()?;
            let id: u32 = fields.next()?.parse().ok()?;
            (id == uid && !name.is_empty()).then_some(name)
        })
        .map_or_else(|| format!("uid:{uid}"), str::to_owned)
}

/// This host's name, as the kernel has it.
fn host_name() -> String {
    read_bounded("/proc/sys/kernel/hostname", 256)
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn read_bounded(path: &str, max: u64) -> Option<String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(max)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
                          broken line\n\
                          :x:7:7::/:/bin/false\n\
                          deploy:x:1000:1000::/home/deploy:/bin/sh\n";

    #[test]
    fn a_uid_is_named_by_the_hosts_passwd_else_by_number() {
        assert_eq!(user_name(0, PASSWD), "root");
        assert_eq!(user_name(1000, PASSWD), "deploy");
        // An entry without a name names nobody.
        assert_eq!(user_name(7, PASSWD), "uid:7");
        assert_eq!(user_name(4242, PASSWD), "uid:4242");
        assert_eq!(user_name(0, ""), "uid:0");
    }

    #[test]
    fn a_tcp_client_is_the_token_at_its_address() {
        assert_eq!(tcp_actor("10.0.0.5".parse().unwrap()), "token@10.0.0.5");
        // An IPv4 client on a dual-stack socket is named by its IPv4 address.
        assert_eq!(
            tcp_actor("::ffff:10.0.0.5".parse().unwrap()),
            "token@10.0.0.5"
        );
        assert_eq!(tcp_actor("::1".parse().unwrap()), "token@::1");
    }
}
