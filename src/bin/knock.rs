//! knock: send one authenticated knock from a laptop; optionally wait for the port
//! to open, or relay for ssh (`ProxyCommand knock proxy %h %p`).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use knockgate::client::config::{self as client_config, HostEntry};
use knockgate::client::{self, Target};
use knockgate::keyfile;
use knockgate::knock::KeyId;
use knockgate::knock::auth::ServerId;

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
            let (target, _) = target_for(Some(host), &args.knock)?;
            let addrs = knocked(client::send(&target)?);
            let stream = client::wait_open(&addrs, *port, args.knock.timeout)?;
            client::relay(&stream).context("relay ended with an error")?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let (target, ssh_port) = target_for(args.host.as_deref(), &args.knock)?;
            let addrs = knocked(client::send(&target)?);
            let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            eprintln!("knock: sent to {}", list.join(", "));
            if args.knock.wait {
                let port = args.knock.wait_port.unwrap_or(ssh_port);
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

/// The addresses knocked; a warning on stderr for each that was not.
fn knocked(sent: client::Sent) -> Vec<std::net::SocketAddr> {
    for (addr, why) in &sent.skipped {
        eprintln!("knock: not sent to {addr}: {why}");
    }
    sent.knocked
}

/// The target from `--server` flags, or from the config entry `host`; and the port
/// the knock opens.
fn target_for(host: Option<&str>, a: &KnockArgs) -> anyhow::Result<(Target, u16)> {
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
        return Ok((target, a.wait_port.unwrap_or(22)));
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
    Ok((target, a.wait_port.unwrap_or(entry.ssh_port)))
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
    })
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
