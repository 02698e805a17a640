//! `ssh` with `ProxyCommand knock proxy %h %p`, end to end: Debian's OpenSSH client in
//! the client namespace, Debian's sshd in the server namespace behind knockgated.
//! Root; CI installs openssh-server and openssh-client and runs this.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Host, Lab, lab_available};

const KEY_HEX: &str = "3f6e0a9d2c4b7e1f5a8d0c3b6e9f2a5d8c1b4e7f0a3d6c9b2e5f8a1d4c7b0e3f";

fn ssh_keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (install openssh-client)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// sshd in the server namespace, killed on drop.
struct Sshd(Child);

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_sshd(lab: &Lab) -> Sshd {
    let dir = lab.dir();
    ssh_keygen(&dir.join("host_key"));
    ssh_keygen(&dir.join("user_key"));
    std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
    let config = lab.write_file(
        "sshd_config",
        &format!(
            "Port 22\nListenAddress ::\nListenAddress 0.0.0.0\nHostKey {}\nAuthorizedKeysFile {}\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nStrictModes no\nPidFile none\n",
            dir.join("host_key").display(),
            dir.join("authorized_keys").display()
        ),
    );
    // sshd wants its privilege separation directory.
    std::fs::create_dir_all("/run/sshd").unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns(Host::Server),
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-f",
        ])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .expect("start sshd (install openssh-server)");
    let sshd = Sshd(child);
    let end = Instant::now() + Duration::from_secs(10);
    while !lab.tcp_listening(Host::Server, "[::1]:22".parse().unwrap()) {
        assert!(
            Instant::now() < end,
            "sshd did not start: {}",
            std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sshd
}

#[test]
fn plain_ssh_works_through_knock_proxy() {
    if !lab_available("plain_ssh_works_through_knock_proxy") {
        return;
    }
    let lab = Lab::new();
    let key = lab.write_file("alice.key", KEY_HEX);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = lab.write_file(
        "knockgate.toml",
        &format!(
            "[knock]\nserver_id = \"lab-server\"\n[dns]\nresolvers = [\"10.77.2.53\"]\n\
             [[keys]]\nid = \"alice\"\nfile = \"{}\"\n",
            key.display()
        ),
    );
    let _sshd = start_sshd(&lab);
    let _daemon = lab.start_daemon(&config);
    let client_config = lab.write_file(
        "knock.toml",
        &format!(
            "[hosts.lab4]\naddress = \"10.77.1.1\"\nkey_id = \"alice\"\nkey_file = \"{k}\"\nserver_id = \"lab-server\"\n\n\
             [hosts.lab6]\naddress = \"fd77:1::1\"\nkey_id = \"alice\"\nkey_file = \"{k}\"\nserver_id = \"lab-server\"\n",
            k = key.display()
        ),
    );
    // Control: without the knock, ssh cannot even connect.
    let direct = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns(Host::Client),
            "ssh",
            "-F",
            "/dev/null",
        ])
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=2",
            "root@10.77.1.1",
            "true",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run ssh");
    assert!(
        !direct.status.success(),
        "ssh without a knock must not connect"
    );
    // The contrib snippet's shape: `web4` is an ssh alias whose HostName is the
    // entry's address (ssh's %h is the HostName); `lab6` is the entry's own name.
    let ssh_config = lab.write_file(
        "ssh_config",
        &format!(
            "Host web4\n    HostName 10.77.1.1\nHost lab6\n    HostName lab6\nHost *\n    User root\n    \
             IdentityFile {}\n    BatchMode yes\n    StrictHostKeyChecking no\n    \
             UserKnownHostsFile /dev/null\n    ConnectTimeout 10\n    \
             ProxyCommand {} proxy %h %p --config {}\n",
            lab.dir().join("user_key").display(),
            env!("CARGO_BIN_EXE_knock"),
            client_config.display()
        ),
    );
    for host in ["web4", "lab6"] {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.ns(Host::Client), "ssh", "-F"])
            .arg(&ssh_config)
            .args([host, "echo hello-through-knockgate"])
            .stdin(Stdio::null())
            .output()
            .expect("run ssh");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("hello-through-knockgate"),
            "{host}: ssh through knock proxy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
