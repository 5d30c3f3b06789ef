//! Results: Markdown tables on standard output and the same figures as JSON.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One Markdown table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Table {
    /// Printed above the table.
    pub title: String,
    /// Column headers.
    pub columns: Vec<String>,
    /// Rows of formatted cells, one per column.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns and no rows yet.
    pub fn new(title: impl Into<String>, columns: &[&str]) -> Self {
        Table { title: title.into(), columns: columns.iter().map(|c| (*c).to_owned()).collect(), rows: Vec::new() }
    }

    /// Adds a row. A row that does not fit the columns is a bug in the workload: debug builds (the smoke test)
    /// stop on it; release builds pad or cut it so that the Markdown stays well-formed.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.columns.len(), "row {cells:?} for columns {:?}", self.columns);
        let mut cells = cells;
        cells.resize(self.columns.len(), String::new());
        self.rows.push(cells);
    }

    /// The table as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n| {} |\n|", self.title, self.columns.join(" | "));
        for _ in &self.columns {
            s.push_str("---|");
        }
        s.push('\n');
        for r in &self.rows {
            s.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        s
    }
}

/// A target from the benchmark issue, checked against a figure measured in this run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Check {
    /// What the target is about, e.g. "one-way p50 / raw TCP".
    pub target: String,
    /// The measured value.
    pub value: f64,
    /// The limit.
    pub limit: f64,
    /// True if a larger value is better (throughput), false if a smaller one is (latency, cost).
    pub higher_is_better: bool,
    /// Unit of value and limit.
    pub unit: String,
}

impl Check {
    /// A target that the value must not exceed.
    pub fn at_most(target: impl Into<String>, value: f64, limit: f64, unit: &str) -> Self {
        Check { target: target.into(), value, limit, higher_is_better: false, unit: unit.to_owned() }
    }

    /// A target that the value must reach.
    pub fn at_least(target: impl Into<String>, value: f64, limit: f64, unit: &str) -> Self {
        Check { target: target.into(), value, limit, higher_is_better: true, unit: unit.to_owned() }
    }

    /// Whether the target is met.
    pub fn met(&self) -> bool {
        if self.higher_is_better {
            self.value >= self.limit
        } else {
            self.value <= self.limit
        }
    }

    /// How far off the target is, as a factor (1.0 = exactly at the limit; above 1 = missed by that factor).
    pub fn miss_factor(&self) -> f64 {
        if self.higher_is_better {
            self.limit / self.value
        } else {
            self.value / self.limit
        }
    }
}

/// Everything one workload measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Section {
    /// The workload's name.
    pub workload: String,
    /// The machine and its load when the workload started.
    pub machine: Machine,
    /// The tables, as printed.
    pub tables: Vec<Table>,
    /// The raw figures (numbers, not formatted), for plots and comparisons across runs.
    pub data: serde_json::Value,
    /// Targets checked.
    pub checks: Vec<Check>,
    /// Remarks printed under the tables (e.g. a peer that could not run).
    pub notes: Vec<String>,
}

impl Section {
    /// An empty section for a workload.
    pub fn new(workload: &str) -> Self {
        Section {
            workload: workload.to_owned(),
            machine: Machine::now(),
            tables: Vec::new(),
            data: serde_json::Value::Object(serde_json::Map::new()),
            checks: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Stores a raw figure under `key`.
    pub fn put(&mut self, key: &str, value: impl Serialize) {
        let v = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        if let serde_json::Value::Object(m) = &mut self.data {
            m.insert(key.to_owned(), v);
        }
    }

    /// Prints the tables, checks and notes as Markdown.
    pub fn print(&self) {
        println!("\n## {}\n", self.workload);
        for t in &self.tables {
            println!("{}", t.markdown());
        }
        if !self.checks.is_empty() {
            println!("{}", checks_table("targets", &self.checks).markdown());
        }
        for n in &self.notes {
            println!("- {n}");
        }
    }

    /// Writes `<dir>/<workload>.json`.
    pub fn write_json(&self, dir: &Path) -> Result<()> {
        let path = dir.join(format!("{}.json", self.workload));
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }
}

/// The machine, for the record: results drift with load on a shared machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Kernel release.
    pub kernel: String,
    /// The 1-minute load average when the workload started.
    pub load1: f64,
    /// Seconds since the Unix epoch when the workload started.
    pub unix_time: u64,
}

impl Machine {
    /// The machine as it is now.
    pub fn now() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let load1 = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
            .unwrap_or(f64::NAN);
        Machine {
            cpu,
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
            load1,
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

/// One line describing the machine, printed at the start of a run.
pub fn machine_line() -> String {
    let m = Machine::now();
    format!("# kecho bench: {} x {}, Linux {}, load average {:.2}", m.cpus, m.cpu, m.kernel, m.load1)
}

fn checks_table(title: &str, checks: &[Check]) -> Table {
    let mut t = Table::new(title, &["target", "measured", "limit", "met"]);
    for c in checks {
        let verdict = if c.met() { "yes".to_owned() } else { format!("no ({:.2}x off)", c.miss_factor()) };
        t.row(vec![
            c.target.clone(),
            format!("{} {}", fmt_num(c.value), c.unit),
            format!("{} {} {}", if c.higher_is_better { ">=" } else { "<=" }, fmt_num(c.limit), c.unit),
            verdict,
        ]);
    }
    t
}

/// Every check of a run in one section.
pub fn targets_section(sections: &[Section]) -> Section {
    let mut s = Section::new("targets");
    let checks: Vec<Check> = sections.iter().flat_map(|x| x.checks.iter().cloned()).collect();
    s.tables.push(checks_table("all targets of this run", &checks));
    s.put("met", checks.iter().filter(|c| c.met()).count());
    s.put("missed", checks.iter().filter(|c| !c.met()).count());
    s.put("checks", &checks);
    s
}

/// A number with about three significant digits.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let a = x.abs();
    if a >= 1e6 {
        format!("{:.3} M", x / 1e6)
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// Nanoseconds as a readable duration.
pub fn fmt_ns(ns: f64) -> String {
    if !ns.is_finite() {
        "n/a".into()
    } else if ns < 0.0 {
        // A difference of latencies (an added latency) may be negative.
        format!("-{}", fmt_ns(-ns))
    } else if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} us", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

/// A ratio, e.g. "1.32x".
pub fn fmt_ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}x")
    } else {
        "n/a".into()
    }
}
