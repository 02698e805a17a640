//! The local admin protocol: one JSON request line, one JSON response line, over
//! a Unix socket whose peer the daemon checks with SO_PEERCRED (root, or a member of
//! the admin group). Used by `knockgate` now and by `egress-window` later.

pub mod client;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::grants::{GrantRecord, WindowRecord, WindowScope};

/// Longest request line the daemon reads.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Longest answer line a client reads: a page of `grants` ([`GRANTS_PAGE`] grants, at
/// most ~300 bytes each in JSON) fits four times over.
pub const MAX_ANSWER: usize = 64 << 20;
/// Most grants in one answer to `grants`: ~10 MB of JSON (15 MB at worst), well
/// inside [`MAX_ANSWER`] — a million in one answer would be ~190 MB, built on the
/// daemon's loop and under its memory cap. A client from before pages, which sends no
/// `after` and ignores `next`, lists the first page only.
pub const GRANTS_PAGE: usize = 50_000;

fn ssh() -> String {
    crate::service::SSH.to_owned()
}

/// What an admin asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The daemon's state in brief.
    Status,
    /// The live grants in pages, by id: the first page (with every egress window)
    /// when `after` is absent, else the page after that grant id. The CLI asks for
    /// page after page until the answer names no next one.
    Grants {
        /// The last grant id of the page before.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
    },
    /// Open `service` for `from` for `ttl_secs` (the server's default if absent;
    /// capped). Sent as `open`; `open_ssh` (knockgate 0.1's CLI) is read as `ssh`.
    #[serde(alias = "open_ssh")]
    Open {
        /// The service to open (`ssh` when absent).
        #[serde(default = "ssh")]
        service: String,
        /// Source address the hole is for.
        from: IpAddr,
        /// Requested length in seconds.
        ttl_secs: Option<u64>,
    },
    /// Open an egress window for `scope` for `ttl_secs` (capped). The window lives as
    /// long as this connection: the daemon closes it when the requester hangs up.
    OpenEgress {
        /// A cgroup (a command and its children) or the whole host.
        scope: WindowScope,
        /// Requested length in seconds.
        ttl_secs: u64,
        /// The command it is for, for the log and `knockgate grants`.
        command: String,
        /// Destinations to restrict a command-scoped window to; empty means any.
        #[serde(default)]
        to: Vec<IpAddr>,
    },
    /// Re-read the config and apply it, keeping grants and windows.
    Reload,
    /// Put the config at `config` in force until confirmed; roll back after
    /// `confirm_secs` otherwise.
    Apply {
        /// The config file to try (absolute path, for messages and logs).
        config: std::path::PathBuf,
        /// Its text, read by the requester: the daemon may not be able to read the
        /// admin's files (another user, `ProtectHome`).
        text: String,
        /// Seconds before the rollback.
        confirm_secs: u64,
    },
    /// Keep the config on trial (it is saved over the daemon's config file).
    Confirm,
    /// Close grant or window `id` now.
    Revoke {
        /// The grant's id.
        id: String,
    },
}

impl Request {
    /// The request's name, as sent (`op`), for logs.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Grants { .. } => "grants",
            Self::Open { .. } => "open",
            Self::OpenEgress { .. } => "open_egress",
            Self::Reload => "reload",
            Self::Apply { .. } => "apply",
            Self::Confirm => "confirm",
            Self::Revoke { .. } => "revoke",
        }
    }

    /// How long a client waits for the answer. A whole-table replace (reload, apply,
    /// confirm) carries every grant and ban: 100,000 grants and two full ban sets take
    /// ~2 s on a fast machine and many times that on a slow one, and giving up early
    /// would report a failure for a change the daemon then makes anyway.
    #[must_use]
    pub fn answer_within(&self) -> std::time::Duration {
        match self {
            Self::Reload | Self::Apply { .. } | Self::Confirm => {
                std::time::Duration::from_secs(120)
            }
            _ => std::time::Duration::from_secs(10),
        }
    }
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Answer to `status`.
    Status {
        /// knockgate's table.
        table: String,
        /// The id knocks must be bound to.
        server_id: String,
        /// The knock port.
        knock_port: u16,
        /// Keys that can knock.
        keys: usize,
        /// Live grants.
        grants: usize,
        /// Keys with a port sequence (0 from a daemon before sequences).
        #[serde(default)]
        sequence_keys: usize,
        /// Datagrams the kernel dropped on the knock port as junk before the daemon
        /// saw them (the table's `knock_junk` counter; none if it could not be read).
        #[serde(default)]
        junk_dropped: Option<u64>,
        /// Datagrams the daemon read and refused since it started.
        #[serde(default)]
        knocks_refused: u64,
    },
    /// Answer to `grants`: a page of at most [`GRANTS_PAGE`] grants by id.
    Grants {
        /// Live grants, by id.
        grants: Vec<GrantRecord>,
        /// Every open egress window (on the first page).
        #[serde(default)]
        windows: Vec<WindowRecord>,
        /// The id to ask `after` for the next page, if there are more grants.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    /// An egress window was opened; it closes when the requesting connection does.
    WindowOpened {
        /// The window.
        window: WindowRecord,
        /// Whether the requested length was cut to `egress.max_ttl`.
        capped: bool,
    },
    /// A config is on trial until `deadline` (Unix seconds).
    Applied {
        /// When it is rolled back unless confirmed.
        deadline: u64,
    },
    /// The config on trial was kept and saved to `path`.
    Confirmed {
        /// The daemon's config file, now holding it.
        path: std::path::PathBuf,
    },
    /// The config was re-read and the new baseline is in force.
    Reloaded {
        /// Rules in the new baseline.
        rules: usize,
    },
    /// An egress window was closed.
    WindowClosed {
        /// The window that was closed.
        window: WindowRecord,
    },
    /// A grant was opened or extended.
    Opened {
        /// The grant.
        grant: GrantRecord,
        /// Whether it extended an existing grant for the same address.
        extended: bool,
        /// Whether the requested TTL was cut to the server's cap.
        capped: bool,
    },
    /// A grant was closed.
    Revoked {
        /// The grant that was closed.
        grant: GrantRecord,
    },
    /// The request was refused or failed.
    Error {
        /// `forbidden`, `not_found`, `bad_request` or `failed`.
        code: String,
        /// What went wrong, for a person.
        message: String,
    },
}

impl Response {
    /// An error response.
    #[must_use]
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self::Error {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line_each() {
        let r = Request::Open {
            service: "wireguard".into(),
            from: "198.51.100.7".parse().unwrap(),
            ttl_secs: Some(1800),
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"op":"open","service":"wireguard","from":"198.51.100.7","ttl_secs":1800}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        // knockgate 0.1's CLI still opens SSH on this daemon.
        let old = r#"{"op":"open_ssh","from":"198.51.100.7","ttl_secs":1800}"#;
        assert_eq!(
            serde_json::from_str::<Request>(old).unwrap(),
            Request::Open {
                service: "ssh".into(),
                from: "198.51.100.7".parse().unwrap(),
                ttl_secs: Some(1800),
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        // `grants` before pages: the first page; a page after an id.
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"grants"}"#).unwrap(),
            Request::Grants { after: None }
        );
        let next = Request::Grants {
            after: Some("0a1b2c3d".into()),
        };
        let line = serde_json::to_string(&next).unwrap();
        assert_eq!(line, r#"{"op":"grants","after":"0a1b2c3d"}"#);
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), next);
        assert_eq!(
            serde_json::to_string(&Request::Grants { after: None }).unwrap(),
            r#"{"op":"grants"}"#
        );
    }

    /// Lines that look like requests, with every field's value drawn at random.
    fn request_like() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let op = prop_oneof![
            Just("status"),
            Just("grants"),
            Just("open_ssh"),
            Just("open_egress"),
            Just("reload"),
            Just("apply"),
            Just("confirm"),
            Just("revoke"),
            Just("x"),
        ];
        let value = prop_oneof![
            Just("null".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            "\\PC{0,40}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            Just("{\"host\":null}".to_owned()),
            Just("{\"cgroup\":18446744073709551615}".to_owned()),
            Just("[\"::1\",\"300.1.1.1\"]".to_owned()),
        ];
        let key = prop_oneof![
            Just("from"),
            Just("ttl_secs"),
            Just("scope"),
            Just("command"),
            Just("to"),
            Just("config"),
            Just("text"),
            Just("confirm_secs"),
            Just("id"),
            Just("after"),
        ];
        (op, proptest::collection::vec((key, value), 0..5)).prop_map(|(op, fields)| {
            let fields: Vec<String> = fields
                .into_iter()
                .map(|(k, v)| format!(",\"{k}\":{v}"))
                .collect();
            format!("{{\"op\":\"{op}\"{}}}", fields.concat())
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        /// The daemon's parse of a request line (bounded to MAX_REQUEST before it gets
        /// here) never panics, whatever the line.
        #[test]
        fn request_parsing_never_panics_on_any_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let line = String::from_utf8_lossy(&bytes);
            let _ = serde_json::from_str::<Request>(&line);
        }

        #[test]
        fn request_parsing_never_panics_on_request_like_lines(line in request_like()) {
            let _ = serde_json::from_str::<Request>(&line);
        }
    }
}
