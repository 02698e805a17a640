//! `knock --sequence` and `--print-sequence`: the key's current port sequence
//! (`crate::sequence`), sent as TCP SYNs (non-blocking connects, closed at once) or
//! one-byte UDP datagrams, or printed for knockd's `knock` client and phone apps.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use crate::sequence::{SequenceSpec, Touch};
use crate::service::Protocol;

/// The gap between two touches: enough that no queue reorders them (a sender moved
/// between CPUs can overtake its own packet on a busy host), far below the
/// server's few seconds per touch.
const TOUCH_GAP: Duration = Duration::from_millis(10);

/// What [`current`] gives: the touches and how long they stay accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    /// The touches, in order.
    pub touches: Vec<Touch>,
    /// The step they belong to.
    pub step: u64,
    /// Unix seconds until which the server accepts them (the end of the next step).
    pub valid_until: u64,
}

/// The sequence of `secret` for `server` at `now` (Unix seconds).
#[must_use]
pub fn current(
    spec: &SequenceSpec,
    secret: &crate::knock::Secret,
    server: &crate::knock::auth::ServerId,
    now: u64,
) -> Option<Current> {
    let step = spec.step_at(now);
    Some(Current {
        touches: spec.derive(secret, server, step)?,
        step,
        valid_until: spec.accepted_until(step),
    })
}

/// Sends `touches` to `to`'s address in order, from the address the route picks.
pub fn touch(to: SocketAddr, touches: &[Touch]) -> std::io::Result<()> {
    for (i, t) in touches.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(TOUCH_GAP);
        }
        let addr = SocketAddr::new(to.ip(), t.port);
        match t.protocol {
            Protocol::Tcp => syn(addr)?,
            Protocol::Udp => {
                let local: SocketAddr = if addr.is_ipv4() {
                    "0.0.0.0:0".parse().unwrap_or(addr)
                } else {
                    "[::]:0".parse().unwrap_or(addr)
                };
                UdpSocket::bind(local)?.send_to(&[0], addr)?;
            }
        }
    }
    Ok(())
}

/// One SYN: a non-blocking connect, closed at once (nothing will answer).
fn syn(addr: SocketAddr) -> std::io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => Ok(()),
        Err(e) => Err(e),
    }
}
