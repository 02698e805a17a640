//! How the binaries turn an error into an exit code and a message a person can act on.
//!
//! Exit codes are part of the contract (SPEC.md): 0 success, 1 runtime failure,
//! 2 bad usage or bad config/input.

use std::process::ExitCode;

use crate::config::ConfigError;

/// Exit code for a bad config or bad input.
pub const USAGE: u8 = 2;
/// Exit code for a failure at run time.
pub const RUNTIME: u8 = 1;

/// Writes `text` to stdout. A reader that went away (`knockgate ruleset | head`) is
/// not an error: the rest is simply not wanted (`print!` would panic there).
pub fn write_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Prints `err` with its whole cause chain (and a hint for the usual mistakes) to
/// stderr as `PROGRAM: error: …`, and returns the exit code its kind calls for.
#[must_use]
pub fn report(program: &str, err: &anyhow::Error) -> ExitCode {
    eprintln!("{program}: error: {err:#}");
    if let Some(hint) = hint(err) {
        eprintln!("{program}: hint: {hint}");
    }
    if err.chain().any(is_usage) {
        ExitCode::from(USAGE)
    } else {
        ExitCode::from(RUNTIME)
    }
}

/// Errors that mean "the input is wrong" (exit 2) rather than "it failed" (exit 1).
fn is_usage(e: &(dyn std::error::Error + 'static)) -> bool {
    use crate::client::ClientError;
    use crate::client::config::ClientConfigError;
    e.is::<ConfigError>()
        || e.is::<ClientConfigError>()
        || e.is::<crate::keyfile::KeyFileError>()
        || e.is::<crate::knock::auth::IdError>()
        || matches!(
            e.downcast_ref(),
            Some(
                crate::egress::EgressError::ToWithHostWide
                    | crate::egress::EgressError::SessionWithoutTerminal
            )
        )
        || matches!(
            e.downcast_ref::<ClientError>(),
            Some(ClientError::Invalid(_) | ClientError::KeyFile(_))
        )
}

fn hint(err: &anyhow::Error) -> Option<&'static str> {
    // Only a refusal from the kernel's packet filter means "not root": the same errno
    // from a file, a socket path or a system-call filter has another cause, which the
    // error's own message names.
    let firewall_refused = err.chain().any(|e| {
        e.downcast_ref::<crate::firewall::FirewallError>()
            .is_some_and(|f| {
                std::error::Error::source(f)
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
            })
    });
    if firewall_refused {
        return Some("programming nftables needs root (or CAP_NET_ADMIN)");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eperm() -> std::io::Error {
        std::io::Error::from_raw_os_error(1)
    }

    #[test]
    fn the_root_hint_is_only_for_the_packet_filter() {
        let nft = anyhow::Error::new(crate::firewall::FirewallError::OpenSocket(eperm()));
        assert!(hint(&nft).is_some());
        let file = anyhow::Error::new(eperm()).context("cannot create the admin socket /run/x");
        assert_eq!(hint(&file), None, "an EPERM elsewhere has another cause");
    }
}
