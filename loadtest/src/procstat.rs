//! Memory and CPU of a process from `/proc` (Linux): resident set (now and peak) from
//! `/proc/<pid>/status`, CPU time (user + system) from `/proc/<pid>/stat`. Pure parsing plus
//! one read per sample. `sample_tree` adds a process's children (nginx's workers to its
//! master).

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

/// Samples process `pid` and its children, summed (the peaks too: a bound, not a joint
/// peak); `None` once `pid` is gone.
pub fn sample_tree(pid: u32) -> Option<ProcSample> {
    let mut total = sample(pid)?;
    for child in children(pid) {
        if let Some(s) = sample(child) {
            total.rss_kib += s.rss_kib;
            total.peak_kib += s.peak_kib;
            total.cpu_s += s.cpu_s;
        }
    }
    Some(total)
}

/// The children of process `pid`, from `/proc/<pid>/task/<tid>/children` of each thread.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| parse_children(&text))
        .collect()
}

/// The pids in `/proc/<pid>/task/<tid>/children`: space-separated.
fn parse_children(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
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

    #[test]
    fn parses_children() {
        assert_eq!(parse_children("9768 9770 \n"), vec![9768, 9770]);
        assert_eq!(parse_children(""), Vec::<u32>::new());
    }

    #[test]
    fn samples_a_process_with_its_children() {
        // An idle shell with an idle child: both stay the same size while sampled.
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .expect("sh");
        let pid = shell.id();
        let children = format!("/proc/{pid}/task/{pid}/children");
        let sleeper = (0..500).find_map(|_| {
            // Found once it runs `sleep`: between fork and exec its size still changes.
            let found = std::fs::read_to_string(&children)
                .ok()
                .and_then(|text| parse_children(&text).first().copied())
                .filter(|s| {
                    std::fs::read_to_string(format!("/proc/{s}/comm")).is_ok_and(|c| c == "sleep\n")
                });
            if found.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            found
        });
        // Sampled again if a size moved between the three reads (a page touched meanwhile).
        let samples = sleeper.map(|s| {
            let mut samples = (sample(pid), sample(s), sample_tree(pid));
            for _ in 0..20 {
                if let (Some(parent), Some(child), Some(tree)) = samples {
                    if tree.rss_kib == parent.rss_kib + child.rss_kib {
                        break;
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
                samples = (sample(pid), sample(s), sample_tree(pid));
            }
            samples
        });
        if let Some(s) = sleeper {
            // SAFETY: signalling the child of our own child, still running (its parent waits).
            unsafe { libc::kill(s as libc::pid_t, libc::SIGKILL) };
        }
        let _ = shell.kill();
        let _ = shell.wait();
        let Some((Some(parent), Some(child), Some(tree))) = samples else {
            panic!("no child of the shell found in {children}: {samples:?}");
        };
        assert_eq!(tree.rss_kib, parent.rss_kib + child.rss_kib, "{tree:?}");
    }
}
