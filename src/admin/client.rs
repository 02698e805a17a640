//! The admin socket's client side, for `knockgate` and `egress-window`: blocking,
//! bounded, with messages that say what to do about the usual failures.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::{MAX_ANSWER, Request, Response};

/// Default admin socket path.
pub const DEFAULT_SOCKET: &str = "/run/knockgate/admin.sock";

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No daemon listens there.
    #[error("cannot reach knockgated at {path} (is it running? is --socket right?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket's permissions keep this user out.
    #[error(
        "permission denied on {path}: only root and members of the admin group may use knockgated"
    )]
    Forbidden {
        /// The socket path.
        path: PathBuf,
    },
    /// Talking failed midway.
    #[error("lost the connection to knockgated at {path}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not understood.
    #[error("knockgated answered something unexpected: {0}")]
    Protocol(String),
}

/// Connects to the daemon at `socket`, telling "not allowed" from "not running".
pub fn connect(socket: &Path) -> Result<UnixStream, AdminError> {
    UnixStream::connect(socket).map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            AdminError::Forbidden {
                path: socket.to_owned(),
            }
        } else {
            AdminError::Connect {
                path: socket.to_owned(),
                source,
            }
        }
    })
}

/// Sends `request` to the daemon at `socket` and returns its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response, AdminError> {
    let stream = connect(socket)?;
    let io = |source| AdminError::Io {
        path: socket.to_owned(),
        source,
    };
    let within = request.answer_within();
    stream.set_read_timeout(Some(within)).map_err(io)?;
    stream.set_write_timeout(Some(within)).map_err(io)?;
    let mut line =
        serde_json::to_string(request).map_err(|e| AdminError::Protocol(e.to_string()))?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    let limit = u64::try_from(MAX_ANSWER).unwrap_or(u64::MAX);
    BufReader::new(std::io::Read::take(&stream, limit))
        .read_line(&mut answer)
        .map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| AdminError::Protocol(format!("{e}")))
}

/// Most pages [`all_grants`] asks for: a million grants are 20; grants added while
/// listing could make a few more, a daemon that never says "last page" no more.
const MOST_PAGES: usize = 1_000;

/// Every grant (by id) and window, asked page after page: one `Response::Grants`
/// with them all and no next page, or the first answer that is not a page (an
/// error, as the daemon gave it). A grant opened or closed while the pages are asked
/// may be missing or listed as it was.
pub fn all_grants(socket: &Path) -> Result<Response, AdminError> {
    let (mut grants, mut windows) = (Vec::new(), Vec::new());
    let mut after: Option<String> = None;
    for _ in 0..MOST_PAGES {
        match call(
            socket,
            &Request::Grants {
                after: after.clone(),
            },
        )? {
            Response::Grants {
                grants: page,
                windows: first,
                next,
            } => {
                grants.extend(page);
                if after.is_none() {
                    windows = first;
                }
                // Ids only grow from page to page: an answer that does not move on
                // ends the listing rather than asking for the same page forever.
                match next {
                    Some(id) if after.as_ref().is_none_or(|last| id > *last) => after = Some(id),
                    _ => break,
                }
            }
            other => return Ok(other),
        }
    }
    Ok(Response::Grants {
        grants,
        windows,
        next: None,
    })
}
