//! CPU time and memory of a process, from /proc (Linux only): for the
//! edge's own stats endpoint and for `throng load` measuring an edge.

use std::sync::OnceLock;

use thiserror::Error;

/// A /proc file could not be read or parsed.
#[derive(Debug, Error)]
#[error("{path}: {reason}")]
pub struct ProcError {
    pub path: String,
    pub reason: String,
}

type Result<T, E = ProcError> = std::result::Result<T, E>;

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| ProcError {
        path: path.to_owned(),
        reason: format!("cannot read: {e}"),
    })
}

fn parsed<T>(path: &str, r: std::result::Result<T, String>) -> Result<T> {
    r.map_err(|reason| ProcError {
        path: path.to_owned(),
        reason: format!("unexpected format: {reason}"),
    })
}

/// Clock ticks per second of /proc/<pid>/stat times. Read once from
/// `getconf CLK_TCK` because the workspace forbids the unsafe sysconf call.
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t: &u64| t > 0)
            // Linux has used 100 on every common architecture for decades.
            .unwrap_or(100)
    })
}

/// utime + stime of `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let (utime, stime) = parsed(&path, parse_stat(&read(&path)?))?;
    Ok((utime + stime) as f64 / clock_ticks() as f64)
}

/// Fields 14 and 15 (utime, stime). The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(text: &str) -> Result<(u64, u64), String> {
    let after = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or("no `)` after the name")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so field n is fields[n - 3].
    let field = |n: usize| -> Result<u64, String> {
        let f = fields.get(n - 3).ok_or_else(|| format!("no field {n}"))?;
        f.parse().map_err(|_| format!("field {n} is `{f}`"))
    };
    Ok((field(14)?, field(15)?))
}

/// CPU seconds the whole machine spent busy (all CPUs, /proc/stat), so a
/// run can tell how much of the machine other processes took meanwhile.
pub fn machine_busy_seconds() -> Result<f64> {
    let ticks = parsed("/proc/stat", parse_machine_busy(&read("/proc/stat")?))?;
    Ok(ticks as f64 / clock_ticks() as f64)
}

/// user + nice + system + irq + softirq + steal of the `cpu` line: idle
/// and iowait are not busy.
fn parse_machine_busy(text: &str) -> Result<u64, String> {
    let line = text.lines().find(|l| l.starts_with("cpu ")).ok_or("no `cpu` line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().map_err(|_| format!("`{f}` is not a number")))
        .collect::<Result<_, _>>()?;
    if fields.len() < 8 {
        return Err(format!("the cpu line has {} fields, expected at least 8", fields.len()));
    }
    Ok(fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7])
}

/// Resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub rss_kib: u64,
    /// Peak resident memory since the process started (VmHWM).
    pub hwm_kib: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    parsed(&path, parse_status(&read(&path)?))
}

fn parse_status(text: &str) -> Result<Memory, String> {
    let kib = |key: &str| -> Result<u64, String> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .ok_or_else(|| format!("no {key}"))?;
        let Some(n) = line.trim().strip_suffix("kB") else {
            return Err(format!("{key} is not in kB: `{line}`"));
        };
        n.trim().parse().map_err(|_| format!("{key} is `{line}`"))
    };
    Ok(Memory {
        rss_kib: kib("VmRSS:")?,
        hwm_kib: kib("VmHWM:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 3 0 99 1000 50";
        assert_eq!(parse_stat(line).expect("parses"), (1234, 567));
        assert!(parse_stat("4242 (x) S 1").is_err());
    }

    #[test]
    fn status_gives_rss_and_peak() {
        let text = "Name:\tthrong\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(
            parse_status(text).expect("parses"),
            Memory {
                rss_kib: 10240,
                hwm_kib: 20480
            }
        );
        assert!(parse_status("Name:\tx\n").is_err());
    }

    #[test]
    fn machine_busy_skips_idle_and_iowait() {
        let text = "cpu  10 1 5 1000 50 2 3 4 0 0\ncpu0 5 0 2 500 25 1 1 2 0 0\n";
        assert_eq!(parse_machine_busy(text).expect("parses"), 10 + 1 + 5 + 2 + 3 + 4);
        assert!(parse_machine_busy("cpu  1 2 3\n").is_err());
        assert!(machine_busy_seconds().expect("this machine's /proc/stat") > 0.0);
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(cpu_seconds(me).expect("own stat") >= 0.0);
        assert!(memory(me).expect("own status").rss_kib > 0);
    }
}
