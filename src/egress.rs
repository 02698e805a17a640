//! `egress-window`: ask knockgated for an egress window, run one command inside it,
//! and close the window when the command ends.
//!
//! Command scope: the command and all its descendants run in a cgroup v2 of their
//! own, which this process enters *before* it asks: the daemon reads the
//! requester's cgroup from the kernel and opens a window only for that one. Where
//! the cgroup comes from:
//!
//! * on a systemd host, a transient scope: `systemd-run --scope` for root,
//!   `systemd-run --user --scope` (the user's own manager) for anyone else;
//! * otherwise, for root, a fresh cgroup under the cgroup2 root;
//! * otherwise, a child of this process's own cgroup, when that cgroup is delegated
//!   to the user (writable) — nobody but root can make one anywhere else.
//!
//! The window lives as long as the admin connection: if this process dies, the
//! daemon closes it; if the daemon dies, the kernel's timeout does.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::admin::client::{AdminError, call, connect};
use crate::admin::{Request, Response};
use crate::cgroup::{CgroupError, WindowCgroup, cgroup2_root, own_cgroup_path};
use crate::grants::{WindowRecord, WindowScope};
use crate::ruleset::baseline::MAX_EGRESS_CGROUP_LEVEL;

/// What to run, where, for how long.
pub struct Plan {
    /// The admin socket.
    pub socket: PathBuf,
    /// The whole host instead of the command's cgroup.
    pub host_wide: bool,
    /// Names (or addresses) the window is restricted to; resolved when it opens.
    pub to: Vec<String>,
    /// How long the window may stay open.
    pub duration: Duration,
    /// The command and its arguments; empty for an admin's session: the user's
    /// login shell (`$SHELL -l`) runs inside the window.
    pub command: Vec<OsString>,
}

/// Set in a session window's shell (and everything it runs): when the window ends,
/// as Unix seconds — for a prompt (`PS1='[egress] \$ '` when it is set, say).
pub const SESSION_UNTIL_ENV: &str = "KNOCKGATE_EGRESS_UNTIL";

impl Plan {
    /// Whether this is a session window (no command: a login shell).
    #[must_use]
    pub fn is_session(&self) -> bool {
        self.command.is_empty()
    }

    /// What runs: the command, or `$SHELL -l` (`/bin/sh -l` without `$SHELL`).
    #[must_use]
    pub fn program(&self) -> Vec<OsString> {
        if self.is_session() {
            let shell = std::env::var_os("SHELL")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "/bin/sh".into());
            vec![shell, "-l".into()]
        } else {
            self.command.clone()
        }
    }
}

/// Why the window was not opened; the command did not run.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// `--to` names that do not resolve.
    #[error("cannot resolve --to {name}")]
    Resolve {
        /// The name.
        name: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// The window's cgroup is deeper than the baseline's rules look.
    #[error(
        "cgroup {path} is {level} levels deep; egress windows match cgroups up to {MAX_EGRESS_CGROUP_LEVEL} levels below the root"
    )]
    TooDeep {
        /// The cgroup.
        path: PathBuf,
        /// Its depth.
        level: u32,
    },
    /// A user other than root, with no cgroup it may make children in.
    #[error(
        "a command-scoped window needs a cgroup of its own, and this user may not make one below {own} ({why}); on a systemd host run it from a login session (it then asks your user manager: `systemd-run --user --scope`; `loginctl enable-linger` keeps one running), or use --host-wide, or run it as root"
    )]
    NoCgroupOfOwn {
        /// This process's cgroup.
        own: String,
        /// Why the child could not be made.
        why: String,
    },
    /// No COMMAND, and no terminal to run a session's shell on.
    #[error(
        "no COMMAND given and standard input is not a terminal; a session (a login shell in the window) needs one — give a COMMAND after --"
    )]
    SessionWithoutTerminal,
    /// `--to` and `--host-wide` together.
    #[error("--to restricts a command's window; it cannot be combined with --host-wide")]
    ToWithHostWide,
    /// knockgated said no.
    #[error("knockgated refused the window: {message}")]
    Refused {
        /// Its words.
        message: String,
    },
}

/// Opens the window, runs the command, closes the window; returns the command's
/// exit code (128+N when a signal ended it).
pub fn run(plan: &Plan) -> anyhow::Result<ExitCode> {
    if plan.host_wide && !plan.to.is_empty() {
        return Err(EgressError::ToWithHostWide.into());
    }
    if plan.is_session() && !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        // A script whose command came out empty must not get a shell reading its input.
        return Err(EgressError::SessionWithoutTerminal.into());
    }
    let to = resolve_all(&plan.to)?;
    let in_scope = std::env::var_os(IN_SCOPE_ENV).is_some();
    let root_user = nix::unistd::geteuid().is_root();
    if !plan.host_wide && !in_scope && systemd_manages_cgroups() {
        // The well-behaved way on a systemd host: run again inside a transient scope
        // (the user's own manager's, for anyone but root). exec only returns on
        // failure; then make a cgroup as below.
        let err = rerun_in_scope(root_user);
        eprintln!(
            "egress-window: cannot run in a systemd scope ({err}); making a cgroup of its own"
        );
    }
    let cgroup = if plan.host_wide {
        None
    } else {
        Some(window_cgroup(in_scope, root_user)?)
    };
    // Into the window's cgroup before asking (inside a systemd scope we are there
    // already): the daemon opens a window only for the cgroup its requester is in.
    let move_in = !in_scope;
    let original = own_cgroup();
    if let (Some((cg, _)), true) = (&cgroup, move_in) {
        cg.add_process(std::process::id())?;
    }
    let scope = cgroup
        .as_ref()
        .map_or(WindowScope::Host, |(cg, _)| WindowScope::Cgroup(cg.id()));
    let program = plan.program();
    let described = if plan.is_session() {
        format!("{} (session)", describe(&program))
    } else {
        describe(&program)
    };
    let leave = || {
        if let (Some((_, root)), Some(original), true) = (&cgroup, &original, move_in) {
            let back = root
                .join(original.trim_start_matches('/'))
                .join("cgroup.procs");
            let _ = std::fs::write(back, std::process::id().to_string());
        }
    };
    let (hold, window) = match open(&plan.socket, scope, &to, plan.duration, &described) {
        Ok(opened) => opened,
        Err(e) => {
            leave();
            return Err(e);
        }
    };
    // The server's end, not the one asked for: it may have capped the window.
    let until = std::time::UNIX_EPOCH + Duration::from_millis(window.ends().0);
    let length =
        Duration::from_secs(window.expires_at_ms.saturating_sub(window.granted_at_ms) / 1000);
    if plan.is_session() {
        eprintln!(
            "egress-window: egress open until {} ({}) for this shell and what it runs; `exit` closes it",
            humantime::format_rfc3339_seconds(until),
            humantime::format_duration(length)
        );
    }
    let window_id = window.id;
    let status = run_command(plan, &program, until);
    if plan.is_session() {
        eprintln!("egress-window: session ended; egress closed");
    }
    // Close at once (not at DURATION) and wait for the daemon to confirm, so a
    // connection made right after this returns is already refused.
    let _ = call(&plan.socket, &Request::Revoke { id: window_id });
    drop(hold);
    // Leave the window's cgroup, so it can be removed (on drop) once the command's
    // processes are gone.
    leave();
    drop(cgroup);
    status
}

/// Every IPv4 and IPv6 address of each name (DNS goes to the resolvers, which the
/// baseline allows).
fn resolve_all(names: &[String]) -> Result<Vec<IpAddr>, EgressError> {
    let mut out = Vec::new();
    for name in names {
        let resolve = |source| EgressError::Resolve {
            name: name.clone(),
            source,
        };
        let found = (name.as_str(), 0).to_socket_addrs().map_err(resolve)?;
        for addr in found.map(|a| a.ip()) {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    Ok(out)
}

/// The command line for the log and `knockgate grants`.
fn describe(command: &[OsString]) -> String {
    let words: Vec<String> = command
        .iter()
        .map(|w| w.to_string_lossy().into_owned())
        .collect();
    words.join(" ")
}

/// This process's cgroup v2 path (`0::/path` in /proc/self/cgroup).
fn own_cgroup() -> Option<String> {
    own_cgroup_path(&std::fs::read_to_string("/proc/self/cgroup").ok()?)
}

/// The window's cgroup: the systemd scope this process runs in; for root a new one
/// under the cgroup2 root; for anyone else a new child of its own (delegated)
/// cgroup. With the root it lives under.
fn window_cgroup(in_scope: bool, root_user: bool) -> anyhow::Result<(WindowCgroup, PathBuf)> {
    let root = cgroup2_root()?;
    let name = format!("knockgate-egress-{}", std::process::id());
    let cg = match (own_cgroup(), in_scope, root_user) {
        (Some(scope), true, _) => WindowCgroup::existing(&root, &scope)?,
        (_, false, true) => WindowCgroup::create(&root, &name)?,
        (own, false, false) => {
            let own = own.unwrap_or_default();
            let below = format!("{}/{name}", own.trim_matches('/'));
            WindowCgroup::create(&root, below.trim_start_matches('/')).map_err(|e| {
                EgressError::NoCgroupOfOwn {
                    own: own.clone(),
                    why: format!("{e:#}"),
                }
            })?
        }
        (None, true, _) => return Err(CgroupError::NoCgroup2.into()),
    };
    if cg.level() > MAX_EGRESS_CGROUP_LEVEL {
        let (path, level) = (cg.path().to_owned(), cg.level());
        return Err(EgressError::TooDeep { path, level }.into());
    }
    Ok((cg, root))
}

/// Set when egress-window runs itself again inside a systemd transient scope.
const IN_SCOPE_ENV: &str = "KNOCKGATE_EGRESS_IN_SCOPE";

/// Whether systemd is PID 1 and owns the cgroup tree (sd_booted's test).
fn systemd_manages_cgroups() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Replaces this process with `systemd-run [--user] --scope … -- <this program>
/// <same args>`; returns why not if that cannot be started. For anyone but root the
/// scope is the user's own manager's (the system manager would ask polkit, and
/// refuse); without a reachable user manager nothing is tried.
fn rerun_in_scope(root_user: bool) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    if !root_user && !user_manager_reachable() {
        return std::io::Error::other(
            "no systemd user manager for this user ($XDG_RUNTIME_DIR/systemd/private)",
        );
    }
    let me = match std::env::current_exe() {
        Ok(me) => me,
        Err(e) => return e,
    };
    let mut command = std::process::Command::new("systemd-run");
    if !root_user {
        command.arg("--user");
    }
    command
        .args(["--scope", "--quiet", "--collect"])
        .arg(format!("--unit=knockgate-egress-{}", std::process::id()))
        .arg("--")
        .arg(me)
        .args(std::env::args_os().skip(1))
        .env(IN_SCOPE_ENV, "1")
        .exec()
}

/// Whether this user's systemd manager listens (what `systemd-run --user` connects to).
fn user_manager_reachable() -> bool {
    std::env::var_os("XDG_RUNTIME_DIR")
        .is_some_and(|dir| Path::new(&dir).join("systemd/private").exists())
}

/// Asks for the window and keeps the connection that holds it.
fn open(
    socket: &Path,
    scope: WindowScope,
    to: &[IpAddr],
    duration: Duration,
    command: &str,
) -> anyhow::Result<(UnixStream, WindowRecord)> {
    let request = Request::OpenEgress {
        scope,
        ttl_secs: duration.as_secs().max(1),
        command: command.to_owned(),
        to: to.to_vec(),
    };
    let stream = connect(socket)?;
    let mut line = serde_json::to_string(&request)?;
    line.push('\n');
    send_with_proc_self(&stream, line.as_bytes())
        .context("cannot send the request to knockgated")?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .context("knockgated closed the connection")?;
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::WindowOpened { window, capped }) => {
            if capped {
                eprintln!("egress-window: window capped at the server's egress.max_ttl");
            }
            Ok((stream, window))
        }
        Ok(Response::Error { message, .. }) => Err(EgressError::Refused { message }.into()),
        _ => Err(AdminError::Protocol(answer).into()),
    }
}

/// Sends `bytes` with this process's `/proc/self` directory attached (SCM_RIGHTS):
/// the daemon reads who is asking — cgroup, uid, command line — from the kernel
/// through it, as its own sandboxed /proc does not show other users' processes.
fn send_with_proc_self(stream: &UnixStream, bytes: &[u8]) -> std::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    use std::mem::MaybeUninit;
    use std::os::fd::AsFd;
    let proc_self = std::fs::File::open("/proc/self")?;
    let fds = [proc_self.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("no room for the descriptor"));
    }
    let sent = sendmsg(
        stream,
        &[std::io::IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    (&*stream).write_all(&bytes[sent..])
}

/// Runs the command; forwards SIGTERM and SIGHUP to it (SIGINT and SIGQUIT reach it
/// from the terminal directly); warns once when the window's time is over.
fn run_command(
    plan: &Plan,
    program: &[OsString],
    until: std::time::SystemTime,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (program, args) = program.split_first().context("no command given")?;
        let until_secs = until
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env(SESSION_UNTIL_ENV, until_secs.to_string())
            // The marker is for this program's own re-run only: a later egress-window
            // started by COMMAND must not take its cgroup for a scope of its own.
            .env_remove(IN_SCOPE_ENV)
            .spawn()
            .with_context(|| format!("cannot run {}", program.to_string_lossy()))?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok());
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut quit = signal(SignalKind::quit())?;
        let left = until
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        let deadline = tokio::time::sleep(left);
        tokio::pin!(deadline);
        let mut warned = false;
        let forward = |sig: nix::sys::signal::Signal| {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
        };
        let status = loop {
            tokio::select! {
                status = child.wait() => break status?,
                () = &mut deadline, if !warned => {
                    warned = true;
                    let what = if plan.is_session() { "this shell stays" } else { "the command still runs" };
                    eprintln!(
                        "egress-window: the window ended at {}; {what}, but its new connections will fail",
                        humantime::format_rfc3339_seconds(until)
                    );
                }
                _ = term.recv() => forward(nix::sys::signal::Signal::SIGTERM),
                _ = hup.recv() => forward(nix::sys::signal::Signal::SIGHUP),
                _ = int.recv() => {}
                _ = quit.recv() => {}
            }
        };
        let code = status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(1);
        Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
    })
}
