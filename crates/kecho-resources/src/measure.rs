//! Host measurement: cores, CPU use, load, memory, disk space, network throughput and GPUs, read from `/proc`,
//! `statvfs` and `/sys`. What cannot be read here is reported by name as unknown, never guessed. Rates (CPU use,
//! network) need two samples, so they are unknown on the first.

use std::path::{Path, PathBuf};
use std::time::Instant;

use kecho::Attrs;

/// One measurement: attributes named `host_*`, and the names of those that could not be read.
#[derive(Debug, Clone, Default)]
pub struct HostSample {
    /// What was measured.
    pub attrs: Attrs,
    /// What could not be, by attribute name.
    pub unknown: Vec<String>,
}

impl HostSample {
    fn put(&mut self, name: &str, v: Option<kecho::Value>) {
        match v {
            Some(v) => self.attrs.set(name, v),
            None => self.unknown.push(name.to_owned()),
        }
    }
    /// An integer attribute, if measured.
    pub fn int(&self, name: &str) -> Option<u64> {
        match self.attrs.get(name)? {
            kecho::Value::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
}

/// Measures one host; keeps the previous counters for rates.
#[derive(Debug)]
pub struct Measurer {
    proc_root: PathBuf,
    sys_root: PathBuf,
    disk: PathBuf,
    cpu: Option<(u64, u64)>,
    net: Option<(Instant, u64, u64)>,
}

impl Default for Measurer {
    fn default() -> Self {
        Measurer::new("/proc", "/sys", "/")
    }
}

impl Measurer {
    /// Reads `proc_root` (normally `/proc`), `sys_root` (`/sys`) and the file system holding `disk`.
    pub fn new(proc_root: impl Into<PathBuf>, sys_root: impl Into<PathBuf>, disk: impl Into<PathBuf>) -> Self {
        Measurer { proc_root: proc_root.into(), sys_root: sys_root.into(), disk: disk.into(), cpu: None, net: None }
    }

    /// Takes a sample at `now`.
    pub fn sample(&mut self, now: Instant) -> HostSample {
        let mut s = HostSample::default();
        let int = |v: Option<u64>| v.and_then(|v| i64::try_from(v).ok()).map(kecho::Value::Int);
        let float = |v: Option<f64>| v.map(kecho::Value::Float);

        s.put("host_cores", int(cores(&self.proc_root)));
        let cpu = read(&self.proc_root.join("stat")).and_then(|t| cpu_counters(&t));
        let use_ = match (self.cpu, cpu) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some((b1.saturating_sub(b0)) as f64 / (t1 - t0) as f64),
            _ => None,
        };
        self.cpu = cpu;
        s.put("host_cpu_use", float(use_));
        s.put(
            "host_load1",
            float(read(&self.proc_root.join("loadavg")).and_then(|t| t.split_whitespace().next()?.parse().ok())),
        );
        let mem = read(&self.proc_root.join("meminfo"));
        s.put("host_mem_total", int(mem.as_deref().and_then(|m| meminfo(m, "MemTotal:"))));
        s.put("host_mem_avail", int(mem.as_deref().and_then(|m| meminfo(m, "MemAvailable:"))));
        let disk = rustix::fs::statvfs(&self.disk).ok();
        s.put("host_disk_total", int(disk.as_ref().map(|d| d.f_blocks.saturating_mul(d.f_frsize))));
        s.put("host_disk_free", int(disk.as_ref().map(|d| d.f_bavail.saturating_mul(d.f_frsize))));
        let net = read(&self.proc_root.join("net/dev")).and_then(|t| net_bytes(&t));
        let rates = match (self.net, net) {
            (Some((t0, rx0, tx0)), Some((rx1, tx1))) if now > t0 => {
                let secs = now.duration_since(t0).as_secs_f64();
                Some((rx1.saturating_sub(rx0) as f64 / secs, tx1.saturating_sub(tx0) as f64 / secs))
            }
            _ => None,
        };
        self.net = net.map(|(rx, tx)| (now, rx, tx));
        s.put("host_net_rx_bps", float(rates.map(|r| r.0 * 8.0)));
        s.put("host_net_tx_bps", float(rates.map(|r| r.1 * 8.0)));
        s.put("host_gpus", int(gpus(&self.sys_root, &self.proc_root)));
        s
    }
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

fn cores(proc_root: &Path) -> Option<u64> {
    let n = read(&proc_root.join("cpuinfo"))?.lines().filter(|l| l.starts_with("processor")).count();
    (n > 0).then_some(n as u64)
}

/// (busy, total) jiffies from the first line of /proc/stat.
fn cpu_counters(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?;
    let mut it = line.split_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = it.map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn meminfo(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Received and sent bytes over every interface but loopback.
fn net_bytes(dev: &str) -> Option<(u64, u64)> {
    let mut rx = 0u64;
    let mut tx = 0u64;
    let mut any = false;
    for line in dev.lines().skip(2) {
        let (name, rest) = line.split_once(':')?;
        if name.trim() == "lo" {
            continue;
        }
        let f: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if f.len() < 16 {
            return None;
        }
        rx = rx.saturating_add(f[0]);
        tx = tx.saturating_add(f[8]);
        any = true;
    }
    any.then_some((rx, tx))
}

/// GPUs: NVIDIA's driver lists them in /proc/driver/nvidia/gpus; otherwise display-class PCI devices of the DRM
/// subsystem (`/sys/class/drm/cardN`). Unknown when neither can be read.
fn gpus(sys_root: &Path, proc_root: &Path) -> Option<u64> {
    if let Ok(d) = std::fs::read_dir(proc_root.join("driver/nvidia/gpus")) {
        return Some(d.count() as u64);
    }
    let d = std::fs::read_dir(sys_root.join("class/drm")).ok()?;
    let n = d
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("card").is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
                && e.path().join("device").exists()
        })
        .count();
    Some(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn nothing_readable_means_everything_unknown() {
        let dir = std::env::temp_dir().join(format!("kecho-res-empty-{}", std::process::id()));
        let mut m = Measurer::new(dir.join("proc"), dir.join("sys"), dir.join("disk"));
        let s = m.sample(Instant::now());
        assert!(s.attrs.is_empty(), "{:?}", s.attrs);
        assert_eq!(s.unknown.len(), 10);
    }

    #[test]
    fn reads_a_proc_tree_and_rates_need_two_samples() {
        let dir = std::env::temp_dir().join(format!("kecho-res-proc-{}", std::process::id()));
        let p = dir.join("proc");
        std::fs::create_dir_all(p.join("net")).unwrap();
        std::fs::write(p.join("cpuinfo"), "processor\t: 0\nprocessor\t: 1\n").unwrap();
        std::fs::write(p.join("stat"), "cpu  100 0 100 800 0 0 0 0 0 0\n").unwrap();
        std::fs::write(p.join("loadavg"), "0.50 0.40 0.30 1/100 42\n").unwrap();
        std::fs::write(p.join("meminfo"), "MemTotal:       1000 kB\nMemFree: 10 kB\nMemAvailable:    500 kB\n")
            .unwrap();
        let dev = "Inter-|\n face |\n    lo: 999 0 0 0 0 0 0 0 999 0 0 0 0 0 0 0\n  eth0: 1000 0 0 0 0 0 0 0 2000 0 0 0 0 0 0 0\n";
        std::fs::write(p.join("net/dev"), dev).unwrap();
        let mut m = Measurer::new(&p, dir.join("sys"), &dir);
        let t0 = Instant::now();
        let s = m.sample(t0);
        assert_eq!(s.int("host_cores"), Some(2));
        assert_eq!(s.int("host_mem_total"), Some(1_024_000));
        assert_eq!(s.int("host_mem_avail"), Some(512_000));
        assert_eq!(s.attrs.get("host_load1"), Some(&kecho::Value::Float(0.5)));
        assert!(s.int("host_disk_total").is_some());
        assert!(s.unknown.contains(&"host_cpu_use".to_string()));
        assert!(s.unknown.contains(&"host_net_rx_bps".to_string()));
        assert!(s.unknown.contains(&"host_gpus".to_string()));
        std::fs::write(p.join("stat"), "cpu  200 0 200 1400 0 0 0 0 0 0\n").unwrap();
        std::fs::write(p.join("net/dev"), dev.replace("1000 0", "2000 0")).unwrap();
        let s = m.sample(t0 + Duration::from_secs(1));
        assert_eq!(s.attrs.get("host_cpu_use"), Some(&kecho::Value::Float(0.25)));
        assert_eq!(s.attrs.get("host_net_rx_bps"), Some(&kecho::Value::Float(8000.0)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn this_host() {
        // On Linux the basics are readable; whatever is not must be listed as unknown, never both or neither.
        let mut m = Measurer::default();
        let s = m.sample(Instant::now());
        for name in ["host_cores", "host_mem_total", "host_gpus", "host_cpu_use"] {
            assert!(s.attrs.get(name).is_some() != s.unknown.iter().any(|u| u == name), "{name}");
        }
    }
}
