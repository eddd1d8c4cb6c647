//! Resident-set-size measurement on Linux, for benchmarks: the peak RSS growth of a region of
//! work, measured by resetting the kernel's high-water mark (`/proc/self/clear_refs`).

/// RSS and its high-water mark in bytes, from `/proc/self/status` (None off Linux).
fn status() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        let kib: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Starts a measurement: resets the high-water mark to the current RSS.
pub struct RssProbe {
    start: Option<u64>,
}

impl RssProbe {
    pub fn start() -> Self {
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        RssProbe {
            start: if reset { status().map(|(rss, _)| rss) } else { None },
        }
    }

    /// Peak RSS growth since `start`, when the platform allows measuring it.
    pub fn peak_growth(&self) -> Option<u64> {
        let start = self.start?;
        let (_, hwm) = status()?;
        Some(hwm.saturating_sub(start))
    }
}
