//! fwknop's own client against knockgated: Debian's `fwknop` 2.6.10 (from
//! `make peers`, unpacked, never installed) in the client namespace sends real SPA
//! packets to knockgated's knock port. Root; CI runs these (and `make test` unpacks
//! the client first).

mod support;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::{Daemon, EchoServer, Host, Lab, eventually, lab_available, sa, v4};

/// Throwaway keys, as `fwknop --key-gen` makes them (32-byte Rijndael, 64-byte HMAC).
const KEY: &str = "Bk5nxiS1D+gqVlc1ZrQGC82GR6ILjYxhiQqe7nMo3tg=";
const HMAC: &str =
    "wYq5pkqWGWbhxpQsqvffKaPUB8Ovqm5roFg7SzWdEVNZUcBKwnlL4hxbEsrUpyAATa5JnNVjDGHVyg/4ft/LsA==";
const OTHER_KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
const OTHER_HMAC: &str =
    "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoOEhYaHiImKi4yNjo+QkZKTlJWWl5iZmpucnZ6foKGiow==";

/// The fwknop client, or `None` (skipping loudly; in CI a failure).
fn fwknop_client(test: &str) -> Option<PathBuf> {
    let root = std::env::var_os("PEERS_ROOT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/root"),
        PathBuf::from,
    );
    let client = root.join("usr/bin/fwknop");
    if client.exists() {
        return Some(client);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: the fwknop client is missing; `make peers` unpacks it, and CI must run this"
    );
    eprintln!("\n*** SKIPPED {test}: no fwknop client (run `make peers`) ***\n");
    None
}

struct Spa {
    lab: Lab,
    client: PathBuf,
    config: PathBuf,
    _ssh: Vec<EchoServer>,
}

fn spa(client: PathBuf, stanza: &str) -> Spa {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::new();
    let keys = lab.write_file(
        "phone.fwknop",
        &format!("KEY_BASE64 {KEY}\nHMAC_KEY_BASE64 {HMAC}\n"),
    );
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = lab.write_file(
        "knockgate.toml",
        &format!(
            "[dns]\nresolvers = [\"10.77.2.53\"]\n\n[[fwknop_keys]]\nname = \"phone\"\nfile = \"{}\"\n{stanza}\n",
            keys.display()
        ),
    );
    let ssh = vec![
        lab.tcp_echo(Host::Server, sa(v4().server_from_client, 22)),
        lab.tcp_echo(Host::Server, sa(v4().server_from_outside, 22)),
    ];
    Spa {
        lab,
        client,
        config,
        _ssh: ssh,
    }
}

impl Spa {
    fn start(&self) -> Daemon {
        self.lab.start_daemon(&self.config)
    }

    /// The real fwknop client in the client namespace, with `args` after the keys.
    fn fwknop(&self, keys: (&str, &str), args: &[&str]) -> Output {
        let server = v4().server_from_client.to_string();
        Command::new("ip")
            .args(["netns", "exec", &self.lab.ns(Host::Client)])
            .arg(&self.client)
            .env("HOME", self.lab.dir())
            .args(["--no-rc-file", "-D", &server, "--use-hmac"])
            .args(["--key-base64-rijndael", keys.0, "--key-base64-hmac", keys.1])
            .args(args)
            .output()
            .expect("run fwknop")
    }

    fn send(&self, keys: (&str, &str), args: &[&str]) {
        let out = self.fwknop(keys, args);
        assert!(
            out.status.success(),
            "fwknop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ssh_open(&self, host: Host) -> bool {
        let server = if host == Host::Outside {
            v4().server_from_outside
        } else {
            v4().server_from_client
        };
        self.lab.tcp_works(host, sa(server, 22))
    }
}

fn laptop() -> String {
    v4().client.to_string()
}

#[test]
fn the_real_fwknop_client_opens_ssh_for_the_laptop_only_until_the_ttl() {
    let test = "the_real_fwknop_client_opens_ssh_for_the_laptop_only_until_the_ttl";
    if !lab_available(test) {
        return;
    }
    let Some(client) = fwknop_client(test) else {
        return;
    };
    let s = spa(client, "ttl = \"4s\"");
    let daemon = s.start();
    assert!(!s.ssh_open(Host::Client), "closed before the packet");
    s.send((KEY, HMAC), &["-A", "tcp/22", "-a", &laptop()]);
    assert!(
        eventually(Duration::from_secs(5), || s.ssh_open(Host::Client)),
        "fwknop's packet opened ssh for the laptop:\n{}",
        daemon.log_text()
    );
    assert!(!s.ssh_open(Host::Outside), "and only for the laptop");
    assert!(
        daemon.logged_soon("who=fwknop phone"),
        "{}",
        daemon.log_text()
    );
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        eventually(Duration::from_secs(3), || !s.ssh_open(Host::Client)),
        "closed by the kernel at the stanza's TTL"
    );
}

#[test]
fn fwknop_packets_that_must_not_open_open_nothing() {
    let test = "fwknop_packets_that_must_not_open_open_nothing";
    if !lab_available(test) {
        return;
    }
    let Some(client) = fwknop_client(test) else {
        return;
    };
    let s = spa(client, "ttl = \"30s\"");
    let mut daemon = s.start();
    let refused = |daemon: &Daemon, reason: &str, n: usize| {
        eventually(Duration::from_secs(3), || {
            daemon
                .log_text()
                .matches(&format!("reason=\"{reason}\""))
                .count()
                >= n
        })
    };
    // A wrong HMAC key; the right HMAC key with a wrong encryption key.
    s.send((KEY, OTHER_HMAC), &["-A", "tcp/22", "-a", &laptop()]);
    assert!(refused(&daemon, "bad-mac", 1), "{}", daemon.log_text());
    s.send((OTHER_KEY, HMAC), &["-A", "tcp/22", "-a", &laptop()]);
    assert!(
        refused(&daemon, "fwknop-content", 1),
        "{}",
        daemon.log_text()
    );
    // A port the stanza does not allow; another address than the packet's source;
    // no address at all (the client's -s) while the source address is required.
    s.send((KEY, HMAC), &["-A", "tcp/5432", "-a", &laptop()]);
    assert!(
        daemon.logged_soon("service `tcp/5432` not allowed"),
        "{}",
        daemon.log_text()
    );
    s.send(
        (KEY, HMAC),
        &["-A", "tcp/22", "-a", &v4().client_alt.to_string()],
    );
    assert!(
        refused(&daemon, "other-address", 1),
        "{}",
        daemon.log_text()
    );
    s.send((KEY, HMAC), &["-A", "tcp/22", "-s"]);
    assert!(refused(&daemon, "unbound", 1), "{}", daemon.log_text());
    // Older than the window (the client's clock 5 minutes behind).
    s.send(
        (KEY, HMAC),
        &["-A", "tcp/22", "-a", &laptop(), "--time-offset-minus", "5m"],
    );
    assert!(refused(&daemon, "clock", 1), "{}", daemon.log_text());
    // A corpus of junk: random base64 of plausible lengths, and other bytes.
    let junk: Vec<Vec<u8>> = (0..200u16)
        .map(|i| {
            let len = 140 + usize::from(i) % 260;
            (0..len)
                .map(|j| {
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                        [(j * 7 + usize::from(i) * 13) % 64]
                })
                .collect()
        })
        .chain((0..50u8).map(|i| vec![i; 200]))
        .collect();
    s.lab.udp_send(
        Host::Outside,
        v4().mirror,
        sa(v4().server_from_outside, 62201),
        &junk,
    );
    assert!(!s.ssh_open(Host::Client), "none of it opened ssh");
    assert!(daemon.is_running());
}

#[test]
fn a_captured_fwknop_packet_opens_once_even_across_a_restart() {
    let test = "a_captured_fwknop_packet_opens_once_even_across_a_restart";
    if !lab_available(test) {
        return;
    }
    let Some(client) = fwknop_client(test) else {
        return;
    };
    let s = spa(client, "ttl = \"30s\"");
    let daemon = s.start();
    let refused = |daemon: &Daemon, reason: &str| {
        eventually(Duration::from_secs(3), || {
            daemon.log_text().contains(&format!("reason=\"{reason}\""))
        })
    };
    // A captured packet: it opens once; replayed (also after a restart), nothing.
    let saved = s.lab.dir().join("spa.txt");
    s.send(
        (KEY, HMAC),
        &[
            "-A",
            "tcp/22",
            "-a",
            &laptop(),
            "-T",
            "-B",
            saved.to_str().unwrap(),
        ],
    );
    let packet = std::fs::read_to_string(&saved)
        .unwrap()
        .trim()
        .as_bytes()
        .to_vec();
    let server = sa(v4().server_from_client, 62201);
    let laptop_ip: IpAddr = v4().client;
    s.lab.udp_send(
        Host::Client,
        laptop_ip,
        server,
        std::slice::from_ref(&packet),
    );
    assert!(eventually(Duration::from_secs(5), || s.ssh_open(Host::Client)));
    let out = support::admin(&s.lab.dir().join("admin.sock"), &["grants", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = listed["grants"][0]["id"].as_str().unwrap().to_owned();
    assert!(
        support::admin(&s.lab.dir().join("admin.sock"), &["revoke", &id])
            .status
            .success()
    );
    s.lab.udp_send(
        Host::Client,
        laptop_ip,
        server,
        std::slice::from_ref(&packet),
    );
    assert!(refused(&daemon, "replay"), "{}", daemon.log_text());
    daemon.terminate();
    let daemon = s.start();
    s.lab.udp_send(Host::Client, laptop_ip, server, &[packet]);
    assert!(
        refused(&daemon, "replay"),
        "after a restart: {}",
        daemon.log_text()
    );
    assert!(!s.ssh_open(Host::Client), "nothing opened");
}

#[test]
fn an_imported_access_conf_lets_the_real_client_in() {
    let test = "an_imported_access_conf_lets_the_real_client_in";
    if !lab_available(test) {
        return;
    }
    let Some(client) = fwknop_client(test) else {
        return;
    };
    let s = spa(client, "");
    let access = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fwknop-access.conf");
    let keys = s.lab.dir().join("imported");
    let out = Command::new(env!("CARGO_BIN_EXE_knockgate"))
        .arg("import-fwknop")
        .arg(&access)
        .arg("--write-keys")
        .arg(&keys)
        .args(["--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stanzas = String::from_utf8(out.stdout).unwrap();
    // Next to a native key, on the same port.
    let native = s.lab.write_file("alice.key", &"7c".repeat(32));
    std::fs::set_permissions(&native, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = s.lab.write_file(
        "imported.toml",
        &format!(
            "[knock]\nserver_id = \"spa\"\n[dns]\nresolvers = [\"10.77.2.53\"]\n\n{stanzas}\n\
             [[keys]]\nid = \"alice\"\nfile = \"{}\"\nallow_unbound = true\n",
            native.display()
        ),
    );
    let daemon = s.lab.start_daemon(&config);
    assert!(!s.ssh_open(Host::Client));
    s.send((KEY, HMAC), &["-A", "tcp/22", "-a", &laptop()]);
    assert!(
        eventually(Duration::from_secs(5), || s.ssh_open(Host::Client)),
        "the imported stanza lets the client in:\n{}",
        daemon.log_text()
    );
    assert!(daemon.logged_soon("who=fwknop fwknop-1"));
    // A native knock on the same port still opens (for another address of the laptop).
    let knock = knockgate::knock::Knock {
        key_id: knockgate::knock::KeyId::new("alice").unwrap(),
        service: knockgate::knock::ServiceId::ssh(),
        timestamp: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        nonce: [3; 16],
        ttl_secs: 60,
        address: knockgate::knock::AddressClaim::PacketSource,
    };
    let datagram = knockgate::knock::auth::seal(
        &knock,
        &knockgate::knock::Secret::from_hex(&"7c".repeat(32)).unwrap(),
        &knockgate::knock::auth::ServerId::new("spa").unwrap(),
    );
    let alt = v4().client_alt;
    s.lab.udp_send(
        Host::Client,
        alt,
        sa(v4().server_from_client, 62201),
        &[datagram],
    );
    assert!(
        eventually(Duration::from_secs(5), || s.lab.tcp_works_from(
            Host::Client,
            alt,
            sa(v4().server_from_client, 22)
        )),
        "the native knock opened too:\n{}",
        daemon.log_text()
    );
}

#[test]
fn the_kernel_drops_what_cannot_be_an_fwknop_packet_and_the_real_client_still_opens() {
    let test = "the_kernel_drops_what_cannot_be_an_fwknop_packet_and_the_real_client_still_opens";
    if !lab_available(test) {
        return;
    }
    let Some(client) = fwknop_client(test) else {
        return;
    };
    let s = spa(client, "ttl = \"30s\"");
    let daemon = s.start();
    let port = sa(v4().server_from_client, 62201);
    // No fwknop packet (and no native knock) is shaped like these: base64 too short
    // (139) or GPG-sized (400, 1,400), a plausible length not starting with base64.
    let mut not_base64 = vec![b'A'; 200];
    not_base64[0] = 0;
    let junk = vec![
        vec![b'A'; 139],
        vec![b'A'; 400],
        vec![b'A'; 1400],
        not_base64,
        vec![b'~'; 300],
    ];
    let (junk_before, refused_before) = support::knock_port_counts(&s.lab);
    for _ in 0..100 {
        s.lab.udp_send(Host::Client, v4().client, port, &junk);
    }
    let sent = 100 * junk.len() as u64;
    assert!(
        eventually(Duration::from_secs(5), || {
            support::knock_port_counts(&s.lab).0 == junk_before + sent
        }),
        "counted by the kernel: {:?}, want {sent} more",
        support::knock_port_counts(&s.lab)
    );
    // Base64 of an fwknop length is the daemon's to judge (one HMAC, refused).
    s.lab
        .udp_send(Host::Client, v4().client, port, &[vec![b'A'; 200]]);
    assert!(
        eventually(Duration::from_secs(5), || {
            support::knock_port_counts(&s.lab).1 == refused_before + 1
        }),
        "{:?}\n{}",
        support::knock_port_counts(&s.lab),
        daemon.log_text()
    );
    assert_eq!(support::knock_port_counts(&s.lab).0, junk_before + sent);
    s.send((KEY, HMAC), &["-A", "tcp/22", "-a", &laptop()]);
    assert!(
        eventually(Duration::from_secs(5), || s.ssh_open(Host::Client)),
        "fwknop's packet still opens:\n{}",
        daemon.log_text()
    );
}
