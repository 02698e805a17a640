//! The measurements, the same for every daemon: real packets in the lab, timed with
//! the monotonic clock, and what /proc says about the daemon's process.

use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg};

use crate::subjects::{KnockDatagrams, SPA_PORT, Subject, send_knock};
use crate::support::{Host, Lab};

/// How often the port is tried after a knock (the method).
pub const POLL: Duration = Duration::from_millis(1);
/// Longest wait for a knock to open the port.
const OPEN_TIMEOUT: Duration = Duration::from_secs(3);

/// Polls a TCP connect to `to` every `poll` until one succeeds (or `limit`); returns
/// when, counted from `since`. A SYN the firewall drops is lost, so each try waits
/// `poll` for an answer and the next sends a new SYN.
pub fn poll_open(
    to: SocketAddr,
    since: Instant,
    limit: Duration,
    poll: Duration,
) -> Option<Duration> {
    while since.elapsed() < limit {
        if connects_within(to, poll) {
            return Some(since.elapsed());
        }
    }
    None
}

/// Whether a new connection to `to` is established within `wait`. Not
/// `TcpStream::connect_timeout`: it waits with `poll(2)`, whose timeout is whole
/// milliseconds, so it cannot poll faster than every millisecond.
fn connects_within(to: SocketAddr, wait: Duration) -> bool {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.set_nonblocking(true).unwrap();
    let started = Instant::now();
    match socket.connect(&to.into()) {
        Ok(()) => return true,
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(_) => return false,
    }
    while started.elapsed() < wait {
        if socket.peer_addr().is_ok() {
            return true;
        }
        if matches!(socket.take_error(), Ok(Some(_))) {
            return false;
        }
        std::thread::yield_now();
    }
    false
}

/// Knock → open, once per knock in `knocks`: sends it from the client, polls port 22
/// every `poll`, then has the daemon close it again. `None` where it never opened.
pub fn knock_to_open(
    lab: &Lab,
    subject: &Subject,
    knocks: &[KnockDatagrams],
    (client, server): (IpAddr, IpAddr),
    poll: Duration,
) -> Vec<Option<Duration>> {
    knocks
        .iter()
        .map(|knock| {
            let took = lab.in_ns(Host::Client, || {
                let udp = UdpSocket::bind(SocketAddr::new(client, 0)).unwrap();
                let started = Instant::now();
                send_knock(&udp, server, knock);
                poll_open(SocketAddr::new(server, 22), started, OPEN_TIMEOUT, poll)
            });
            subject.revoke(lab, client);
            took
        })
        .collect()
}

/// How long after its TTL each grant really ended (negative: before), in ms: knock,
/// wait for the port to open, then try a connection every 5 ms until one fails.
pub fn revoke_lateness(
    lab: &Lab,
    subject: &Subject,
    knocks: &[KnockDatagrams],
    ttl: Duration,
    client: IpAddr,
    server: IpAddr,
) -> Vec<f64> {
    let ssh = SocketAddr::new(server, 22);
    let late = knocks
        .iter()
        .filter_map(|knock| {
            lab.in_ns(Host::Client, || {
                let udp = UdpSocket::bind(SocketAddr::new(client, 0)).unwrap();
                let started = Instant::now();
                send_knock(&udp, server, knock);
                // Open seen within 0.1 ms; then probed every millisecond until the
                // first probe that fails, counted from when that probe *started*
                // (its SYN met the closed port; the timeout it then waits is not
                // lateness).
                poll_open(ssh, started, OPEN_TIMEOUT, Duration::from_micros(100))?;
                let opened = Instant::now();
                let limit = ttl * 2 + Duration::from_secs(2);
                while opened.elapsed() < limit {
                    let probe = opened.elapsed();
                    if TcpStream::connect_timeout(&ssh, Duration::from_millis(5)).is_err() {
                        return Some((probe.as_secs_f64() - ttl.as_secs_f64()) * 1000.0);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                None
            })
        })
        .collect();
    subject.revoke(lab, client);
    late
}

/// What a junk flood did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct FloodResult {
    /// Junk datagrams sent.
    pub sent: u64,
    /// How long the flood lasted, in seconds.
    pub seconds: f64,
    /// Datagrams the kernel dropped at the daemon's full socket (UDP daemons only).
    pub socket_drops: Option<u64>,
    /// Datagrams knockgate's nft shape filter dropped before the socket (its
    /// `knock_junk` counter; none for the peers).
    pub kernel_dropped: Option<u64>,
    /// Junk the daemon itself read and rejected, per second.
    pub rejected_per_sec: Option<f64>,
    /// The daemon's CPU time over the flood, as a share of one core.
    pub cpu_share: f64,
    /// Valid knocks sent during the flood.
    pub valid_sent: usize,
    /// Knock → open of the valid knocks that opened.
    pub valid_opened_ms: Vec<f64>,
}

/// Floods the knock port(s) from the client's second address with `junk` (cycled)
/// for `duration`, while the client knocks validly `valid.len()` times, evenly spread.
pub fn flood(
    lab: &Lab,
    subject: &Subject,
    junk: &[KnockDatagrams],
    valid: &[KnockDatagrams],
    duration: Duration,
    (client, intruder, server): (IpAddr, IpAddr, IpAddr),
) -> FloodResult {
    let pid = subject.pid();
    let drops_before = udp_drops(lab, SPA_PORT);
    let kernel_before = knock_junk_counter(lab);
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let (sent, opened) = std::thread::scope(|s| {
        // Two sending threads (one core each on a 2-core VM, shared with the daemon),
        // each handing the kernel 64 datagrams a call (`sendmmsg`): one thread's
        // `sendto` per datagram was below what the daemon rejects, and with two the
        // daemon was never saturated, so its small batches measured its wake-ups.
        let generators: Vec<_> = (0..SENDERS)
            .map(|_| {
                s.spawn(|| {
                    lab.in_ns(Host::Client, || {
                        let udp = UdpSocket::bind(SocketAddr::new(intruder, 0)).unwrap();
                        let batches = JunkBatches::new(server, junk);
                        let mut sent = 0u64;
                        while started.elapsed() < duration {
                            sent += batches.send_all(&udp);
                        }
                        sent
                    })
                })
            })
            .collect();
        let opened = knock_during(lab, subject, valid, duration, client, server);
        let sent: u64 = generators.into_iter().map(|g| g.join().unwrap()).sum();
        (sent, opened)
    });
    let seconds = started.elapsed().as_secs_f64();
    let cpu_share = (cpu_seconds(pid) - cpu_before) / seconds;
    let socket_drops = drops_before.and_then(|b| udp_drops(lab, SPA_PORT).map(|a| a - b));
    let kernel_dropped =
        kernel_before.and_then(|b| knock_junk_counter(lab).map(|a| a.saturating_sub(b)));
    FloodResult {
        sent,
        seconds,
        socket_drops,
        kernel_dropped,
        rejected_per_sec: socket_drops.map(|d| {
            sent.saturating_sub(d)
                .saturating_sub(kernel_dropped.unwrap_or(0)) as f64
                / seconds
        }),
        cpu_share,
        valid_sent: valid.len(),
        valid_opened_ms: opened,
    }
}

/// Sends the `valid` knocks from `client` to `server`, evenly spread over `duration`,
/// each revoked after it opened; returns knock → open of those that opened, in ms.
fn knock_during(
    lab: &Lab,
    subject: &Subject,
    valid: &[KnockDatagrams],
    duration: Duration,
    client: IpAddr,
    server: IpAddr,
) -> Vec<f64> {
    let gap = duration / u32::try_from(valid.len() + 1).unwrap_or(1);
    let mut opened = Vec::new();
    for knock in valid {
        std::thread::sleep(gap.saturating_sub(Duration::from_millis(50)));
        let took = lab.in_ns(Host::Client, || {
            let udp = UdpSocket::bind(SocketAddr::new(client, 0)).unwrap();
            let t = Instant::now();
            send_knock(&udp, server, knock);
            poll_open(
                SocketAddr::new(server, 22),
                t,
                Duration::from_millis(500),
                POLL,
            )
        });
        if let Some(took) = took {
            opened.push(took.as_secs_f64() * 1000.0);
        }
        subject.revoke(lab, client);
    }
    opened
}

/// What a spoofed flood did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SpoofedResult {
    /// The flood, as for one source.
    pub flood: FloodResult,
    /// Distinct IPv4 sources, and IPv6 sources (all in one /64), cycled.
    pub sources_v4: u32,
    pub sources_v6: u32,
    /// The daemon's RSS before and after, KiB.
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
}

/// The spoofed sources: IPv4 from 10.80.0.0/16, IPv6 from fd77:9:0:1234::/64.
fn spoofed(n: u32, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(std::net::Ipv6Addr::from(
            (0xfd77_0009_u128 << 96) | (0x1234_u128 << 64) | u128::from(n),
        ))
    } else {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a50_0000 + (n & 0xffff)))
    }
}

/// Floods the knock port with 114-byte junk from `sources_v4` IPv4 and `sources_v6`
/// IPv6 addresses (one /64) the client namespace does not have — bound with
/// `ip_nonlocal_bind`, IPv4 sockets transparent, as a spoofer's raw socket would send
/// them — alternating families, one datagram per source in turn, for `duration`,
/// while the client knocks validly `valid.len()` times over IPv4.
pub fn spoofed_flood(
    lab: &Lab,
    subject: &Subject,
    valid: &[KnockDatagrams],
    duration: Duration,
    (client, server_v4, server_v6): (IpAddr, IpAddr, IpAddr),
    (sources_v4, sources_v6): (u32, u32),
) -> SpoofedResult {
    lab.exec(
        Host::Client,
        &["sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1"],
    );
    lab.exec(
        Host::Client,
        &["sysctl", "-qw", "net.ipv6.ip_nonlocal_bind=1"],
    );
    let pid = subject.pid();
    let mut shaped = vec![0x5a; 114];
    shaped[..4].copy_from_slice(&knockgate::knock::packet::V1_HEADER);
    let rss_before_kib = rss_kib(pid).0;
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let (sent, opened) = std::thread::scope(|s| {
        let generator = s.spawn(|| {
            let to = |from: IpAddr| {
                SocketAddr::new(if from.is_ipv4() { server_v4 } else { server_v6 }, SPA_PORT)
            };
            let mut sent = 0u64;
            let mut round = 0u32;
            // Rounds of 1,000 sources of each family, alternating, until the time is up.
            while started.elapsed() < duration {
                let batch = (0..1_000u32).flat_map(|i| {
                    let n = round.wrapping_mul(1_000).wrapping_add(i);
                    [
                        spoofed(n % sources_v4.max(1), false),
                        spoofed(n % sources_v6.max(1), true),
                    ]
                });
                // Shaped like a knock: the kernel's shape filter would drop anything
                // else before the meters it is meant to fill.
                sent += lab.spoof(batch, to, &shaped) as u64;
                round = round.wrapping_add(1);
            }
            sent
        });
        let opened = knock_during(lab, subject, valid, duration, client, server_v4);
        (generator.join().unwrap(), opened)
    });
    let seconds = started.elapsed().as_secs_f64();
    SpoofedResult {
        flood: FloodResult {
            sent,
            seconds,
            socket_drops: None,
            kernel_dropped: None,
            rejected_per_sec: None,
            cpu_share: (cpu_seconds(pid) - cpu_before) / seconds,
            valid_sent: valid.len(),
            valid_opened_ms: opened,
        },
        sources_v4,
        sources_v6,
        rss_before_kib,
        rss_after_kib: rss_kib(pid).0,
    }
}

/// New TCP connections per second from `client` to `to`: the median of five windows
/// of `duration / 5` (the machines are shared; one long window takes every hiccup).
/// Each connection is closed at once (the server side must accept: [`AcceptAll`]).
pub fn connect_rate(lab: &Lab, client: IpAddr, to: SocketAddr, duration: Duration) -> f64 {
    let mut rates: Vec<f64> = (0..5)
        .map(|_| connect_rate_once(lab, client, to, duration / 5))
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[2]
}

fn connect_rate_once(lab: &Lab, client: IpAddr, to: SocketAddr, duration: Duration) -> f64 {
    lab.in_ns(Host::Client, || {
        let started = Instant::now();
        let mut n = 0u32;
        while started.elapsed() < duration {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(to),
                socket2::Type::STREAM,
                None,
            )
            .unwrap();
            let _ = socket.set_linger(Some(Duration::ZERO)); // RST: no TIME_WAIT pile-up
            socket.bind(&SocketAddr::new(client, 0).into()).unwrap();
            if socket
                .connect_timeout(&to.into(), Duration::from_millis(200))
                .is_ok()
            {
                n += 1;
            }
        }
        f64::from(n) / started.elapsed().as_secs_f64()
    })
}

/// A listener in the server namespace that accepts and drops every connection until
/// dropped itself.
pub struct AcceptAll {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AcceptAll {
    pub fn start(lab: &Lab, addr: SocketAddr) -> Self {
        let listener = lab.in_ns(Host::Server, || TcpListener::bind(addr)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for AcceptAll {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// User + system CPU seconds of `pid` so far.
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')'.
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// Resident memory of `pid` in KiB: all of it, and the anonymous part (heap, stacks:
/// what the program allocated, as opposed to the pages of its code and libraries).
pub fn rss_kib(pid: i32) -> (u64, u64) {
    (status_field(pid, "VmRSS:"), status_field(pid, "RssAnon:"))
}

/// Proportional set size of `pid` in KiB (shared library pages divided among the
/// processes that map them).
pub fn pss_kib(pid: i32) -> u64 {
    field(
        &std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default(),
        "Pss:",
    )
}

/// Context switches (voluntary and not) of each of `pid`'s threads, by thread id: each
/// is a wake-up.
pub fn context_switches(pid: i32) -> std::collections::BTreeMap<String, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return std::collections::BTreeMap::new();
    };
    tasks
        .flatten()
        .map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let switches = ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
                .iter()
                .map(|f| field(&status, f))
                .sum::<u64>();
            (t.file_name().to_string_lossy().into_owned(), switches)
        })
        .collect()
}

/// Wake-ups between two [`context_switches`] readings: each thread's own count (a
/// thread that started meanwhile, all of its own), and one for each thread that ended
/// meanwhile (it woke at least to end; its count went with it).
pub fn wakeups_between(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> u64 {
    let ended = before.keys().filter(|t| !after.contains_key(*t)).count();
    let counted: u64 = after
        .iter()
        .map(|(t, n)| n.saturating_sub(before.get(t).copied().unwrap_or(0)))
        .sum();
    counted + u64::try_from(ended).unwrap_or(u64::MAX)
}

fn status_field(pid: i32, name: &str) -> u64 {
    field(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(),
        name,
    )
}

fn field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Threads sending a junk flood.
const SENDERS: usize = 2;
/// Datagrams handed to the kernel per `sendmmsg` call by a junk sender.
const SEND_BATCH: usize = 64;

/// A junk set laid out for `sendmmsg`: every datagram with its destination, sent in
/// calls of up to [`SEND_BATCH`].
struct JunkBatches<'a> {
    datagrams: Vec<[IoSlice<'a>; 1]>,
    to: Vec<Option<SockaddrStorage>>,
}

impl<'a> JunkBatches<'a> {
    fn new(server: IpAddr, junk: &'a [KnockDatagrams]) -> Self {
        let all = junk.iter().flatten();
        Self {
            datagrams: all.clone().map(|(_, d)| [IoSlice::new(d)]).collect(),
            to: all
                .map(|(port, _)| Some(SockaddrStorage::from(SocketAddr::new(server, *port))))
                .collect(),
        }
    }

    /// Sends the whole set once; returns how many datagrams the kernel took.
    fn send_all(&self, udp: &UdpSocket) -> u64 {
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(SEND_BATCH, None);
        let mut sent = 0u64;
        for (datagrams, to) in self
            .datagrams
            .chunks(SEND_BATCH)
            .zip(self.to.chunks(SEND_BATCH))
        {
            let no_cmsgs: [ControlMessage; 0] = [];
            if let Ok(results) = sendmmsg(
                udp.as_raw_fd(),
                &mut headers,
                datagrams,
                to,
                no_cmsgs,
                MsgFlags::empty(),
            ) {
                sent += results.count() as u64;
            }
        }
        sent
    }
}

/// knockgate's `knock_junk` counter in the server's namespace (none without one).
fn knock_junk_counter(lab: &Lab) -> Option<u64> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.ns(Host::Server)])
        .args(["nft", "list", "counter", "inet", "knockgate", "knock_junk"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|&w| w == "packets")?;
    words.next()?.parse().ok()
}

/// The kernel's drop count for the UDP socket on `port` in the server namespace.
fn udp_drops(lab: &Lab, port: u16) -> Option<u64> {
    let table = lab.exec(Host::Server, &["cat", "/proc/net/udp", "/proc/net/udp6"]);
    let local = format!(":{port:04X}");
    let drops: Vec<u64> = table
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(&local))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    (!drops.is_empty()).then(|| drops.iter().sum())
}
