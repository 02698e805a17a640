//! The report: every figure in JSON, and the same as Markdown tables with ratios to
//! the peers (the machines are shared and noisy; ratios from one run travel better).

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::measure::FloodResult;
use crate::scale::ScaleRow;

/// Median, p99 and max of a sample, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub n: usize,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    /// Of `ms` (any order); `None` if empty.
    pub fn of(mut ms: Vec<f64>) -> Option<Self> {
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        let at = |p: usize| ms[(p * (ms.len() - 1)).div_ceil(100)];
        Some(Self {
            n: ms.len(),
            median_ms: at(50),
            p99_ms: at(99),
            max_ms: ms[ms.len() - 1],
        })
    }

    pub fn of_durations(d: &[Duration]) -> Option<Self> {
        Self::of(d.iter().map(|d| d.as_secs_f64() * 1000.0).collect())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OpenRow {
    pub daemon: &'static str,
    pub runs: usize,
    pub opened: usize,
    pub spread: Option<Spread>,
    /// The same, polled every 0.1 ms.
    pub fine: Option<Spread>,
}

/// Port sequences with `keys` keys: the kernel elements per key and the step writes.
#[derive(Debug, Clone, Serialize)]
pub struct RotationRow {
    pub keys: usize,
    pub elements_per_key: f64,
    /// Elements one step's write adds.
    pub written_per_step: usize,
    /// Each step write the daemon timed, in ms.
    pub write_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatenessRow {
    pub daemon: &'static str,
    pub ttl_secs: u64,
    /// Milliseconds after the TTL the port was closed (negative: before), per grant.
    pub late_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FloodRow {
    pub daemon: &'static str,
    pub junk: &'static str,
    pub result: FloodResult,
    pub valid: Option<Spread>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpoofedRow {
    pub daemon: &'static str,
    pub result: crate::measure::SpoofedResult,
    pub valid: Option<Spread>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FootprintRow {
    pub daemon: &'static str,
    pub rss_kib: u64,
    pub rss_anon_kib: u64,
    pub pss_kib: u64,
    pub wakeups_per_sec: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EgressRow {
    pub runs: usize,
    pub direct_ms: f64,
    pub command_scope_added_ms: f64,
    pub host_wide_added_ms: f64,
}

/// Everything one run measured.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub machine: String,
    pub quick: bool,
    pub missing_peers: Vec<&'static str>,
    pub knock_to_open: Vec<OpenRow>,
    pub revoke_lateness: Vec<LatenessRow>,
    pub flood: Vec<FloodRow>,
    pub spoofed: Vec<SpoofedRow>,
    pub scale: Vec<ScaleRow>,
    pub footprint: Vec<FootprintRow>,
    pub egress: Option<EgressRow>,
    pub sequence_rotation: Vec<RotationRow>,
    pub clients: Vec<crate::client::ClientRow>,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.digits$}"))
}

impl Report {
    fn median_open(&self, daemon: &str) -> Option<f64> {
        self.knock_to_open
            .iter()
            .find(|r| r.daemon == daemon)
            .and_then(|r| r.spread.as_ref())
            .map(|s| s.median_ms)
    }

    /// The Markdown tables.
    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let quick = if self.quick {
            " (quick smoke run: few repetitions, not for quoting)"
        } else {
            ""
        };
        let _ = writeln!(m, "Run {} on {}{quick}.\n", self.date, self.machine);
        if !self.missing_peers.is_empty() {
            let missing = self.missing_peers.join(", ");
            let _ = writeln!(m, "Not installed, not measured: {missing}.\n");
        }
        self.open_table(&mut m);
        self.lateness_table(&mut m);
        self.flood_table(&mut m);
        self.spoofed_table(&mut m);
        self.scale_table(&mut m);
        self.footprint_table(&mut m);
        self.client_table(&mut m);
        self.rotation_table(&mut m);
        m
    }

    fn client_table(&self, m: &mut String) {
        if self.clients.is_empty() {
            return;
        }
        m.push_str("\n**The knock client** (one hyperfine run in the lab's client namespace, each program sending one knock; median of each, and over `/bin/true`'s in the same run)\n\n| client | median | mean ± σ | over /bin/true |\n|---|---:|---:|---:|\n");
        for r in &self.clients {
            let _ = writeln!(
                m,
                "| {} | {:.3} ms | {:.3} ± {:.3} ms | {:+.3} ms |",
                r.client, r.median_ms, r.mean_ms, r.stddev_ms, r.over_true_ms
            );
        }
    }

    fn rotation_table(&self, m: &mut String) {
        if self.sequence_rotation.is_empty() {
            return;
        }
        m.push_str("\n**Port sequences: writing a step** (4 UDP touches, 2 s steps; the daemon times each write, one netlink batch)\n\n");
        m.push_str("| keys | kernel elements per key | elements per write | writes | median write | slowest |\n|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.sequence_rotation {
            let mut v = r.write_ms.clone();
            v.sort_by(f64::total_cmp);
            let _ = writeln!(
                m,
                "| {} | {:.1} | {} | {} | {} ms | {} ms |",
                r.keys,
                r.elements_per_key,
                r.written_per_step,
                v.len(),
                opt(v.get(v.len() / 2).copied(), 2),
                opt(v.last().copied(), 2)
            );
        }
    }

    fn open_table(&self, m: &mut String) {
        let kg = self.median_open("knockgate");
        m.push_str("**Knock → open** (first datagram sent → first TCP connect to 22 that succeeds, polled every 1 ms)\n\n");
        m.push_str("| daemon | opened | median | p99 | max | knockgate is faster by | median, 0.1 ms polls | faster by |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
        let kg_fine = self
            .knock_to_open
            .iter()
            .find(|r| r.daemon == "knockgate")
            .and_then(|r| r.fine.as_ref())
            .map(|s| s.median_ms);
        for r in &self.knock_to_open {
            let s = r.spread.as_ref();
            let ratio = match (s, kg) {
                _ if r.daemon.starts_with("knockgate")
                    && r.daemon != "knockgate (fwknop packets)" =>
                {
                    "—".to_owned()
                }
                (Some(s), Some(kg)) => format!("{:.1}×", s.median_ms / kg),
                _ => "—".to_owned(),
            };
            let fine = r.fine.as_ref().map(|s| s.median_ms);
            let fine_ratio = match (fine, kg_fine) {
                _ if r.daemon == "knockgate" => "—".to_owned(),
                (Some(f), Some(kg)) => format!("{:.1}×", f / kg),
                _ => "—".to_owned(),
            };
            let _ = writeln!(
                m,
                "| {} | {}/{} | {} ms | {} ms | {} ms | {ratio} | {} ms | {fine_ratio} |",
                r.daemon,
                r.opened,
                r.runs,
                opt(s.map(|s| s.median_ms), 2),
                opt(s.map(|s| s.p99_ms), 2),
                opt(s.map(|s| s.max_ms), 2),
                opt(fine, 2),
            );
        }
    }

    fn lateness_table(&self, m: &mut String) {
        m.push_str("\n**Revoke lateness** (port seen closed — the start of the first probe that fails, probes every 1 ms — relative to the TTL after it was seen open, within 0.1 ms; negative = early)\n\n");
        m.push_str("| daemon | TTL | grants | earliest | median | latest |\n|---|---:|---:|---:|---:|---:|\n");
        for r in &self.revoke_lateness {
            let mut v = r.late_ms.clone();
            v.sort_by(f64::total_cmp);
            let _ = writeln!(
                m,
                "| {} | {} s | {} | {} ms | {} ms | {} ms |",
                r.daemon,
                r.ttl_secs,
                v.len(),
                opt(v.first().copied(), 0),
                opt(v.get(v.len() / 2).copied(), 0),
                opt(v.last().copied(), 0)
            );
        }
    }

    fn flood_table(&self, m: &mut String) {
        m.push_str("\n**Junk flood** (one source, as fast as two sending threads go, while the laptop knocks validly)\n\n");
        m.push_str("| daemon | junk | sent/s | dropped by its nft filter | dropped at its socket | rejected by the daemon/s | daemon CPU | rejected per CPU-second | valid knocks opened | their median / p99 |\n");
        m.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.flood {
            let f = &r.result;
            let drops = f
                .socket_drops
                .map_or_else(|| "—".to_owned(), |d| d.to_string());
            let filtered = f
                .kernel_dropped
                .map_or_else(|| "—".to_owned(), |d| d.to_string());
            let _ = writeln!(
                m,
                "| {} | {} | {:.0} | {filtered} | {drops} | {} | {:.0}% | {} | {}/{} | {} / {} ms |",
                r.daemon,
                r.junk,
                f.sent as f64 / f.seconds,
                opt(f.rejected_per_sec, 0),
                f.cpu_share * 100.0,
                opt(
                    f.rejected_per_sec
                        .filter(|_| f.cpu_share > 0.01)
                        .map(|r| r / f.cpu_share),
                    0
                ),
                f.valid_opened_ms.len(),
                f.valid_sent,
                opt(r.valid.as_ref().map(|s| s.median_ms), 2),
                opt(r.valid.as_ref().map(|s| s.p99_ms), 2)
            );
        }
    }

    fn spoofed_table(&self, m: &mut String) {
        if self.spoofed.is_empty() {
            return;
        }
        m.push_str("\n**Spoofed flood** (junk from many forged sources, IPv4 and one IPv6 /64, one datagram each in turn, while the laptop knocks validly over IPv4)\n\n");
        m.push_str("| daemon | IPv4 sources | IPv6 sources (one /64) | sent/s | daemon CPU | RSS before → after | valid knocks opened | their median / p99 |\n");
        m.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.spoofed {
            let (s, f) = (&r.result, &r.result.flood);
            let _ = writeln!(
                m,
                "| {} | {} | {} | {:.0} | {:.0}% | {:.1} → {:.1} MB | {}/{} | {} / {} ms |",
                r.daemon,
                s.sources_v4,
                s.sources_v6,
                f.sent as f64 / f.seconds,
                f.cpu_share * 100.0,
                s.rss_before_kib as f64 / 1024.0,
                s.rss_after_kib as f64 / 1024.0,
                f.valid_opened_ms.len(),
                f.valid_sent,
                opt(r.valid.as_ref().map(|s| s.median_ms), 2),
                opt(r.valid.as_ref().map(|s| s.p99_ms), 2)
            );
        }
    }

    fn scale_table(&self, m: &mut String) {
        m.push_str("\n**Grant scale** (new connections/s from a granted client, relative to only its own grant)\n\n");
        m.push_str("| daemon | grants | grants opened/s | measured with | connects/s | vs. 1 grant |\n|---|---:|---:|---|---:|---:|\n");
        for r in &self.scale {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {:.0} | {:.0}% |",
                r.daemon,
                r.grants,
                opt(r.grant_rate, 0),
                r.grant_rate_how,
                r.connect_rate,
                r.connect_ratio * 100.0
            );
        }
    }

    fn footprint_table(&self, m: &mut String) {
        m.push_str("\n**Footprint** (idle, after start; RSS of which anonymous, i.e. not code or library pages; PSS)\n\n| daemon | RSS | anonymous | PSS | wake-ups/s | over |\n|---|---:|---:|---:|---:|---:|\n");
        for r in &self.footprint {
            let _ = writeln!(
                m,
                "| {} | {:.1} MB | {:.1} MB | {:.1} MB | {:.2} | {:.0} s |",
                r.daemon,
                r.rss_kib as f64 / 1024.0,
                r.rss_anon_kib as f64 / 1024.0,
                r.pss_kib as f64 / 1024.0,
                r.wakeups_per_sec,
                r.seconds
            );
        }
        if let Some(e) = &self.egress {
            let _ = writeln!(
                m,
                "\n**egress-window overhead** (spawn → COMMAND running, added over starting it directly; {} runs, medians)\n",
                e.runs
            );
            let _ = writeln!(
                m,
                "| command scope (cgroup) | --host-wide |\n|---:|---:|\n| {:.2} ms | {:.2} ms |",
                e.command_scope_added_ms, e.host_wide_added_ms
            );
        }
    }
}
