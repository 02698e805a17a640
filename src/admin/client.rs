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
