//! Who an instance's process runs as: `[service] user` when the spec says, else the image's
//! `User`, else the unprivileged 65534:65534. Names resolve through the image's own
//! `/etc/passwd` and `/etc/group`, as the OCI image spec says a `User` does; a user or group
//! given as a number is used as it is.
//!
//! **Invariant:** uid 0 only when `[service] user` asks for it. An image whose `User` is root
//! is refused rather than silently run as someone else, since the app would then fail on
//! permissions far from the cause.
//!
//! An image without its own account files sees kiln's [`minimal_accounts`] in their place
//! (local provider), so `root`, `nobody` and the process's own ids have names.
//!
//! Pure: the providers read the files (or let the engine do it) and call in here.

/// The user and group ids the unprivileged default runs as (`nobody`/`nogroup` on Debian).
pub const UNPRIVILEGED: u32 = 65534;

/// The most of `/etc/passwd` or `/etc/group` that is read: a bigger file is not an account
/// database kiln needs to understand.
pub(crate) const ACCOUNT_FILE_CAP: u64 = 1 << 20;

/// The ids a process gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: those `/etc/group` lists the user in, when no group was named.
    pub additional_gids: Vec<u32>,
}

/// The account files of an image, when it has them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Accounts<'a> {
    pub passwd: Option<&'a str>,
    pub group: Option<&'a str>,
    /// `passwd` is kiln's [`minimal_accounts`], the image having none.
    pub minimal: bool,
}

/// `/etc/passwd` and `/etc/group` for an image that brings none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MinimalAccounts {
    pub passwd: String,
    pub group: String,
}

/// The name of the account [`minimal_accounts`] adds for the process's own ids.
const OWN_ACCOUNT: &str = "app";

/// The account files an image without its own gets: `root` and `nobody` (group `nogroup`),
/// as Debian names them, plus an `app` user and group for the ids the instance runs as
/// (`requested`, else `image_user`) when those are numbers and neither root's nor nobody's,
/// so that looking up the process's own ids succeeds. A user given by name needs no line:
/// without the image's files only `root` and `nobody` resolve. A uid given without a group
/// keeps group 0, as without the files.
pub(crate) fn minimal_accounts(
    requested: Option<&str>,
    image_user: Option<&str>,
) -> MinimalAccounts {
    let mut passwd = String::from(
        "root:x:0:0:root:/root:/sbin/nologin\n\
         nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n",
    );
    let mut group = String::from("root:x:0:\nnogroup:x:65534:\n");
    let known = |id: u32| id == 0 || id == UNPRIVILEGED;
    if let Some(text) = requested.or(image_user) {
        let (user, group_part) = match text.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (text, None),
        };
        let gid = match group_part {
            Some(g) => g.parse::<u32>().ok(),
            None => Some(0),
        };
        if let Ok(uid) = user.parse::<u32>()
            && !known(uid)
        {
            // A named group is looked up in the file, where it is not (unless `nogroup`).
            let primary = gid.unwrap_or(0);
            passwd.push_str(&format!(
                "{OWN_ACCOUNT}:x:{uid}:{primary}:{OWN_ACCOUNT}:/nonexistent:/sbin/nologin\n"
            ));
        }
        if let Some(gid) = gid.filter(|g| !known(*g)) {
            group.push_str(&format!("{OWN_ACCOUNT}:x:{gid}:\n"));
        }
    }
    MinimalAccounts { passwd, group }
}

/// One `/etc/passwd` entry: name, uid, primary gid.
fn passwd_entries(passwd: &str) -> impl Iterator<Item = (&str, u32, u32)> {
    passwd.lines().filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        Some((name, uid, gid))
    })
}

/// One `/etc/group` entry: name, gid, members.
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, &str)> {
    group.lines().filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let gid = f.next()?.parse().ok()?;
        Some((name, gid, f.next().unwrap_or("")))
    })
}

/// The ids for `requested` (`[service] user`) or else `image_user` (the image config's
/// `User`), resolved against the image's `accounts`.
pub(crate) fn resolve(
    requested: Option<&str>,
    image_user: Option<&str>,
    accounts: Accounts<'_>,
) -> Result<ProcessUser, String> {
    let (text, origin) = match (requested, image_user) {
        (Some(u), _) => (u, "[service] user"),
        (None, Some(u)) => (u, "the image's User"),
        (None, None) => {
            return Ok(ProcessUser {
                uid: UNPRIVILEGED,
                gid: UNPRIVILEGED,
                additional_gids: Vec::new(),
            });
        }
    };
    let passwd = accounts.passwd.unwrap_or("");
    let group = accounts.group.unwrap_or("");
    let (user, group_part) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    // (uid, primary gid when listed, name when known)
    let (uid, primary, name) = match user.parse::<u32>() {
        Ok(uid) => {
            let entry = passwd_entries(passwd).find(|(_, u, _)| *u == uid);
            (uid, entry.map(|e| e.2), entry.map(|e| e.0))
        }
        Err(_) => match passwd_entries(passwd).find(|(n, _, _)| *n == user) {
            Some((n, uid, gid)) => (uid, Some(gid), Some(n)),
            // `root` is uid 0 whether or not the image has an /etc/passwd (scratch has none).
            None if user == "root" => (0, Some(0), Some("root")),
            None => {
                return Err(format!(
                    "{origin} {text:?}: no user {user:?} in the image's /etc/passwd{}",
                    if accounts.passwd.is_none() || accounts.minimal {
                        " (the image has none, and kiln's names only root and nobody; use a \
                         numeric UID[:GID])"
                    } else {
                        ""
                    }
                ));
            }
        },
    };
    let (gid, additional_gids) = match group_part {
        Some(g) => {
            let gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => match group_entries(group).find(|(n, _, _)| *n == g) {
                    Some((_, gid, _)) => gid,
                    None if g == "root" => 0,
                    None => {
                        return Err(format!(
                            "{origin} {text:?}: no group {g:?} in the image's /etc/group"
                        ));
                    }
                },
            };
            // A named group replaces the supplementary ones (OCI image spec).
            (gid, Vec::new())
        }
        None => {
            // A uid the image does not list gets group 0, as Docker and containerd give it.
            let gid = primary.unwrap_or(0);
            let mut extra: Vec<u32> = match name {
                Some(n) => group_entries(group)
                    .filter(|(_, g, members)| *g != gid && members.split(',').any(|m| m == n))
                    .map(|(_, g, _)| g)
                    .collect(),
                None => Vec::new(),
            };
            extra.sort_unstable();
            extra.dedup();
            (gid, extra)
        }
    };
    if uid == 0 && requested.is_none() {
        return Err(format!(
            "the image's User {text:?} is root: an instance runs as root only when the spec \
             says so with [service] user = \"root\""
        ));
    }
    Ok(ProcessUser {
        uid,
        gid,
        additional_gids,
    })
}

/// The `User` a Docker Engine is given, which resolves names in the container itself:
/// `[service] user` (`root` spelled `0:0`, since a scratch image has no `/etc/passwd` to find
/// it in), else the image's `User`, else 65534:65534. An image `User` that names root is
/// refused as [`resolve`] refuses it; a name the image maps to uid 0 cannot be seen from here.
pub(crate) fn docker_user(
    requested: Option<&str>,
    image_user: Option<&str>,
) -> Result<String, String> {
    match (requested, image_user) {
        (Some("root"), _) => Ok("0:0".to_owned()),
        (Some(u), _) => Ok(u.to_owned()),
        (None, Some(u)) => {
            let user = u.split(':').next().unwrap_or(u);
            if user == "root" || user.parse::<u32>() == Ok(0) {
                Err(format!(
                    "the image's User {u:?} is root: an instance runs as root only when the \
                     spec says so with [service] user = \"root\""
                ))
            } else {
                Ok(u.to_owned())
            }
        }
        (None, None) => Ok(format!("{UNPRIVILEGED}:{UNPRIVILEGED}")),
    }
}

/// Refuses `[service] capabilities` for a process a Docker Engine runs as `user` (what
/// [`docker_user`] gave) unless that is root: the engine puts a non-root process's
/// capabilities only in its bounding set (moby since 20.10.14, as execve would leave them),
/// where it can never use them, and an app that silently lacks one fails far from the cause.
pub(crate) fn docker_capabilities(
    user: &str,
    capabilities: &[kiln_spec::Capability],
) -> Result<(), String> {
    let name = user.split(':').next().unwrap_or(user);
    if capabilities.is_empty() || name == "root" || name.parse::<u32>() == Ok(0) {
        return Ok(());
    }
    let names: Vec<&str> = capabilities.iter().map(|c| c.as_str()).collect();
    Err(format!(
        "[service] capabilities {}: the Docker Engine gives a non-root process (user {user:?}) \
         capabilities only in its bounding set, where it cannot use them; run it as root with \
         [service] user = \"root\", or on the local provider",
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # a comment, and a broken line\n\
                          broken\n\
                          app:x:1000:1000::/srv:/bin/sh\n\
                          web:x:1001:1001::/srv:/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
                         app:x:1000:\n\
                         staff:x:50:app,web\n\
                         audio:x:29:app\n\
                         web:x:1001:\n";

    fn accounts() -> Accounts<'static> {
        Accounts {
            passwd: Some(PASSWD),
            group: Some(GROUP),
            minimal: false,
        }
    }

    fn ids(u: &ProcessUser) -> (u32, u32, Vec<u32>) {
        (u.uid, u.gid, u.additional_gids.clone())
    }

    /// (requested, image user, with the account files?) → (uid, gid, groups) or the error's
    /// start.
    type Case = (
        Option<&'static str>,
        Option<&'static str>,
        bool,
        Result<(u32, u32, Vec<u32>), &'static str>,
    );

    #[test]
    fn users_resolve_as_the_image_spec_says() {
        let cases: &[Case] = &[
            // Nothing said: the unprivileged default.
            (None, None, false, Ok((65534, 65534, vec![]))),
            (None, None, true, Ok((65534, 65534, vec![]))),
            // The image's user, by name or number.
            (None, Some("app"), true, Ok((1000, 1000, vec![29, 50]))),
            (None, Some("1000"), true, Ok((1000, 1000, vec![29, 50]))),
            (None, Some("1000"), false, Ok((1000, 0, vec![]))),
            (None, Some("1000:7"), false, Ok((1000, 7, vec![]))),
            (None, Some("app:staff"), true, Ok((1000, 50, vec![]))),
            (None, Some("4242"), true, Ok((4242, 0, vec![]))),
            // The spec's user wins over the image's.
            (Some("web"), Some("app"), true, Ok((1001, 1001, vec![50]))),
            (
                Some("2000:2000"),
                Some("app"),
                true,
                Ok((2000, 2000, vec![])),
            ),
            // Root only when the spec says so.
            (Some("root"), None, false, Ok((0, 0, vec![]))),
            (Some("root"), Some("app"), true, Ok((0, 0, vec![]))),
            (Some("0"), None, false, Ok((0, 0, vec![]))),
            (
                None,
                Some("root"),
                true,
                Err("the image's User \"root\" is root"),
            ),
            (
                None,
                Some("0:0"),
                false,
                Err("the image's User \"0:0\" is root"),
            ),
            (
                None,
                Some("root"),
                false,
                Err("the image's User \"root\" is root"),
            ),
            // Names the image does not have.
            (
                None,
                Some("ghost"),
                true,
                Err("the image's User \"ghost\": no user \"ghost\""),
            ),
            (
                Some("app"),
                None,
                false,
                Err(
                    "[service] user \"app\": no user \"app\" in the image's /etc/passwd (the image has none",
                ),
            ),
            (
                Some("app:ghosts"),
                None,
                true,
                Err("[service] user \"app:ghosts\": no group \"ghosts\""),
            ),
        ];
        for (requested, image, with, want) in cases {
            let acc = if *with {
                accounts()
            } else {
                Accounts::default()
            };
            let got = resolve(*requested, *image, acc);
            match (got, want) {
                (Ok(u), Ok(w)) => assert_eq!(&ids(&u), w, "{requested:?} {image:?}"),
                (Err(e), Err(w)) => assert!(e.starts_with(w), "{requested:?} {image:?}: {e}"),
                (got, want) => panic!("{requested:?} {image:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn an_image_without_account_files_gets_root_nobody_and_its_own_ids() {
        const BASE_PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
                                   nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n";
        const BASE_GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
        let own = |uid: u32, gid: u32| {
            format!("{BASE_PASSWD}app:x:{uid}:{gid}:app:/nonexistent:/sbin/nologin\n")
        };
        for (requested, image, passwd, group) in [
            (None, None, BASE_PASSWD.to_owned(), BASE_GROUP.to_owned()),
            (
                Some("root"),
                None,
                BASE_PASSWD.to_owned(),
                BASE_GROUP.to_owned(),
            ),
            (
                Some("65534:65534"),
                None,
                BASE_PASSWD.to_owned(),
                BASE_GROUP.to_owned(),
            ),
            (
                Some("nobody:nogroup"),
                None,
                BASE_PASSWD.to_owned(),
                BASE_GROUP.to_owned(),
            ),
            (
                None,
                Some("1000:1001"),
                own(1000, 1001),
                format!("{BASE_GROUP}app:x:1001:\n"),
            ),
            // The spec's user wins; a lone uid keeps group 0, as without the files.
            (
                Some("1000"),
                Some("2000:2000"),
                own(1000, 0),
                BASE_GROUP.to_owned(),
            ),
            (
                Some("0:50"),
                None,
                BASE_PASSWD.to_owned(),
                format!("{BASE_GROUP}app:x:50:\n"),
            ),
            (
                Some("1000:nogroup"),
                None,
                own(1000, 0),
                BASE_GROUP.to_owned(),
            ),
        ] {
            let got = minimal_accounts(requested, image);
            assert_eq!(
                got,
                MinimalAccounts { passwd, group },
                "{requested:?} {image:?}"
            );
        }
        // What the instance then resolves against them.
        let resolved = |requested: Option<&str>, image: Option<&str>| {
            let m = minimal_accounts(requested, image);
            let accounts = Accounts {
                passwd: Some(&m.passwd),
                group: Some(&m.group),
                minimal: true,
            };
            resolve(requested, image, accounts).map(|u| ids(&u))
        };
        assert_eq!(resolved(Some("nobody"), None), Ok((65534, 65534, vec![])));
        assert_eq!(resolved(Some("root"), None), Ok((0, 0, vec![])));
        assert_eq!(resolved(None, Some("1000:1001")), Ok((1000, 1001, vec![])));
        assert_eq!(resolved(Some("1000"), None), Ok((1000, 0, vec![])));
        let e = resolved(Some("www-data"), None).unwrap_err();
        assert!(e.contains("kiln's names only root and nobody"), "{e}");
    }

    #[test]
    fn docker_refuses_capabilities_a_non_root_process_could_not_use() {
        let chown = [kiln_spec::Capability::parse("CHOWN").unwrap()];
        for root in ["0:0", "0", "root", "root:staff"] {
            assert_eq!(docker_capabilities(root, &chown), Ok(()), "{root}");
        }
        assert_eq!(docker_capabilities("65534:65534", &[]), Ok(()));
        let e = docker_capabilities("65534:65534", &chown).unwrap_err();
        assert!(
            e.starts_with("[service] capabilities CHOWN: the Docker Engine"),
            "{e}"
        );
        assert!(docker_capabilities("app", &chown).is_err());
    }

    #[test]
    fn docker_gets_a_user_string_it_resolves_itself() {
        assert_eq!(docker_user(None, None).unwrap(), "65534:65534");
        assert_eq!(docker_user(None, Some("app")).unwrap(), "app");
        assert_eq!(docker_user(Some("root"), None).unwrap(), "0:0");
        assert_eq!(docker_user(Some("web"), Some("app")).unwrap(), "web");
        for root in ["root", "0", "0:0", "root:staff", "00"] {
            assert!(docker_user(None, Some(root)).is_err(), "{root}");
        }
    }
}
