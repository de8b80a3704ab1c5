//! Memory and CPU of a process from `/proc` (Linux): resident set (now and peak) from
//! `/proc/<pid>/status`, CPU time (user + system) from `/proc/<pid>/stat`. Pure parsing plus
//! one read per sample.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcSample {
    pub rss_kib: u64,
    /// `VmHWM`: the highest resident set so far.
    pub peak_kib: u64,
    /// User + system CPU time, in seconds.
    pub cpu_s: f64,
}

/// Samples process `pid`; `None` once it is gone.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (rss_kib, peak_kib) = parse_status(&status)?;
    let ticks = parse_stat_cpu_ticks(&stat)?;
    Some(ProcSample {
        rss_kib,
        peak_kib,
        cpu_s: ticks as f64 / clock_ticks_per_second(),
    })
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// `(VmRSS, VmHWM)` in KiB.
fn parse_status(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    let rss = field("VmRSS:")?;
    Some((rss, field("VmHWM:").unwrap_or(rss)))
}

/// utime + stime (fields 14 and 15), counted after the `comm` field, which may hold spaces
/// and parentheses.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // `after_comm` starts at field 3 (state), so field n is at index n - 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_stat() {
        let status = "Name:\tsse-gateway\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status(status), Some((10240, 20480)));
        assert_eq!(parse_status("Name: x\n"), None);
        let stat =
            "4242 (sse gw (1)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn samples_this_process() {
        let me = sample(std::process::id()).expect("own /proc entry");
        assert!(me.rss_kib > 0 && me.peak_kib >= me.rss_kib, "{me:?}");
    }
}
