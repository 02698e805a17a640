//! Egress sets in the kernel: outbound HTTP/HTTPS for the sockets of one cgroup (and
//! its children) only, or host-wide, each closed by removal or by the kernel's
//! timeout. Real processes in a real cgroup, real connections (root; CI runs these).

mod support;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use knockgate::cgroup::{WindowCgroup, cgroup2_root};
use knockgate::config::Config;
use knockgate::firewall::Firewall;
use knockgate::firewall::nft::NftFirewall;
use knockgate::ruleset::baseline::{EGRESS_CGROUPS, EGRESS_HOST};
use knockgate::ruleset::{ElementKey, baseline};
use support::{Host, Lab, lab_available, sa, v4, v6};

fn with_fw<T: Send>(lab: &Lab, f: impl FnOnce(&mut NftFirewall) -> T + Send) -> T {
    lab.in_ns(Host::Server, || {
        f(&mut NftFirewall::open().expect("open netlink"))
    })
}

/// Whether a TCP connection to `to` succeeds from a process in the server
/// namespace, started inside `cgroup` (or left where it is).
fn connects_from(lab: &Lab, cgroup: Option<&Path>, to: std::net::SocketAddr) -> bool {
    let netns = format!("/run/netns/{}", lab.ns(Host::Server));
    let target = match to.ip() {
        std::net::IpAddr::V4(a) => format!("{a}"),
        std::net::IpAddr::V6(a) => format!("{a}"),
    };
    let probe = format!("exec 3<>/dev/tcp/{target}/{}", to.port());
    // The shell joins the cgroup first, then enters the namespace and connects;
    // nsenter keeps the host's /sys (ip netns exec would remount it).
    let join = cgroup.map_or(String::new(), |c| {
        format!("echo $$ > {}/cgroup.procs && ", c.display())
    });
    let script = format!("{join}exec nsenter --net={netns} timeout 1 bash -c '{probe}'");
    Command::new("sh")
        .args(["-c", &script])
        .status()
        .expect("run sh")
        .success()
}

#[test]
fn a_window_cgroup_and_its_children_get_out_and_nothing_else_does() {
    if !lab_available("a_window_cgroup_and_its_children_get_out_and_nothing_else_does") {
        return;
    }
    let lab = Lab::new();
    let _mirrors: Vec<_> = [v4(), v6()]
        .iter()
        .flat_map(|p| [80, 443].map(|port| lab.tcp_echo(Host::Outside, sa(p.mirror, port))))
        .collect();
    let resolvers = ["10.77.2.53".parse().unwrap()];
    with_fw(&lab, |fw| {
        fw.replace(&baseline(&Config::default(), &resolvers))
    })
    .unwrap();
    let root = cgroup2_root().expect("cgroup2 is mounted on the test machines");
    let window =
        WindowCgroup::create(&root, &format!("knockgate-test-{}", lab.ns(Host::Server))).unwrap();
    let child = window.path().join("child");
    std::fs::create_dir(&child).unwrap();
    let mirror = sa(v4().mirror, 443);
    assert!(
        !connects_from(&lab, Some(window.path()), mirror),
        "closed before the window"
    );

    let key = ElementKey::Cgroup(window.id());
    with_fw(&lab, |fw| {
        fw.add_element("knockgate", EGRESS_CGROUPS, key, Duration::from_secs(30))
    })
    .unwrap();
    for plan in [v4(), v6()] {
        for port in [80, 443] {
            assert!(
                connects_from(&lab, Some(window.path()), sa(plan.mirror, port)),
                "the window's process gets out to {port}"
            );
        }
        assert!(
            connects_from(&lab, Some(&child), sa(plan.mirror, 443)),
            "so does a child cgroup"
        );
        assert!(
            !connects_from(&lab, None, sa(plan.mirror, 443)),
            "a process outside the window does not"
        );
    }
    assert!(
        !connects_from(&lab, Some(window.path()), sa(v4().mirror, 22)),
        "only the egress ports"
    );

    with_fw(&lab, |fw| {
        fw.remove_element("knockgate", EGRESS_CGROUPS, key)
    })
    .unwrap();
    assert!(
        !connects_from(&lab, Some(window.path()), mirror),
        "closed at once when removed"
    );

    // The kernel ends a window on time by itself.
    with_fw(&lab, |fw| {
        fw.add_element("knockgate", EGRESS_CGROUPS, key, Duration::from_secs(1))
    })
    .unwrap();
    assert!(connects_from(&lab, Some(window.path()), mirror));
    std::thread::sleep(Duration::from_millis(1300));
    assert!(
        !connects_from(&lab, Some(window.path()), mirror),
        "closed by the kernel's timeout"
    );
    std::fs::remove_dir(&child).unwrap();
}

#[test]
fn the_host_wide_switch_lets_everyone_out_until_it_ends() {
    if !lab_available("the_host_wide_switch_lets_everyone_out_until_it_ends") {
        return;
    }
    let lab = Lab::new();
    let _mirror = lab.tcp_echo(Host::Outside, sa(v4().mirror, 80));
    let resolvers = ["10.77.2.53".parse().unwrap()];
    with_fw(&lab, |fw| {
        fw.replace(&baseline(&Config::default(), &resolvers))
    })
    .unwrap();
    let mirror = sa(v4().mirror, 80);
    assert!(
        !lab.tcp_works(Host::Server, mirror),
        "closed before the window"
    );
    let tcp = ElementKey::Proto(6);
    with_fw(&lab, |fw| {
        fw.add_element("knockgate", EGRESS_HOST, tcp, Duration::from_secs(1))
    })
    .unwrap();
    assert!(
        lab.tcp_works(Host::Server, mirror),
        "any process gets out during a host-wide window"
    );
    std::thread::sleep(Duration::from_millis(1300));
    assert!(!lab.tcp_works(Host::Server, mirror), "and nobody after it");
}

/// A lab with knockgated in the server namespace and echo servers on the mirror.
struct Windows {
    lab: Lab,
    socket: std::path::PathBuf,
    _mirrors: Vec<support::EchoServer>,
}

fn windows() -> (Windows, support::Daemon) {
    windows_with("")
}

/// [`windows`] with `extra` at the top of the config.
fn windows_with(extra: &str) -> (Windows, support::Daemon) {
    let lab = Lab::new();
    let mirrors = [80, 443]
        .map(|port| lab.tcp_echo(Host::Outside, sa(v4().mirror, port)))
        .into();
    let config = lab.write_file(
        "k.toml",
        &format!("{extra}[egress]\nmax_ttl = \"10m\"\n[dns]\nresolvers = [\"10.77.2.53\"]\n"),
    );
    let daemon = lab.start_daemon(&config);
    let socket = lab.dir().join("admin.sock");
    (
        Windows {
            lab,
            socket,
            _mirrors: mirrors,
        },
        daemon,
    )
}

/// A shell line that connects to the mirror's port 80 and fails if it cannot.
fn probe_mirror() -> String {
    format!("timeout 1 bash -c 'exec 3<>/dev/tcp/{}/80'", v4().mirror)
}

impl Windows {
    /// `egress-window ARGS` in the server namespace (nsenter keeps the host's cgroup mount).
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.lab.ns(Host::Server)))
            .arg(env!("CARGO_BIN_EXE_egress-window"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().expect("run egress-window")
    }

    fn outside_gets_out(&self) -> bool {
        connects_from(&self.lab, None, sa(v4().mirror, 80))
    }

    fn open_windows(&self) -> usize {
        let out = Command::new(env!("CARGO_BIN_EXE_knockgate"))
            .arg("--socket")
            .arg(&self.socket)
            .args(["grants", "--json"])
            .output()
            .unwrap();
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        listed["windows"].as_array().map_or(0, Vec::len)
    }
}

#[test]
fn egress_window_lets_its_command_out_and_nobody_else() {
    if !lab_available("egress_window_lets_its_command_out_and_nobody_else") {
        return;
    }
    let (w, _daemon) = windows();
    let probe = probe_mirror();
    assert!(!w.outside_gets_out(), "no egress without a window");
    // The command gets out (and so does its child); meanwhile a process outside the
    // window does not.
    let mut running = w
        .command(&[
            "10s",
            "--",
            "bash",
            "-c",
            &format!("{probe} && bash -c \"{probe}\" && sleep 1 && {probe}"),
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        !w.outside_gets_out(),
        "a second process outside the window stays in"
    );
    let status = running.wait().unwrap();
    assert!(status.success(), "the command and its child got out");
    assert_eq!(
        w.open_windows(),
        0,
        "the window closed when the command exited"
    );
    let code = w.run(&["5s", "--", "bash", "-c", "exit 7"]).status.code();
    assert_eq!(code, Some(7), "egress-window exits with the command's code");
}

#[test]
fn a_command_that_outlives_its_window_loses_new_connections() {
    if !lab_available("a_command_that_outlives_its_window_loses_new_connections") {
        return;
    }
    let (w, _daemon) = windows();
    let probe = probe_mirror();
    let out = w.run(&[
        "1s",
        "--",
        "bash",
        "-c",
        &format!("{probe} && sleep 2 && {probe}"),
    ]);
    assert!(
        !out.status.success(),
        "the second connection, after 1 s, fails"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("window ended at "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn host_wide_windows_open_for_all_and_close_when_the_command_ends() {
    if !lab_available("host_wide_windows_open_for_all_and_close_when_the_command_ends") {
        return;
    }
    let (w, _daemon) = windows();
    // The command outlives the checks below by a margin: on a loaded 2-core machine
    // the window can take longer than half a second to open (a fixed wait flaked).
    let mut running = w
        .command(&["--host-wide", "30s", "--", "sleep", "5"])
        .spawn()
        .unwrap();
    assert!(
        support::eventually(Duration::from_secs(3), || w.outside_gets_out()),
        "any process gets out during a host-wide window"
    );
    assert!(running.wait().unwrap().success());
    assert!(
        !w.outside_gets_out(),
        "nobody after it — at once, not at 30 s"
    );
}

#[test]
fn kill_9_of_egress_window_closes_the_window_within_a_second() {
    if !lab_available("kill_9_of_egress_window_closes_the_window_within_a_second") {
        return;
    }
    let (w, _daemon) = windows();
    let mut running = w.command(&["60s", "--", "sleep", "20"]).spawn().unwrap();
    // nsenter execs egress-window, so this is its pid (and its cgroup's name).
    let pid = running.id();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(w.open_windows(), 1);
    running.kill().unwrap();
    running.wait().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(w.open_windows(), 0, "closed within a second of kill -9");
    let set = w
        .lab
        .nft(&["list", "set", "inet", "knockgate", "egress_cgroups"]);
    assert!(!set.contains("elements"), "and gone from the kernel: {set}");
    // Clean up what a killed egress-window leaves: its command and its empty cgroup.
    let _ = Command::new("pkill").args(["-f", "^sleep 20$"]).status();
    std::thread::sleep(Duration::from_millis(100));
    let root = cgroup2_root().unwrap();
    let _ = std::fs::remove_dir(root.join(format!("knockgate-egress-{pid}")));
}

#[test]
fn kill_9_of_the_daemon_still_ends_the_window_at_its_duration() {
    if !lab_available("kill_9_of_the_daemon_still_ends_the_window_at_its_duration") {
        return;
    }
    let (w, daemon) = windows();
    let mut running = w
        .command(&["--host-wide", "2s", "--", "sleep", "4"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    daemon.kill_9();
    assert!(w.outside_gets_out(), "open while the window lasts");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !w.outside_gets_out(),
        "closed by the kernel at DURATION with no daemon"
    );
    let _ = running.wait();
}

#[test]
fn ctrl_c_reaches_the_command_and_the_exit_code_says_so() {
    if !lab_available("ctrl_c_reaches_the_command_and_the_exit_code_says_so") {
        return;
    }
    let (w, _daemon) = windows();
    // A terminal's Ctrl-C goes to the whole foreground process group: setsid makes
    // one, led by egress-window, that the test can signal the same way.
    let mut c = Command::new("setsid");
    c.arg("--wait")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", w.lab.ns(Host::Server)))
        .arg(env!("CARGO_BIN_EXE_egress-window"))
        .arg("--socket")
        .arg(&w.socket)
        .args(["--host-wide", "30s", "--", "sleep", "30"]);
    let mut running = c.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let pgid = pgid_of_sleep();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = running.wait().unwrap();
    assert_eq!(status.code(), Some(130), "128 + SIGINT");
    assert!(!w.outside_gets_out(), "and the window is closed");
}

/// The process group of the `sleep 30` started by the Ctrl-C test.
fn pgid_of_sleep() -> i32 {
    let out = Command::new("pgrep")
        .args(["-f", "-n", "^sleep 30$"])
        .output()
        .unwrap();
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("sleep is running");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    after.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn users_outside_the_admin_group_get_no_window_and_their_command_does_not_run() {
    if !lab_available("users_outside_the_admin_group_get_no_window_and_their_command_does_not_run")
    {
        return;
    }
    let (w, _daemon) = windows();
    std::fs::set_permissions(w.lab.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let marker = w.lab.dir().join("ran");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_egress-window"))
        .arg("--socket")
        .arg(&w.socket)
        .args(["--host-wide", "5s", "--", "touch"])
        .arg(&marker)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("only root and members of the admin group"),
        "{said}"
    );
    assert!(!marker.exists(), "the command did not run");
}

/// A child process killed on drop (dnsmasq, the HTTP server).
struct Service(std::process::Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The mirror: a real HTTP server (Python's) on 10.77.2.2:80 serving "mirror-ok",
/// and a real resolver (dnsmasq) on 10.77.2.53 answering mirror.lab and other.lab.
fn mirror_and_resolver(lab: &Lab) -> (Service, Service) {
    let root = lab.dir().join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), "mirror-ok\n").unwrap();
    let http = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns(Host::Outside),
            "python3",
            "-m",
            "http.server",
            "80",
            "--bind",
            "10.77.2.2",
            "--directory",
        ])
        .arg(&root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 http.server");
    let dns = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns(Host::Outside),
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
        ])
        .args([
            "--bind-interfaces",
            "--listen-address=10.77.2.53",
            "--pid-file=",
            "--user=root",
        ])
        .args([
            "--address=/mirror.lab/10.77.2.2",
            "--address=/other.lab/10.77.2.53",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("dnsmasq (install dnsmasq-base)");
    let (http, dns) = (Service(http), Service(dns));
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !(lab.tcp_listening(Host::Outside, "10.77.2.2:80".parse().unwrap())
        && lab.tcp_listening(Host::Outside, "10.77.2.53:53".parse().unwrap()))
    {
        assert!(
            std::time::Instant::now() < end,
            "mirror or resolver did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (http, dns)
}

/// `egress-window ARGS` in the server namespace through `ip netns exec` (so the
/// namespace's resolv.conf applies), with cgroup2 mounted in that mount namespace.
fn egress_window_by_name(lab: &Lab, socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", &lab.ns(Host::Server), "sh", "-c"])
        .arg("mount -t cgroup2 none /sys/fs/cgroup && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_egress-window"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run egress-window")
}

#[test]
fn curl_by_name_works_in_a_window_and_not_outside_it() {
    if !lab_available("curl_by_name_works_in_a_window_and_not_outside_it") {
        return;
    }
    let lab = Lab::new();
    let _services = mirror_and_resolver(&lab);
    lab.set_resolv_conf(Host::Server, "nameserver 10.77.2.53\n");
    // Resolvers from the server's resolv.conf, as on a default install.
    let _daemon = lab.start_daemon(&lab.write_file("k.toml", ""));
    let socket = lab.dir().join("admin.sock");
    let curl = ["curl", "-sf", "--max-time", "3", "http://mirror.lab/"];
    let outside = lab.try_exec(Host::Server, &curl);
    assert!(!outside.status.success(), "curl outside a window fails");
    let mut args = vec!["5s", "--"];
    args.extend_from_slice(&curl);
    let inside = egress_window_by_name(&lab, &socket, &args);
    assert!(
        inside.status.success() && String::from_utf8_lossy(&inside.stdout).contains("mirror-ok"),
        "curl by name inside the window: {}",
        String::from_utf8_lossy(&inside.stderr)
    );
    assert!(
        !lab.try_exec(Host::Server, &curl).status.success(),
        "and fails again after it"
    );
}

#[test]
fn to_restricts_a_window_to_the_named_destinations() {
    if !lab_available("to_restricts_a_window_to_the_named_destinations") {
        return;
    }
    let lab = Lab::new();
    let _services = mirror_and_resolver(&lab);
    // Another lab host: the resolver's address also serves port 80.
    let _other = lab.tcp_echo(Host::Outside, "10.77.2.53:80".parse().unwrap());
    lab.set_resolv_conf(Host::Server, "nameserver 10.77.2.53\n");
    let _daemon = lab.start_daemon(&lab.write_file("k.toml", ""));
    let socket = lab.dir().join("admin.sock");
    let probe = |host: &str| format!("timeout 1 bash -c 'exec 3<>/dev/tcp/{host}/80'");
    let script = format!("{} && ! {}", probe("10.77.2.2"), probe("10.77.2.53"));
    let out = egress_window_by_name(
        &lab,
        &socket,
        &["--to", "mirror.lab", "5s", "--", "bash", "-c", &script],
    );
    assert!(
        out.status.success(),
        "the mirror is reachable, the other host is not: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without --to, the same window reaches both (the control for the refusal above).
    let both = format!("{} && {}", probe("10.77.2.2"), probe("10.77.2.53"));
    let out = egress_window_by_name(&lab, &socket, &["5s", "--", "bash", "-c", &both]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --to and --host-wide together is a usage error, and nothing runs.
    let out = egress_window_by_name(
        &lab,
        &socket,
        &["--host-wide", "--to", "mirror.lab", "5s", "--", "true"],
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn inside_a_systemd_style_scope_the_window_is_the_scope() {
    if !lab_available("inside_a_systemd_style_scope_the_window_is_the_scope") {
        return;
    }
    // What systemd-run --scope leaves egress-window in: a cgroup someone else made.
    // (The lab has no systemd as PID 1, so the re-run itself is not exercised.)
    let (w, _daemon) = windows();
    let root = cgroup2_root().unwrap();
    let scope = root.join(format!("knockgate-test-scope-{}", w.lab.ns(Host::Server)));
    std::fs::create_dir(&scope).unwrap();
    let script = format!(
        "echo $$ > {}/cgroup.procs && KNOCKGATE_EGRESS_IN_SCOPE=1 exec nsenter --net=/run/netns/{} {} --socket {} 5s -- bash -c \"{}\"",
        scope.display(),
        w.lab.ns(Host::Server),
        env!("CARGO_BIN_EXE_egress-window"),
        w.socket.display(),
        probe_mirror()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(
        out.status.success(),
        "the scope got out: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(scope.exists(), "the scope is left for its owner to remove");
    assert_eq!(w.open_windows(), 0, "the window is closed");
    std::fs::remove_dir(&scope).unwrap();
}

#[test]
fn windows_are_listed_and_can_be_revoked_early() {
    if !lab_available("windows_are_listed_and_can_be_revoked_early") {
        return;
    }
    let (w, _daemon) = windows();
    let mut running = w
        .command(&["--host-wide", "60s", "--", "sleep", "3"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = Command::new(env!("CARGO_BIN_EXE_knockgate"))
        .arg("--socket")
        .arg(&w.socket)
        .arg("grants")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("host-wide") && table.contains("uid 0") && table.contains("sleep 3"),
        "{table}"
    );
    let id = table
        .lines()
        .find(|l| l.contains("host-wide"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    assert!(w.outside_gets_out());
    let out = Command::new(env!("CARGO_BIN_EXE_knockgate"))
        .arg("--socket")
        .arg(&w.socket)
        .args(["revoke", &id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!w.outside_gets_out(), "revoked before its command ended");
    assert!(
        running.wait().unwrap().success(),
        "the command itself runs on"
    );
}

/// A cgroup the test makes under the cgroup2 root, removed on drop (children first).
struct TestCgroup(std::path::PathBuf);

impl TestCgroup {
    fn new(lab: &Lab, name: &str) -> Self {
        let root = cgroup2_root().expect("cgroup2 is mounted on the test machines");
        let path = root.join(format!("knockgate-test-{name}-{}", lab.ns(Host::Server)));
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }

    fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.0).unwrap().ino()
    }

    /// A shell line that moves the shell into this cgroup.
    fn join(&self) -> String {
        format!("echo $$ > {}/cgroup.procs", self.0.display())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(children) = std::fs::read_dir(&self.0) {
            for child in children.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::remove_dir(child.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Sends one `open_egress` request for cgroup `id`, claiming `claimed` as its command,
/// from a python3 process inside `cgroup`; returns the daemon's answer line.
fn python_asks(socket: &Path, cgroup: &TestCgroup, id: u64, claimed: &str) -> String {
    let script = r#"
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
req = {"op": "open_egress", "scope": {"cgroup": int(sys.argv[2])}, "ttl_secs": 30, "command": os.environ["CLAIMED"]}
s.sendall((json.dumps(req) + "\n").encode())
print(s.makefile().readline(), end="")
"#;
    // The claim travels in the environment, so that it is nowhere in the real
    // command line.
    let line = format!(
        "{} && exec python3 -c '{script}' {} {id}",
        cgroup.join(),
        socket.display()
    );
    let out = Command::new("sh")
        .args(["-c", &line])
        .env("CLAIMED", claimed)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_window_is_only_for_the_requesters_own_cgroup_and_the_log_names_its_real_command() {
    if !lab_available(
        "a_window_is_only_for_the_requesters_own_cgroup_and_the_log_names_its_real_command",
    ) {
        return;
    }
    let (w, daemon) = windows();
    let (mine, other) = (
        TestCgroup::new(&w.lab, "mine"),
        TestCgroup::new(&w.lab, "other"),
    );
    // Another process's cgroup: refused, and nothing opens for it.
    let answer = python_asks(&w.socket, &mine, other.id(), "apt upgrade");
    assert!(
        answer.contains("only for the requester's own cgroup") && answer.contains("python3"),
        "{answer}"
    );
    assert!(!connects_from(&w.lab, Some(&other.0), sa(v4().mirror, 80)));
    assert_eq!(w.open_windows(), 0);
    assert!(
        daemon.logged_soon("egress window refused"),
        "{}",
        daemon.log_text()
    );
    // Its own cgroup: opened, and what the log and the listing show is the command
    // line the kernel has, not the one the request claimed.
    let answer = python_asks(&w.socket, &mine, mine.id(), "apt upgrade");
    assert!(answer.contains("window_opened"), "{answer}");
    let opened = daemon
        .log_text()
        .lines()
        .find(|l| l.contains("egress window opened"))
        .map(ToOwned::to_owned)
        .unwrap_or_default();
    assert!(
        opened.contains("python3 -c")
            && opened.contains("CLAIMED")
            && !opened.contains("apt upgrade"),
        "{opened}"
    );
    assert!(
        opened.contains(&format!(
            "cgroup=Some(\"/{}\")",
            mine.0.file_name().unwrap().to_string_lossy()
        )),
        "{opened}"
    );
}

#[test]
fn a_nested_to_window_is_restricted_once_the_outer_one_ends() {
    if !lab_available("a_nested_to_window_is_restricted_once_the_outer_one_ends") {
        return;
    }
    let (w, _daemon) = windows();
    // The other host: the resolver's address also serves port 80.
    let _other = w
        .lab
        .tcp_echo(Host::Outside, "10.77.2.53:80".parse().unwrap());
    // Both windows in one (systemd-style) scope: egress-window inside egress-window.
    let scope = TestCgroup::new(&w.lab, "nested");
    let dir = w.lab.dir();
    let probe = |host: &str| format!("timeout 1 bash -c \"exec 3<>/dev/tcp/{host}/80\"");
    let script = format!(
        "{} && {} && touch {d}/both && for i in $(seq 200); do [ -e {d}/revoked ] && break; sleep 0.05; done && {} && ! {}",
        probe("10.77.2.2"),
        probe("10.77.2.53"),
        probe("10.77.2.2"),
        probe("10.77.2.53"),
        d = dir.display()
    );
    let ew = env!("CARGO_BIN_EXE_egress-window");
    let sock = w.socket.display();
    let line = format!(
        "{} && KNOCKGATE_EGRESS_IN_SCOPE=1 exec nsenter --net=/run/netns/{} {ew} --socket {sock} 60s -- env KNOCKGATE_EGRESS_IN_SCOPE=1 {ew} --socket {sock} --to 10.77.2.2 60s -- bash -c '{script}'",
        scope.join(),
        w.lab.ns(Host::Server),
    );
    let mut outer = Command::new("sh").args(["-c", &line]).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !dir.join("both").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the inner command never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The outer, unrestricted window ends (revoked) while the inner one runs on.
    let out = Command::new(env!("CARGO_BIN_EXE_knockgate"))
        .arg("--socket")
        .arg(&w.socket)
        .args(["grants", "--json"])
        .output()
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let windows = listed["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 2, "{listed}");
    let unrestricted = windows
        .iter()
        .find(|w| w["to"].as_array().is_none_or(Vec::is_empty))
        .unwrap();
    let id = unrestricted["id"].as_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_knockgate"))
        .arg("--socket")
        .arg(&w.socket)
        .args(["revoke", id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.join("revoked"), "").unwrap();
    assert!(
        outer.wait().unwrap().success(),
        "after the outer window's end the inner command reaches its --to host and nothing else"
    );
}

#[test]
fn a_member_of_the_admin_group_runs_a_command_scoped_window_in_its_delegated_cgroup() {
    if !lab_available(
        "a_member_of_the_admin_group_runs_a_command_scoped_window_in_its_delegated_cgroup",
    ) {
        return;
    }
    // nobody (65534), whose primary group nogroup is the admin group here.
    let (w, _daemon) = windows_with("[admin]\ngroup = \"nogroup\"\n");
    std::fs::set_permissions(w.lab.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // What systemd does for a user manager: a cgroup delegated to the user (its
    // directory and its files are the user's), with the user's shell in it.
    let delegated = TestCgroup::new(&w.lab, "user");
    for file in [
        "",
        "cgroup.procs",
        "cgroup.subtree_control",
        "cgroup.threads",
    ] {
        let path = delegated.0.join(file);
        nix::unistd::chown(
            &path,
            Some(nix::unistd::Uid::from_raw(65534)),
            Some(nix::unistd::Gid::from_raw(65534)),
        )
        .unwrap();
    }
    // A directory nobody may write to, for the markers.
    let dir = w.lab.dir().join("nobody");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let dir = dir.as_path();
    let script = format!(
        "{} && touch {d}/in && sleep 2",
        probe_mirror(),
        d = dir.display()
    );
    let as_nobody = |cgroup: &TestCgroup, script: &str| {
        let file = w.lab.write_file(&format!("script-{}", cgroup.id()), script);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        format!(
            "{} && exec nsenter --net=/run/netns/{} setpriv --reuid=65534 --regid=65534 --clear-groups {} --socket {} 10s -- bash {}",
            cgroup.join(),
            w.lab.ns(Host::Server),
            env!("CARGO_BIN_EXE_egress-window"),
            w.socket.display(),
            file.display()
        )
    };
    let mut running = Command::new("sh")
        .args(["-c", &as_nobody(&delegated, &script)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !dir.join("in").exists() {
        assert!(
            std::time::Instant::now() < deadline && running.try_wait().unwrap().is_none(),
            "the command did not get out: {:?}",
            running
                .wait_with_output()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Meanwhile only the command's own cgroup gets out: not the user's others.
    assert!(!connects_from(
        &w.lab,
        Some(&delegated.0),
        sa(v4().mirror, 80)
    ));
    assert!(!w.outside_gets_out());
    assert!(running.wait().unwrap().success());

    // From a cgroup that is not the user's, there is nothing to make: a clear error,
    // and the command does not run.
    let other = TestCgroup::new(&w.lab, "not-delegated");
    let marker = dir.join("ran");
    let out = Command::new("sh")
        .args([
            "-c",
            &as_nobody(&other, &format!("touch {}", marker.display())),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("needs a cgroup of its own"), "{said}");
    assert!(!marker.exists(), "the command did not run");
}

/// The user the blind daemon runs as.
const DAEMON_UID: u32 = 64_124;

#[test]
fn a_daemon_blind_to_other_users_processes_still_identifies_egress_window() {
    if !lab_available("a_daemon_blind_to_other_users_processes_still_identifies_egress_window") {
        return;
    }
    // knockgated as its own user with only CAP_NET_ADMIN, and a /proc that hides other
    // users' processes from it (what ProtectProc=invisible gives the packaged unit).
    let lab = Lab::new();
    let _mirror = lab.tcp_echo(Host::Outside, sa(v4().mirror, 80));
    let config = lab.write_file(
        "k.toml",
        "[egress]\nmax_ttl = \"10m\"\n[dns]\nresolvers = [\"10.77.2.53\"]\n",
    );
    for path in [lab.dir().to_owned(), config.clone()] {
        nix::unistd::chown(
            &path,
            Some(nix::unistd::Uid::from_raw(DAEMON_UID)),
            Some(nix::unistd::Gid::from_raw(DAEMON_UID)),
        )
        .unwrap();
    }
    let id = DAEMON_UID.to_string();
    let daemon = lab.start_daemon_wrapped(
        &config,
        &[],
        &[
            "sh",
            "-c",
            "mount -t proc -o hidepid=invisible proc /proc && exec \"$@\"",
            "sh",
            "setpriv",
            "--reuid",
            &id,
            "--regid",
            &id,
            "--clear-groups",
            "--inh-caps=-all,+net_admin",
            "--ambient-caps=-all,+net_admin",
            "--bounding-set=-all,+net_admin",
            "--",
        ],
    );
    let socket = lab.dir().join("admin.sock");
    // egress-window passes its /proc/self: identified, and its command gets out.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.ns(Host::Server)))
        .arg(env!("CARGO_BIN_EXE_egress-window"))
        .arg("--socket")
        .arg(&socket)
        .args(["10s", "--", "bash", "-c", &probe_mirror()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    assert!(
        daemon.log_text().contains("egress window opened"),
        "{}",
        daemon.log_text()
    );
    // A requester that passes nothing cannot be seen, so it gets no window.
    let cgroup = TestCgroup::new(&lab, "blind");
    let answer = python_asks(&socket, &cgroup, cgroup.id(), "apt upgrade");
    assert!(answer.contains("hidden from knockgated"), "{answer}");
}

#[test]
fn a_session_window_lets_the_shell_out_and_ends_with_exit() {
    if !lab_available("a_session_window_lets_the_shell_out_and_ends_with_exit") {
        return;
    }
    let (w, daemon) = windows();
    let probe = probe_mirror();
    assert!(!w.outside_gets_out(), "no egress before the session");
    // No COMMAND: egress-window runs $SHELL -l, here on a pseudo-terminal (`script`),
    // with what a user types on its stdin.
    let line = w.command(&["5s"]);
    let words: Vec<String> = std::iter::once(line.get_program())
        .chain(line.get_args())
        .map(|w| w.to_string_lossy().into_owned())
        .collect();
    let mut session = Command::new("script")
        .args(["-q", "-e", "-c", &words.join(" "), "/dev/null"])
        .env("SHELL", "/bin/bash")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let mut typed = session.stdin.take().unwrap();
    assert!(
        support::eventually(Duration::from_secs(10), || w.open_windows() == 1),
        "the session's window opens"
    );
    writeln!(
        typed,
        "{probe} && echo \"IN-$((40+2))\" || echo \"OUT-$((40+2))\"; echo \"until=$KNOCKGATE_EGRESS_UNTIL\""
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        !w.outside_gets_out(),
        "a process outside the shell stays in during the session"
    );
    writeln!(typed, "exit").unwrap();
    drop(typed);
    let out = session.wait_with_output().unwrap();
    let seen = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(seen.contains("IN-42"), "the typed command got out:\n{seen}");
    assert!(!seen.contains("OUT-42"), "{seen}");
    assert!(
        seen.contains("egress open until"),
        "the start line:\n{seen}"
    );
    assert!(seen.contains("until=1"), "the prompt variable:\n{seen}");
    assert_eq!(w.open_windows(), 0, "exit closed the window");
    assert!(!w.outside_gets_out(), "nothing gets out after exit");
    // The daemon logs what the kernel says egress-window runs (not what it claims).
    assert!(
        daemon.logged_soon("admin.sock 5s\" expires_at="),
        "the log names the real command line:\n{}",
        daemon.log_text()
    );
}
