//! knockgate: the local admin's command line.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use knockgate::admin::client::call;
use knockgate::admin::{Request, Response};
use knockgate::config;
use knockgate::grants::{GrantRecord, WindowRecord};
use knockgate::ruleset::baseline;

use knockgate::cli::knockgate::{Args, Command};

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(err) => knockgate::exit::report("knockgate", &err),
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let request = match &args.command {
        Command::Status => Request::Status,
        Command::Grants { .. } => Request::Grants { after: None },
        Command::Open { service, from, ttl } => Request::Open {
            service: service.clone(),
            from: *from,
            ttl_secs: ttl.map(|d| d.as_secs()),
        },
        Command::Revoke { id } => Request::Revoke { id: id.clone() },
        Command::Reload => Request::Reload,
        Command::Apply { confirm } => {
            let read_error = |source| config::ConfigError::ReadFile {
                path: args.config_path(),
                source,
            };
            let path = std::fs::canonicalize(args.config_path()).map_err(read_error)?;
            let text = std::fs::read_to_string(&path).map_err(read_error)?;
            Request::Apply {
                config: path,
                text,
                confirm_secs: confirm.as_secs(),
            }
        }
        Command::Confirm => Request::Confirm,
        Command::Keygen {
            id,
            dir,
            address,
            owner,
            nat,
            sequence,
        } => {
            let key = NewKey {
                id,
                dir,
                address: address.as_deref(),
                owner: owner.as_deref(),
                nat: *nat,
                sequence: *sequence,
            };
            return keygen(&args.config_path(), &key);
        }
        Command::ImportFwknop {
            access_conf,
            write_keys,
        } => return import_fwknop(args, access_conf, write_keys.as_deref()),
        Command::Ruleset => {
            let loaded = config::load(&args.config_path())?;
            knockgate::exit::write_stdout(
                &baseline(&loaded.config, &loaded.resolvers).to_string(),
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Check => {
            let loaded = config::load(&args.config_path())?;
            let keys = config::load_keys(&loaded)?;
            println!("{}: ok ({} knock keys)", loaded.path.display(), keys.len());
            return Ok(ExitCode::SUCCESS);
        }
    };
    let json = matches!(args.command, Command::Grants { json: true });
    let socket = args.socket_path()?;
    let answer = if matches!(request, Request::Grants { .. }) {
        knockgate::admin::client::all_grants(&socket)?
    } else {
        call(&socket, &request)?
    };
    Ok(show(&answer, json))
}

fn show(response: &Response, json: bool) -> ExitCode {
    match response {
        Response::Status {
            table,
            server_id,
            knock_port,
            keys,
            grants,
            sequence_keys,
            junk_dropped,
            knocks_refused,
        } => {
            let sequences = if *sequence_keys > 0 {
                format!(", {sequence_keys} with a port sequence")
            } else {
                String::new()
            };
            println!(
                "knockgated running: table inet {table}, knock port {knock_port}/udp, server id {server_id}, {keys} keys{sequences}, {grants} open grants"
            );
            let junk = junk_dropped.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
            println!(
                "knock port: {junk} junk datagrams dropped by the kernel, {knocks_refused} refused by the daemon"
            );
        }
        Response::Grants {
            grants, windows, ..
        } if json => {
            let both = serde_json::json!({ "grants": grants, "windows": windows });
            let text = serde_json::to_string_pretty(&both).unwrap_or_default() + "\n";
            if let Err(e) = knockgate::exit::write_stdout(&text) {
                eprintln!("knockgate: cannot write the list: {e}");
                return ExitCode::from(1);
            }
        }
        Response::Grants {
            grants, windows, ..
        } => {
            let text = grants_table(grants) + &windows_table(windows);
            if let Err(e) = knockgate::exit::write_stdout(&text) {
                eprintln!("knockgate: cannot write the list: {e}");
                return ExitCode::from(1);
            }
        }
        Response::WindowOpened { window, capped } => {
            let cap = if *capped {
                " (capped at egress.max_ttl)"
            } else {
                ""
            };
            println!(
                "opened egress window {} for {} until {}{cap}",
                window.id,
                window.scope,
                when(window.expires_at)
            );
        }
        Response::Reloaded { rules } => println!("reloaded: {rules} rules in force"),
        Response::Applied { deadline } => println!(
            "applied; rolled back {} unless you run `knockgate confirm`",
            when(*deadline)
        ),
        Response::Confirmed { path } => println!("confirmed; saved to {}", path.display()),
        Response::WindowClosed { window } => {
            println!("closed egress window {} ({})", window.id, window.scope);
        }
        Response::Opened {
            grant,
            extended,
            capped,
        } => {
            let verb = if *extended { "extended" } else { "opened" };
            let cap = if *capped {
                " (capped at the server's max_ttl)"
            } else {
                ""
            };
            println!(
                "{verb} {} for {} until {}{cap}: id {}",
                grant.service,
                grant.address,
                when(grant.expires_at),
                grant.id
            );
        }
        Response::Revoked { grant } => {
            println!(
                "revoked {}: {} for {}",
                grant.id, grant.service, grant.address
            );
        }
        Response::Error { code, message } => {
            eprintln!("knockgate: {code}: {message}");
            return ExitCode::from(if code == "bad_request" { 2 } else { 1 });
        }
    }
    ExitCode::SUCCESS
}

/// The grants as a table (one line each: 100,000 grants are written at once).
fn grants_table(grants: &[GrantRecord]) -> String {
    use std::fmt::Write as _;
    if grants.is_empty() {
        return "no open grants\n".to_owned();
    }
    let mut out = format!(
        "{:<10} {:<12} {:<40} {:<20} EXPIRES\n",
        "ID", "SERVICE", "ADDRESS", "WHO"
    );
    for g in grants {
        let _ = writeln!(
            out,
            "{:<10} {:<12} {:<40} {:<20} {}",
            g.id,
            g.service,
            g.address,
            g.who,
            when(g.expires_at)
        );
    }
    out
}

/// The egress windows as a table, after a blank line; nothing if there are none.
fn windows_table(windows: &[WindowRecord]) -> String {
    use std::fmt::Write as _;
    if windows.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\n{:<10} {:<22} {:<10} {:<14} COMMAND\n",
        "WINDOW", "SCOPE", "WHO", "EXPIRES"
    );
    for w in windows {
        let scope = if w.to.is_empty() {
            w.scope.to_string()
        } else {
            let to: Vec<String> = w.to.iter().map(ToString::to_string).collect();
            format!("{} to {}", w.scope, to.join(","))
        };
        let _ = writeln!(
            out,
            "{:<10} {:<22} {:<10} {:<14} {}",
            w.id,
            scope,
            w.who,
            when(w.expires_at),
            w.command
        );
    }
    out
}

/// A Unix time as "in 14m 3s".
fn when(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "in {}",
        humantime::format_duration(Duration::from_secs(unix.saturating_sub(now)))
    )
}

/// The system user the packaged unit runs knockgated as.
const DAEMON_USER: &str = "knockgated";

/// What `knockgate keygen` was asked for.
struct NewKey<'a> {
    id: &'a str,
    dir: &'a Path,
    address: Option<&'a str>,
    owner: Option<&'a str>,
    nat: bool,
    sequence: bool,
}

/// Printed by `keygen --sequence`: what a sequence depends on.
const SEQUENCE_NOTE: &str = "\
# Port sequence: the ports change every `sequence.step` and are worked out from the
# key and the clock on both sides, so the laptop's (or phone's) clock must be within
# a few seconds of the server's: keep both on NTP (systemd-timesyncd, chrony). The
# server accepts the current and the previous step's sequence, each once.
";

/// The host-entry lines a client needs when the server's `[sequence]` is not the
/// default (nothing when it is).
fn sequence_shape(q: &config::Sequence) -> String {
    use std::fmt::Write as _;
    let d = config::Sequence::default();
    let mut out = String::new();
    if q.ports != d.ports {
        if let Ok(p) = q.ports.parse() {
            let _ = writeln!(out, "sequence_ports = \"{p}\"");
        }
    }
    if q.length != d.length {
        let _ = writeln!(out, "sequence_length = {}", q.length);
    }
    if q.protocol != d.protocol {
        let _ = writeln!(out, "sequence_protocol = \"{}\"", q.protocol);
    }
    if q.step != d.step {
        let _ = writeln!(out, "sequence_step = \"{}s\"", q.step.0.as_secs());
    }
    if out.is_empty() {
        return out;
    }
    format!("# This server's [sequence] is not the default; the host entry also needs:\n{out}\n")
}

/// What NAT mode gives up, printed by `keygen --nat`.
const NAT_TRADE_OFF: &str = "\
# NAT mode: this key's knocks may name no address, and the grant is then for
# whatever address the knock arrives from. Anyone who sees the knock on its way
# (same Wi-Fi, on the path) can send the same datagram first from their own
# address and get the grant; the laptop's own copy is then refused as a replay.
# Prefer bound knocks: `knock` binds on its own when it can see the address the
# server sees, and behind a NAT `discover` in its config learns it.
";

/// Hands the new key file `file` to `user` (the user knockgated runs as).
fn hand_to(file: &Path, user: &nix::unistd::User) -> anyhow::Result<()> {
    nix::unistd::chown(file, Some(user.uid), Some(user.gid)).map_err(|e| {
        anyhow::anyhow!(
            "wrote {}, but cannot hand it to user {} ({e}); run as root: chown {}: {}",
            file.display(),
            user.name,
            user.name,
            file.display()
        )
    })
}

/// `knockgate import-fwknop`: stanzas on stdout, what was left behind on stderr.
fn import_fwknop(
    args: &Args,
    access_conf: &Path,
    write_keys: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    use knockgate::fwknop::import;
    let text =
        std::fs::read_to_string(access_conf).map_err(|source| config::ConfigError::ReadFile {
            path: access_conf.to_owned(),
            source,
        })?;
    // The ssh port decides which OPEN_PORTS entry is `ssh`; the default config's 22
    // when --config cannot be read.
    let ssh_port = config::load(&args.config_path()).map_or(22, |l| l.config.inbound.ssh_port);
    let imported = import::import(&text, ssh_port);
    if imported.key_files.is_empty() {
        for line in &imported.skipped {
            eprintln!("knockgate: {line}");
        }
        anyhow::bail!(config::ConfigError::Invalid {
            path: access_conf.to_owned(),
            key: "SOURCE".into(),
            expected: "no stanza could be imported (see above)".into(),
        });
    }
    let mut stanzas = imported.config.clone();
    if let Some(dir) = write_keys {
        std::fs::create_dir_all(dir)?;
        for (name, contents) in &imported.key_files {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let file = dir.join(format!("{name}.fwknop"));
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot create {} (it must not exist yet): {e}",
                        file.display()
                    )
                })?;
            out.write_all(contents.as_bytes())?;
            // As keygen does: the key goes to the user knockgated runs as, if there is one.
            match nix::unistd::User::from_name(DAEMON_USER).ok().flatten() {
                Some(user) => {
                    hand_to(&file, &user)?;
                    eprintln!(
                        "knockgate: wrote {} (mode 0600, owned by {})",
                        file.display(),
                        user.name
                    );
                }
                None => eprintln!("knockgate: wrote {} (mode 0600)", file.display()),
            }
        }
        stanzas = stanzas.replace(
            &format!("\"{}/", import::KEY_DIR),
            &format!("\"{}/", dir.display()),
        );
    } else {
        eprintln!(
            "knockgate: key files not written; run again with --write-keys {} (as root) to write them",
            import::KEY_DIR
        );
    }
    for line in &imported.skipped {
        eprintln!("knockgate: not carried over: {line}");
    }
    knockgate::exit::write_stdout(&stanzas)?;
    Ok(ExitCode::SUCCESS)
}

/// The name the laptop's config knows the server by: the first label of a host name
/// (`web1` for web1.example.org), an IP address whole.
fn host_name(address: &str) -> String {
    let bare = address.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() {
        bare.to_owned()
    } else {
        address.split('.').next().unwrap_or(address).to_owned()
    }
}

/// `name` as a TOML key: bare when it can be, quoted otherwise (`"10.203.9.1"`).
fn toml_key(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        name.to_owned()
    } else {
        format!("\"{}\"", name.escape_default())
    }
}

fn keygen(config_path: &Path, key: &NewKey) -> anyhow::Result<ExitCode> {
    use knockgate::knock::{KeyId, Secret};
    let NewKey {
        id,
        dir,
        address,
        owner,
        nat,
        sequence,
    } = *key;
    KeyId::new(id)?;
    // Resolved before anything is written: a misspelt --owner leaves no key behind.
    let owner = match owner {
        Some(name) => Some(
            nix::unistd::User::from_name(name)?
                .ok_or_else(|| anyhow::anyhow!("--owner {name}: no such user"))?,
        ),
        None => nix::unistd::User::from_name(DAEMON_USER).ok().flatten(),
    };
    // The server id laptops must use comes from the config: one that cannot be read
    // is an error (exit 2) before any key is written, never a guess.
    let loaded = config::load(config_path)?;
    let server_id = loaded.server_id.as_str().to_owned();
    std::fs::create_dir_all(dir)?;
    let file = dir.join(format!("{id}.key"));
    let secret = Secret::generate().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    knockgate::keyfile::create(&file, &secret)?;
    let address = address.unwrap_or(&server_id);
    match owner {
        Some(user) => {
            hand_to(&file, &user)?;
            println!(
                "wrote {} (mode 0600, owned by {}, the user knockgated runs as)\n",
                file.display(),
                user.name
            );
        }
        None => println!("wrote {} (mode 0600)\n", file.display()),
    }
    println!(
        "# 1. On this server, add to {} and restart knockgated:",
        config_path.display()
    );
    if nat {
        print!("{NAT_TRADE_OFF}");
    }
    if sequence {
        print!("{SEQUENCE_NOTE}");
    }
    let sequence_line = if sequence { "sequence = true\n" } else { "" };
    println!(
        "[[keys]]\nid = \"{id}\"\nfile = \"{}\"\nservices = [\"ssh\"]\nallow_unbound = {nat}\n{sequence_line}",
        file.display()
    );
    println!(
        "# 2. Copy {} to the laptop as ~/.config/knock/{id}.key (chmod 600),",
        file.display()
    );
    println!("#    and add to ~/.config/knock/config.toml:");
    let source = if nat {
        "source = \"packet\"\n"
    } else {
        "# Behind a NAT, say how to learn your public address, e.g.:\n# discover = \"https://api.ipify.org\"\n"
    };
    let host = host_name(address);
    println!(
        "[hosts.{}]\naddress = \"{address}\"\nkey_id = \"{id}\"\nkey_file = \"~/.config/knock/{id}.key\"\nserver_id = \"{server_id}\"\n{source}",
        toml_key(&host)
    );
    if sequence {
        print!("{}", sequence_shape(&loaded.config.sequence));
    }
    println!("# 3. Then: knock {host} --wait && ssh {address}");
    if sequence {
        println!(
            "#    Or touch the port sequence: knock {host} --sequence --wait; to see it for\n#    knockd's client or a phone app: knock {host} --print-sequence"
        );
    }
    Ok(ExitCode::SUCCESS)
}
