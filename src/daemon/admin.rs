//! The admin socket's daemon side: who may talk (SO_PEERCRED: root, or a member of
//! the admin group) and what each request does to the core. Every request and every
//! refusal is logged with the peer's uid and pid.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use nix::unistd::{Gid, Group, Uid, User, getgrouplist};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tracing::{info, warn};

use super::core::Core;
use crate::admin::{MAX_REQUEST, Request, Response};
use crate::firewall::Firewall;
use crate::grants::{Granted, WindowScope};
use crate::logging::AUDIT;
use crate::ruleset::baseline::MAX_EGRESS_CGROUP_LEVEL;

/// Most destinations one `--to` window may name: each is a set element, added on the
/// daemon's one loop.
pub const MAX_WINDOW_DESTINATIONS: usize = 64;

/// Longest a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the admin socket could not be made; each names the path and the step.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Its directory could not be created.
    #[error("cannot create the admin socket's directory {path}")]
    CreateDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A stale socket from a crash could not be removed.
    #[error("cannot remove the stale admin socket {path}")]
    RemoveStale {
        /// The socket.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `bind` failed.
    #[error("cannot create the admin socket {path}")]
    Bind {
        /// The socket.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Its mode could not be set to 0660.
    #[error("cannot set mode 0660 on the admin socket {path}")]
    Chmod {
        /// The socket.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It could not be handed to the admin group.
    #[error(
        "cannot give the admin socket {path} to group `{group}` (run knockgated with that group as its own, e.g. Group={group} in the unit, or as a member of it where chown is allowed)"
    )]
    Chown {
        /// The socket.
        path: std::path::PathBuf,
        /// The admin group.
        group: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Binds the admin socket at `path` (mode 0660, group `group` when it exists),
/// replacing a stale socket file left by a crash. The socket is made with the
/// daemon's own group; only when that is not the admin group is it chowned (the
/// shipped unit runs the daemon with `Group=knockgate`, because its system-call
/// filter forbids `chown`).
pub fn bind(path: &Path, group: &str) -> Result<tokio::net::UnixListener, BindError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let owned = |source| (path.to_owned(), source);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| BindError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(|source| {
                let (path, source) = owned(source);
                BindError::RemoveStale { path, source }
            })?;
        }
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|source| {
        let (path, source) = owned(source);
        BindError::Bind { path, source }
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|source| {
        let (path, source) = owned(source);
        BindError::Chmod { path, source }
    })?;
    if let Some(gid) = group_id(group) {
        let current = std::fs::metadata(path).map(|m| m.gid()).ok();
        if current != Some(gid.as_raw()) {
            nix::unistd::chown(path, None, Some(gid)).map_err(|errno| BindError::Chown {
                path: path.to_owned(),
                group: group.to_owned(),
                source: std::io::Error::from(errno),
            })?;
        }
    }
    Ok(listener)
}

/// The id of group `name`: from `/etc/group` when it is there (where the package's
/// `adduser` puts it, and where nsswitch looks first), else from the system's name
/// services. Read at start, the file spares an idle daemon the NSS modules (~0.35 MB
/// resident: libnss_systemd and what it loads) that only a non-root admin's request
/// then needs.
fn group_id(name: &str) -> Option<Gid> {
    let from_file = std::fs::read_to_string("/etc/group").ok().and_then(|text| {
        text.lines().find_map(|line| {
            let mut fields = line.split(':');
            (fields.next() == Some(name))
                .then(|| fields.nth(1)?.parse().ok().map(Gid::from_raw))
                .flatten()
        })
    });
    from_file.or_else(|| Group::from_name(name).ok().flatten().map(|g| g.gid))
}

/// The peer of one admin connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its user id.
    pub uid: u32,
    /// Its primary group id.
    pub gid: u32,
    /// Its process id, for the log.
    pub pid: Option<i32>,
    /// The process, as the kernel describes it (or why it could not be told): what
    /// an egress window is checked against.
    pub process: Result<super::peer::Process, String>,
}

/// Whether `peer` may use the socket: root always; others only as members of `group`.
pub fn authorize(peer: &Peer, group: &str) -> Result<(), String> {
    if peer.uid == 0 {
        return Ok(());
    }
    let Ok(Some(admin)) = Group::from_name(group) else {
        return Err(format!(
            "uid {} is not root, and the admin group `{group}` does not exist",
            peer.uid
        ));
    };
    if Gid::from_raw(peer.gid) == admin.gid {
        return Ok(());
    }
    let user = User::from_uid(Uid::from_raw(peer.uid)).ok().flatten();
    let member = user.as_ref().is_some_and(|u| {
        std::ffi::CString::new(u.name.as_str())
            .ok()
            .and_then(|name| getgrouplist(&name, u.gid).ok())
            .is_some_and(|groups| groups.contains(&admin.gid))
    });
    if member {
        return Ok(());
    }
    let name = user.map_or_else(|| "?".to_owned(), |u| u.name);
    Err(format!(
        "uid {} ({name}) is not root and not in the admin group `{group}`",
        peer.uid
    ))
}

/// Whether `peer` (already authorized) may change the config: root always; the admin
/// group only where `admin.group_may_change_config` says so.
pub fn may_change_config(peer: &Peer, admin: &crate::config::Admin) -> Result<(), String> {
    if peer.uid == 0 || admin.group_may_change_config {
        return Ok(());
    }
    Err(format!(
        "uid {} may not change the config: reload, apply and confirm are root's (run them with sudo, or set group_may_change_config = true under [admin] to let the group `{}` do it)",
        peer.uid, admin.group
    ))
}

/// Bytes of the first read of a request, and the one file descriptor it may carry
/// (`SCM_RIGHTS`: the requester's `/proc/self`). Any further descriptors are closed
/// by the kernel (no room for them) or dropped here.
async fn receive_first(
    stream: &tokio::net::UnixStream,
) -> std::io::Result<(Vec<u8>, Option<std::os::fd::OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    use std::mem::MaybeUninit;
    loop {
        stream.readable().await?;
        let received = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut buf = vec![0u8; 4096];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
                .map_err(std::io::Error::from)?;
            let mut passed = None;
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = message {
                    for fd in fds {
                        passed.get_or_insert(fd);
                    }
                }
            }
            buf.truncate(msg.bytes);
            Ok((buf, passed))
        });
        match received {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => return other,
        }
    }
}

/// What to do when a held connection ends (an egress window's requester hung up).
pub type OnClose = Box<dyn FnOnce()>;

/// Reads one request from `stream` and answers it with `handle`. If `handle` returns
/// an [`OnClose`], the connection is held until the peer closes it (or dies), and
/// then the action runs.
pub async fn serve(
    stream: tokio::net::UnixStream,
    group: &str,
    cgroup_root: Option<&Path>,
    handle: impl FnOnce(Request, Peer) -> (Response, Option<OnClose>),
) {
    let Ok(cred) = stream.peer_cred() else { return };
    // Taken at once, while the connecting process is surely there to be seen.
    let connected = super::peer::connected(&stream);
    // The request's first bytes, with the /proc directory a requester may pass.
    let (first, passed) = tokio::time::timeout(REQUEST_TIMEOUT, receive_first(&stream))
        .await
        .unwrap_or_else(|_| Ok((Vec::new(), None)))
        .unwrap_or_default();
    let process = connected.and_then(|c| super::peer::identify(&c, passed, cgroup_root));
    let peer = Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
        process,
    };
    let (read, mut write) = stream.into_split();
    let limit = u64::try_from(MAX_REQUEST).unwrap_or(u64::MAX);
    let rest = tokio::io::AsyncReadExt::take(read, limit);
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::chain(
        std::io::Cursor::new(first),
        rest,
    ));
    let (response, on_close) = if let Err(why) = authorize(&peer, group) {
        warn!(target: AUDIT, event = "admin-refuse", uid = peer.uid, pid = ?peer.pid, reason = %why,
            "admin request refused");
        (Response::error("forbidden", why), None)
    } else {
        let mut line = String::new();
        match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
            Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(&line) {
                Ok(request) => handle(request, peer),
                Err(e) => (
                    Response::error("bad_request", format!("not a request: {e}")),
                    None,
                ),
            },
            _ => (Response::error("bad_request", "no request line"), None),
        }
    };
    let mut text = serde_json::to_string(&response).unwrap_or_default();
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
    if let Some(on_close) = on_close {
        // Held: anything the peer sends is ignored; end of stream or an error (the
        // peer died) ends the hold.
        let mut sink = [0u8; 64];
        let mut inner = reader.into_inner();
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut inner, &mut sink).await {
            if n == 0 {
                break;
            }
        }
        on_close();
    }
}

/// The requesting process, if it may have a window of `scope`: a command-scoped
/// window only for the cgroup the requester itself is in (as the kernel says), at a
/// depth the baseline's rules look at.
fn verify_window_scope(peer: &Peer, scope: WindowScope) -> Result<super::peer::Process, String> {
    let process = peer
        .process
        .clone()
        .map_err(|e| format!("cannot identify the requesting process: {e}"))?;
    let WindowScope::Cgroup(asked) = scope else {
        return Ok(process);
    };
    let Some(own) = &process.cgroup else {
        return Err(
            "knockgated sees no cgroup2 file system, so it cannot check a command's cgroup; use --host-wide"
                .to_owned(),
        );
    };
    if own.id != asked {
        return Err(format!(
            "a window is only for the requester's own cgroup: pid {} (`{}`) is in {} (id {}), not cgroup {asked}",
            process.pid, process.command, own.path, own.id
        ));
    }
    // Anyone but root only for a cgroup delegated to them (theirs: a user manager's
    // scope, or one they made): not a shared one such as a login session's scope or
    // cron.service, where other users' (or root's) processes run too.
    if process.uid != 0 && own.owner != process.uid {
        return Err(format!(
            "cgroup {} is not uid {}'s own (its owner is uid {}): a window is for a cgroup delegated to its requester; egress-window makes one",
            own.path, process.uid, own.owner
        ));
    }
    if own.level == 0 || own.level > MAX_EGRESS_CGROUP_LEVEL {
        return Err(format!(
            "cgroup {} is {} levels deep; windows are for cgroups 1 to {MAX_EGRESS_CGROUP_LEVEL} levels below the root",
            own.path, own.level
        ));
    }
    Ok(process)
}

/// A page of `grants` (with the windows on the first), or why `after` names no grant
/// id.
fn grants_page<F: Firewall>(
    core: &mut Core<F>,
    now: crate::clock::UnixMs,
    after: Option<&str>,
) -> Response {
    let after = match after.map(crate::grants::parse_id) {
        None => None,
        Some(Some(id)) => Some(id),
        Some(None) => {
            return Response::error("bad_request", "`after` is not a grant id (8 hex digits)");
        }
    };
    let (grants, next) = core.grants_page(now, after, crate::admin::GRANTS_PAGE);
    let windows = if after.is_none() {
        core.windows(now)
    } else {
        Vec::new()
    };
    Response::Grants {
        grants,
        windows,
        next: next.map(crate::grants::id_text),
    }
}

/// Opens the window for the verified `process`; its real command line is what the
/// log and `knockgate grants` show.
fn open_window<F: Firewall>(
    core: &mut Core<F>,
    scope: WindowScope,
    to: &[std::net::IpAddr],
    ttl_secs: u64,
    who: &str,
    process: &super::peer::Process,
    now: crate::clock::UnixMs,
) -> Response {
    let ttl = Duration::from_secs(ttl_secs);
    match core.open_window(scope, to, ttl, who, &process.command, now) {
        Ok((window, capped)) => {
            let cgroup = process.cgroup.as_ref().map(|c| c.path.as_str());
            info!(target: AUDIT, event = "egress-open", id = %window.id, scope = %window.scope,
                cgroup = ?cgroup, to = ?window.to, who = %window.who, uid = process.uid,
                pid = process.pid, command = ?window.command, expires_at = window.expires_at,
                capped, "egress window opened");
            Response::WindowOpened { window, capped }
        }
        Err(e) => Response::error("failed", format!("{e:#}")),
    }
}

/// What `request` from `peer` does to `core` at Unix time `now`.
pub fn dispatch<F: Firewall>(
    core: &mut Core<F>,
    status: impl FnOnce(&mut Core<F>) -> Response,
    request: Request,
    peer: &Peer,
    now: crate::clock::UnixMs,
) -> Response {
    let who = format!("uid {}", peer.uid);
    match request {
        Request::Status => status(core),
        // The daemon handles these before it gets here.
        Request::Reload | Request::Apply { .. } | Request::Confirm => {
            Response::error("bad_request", "not a core request")
        }
        Request::Grants { after } => grants_page(core, now, after.as_deref()),
        Request::OpenEgress { ref to, .. } if to.len() > MAX_WINDOW_DESTINATIONS => {
            Response::error(
                "bad_request",
                format!(
                    "a window may name at most {MAX_WINDOW_DESTINATIONS} destinations, not {}",
                    to.len()
                ),
            )
        }
        Request::OpenEgress {
            scope: WindowScope::Host,
            ref to,
            ..
        } if !to.is_empty() => Response::error(
            "bad_request",
            "a host-wide window cannot be restricted to destinations; use one or the other",
        ),
        Request::OpenEgress {
            scope,
            ttl_secs,
            command: claimed,
            to,
        } => {
            let process = match verify_window_scope(peer, scope) {
                Ok(process) => process,
                Err(why) => {
                    warn!(target: AUDIT, event = "egress-refused", scope = %scope, who = %who,
                        pid = ?peer.pid, claimed_command = ?claimed, reason = %why,
                        "egress window refused");
                    return Response::error("forbidden", why);
                }
            };
            open_window(core, scope, &to, ttl_secs, &who, &process, now)
        }
        Request::Open {
            service,
            from,
            ttl_secs,
        } => {
            let ttl = ttl_secs.map(Duration::from_secs);
            match core.open(&service, from, ttl, &who, now) {
                Ok((grant, kind, capped)) => {
                    info!(target: AUDIT, event = "grant", id = %grant.id, service = %grant.service,
                        address = %grant.address, who = %grant.who, pid = ?peer.pid,
                        expires_at = grant.expires_at, extended = kind == Granted::Extended, capped,
                        "admin opened a grant");
                    Response::Opened {
                        grant,
                        extended: kind == Granted::Extended,
                        capped,
                    }
                }
                Err(e) => {
                    warn!(target: AUDIT, event = "grant-refused", service = %service, address = %from, who = %who,
                        pid = ?peer.pid, error = %format!("{e:#}"), "admin's grant refused");
                    Response::error("failed", format!("{e:#}"))
                }
            }
        }
        Request::Revoke { id } => match core.revoke(&id) {
            Ok(Some(grant)) => {
                info!(target: AUDIT, event = "revoke", id = %grant.id, service = %grant.service,
                    address = %grant.address, by = %who, pid = ?peer.pid, "grant revoked");
                Response::Revoked { grant }
            }
            Ok(None) => match core.close_window(&id, now) {
                Ok(Some(window)) => {
                    info!(target: AUDIT, event = "egress-close", id = %window.id, scope = %window.scope,
                        by = %who, pid = ?peer.pid, "egress window revoked");
                    Response::WindowClosed { window }
                }
                Ok(None) => {
                    Response::error("not_found", format!("no grant or window with id {id}"))
                }
                Err(e) => Response::error("failed", format!("{e:#}")),
            },
            Err(e) => Response::error("failed", format!("{e:#}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_come_from_etc_group_as_nss_gives_them() {
        assert_eq!(group_id("root"), Some(Gid::from_raw(0)));
        assert_eq!(
            group_id("root"),
            Group::from_name("root").unwrap().map(|g| g.gid)
        );
        assert_eq!(group_id("no-such-group-knockgate-test"), None);
        // A prefix of a name is not the name.
        assert_eq!(group_id("roo"), None);
    }

    #[test]
    fn root_is_always_allowed() {
        let root = Peer {
            uid: 0,
            gid: 0,
            pid: None,
            process: Err("not needed".to_owned()),
        };
        assert!(authorize(&root, "no-such-group-here").is_ok());
    }

    #[test]
    fn config_changes_are_roots_unless_the_group_may() {
        let member = Peer {
            uid: 1000,
            gid: 1000,
            pid: Some(7),
            process: Err("not needed".to_owned()),
        };
        let mut admin = crate::config::Admin::default();
        let why = may_change_config(&member, &admin).unwrap_err();
        assert!(
            why.contains("uid 1000") && why.contains("group_may_change_config = true"),
            "{why}"
        );
        let root = Peer {
            uid: 0,
            ..member.clone()
        };
        assert!(may_change_config(&root, &admin).is_ok());
        admin.group_may_change_config = true;
        assert!(may_change_config(&member, &admin).is_ok());
    }

    fn requester(cgroup: Option<(u64, u32)>) -> Peer {
        requester_owning(cgroup, 1000)
    }

    fn requester_owning(cgroup: Option<(u64, u32)>, owner: u32) -> Peer {
        use super::super::peer::{Cgroup, Process};
        Peer {
            uid: 1000,
            gid: 1000,
            pid: Some(4321),
            process: Ok(Process {
                pid: 4321,
                uid: 1000,
                command: "egress-window 10m -- apt upgrade".to_owned(),
                cgroup: cgroup.map(|(id, level)| Cgroup {
                    path: "/user.slice/run-1.scope".to_owned(),
                    id,
                    level,
                    owner,
                }),
            }),
        }
    }

    #[test]
    fn a_window_is_only_for_the_requesters_own_cgroup() {
        let peer = requester(Some((5, 2)));
        let process = verify_window_scope(&peer, WindowScope::Cgroup(5)).unwrap();
        assert_eq!(process.command, "egress-window 10m -- apt upgrade");
        let why = verify_window_scope(&peer, WindowScope::Cgroup(6)).unwrap_err();
        assert!(
            why.contains("only for the requester's own cgroup")
                && why.contains("/user.slice/run-1.scope (id 5)")
                && why.contains("apt upgrade"),
            "{why}"
        );
        // Host-wide needs no cgroup, but still a process the kernel described.
        assert!(verify_window_scope(&peer, WindowScope::Host).is_ok());
        let unknown = Peer {
            process: Err("cannot open /proc/4321".to_owned()),
            ..peer
        };
        for scope in [WindowScope::Host, WindowScope::Cgroup(5)] {
            let why = verify_window_scope(&unknown, scope).unwrap_err();
            assert!(
                why.contains("cannot identify the requesting process"),
                "{why}"
            );
        }
        let why = verify_window_scope(&requester(None), WindowScope::Cgroup(5)).unwrap_err();
        assert!(why.contains("no cgroup2"), "{why}");
        let deep = requester(Some((5, MAX_EGRESS_CGROUP_LEVEL + 1)));
        assert!(verify_window_scope(&deep, WindowScope::Cgroup(5)).is_err());
        let root = requester(Some((1, 0)));
        assert!(verify_window_scope(&root, WindowScope::Cgroup(1)).is_err());
        // A shared cgroup (root's, like cron.service or a session scope) is refused to
        // a non-root member, whose own it is not.
        let shared = requester_owning(Some((5, 2)), 0);
        let why = verify_window_scope(&shared, WindowScope::Cgroup(5)).unwrap_err();
        assert!(
            why.contains("is not uid 1000's own (its owner is uid 0)"),
            "{why}"
        );
    }

    #[test]
    fn others_need_the_group() {
        let nobody = Peer {
            uid: 65534,
            gid: 65534,
            pid: None,
            process: Err("not needed".to_owned()),
        };
        let why = authorize(&nobody, "no-such-group-here").unwrap_err();
        assert!(
            why.contains("65534") && why.contains("no-such-group-here"),
            "{why}"
        );
        // "root" exists on every Linux system; nobody is not in it.
        let why = authorize(&nobody, "root").unwrap_err();
        assert!(why.contains("not in the admin group `root`"), "{why}");
        // A primary group match is enough.
        let in_group = Peer {
            uid: 65534,
            gid: 0,
            pid: None,
            process: Err("not needed".to_owned()),
        };
        assert!(authorize(&in_group, "root").is_ok());
    }
}
