//! What the examples share.

/// CPU time of this process so far (user + system), in seconds, from /proc/self/stat (100 ticks per second; 0 where
/// there is no /proc).
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) are space-separated; utime and stime are the 14th and
    // 15th of the whole line, the 12th and 13th after the name.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / 100.0
}

/// Context switches of this process so far (voluntary and involuntary, every thread's), from /proc/self/task (0
/// where there is none): about the number of times a thread went to sleep and was woken.
#[allow(dead_code)]
pub fn context_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    let mut n = 0;
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                n += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    n
}
