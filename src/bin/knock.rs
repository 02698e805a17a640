//! knock: send one authenticated knock from a laptop; optionally wait for the port
//! to open, or relay for ssh (`ProxyCommand knock proxy %h %p`).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use knockgate::client::config::{self as client_config, HostEntry};
use knockgate::client::{self, Mode, Target};
use knockgate::keyfile;
use knockgate::knock::KeyId;
use knockgate::knock::auth::ServerId;
use knockgate::knock::{AddressClaim, ServiceId};
use knockgate::service;

use knockgate::cli::knock::{Args, Command, KnockArgs};

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(err) => knockgate::exit::report("knock", &err),
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    match &args.command {
        Some(Command::Proxy { host, port }) => {
            let (target, _, _) = target_for(Some(host), &args.knock)?;
            let addrs = knocked(client::send(&target, Mode::Send)?);
            let stream = client::wait_open(&addrs, *port, args.knock.timeout)?;
            client::relay(&stream).context("relay ended with an error")?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let (target, ssh_port, entry) = target_for(args.host.as_deref(), &args.knock)?;
            let a = &args.knock;
            if a.seq.sequence || a.seq.print_sequence {
                return sequence(&target, ssh_port, a, entry.as_ref());
            }
            // Known before anything is sent: which port --wait polls.
            let wait_port = match (a.wait, a.wait_port) {
                (false, _) => None,
                (true, Some(port)) => Some(port),
                (true, None) if target.services.iter().any(|s| s == service::SSH) => Some(ssh_port),
                (true, None) => anyhow::bail!(client::ClientError::Invalid(format!(
                    "--wait: which port does `{}` open? give --wait-port",
                    target.services.join(", ")
                ))),
            };
            if a.dry_run || a.save_packet.is_some() {
                return built_only(&target, a);
            }
            let sent = client::send(&target, Mode::Send)?;
            let services = target.services.join(", ");
            let addrs = knocked(sent);
            let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            eprintln!("knock: sent to {} ({services})", list.join(", "));
            if let Some(port) = wait_port {
                let stream = client::wait_open(&addrs, port, args.knock.timeout)?;
                let peer = stream
                    .peer_addr()
                    .map_or_else(|_| "?".to_owned(), |a| a.to_string());
                eprintln!("knock: {peer} is open");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--sequence` and `--print-sequence`.
fn sequence(
    target: &Target,
    ssh_port: u16,
    a: &KnockArgs,
    entry: Option<&HostEntry>,
) -> anyhow::Result<ExitCode> {
    use knockgate::client::sequence as seq;
    let spec = sequence_spec(a, entry)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let Some(current) = seq::current(&spec, &target.secret, &target.server_id, now) else {
        anyhow::bail!(client::ClientError::Invalid(
            "no sequence for this step (the range is too small)".to_owned()
        ));
    };
    let left = current.valid_until.saturating_sub(now);
    if a.seq.print_sequence {
        let line = knockgate::sequence::knockd_arguments(&target.host, &current.touches);
        knockgate::exit::write_stdout(&format!(
            "{line}\n# valid for {left} s more (until Unix time {}); send it with `knock -d 10 {line}` (knockd's client)\n",
            current.valid_until
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let addrs = client::resolve(&target.host, target.port)?;
    let to = addrs[0];
    seq::touch(to, &current.touches)
        .with_context(|| format!("cannot send the sequence to {}", to.ip()))?;
    eprintln!(
        "knock: sequence of {} touches sent to {} (valid {left} s more)",
        current.touches.len(),
        to.ip()
    );
    if a.wait {
        let port = a.wait_port.unwrap_or(ssh_port);
        let stream = client::wait_open(&[to], port, a.timeout)?;
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string());
        eprintln!("knock: {peer} is open");
    }
    Ok(ExitCode::SUCCESS)
}

/// The server's sequence shape: flags, then the host's entry, then the defaults.
fn sequence_spec(
    a: &KnockArgs,
    entry: Option<&HostEntry>,
) -> anyhow::Result<knockgate::sequence::SequenceSpec> {
    use knockgate::sequence::{LENGTHS, MIN_RANGE, STEP_SECS, SequenceSpec, TouchProtocols};
    let invalid = |what: String| client::ClientError::Invalid(what);
    let defaults = SequenceSpec::default();
    let ports = match a
        .seq
        .sequence_ports
        .as_deref()
        .or(entry.and_then(|e| e.sequence_ports.as_deref()))
    {
        None => defaults.ports,
        Some(text) => knockgate::config::PortValue::Text(text.to_owned())
            .parse()
            .map_err(|e| invalid(format!("sequence ports `{text}`: {e}")))?,
    };
    if u32::from(ports.last) - u32::from(ports.first) + 1 < MIN_RANGE {
        anyhow::bail!(invalid(format!(
            "sequence ports {ports}: at least {MIN_RANGE} ports"
        )));
    }
    let length = a
        .seq
        .sequence_length
        .or(entry.and_then(|e| e.sequence_length))
        .unwrap_or(defaults.length);
    if !LENGTHS.contains(&length) {
        anyhow::bail!(invalid(format!(
            "sequence length {length}: expected 3 to 8"
        )));
    }
    let protocols = match a
        .seq
        .sequence_protocol
        .as_deref()
        .or(entry.and_then(|e| e.sequence_protocol.as_deref()))
    {
        None => defaults.protocols,
        Some(name) => TouchProtocols::from_name(name).ok_or_else(|| {
            invalid(format!(
                "sequence protocol `{name}`: expected tcp, udp or mixed"
            ))
        })?,
    };
    let step = a
        .seq
        .sequence_step
        .or(entry.and_then(|e| e.sequence_step.map(|d| d.0)))
        .map_or(defaults.step_secs, |d| {
            u32::try_from(d.as_secs()).unwrap_or(0)
        });
    if !STEP_SECS.contains(&step) {
        anyhow::bail!(invalid(format!(
            "sequence step {step} s: expected 2s to 1h"
        )));
    }
    Ok(SequenceSpec {
        ports,
        length,
        protocols,
        step_secs: step,
    })
}

/// `--dry-run` and `--save-packet`: the knocks built, printed or written, not sent.
fn built_only(target: &Target, a: &KnockArgs) -> anyhow::Result<ExitCode> {
    use std::fmt::Write as _;
    let sent = client::send(target, Mode::Build)?;
    knocked(client::Sent {
        skipped: sent.skipped,
        ..client::Sent::default()
    });
    let mut lines = String::new();
    for p in &sent.packets {
        let hex = p.datagram.iter().fold(String::new(), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        });
        let _ = writeln!(lines, "{} {} {hex}", p.to, p.service);
    }
    if let Some(file) = &a.save_packet {
        std::fs::write(file, &lines).with_context(|| format!("cannot write {}", file.display()))?;
        eprintln!(
            "knock: {} knock(s) written to {}, nothing sent",
            sent.packets.len(),
            file.display()
        );
    }
    if a.dry_run {
        for p in &sent.packets {
            let bound = match p.claim {
                AddressClaim::PacketSource => "unbound (the packet's source)".to_owned(),
                AddressClaim::V4(ip) => ip.to_string(),
                AddressClaim::V6(ip) => ip.to_string(),
            };
            println!(
                "would send {} bytes to {}: service {} (id {}), key {}, server id {}, bound to {bound}",
                p.datagram.len(),
                p.to,
                p.service,
                ServiceId::of(&p.service),
                target.key_id,
                target.server_id.as_str(),
            );
        }
        if a.save_packet.is_none() {
            knockgate::exit::write_stdout(&lines)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The addresses knocked; a warning on stderr for each that was not.
fn knocked(sent: client::Sent) -> Vec<std::net::SocketAddr> {
    for (addr, why) in &sent.skipped {
        eprintln!("knock: not sent to {addr}: {why}");
    }
    sent.knocked
}

/// The target from `--server` flags, or from the config entry `host`; and the port
/// the knock opens.
fn target_for(
    host: Option<&str>,
    a: &KnockArgs,
) -> anyhow::Result<(Target, u16, Option<HostEntry>)> {
    if let Some(server) = &a.server {
        let (name, port) = split_server(server)?;
        let key_id = a.key_id.as_deref().unwrap_or_default();
        let key_file = a.key_file.clone().unwrap_or_default();
        let target = build(
            &name,
            port,
            key_id,
            &key_file,
            a.server_id.as_deref(),
            a,
            None,
        )?;
        return Ok((target, a.wait_port.unwrap_or(22), None));
    }
    let Some(host) = host else {
        anyhow::bail!(client::ClientError::Invalid(
            "name a host from the config, or give --server, --key-id and --key-file".to_owned()
        ));
    };
    let path = a.config.clone().unwrap_or_else(client_config::default_path);
    let config = client_config::load(&path)?;
    let entry: &HostEntry = config.host(&path, host)?;
    let server_id = a.server_id.as_deref().or(entry.server_id.as_deref());
    let key_file = client_config::expand_home(&entry.key_file);
    let target = build(
        &entry.address,
        entry.port,
        &entry.key_id,
        &key_file,
        server_id,
        a,
        Some(entry),
    )?;
    Ok((
        target,
        a.wait_port.unwrap_or(entry.ssh_port),
        Some(entry.clone()),
    ))
}

fn build(
    host: &str,
    port: u16,
    key_id: &str,
    key_file: &std::path::Path,
    server_id: Option<&str>,
    a: &KnockArgs,
    entry: Option<&HostEntry>,
) -> anyhow::Result<Target> {
    let invalid = |what: String| client::ClientError::Invalid(what);
    let key_id = KeyId::new(key_id).map_err(|e| invalid(format!("key id `{key_id}`: {e}")))?;
    let server_id = server_id.unwrap_or(host);
    let server_id = ServerId::new(server_id).map_err(|e| invalid(format!("server id: {e}")))?;
    let source = a
        .source
        .as_deref()
        .or(entry.and_then(|e| e.source.as_deref()));
    let discover = a
        .discover
        .as_deref()
        .or(entry.and_then(|e| e.discover.as_deref()));
    Ok(Target {
        host: host.to_owned(),
        port,
        server_id,
        key_id,
        secret: keyfile::read(key_file)?,
        ttl: a.ttl.or(entry.and_then(|e| e.ttl.map(|d| d.0))),
        binding: client::Binding::parse(source)?,
        discovery: discover.map(client::Discovery::parse).transpose()?,
        services: services(a, entry)?,
    })
}

/// `--service` (in order, without repeats), else the host's `services`, else ssh.
fn services(a: &KnockArgs, entry: Option<&HostEntry>) -> anyhow::Result<Vec<String>> {
    let asked: &[String] = if a.services.is_empty() {
        entry.map_or(&[][..], |e| e.services.as_slice())
    } else {
        &a.services
    };
    let mut out: Vec<String> = Vec::new();
    for name in asked {
        if !service::valid_name(name) {
            anyhow::bail!(client::ClientError::Invalid(format!(
                "service `{}`: a service name is 1 to {} of a-z, 0-9 and `_`",
                name.escape_debug(),
                service::MAX_NAME_LEN
            )));
        }
        if !out.contains(name) {
            out.push(name.clone());
        }
    }
    if out.is_empty() {
        out.push(service::SSH.to_owned());
    }
    Ok(out)
}

/// `ADDR`, `ADDR:PORT`, `[V6]:PORT` or a bare IPv6 address.
fn split_server(text: &str) -> anyhow::Result<(String, u16)> {
    let default = client_config::DEFAULT_PORT;
    if text.parse::<std::net::IpAddr>().is_ok() {
        return Ok((text.to_owned(), default));
    }
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            let port = port.parse().map_err(|_| {
                client::ClientError::Invalid(format!("--server {text}: `{port}` is not a port"))
            })?;
            Ok((host.to_owned(), port))
        }
        _ => Ok((
            text.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            default,
        )),
    }
}
