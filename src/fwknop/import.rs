//! `knockgate import-fwknop`: fwknopd's access.conf → `[[fwknop_keys]]` stanzas (and
//! the `[[services]]` their ports need), naming every directive that cannot be
//! carried over and why. Pure: text in, text and key files' contents out.

use std::fmt::Write as _;

use base64::Engine as _;

use super::{HmacDigest, MAX_HMAC_KEY_LEN, MAX_KEY_LEN};

/// Where the printed stanzas say the key files are (`--write-keys DIR` changes it).
pub const KEY_DIR: &str = "/etc/knockgate/keys";

/// What an import produced. No `Debug`: it holds the keys.
#[derive(Default)]
pub struct Import {
    /// The config text to add (services, then fwknop stanzas), with comments.
    pub config: String,
    /// Key files to write: (stanza name, contents).
    pub key_files: Vec<(String, zeroize::Zeroizing<String>)>,
    /// What could not be carried over, one line each (also in `config` as comments).
    pub skipped: Vec<String>,
}

/// Directives that cannot be carried over, and why.
fn unsupported(directive: &str) -> Option<&'static str> {
    let why = match directive {
        d if d == "ENABLE_CMD_EXEC" || d.starts_with("CMD_") => {
            "knockgate runs no commands for a packet"
        }
        d if d.starts_with("GPG_") => "GPG mode is not supported (use Rijndael + HMAC keys)",
        "FORCE_NAT" | "FORCE_SNAT" | "FORCE_MASQUERADE" | "FORWARD_ALL" | "DISABLE_DNAT" => {
            "knockgate does no NAT for grants"
        }
        "DESTINATION" => "knockgate opens ports of this host only",
        "REQUIRE_USERNAME" => "the SPA username is not an authenticator; knockgate ignores it",
        "ACCESS_EXPIRE" | "ACCESS_EXPIRE_EPOCH" => {
            "stanzas do not expire in knockgate; remove the stanza when it should"
        }
        "RESTRICT_PORTS" => "use OPEN_PORTS (carried over as the stanza's services)",
        "ENCRYPTION_MODE" => "only CBC (fwknop's default) is supported",
        "ENABLE_SPA_OVER_HTTP" | "ENABLE_TCP_SERVER" => "knockgate takes SPA over UDP only",
        d if d.starts_with('%') => "includes are not followed; import the included file too",
        _ => return None,
    };
    Some(why)
}

#[derive(Default)]
struct Stanza {
    line: usize,
    source: String,
    key: Option<Vec<u8>>,
    hmac_key: Option<Vec<u8>>,
    digest: Option<String>,
    open_ports: Option<String>,
    timeout: Option<String>,
    max_timeout: Option<String>,
    require_source: Option<bool>,
    problems: Vec<String>,
    dropped: Vec<String>,
}

/// The stanzas of access.conf `text`, and the lines before the first `SOURCE`.
fn parse(text: &str) -> (Vec<Stanza>, Vec<String>) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut stanzas: Vec<Stanza> = Vec::new();
    let mut before_first = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .split_once(char::is_whitespace)
            .map_or((line, ""), |(a, b)| (a, b.trim()));
        if name == "SOURCE" {
            stanzas.push(Stanza {
                line: n + 1,
                source: value.to_owned(),
                ..Stanza::default()
            });
            continue;
        }
        // Only a directive-like word is ever echoed: a line such as `KEY_BASE64=…`
        // must not end up on the screen or in the config.
        let shown = if !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'%')
        {
            name
        } else {
            "(an unreadable line)"
        };
        let Some(stanza) = stanzas.last_mut() else {
            before_first.push(format!(
                "line {}: {shown} before any SOURCE: ignored",
                n + 1
            ));
            continue;
        };
        match name {
            "KEY_BASE64" | "HMAC_KEY_BASE64" => {
                let decoded = b64.decode(value).ok();
                if decoded.is_none() {
                    stanza.problems.push(format!("{name} is not base64"));
                }
                if name == "KEY_BASE64" {
                    stanza.key = decoded;
                } else {
                    stanza.hmac_key = decoded;
                }
            }
            "KEY" => stanza.key = Some(value.as_bytes().to_vec()),
            "HMAC_KEY" => stanza.hmac_key = Some(value.as_bytes().to_vec()),
            "HMAC_DIGEST_TYPE" => stanza.digest = Some(value.to_owned()),
            "OPEN_PORTS" => stanza.open_ports = Some(value.to_owned()),
            "FW_ACCESS_TIMEOUT" => stanza.timeout = Some(value.to_owned()),
            "MAX_FW_TIMEOUT" => stanza.max_timeout = Some(value.to_owned()),
            "REQUIRE_SOURCE_ADDRESS" | "REQUIRE_SOURCE" => {
                stanza.require_source = Some(value.eq_ignore_ascii_case("Y"));
            }
            "ENCRYPTION_MODE" if value.eq_ignore_ascii_case("CBC") => {}
            "ENCRYPTION_MODE" => stanza.problems.push(format!(
                "ENCRYPTION_MODE {value}: only CBC (fwknop's default)"
            )),
            _ => {
                let why = unsupported(name).unwrap_or("not known to knockgate");
                stanza.dropped.push(format!("{shown}: {why}"));
            }
        }
    }
    (stanzas, before_first)
}

/// The services a stanza's `OPEN_PORTS` needs (`ssh`, or `proto_port`), adding new
/// ones to `services` as (name, protocol, port).
fn services_of(
    stanza: &mut Stanza,
    ssh_port: u16,
    services: &mut Vec<(String, String, u16)>,
) -> Vec<String> {
    let mut wanted = Vec::new();
    let ports = stanza.open_ports.clone().unwrap_or_else(|| {
        stanza.dropped.push(format!(
            "no OPEN_PORTS (fwknop then honours any port): only tcp/{ssh_port} (ssh) is imported"
        ));
        format!("tcp/{ssh_port}")
    });
    for port in ports.split(',') {
        let port = port.trim();
        let parsed = port
            .split_once('/')
            .and_then(|(proto, n)| Some((proto, n.parse::<u16>().ok()?)))
            .filter(|(proto, n)| matches!(*proto, "tcp" | "udp") && *n != 0);
        let Some((proto, number)) = parsed else {
            stanza
                .dropped
                .push(format!("OPEN_PORTS {port}: only tcp/N and udp/N"));
            continue;
        };
        let service = if proto == "tcp" && number == ssh_port {
            "ssh".to_owned()
        } else {
            let service = format!("{proto}_{number}");
            if !services.iter().any(|(s, _, _)| *s == service) {
                services.push((service.clone(), proto.to_owned(), number));
            }
            service
        };
        if !wanted.contains(&service) {
            wanted.push(service);
        }
    }
    wanted
}

/// The `[[fwknop_keys]]` text of one importable stanza.
fn render(body: &mut String, stanza: &Stanza, name: &str, services: &[String]) {
    let digest = stanza
        .digest
        .as_deref()
        .and_then(HmacDigest::from_name)
        .unwrap_or(HmacDigest::Sha256);
    let any = stanza
        .source
        .split(',')
        .any(|s| s.trim().eq_ignore_ascii_case("ANY"));
    let sources: Vec<String> = if any {
        vec!["0.0.0.0/0".into(), "::/0".into()]
    } else {
        stanza
            .source
            .split(',')
            .map(|s| s.trim().to_owned())
            .collect()
    };
    let quoted = |v: &[String]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        body,
        "# from the stanza at line {} (SOURCE {})",
        stanza.line, stanza.source
    );
    for dropped in &stanza.dropped {
        let _ = writeln!(body, "# not carried over: {dropped}");
    }
    let require = stanza.require_source.unwrap_or(false);
    if !require {
        let _ = writeln!(
            body,
            "# REQUIRE_SOURCE_ADDRESS was not Y: the client may send -s (0.0.0.0), and whoever\n# sees the packet can race it from their own address. Set it to true if you can."
        );
    }
    let _ = writeln!(body, "[[fwknop_keys]]\nname = \"{name}\"");
    let _ = writeln!(body, "file = \"{KEY_DIR}/{name}.fwknop\"");
    let _ = writeln!(body, "hmac_digest = \"{}\"", digest.name());
    let _ = writeln!(body, "services = [{}]", quoted(services));
    let _ = writeln!(body, "sources = [{}]", quoted(&sources));
    let _ = writeln!(
        body,
        "ttl = \"{}s\"",
        stanza.timeout.as_deref().unwrap_or("30")
    );
    let _ = writeln!(
        body,
        "max_ttl = \"{}s\"",
        stanza.max_timeout.as_deref().unwrap_or("300")
    );
    let _ = writeln!(body, "require_source_address = {require}\n");
}

/// Imports access.conf `text`; `ssh_port` is the server's `inbound.ssh_port` (a
/// stanza's `tcp/<ssh_port>` becomes the `ssh` service).
#[must_use]
pub fn import(text: &str, ssh_port: u16) -> Import {
    let b64 = base64::engine::general_purpose::STANDARD;
    let (mut stanzas, before_first) = parse(text);
    let mut out = Import::default();
    let mut services = Vec::new();
    let mut body = String::new();
    let mut hmac_keys: Vec<(zeroize::Zeroizing<Vec<u8>>, usize)> = Vec::new();
    for (i, stanza) in stanzas.iter_mut().enumerate() {
        let name = format!("fwknop-{}", i + 1);
        let shared = stanza.hmac_key.as_ref().and_then(|h| {
            hmac_keys
                .iter()
                .find(|(k, _)| k.as_slice() == h.as_slice())
                .map(|(_, line)| *line)
        });
        if let Some(line) = shared {
            out.skipped.push(format!(
                "stanza at line {} (SOURCE {}): not imported: it has the HMAC key of the stanza at line {line}, and knockgate matches packets by HMAC key; merge the two (SOURCE, OPEN_PORTS) into that one",
                stanza.line, stanza.source
            ));
            continue;
        }
        if let Some(why) = stanza_problem(stanza) {
            out.skipped.push(format!(
                "stanza at line {} (SOURCE {}): not imported: {why}",
                stanza.line, stanza.source
            ));
            continue;
        }
        if let Some(h) = &stanza.hmac_key {
            hmac_keys.push((zeroize::Zeroizing::new(h.clone()), stanza.line));
        }
        let wanted = services_of(stanza, ssh_port, &mut services);
        for dropped in &stanza.dropped {
            out.skipped
                .push(format!("stanza at line {}: {dropped}", stanza.line));
        }
        render(&mut body, stanza, &name, &wanted);
        let mut file = zeroize::Zeroizing::new(String::new());
        let key = stanza.key.as_deref().unwrap_or_default();
        let hmac = stanza.hmac_key.as_deref().unwrap_or_default();
        let _ = writeln!(file, "KEY_BASE64 {}", b64.encode(key));
        let _ = writeln!(file, "HMAC_KEY_BASE64 {}", b64.encode(hmac));
        out.key_files.push((name, file));
    }
    let mut config = String::new();
    for line in &before_first {
        let _ = writeln!(config, "# {line}");
        out.skipped.push(line.clone());
    }
    for (name, proto, port) in &services {
        let _ = writeln!(
            config,
            "[[services]]\nname = \"{name}\"\nprotocol = \"{proto}\"\nport = {port}\n"
        );
    }
    for line in out.skipped.iter().filter(|l| l.contains("not imported")) {
        let _ = writeln!(config, "# {line}");
    }
    config.push_str(&body);
    out.config = config;
    out
}

/// Why a stanza cannot be imported at all, if it cannot.
fn stanza_problem(stanza: &Stanza) -> Option<String> {
    if let Some(problem) = stanza.problems.first() {
        return Some(problem.clone());
    }
    let Some(key) = stanza.key.as_deref() else {
        return Some("no KEY_BASE64 (GPG stanzas are not supported)".into());
    };
    let Some(hmac) = stanza.hmac_key.as_deref() else {
        return Some(
            "no HMAC key: knockgate takes only authenticated (HMAC) packets; give the client --use-hmac and the stanza an HMAC_KEY_BASE64"
                .into(),
        );
    };
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Some(format!(
            "the Rijndael key is {} bytes; 1 to {MAX_KEY_LEN}",
            key.len()
        ));
    }
    if hmac.is_empty() || hmac.len() > MAX_HMAC_KEY_LEN {
        return Some(format!(
            "the HMAC key is {} bytes; 1 to {MAX_HMAC_KEY_LEN}",
            hmac.len()
        ));
    }
    if key == hmac {
        return Some("the Rijndael and HMAC keys are the same".into());
    }
    if let Some(d) = &stanza.digest {
        if HmacDigest::from_name(d).is_none() {
            return Some(format!(
                "HMAC_DIGEST_TYPE {d}: only sha256, sha384 and sha512"
            ));
        }
    }
    for (name, value) in [
        ("FW_ACCESS_TIMEOUT", &stanza.timeout),
        ("MAX_FW_TIMEOUT", &stanza.max_timeout),
    ] {
        if let Some(v) = value {
            if v.parse::<u32>().map_or(true, |n| n == 0) {
                return Some(format!("{name} {v} is not a number of seconds"));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Any text, and access.conf-like text with any values: no panic.
        #[test]
        fn any_access_conf_imports_or_is_refused_without_panic(
            text in "(SOURCE|KEY_BASE64|HMAC_KEY_BASE64|KEY|HMAC_KEY|OPEN_PORTS|FW_ACCESS_TIMEOUT|HMAC_DIGEST_TYPE|REQUIRE_SOURCE_ADDRESS|CMD_EXEC|%include|#)[ \\t][ -~]{0,60}(\\n(SOURCE|KEY_BASE64|HMAC_KEY_BASE64|OPEN_PORTS|MAX_FW_TIMEOUT)[ \\t][ -~]{0,60}){0,12}",
            junk in "\\PC{0,400}",
        ) {
            let _ = import(&text, 22);
            let _ = import(&junk, 22);
        }
    }

    #[test]
    fn a_stanza_becomes_a_config_stanza_and_a_key_file() {
        let text = "SOURCE ANY\nKEY_BASE64 AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=\nHMAC_KEY_BASE64 ZGVmZ2hp\nOPEN_PORTS tcp/2222, udp/53\nREQUIRE_SOURCE_ADDRESS Y\n";
        let out = import(text, 2222);
        assert!(
            out.config.contains("services = [\"ssh\", \"udp_53\"]"),
            "{}",
            out.config
        );
        assert_eq!(out.key_files.len(), 1);
        assert!(out.key_files[0].1.starts_with("KEY_BASE64 AQID"));
        assert!(out.skipped.is_empty(), "{:?}", out.skipped);
    }

    #[test]
    fn shared_hmac_keys_unreadable_lines_and_other_modes_are_named_not_echoed() {
        let stanza = "KEY_BASE64 AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=\nHMAC_KEY_BASE64 ZGVmZ2hp\nOPEN_PORTS tcp/22\n";
        let text = format!(
            "KEY_BASE64=c2VjcmV0\nSOURCE ANY\n{stanza}HMAC_KEY=topsecret123\nSOURCE 10.0.0.0/8\n{stanza}SOURCE 192.0.2.0/24\nKEY_BASE64 AQID\nHMAC_KEY_BASE64 c2Vjb25k\nENCRYPTION_MODE legacy\n"
        );
        let out = import(&text, 22);
        assert_eq!(out.key_files.len(), 1, "{:?}", out.skipped);
        let said = out.skipped.join("\n");
        assert!(
            said.contains("has the HMAC key of the stanza at line 2"),
            "{said}"
        );
        assert!(said.contains("ENCRYPTION_MODE legacy"), "{said}");
        assert!(said.contains("(an unreadable line)"), "{said}");
        for secret in ["c2VjcmV0", "topsecret123"] {
            assert!(
                !said.contains(secret) && !out.config.contains(secret),
                "{secret} echoed"
            );
        }
    }
}
