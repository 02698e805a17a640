//! How long `egress-window` takes before COMMAND starts. Not a test: prints figures,
//! asserts nothing about time. (`cargo bench --bench compare` reports it too.)
//!
//!     cargo bench --bench egress        # as root (the lab)

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "compare/egress.rs"]
mod egress;

use std::time::Duration;

use support::Lab;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("(egress-window bench skipped: the lab needs root)");
        return;
    }
    let lab = Lab::new();
    let _daemon =
        lab.start_daemon(&lab.write_file("k.toml", "[dns]\nresolvers = [\"10.77.2.53\"]\n"));
    let runs = 50;
    let t = egress::measure(&lab, runs);
    let (d, c, h) = (
        median(t.direct),
        median(t.command_scope),
        median(t.host_wide),
    );
    println!("## egress-window: time before COMMAND starts ({runs} runs each, medians)\n");
    println!("| how COMMAND is started | spawn → COMMAND running | added by egress-window |");
    println!("|---|---:|---:|");
    println!("| directly (nsenter) | {:.2} ms | — |", ms(d));
    println!(
        "| egress-window, command scope (cgroup) | {:.2} ms | {:.2} ms |",
        ms(c),
        ms(c.saturating_sub(d))
    );
    println!(
        "| egress-window --host-wide | {:.2} ms | {:.2} ms |",
        ms(h),
        ms(h.saturating_sub(d))
    );
}
