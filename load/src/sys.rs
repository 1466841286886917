//! What the tool reads from and asks of the operating system: its own
//! file-descriptor limit, and the memory and CPU time of server processes
//! from `/proc`.

use std::collections::HashMap;
use std::fs;

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on
/// every Linux architecture this runs on).
const CLK_TCK: f64 = 100.0;

/// Raises `RLIMIT_NOFILE` to at least `want` descriptors: the soft limit up
/// to the hard one, and the hard one too when the process may (root).
/// Returns the soft limit in force afterwards.
pub fn raise_nofile(want: u64) -> u64 {
    let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() else {
        return 0;
    };
    if soft >= want {
        return soft;
    }
    if want > hard && rlimit::Resource::NOFILE.set(want, want).is_ok() {
        return want;
    }
    let target = want.min(hard);
    match rlimit::Resource::NOFILE.set(target, hard) {
        Ok(()) => target,
        Err(_) => soft,
    }
}

/// Resident set size of `pid` in bytes (`VmRSS`), `None` when it cannot
/// be read (process gone, or not Linux).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Sum of [`rss_bytes`] over `pids` (`None` when none can be read).
pub fn total_rss(pids: &[u32]) -> Option<u64> {
    let v: Vec<u64> = pids.iter().filter_map(|p| rss_bytes(*p)).collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// `(ppid, utime + stime in ticks)` of a process.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// CPU ticks used so far by each of `pids` and each of their direct
/// children (Postgres backends are children of the postmaster).
pub fn cpu_ticks(pids: &[u32]) -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    if pids.is_empty() {
        return out;
    }
    for p in pids {
        if let Some((_, t)) = stat(*p) {
            out.insert(*p, t);
        }
    }
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, t)) = stat(pid) {
                if pids.contains(&ppid) {
                    out.insert(pid, t);
                }
            }
        }
    }
    out
}

/// Percent of one core used between two [`cpu_ticks`] samples `secs`
/// apart. A process that appeared in between counts from zero.
pub fn cpu_percent(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    let ticks: u64 = after
        .iter()
        .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum();
    ticks as f64 / CLK_TCK / secs * 100.0
}

/// One core's cumulative times from `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreTimes {
    /// Every field of the core's line summed (the guest fields are
    /// already inside user and nice, so they are left out).
    pub total: u64,
    /// Idle and I/O wait.
    pub idle: u64,
    /// Softirq: packet receive work, among others.
    pub softirq: u64,
    /// Time the hypervisor gave to someone else while this core wanted it.
    pub steal: u64,
}

/// `core`'s times as of now (`None` when `/proc/stat` has no such core).
pub fn core_times(core: usize) -> Option<CoreTimes> {
    parse_core_times(&fs::read_to_string("/proc/stat").ok()?, core)
}

fn parse_core_times(stat: &str, core: usize) -> Option<CoreTimes> {
    let name = format!("cpu{core}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    // user nice system idle iowait irq softirq steal guest guest_nice
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    Some(CoreTimes {
        total: (0..8).map(at).sum(),
        idle: at(3) + at(4),
        softirq: at(6),
        steal: at(7),
    })
}

/// What a core did between two [`core_times`] samples, in percent of its
/// time: busy (neither idle nor stolen), softirq and steal.
pub fn core_share(before: CoreTimes, after: CoreTimes) -> Option<(f64, f64, f64)> {
    let total = after.total.checked_sub(before.total).filter(|t| *t > 0)? as f64;
    let d = |a: u64, b: u64| a.saturating_sub(b) as f64 / total * 100.0;
    let idle = d(after.idle, before.idle);
    let steal = d(after.steal, before.steal);
    Some((
        (100.0 - idle - steal).max(0.0),
        d(after.softirq, before.softirq),
        steal,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 0);
        assert!(cpu_ticks(&[me]).contains_key(&me));
        let before = HashMap::from([(1, 100)]);
        let after = HashMap::from([(1, 150), (2, 50)]);
        assert!((cpu_percent(&before, &after, 2.0) - 50.0).abs() < 1e-9);
    }

    #[test]
    fn reads_a_cores_line_and_shares_its_time() {
        let stat = "cpu  9 9 9 9 9 9 9 9 0 0\n\
                    cpu0 100 0 50 800 20 0 10 20 0 0\n\
                    cpu1 1 1 1 1 1 1 1 1 0 0\n";
        let a = parse_core_times(stat, 0).unwrap();
        assert_eq!(
            a,
            CoreTimes {
                total: 1000,
                idle: 820,
                softirq: 10,
                steal: 20
            }
        );
        assert!(parse_core_times(stat, 2).is_none());
        let b = CoreTimes {
            total: 2000,
            idle: 1120,
            softirq: 110,
            steal: 120,
        };
        // Of 1,000 ticks: 300 idle, 100 stolen, 100 softirq.
        let (busy, softirq, steal) = core_share(a, b).unwrap();
        assert!((busy - 60.0).abs() < 1e-9);
        assert!((softirq - 10.0).abs() < 1e-9);
        assert!((steal - 10.0).abs() < 1e-9);
        assert!(core_times(0).is_some(), "this machine's /proc/stat");
    }
}
