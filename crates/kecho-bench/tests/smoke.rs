//! Every workload once with tiny counts: the suite keeps working, loses no event and writes what it prints. Nothing
//! here looks at a timing.

use std::path::{Path, PathBuf};

use kecho_bench::{run_sections, BenchArgs, Section, Workload};

fn args(out: &Path) -> BenchArgs {
    BenchArgs {
        workload: Workload::All,
        // Every count falls to its floor (5 to 100 events or repetitions).
        scale: 1e-6,
        out: out.to_owned(),
        no_plots: false,
        no_peers: false,
        child_timeout: 60,
        // Child processes (strace/perf runs, the memory probe) need the suite's binary, not this test harness.
        exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_kecho-bench"))),
        child: None,
    }
}

/// One section: its tables are well-formed and non-empty, its JSON file reads back equal, and no loss check failed.
fn check(s: &Section, out: &Path) {
    let name = &s.workload;
    let untraceable = name == "syscalls" && s.notes.iter().any(|n| n.contains("not counted"));
    if !untraceable {
        assert!(!s.tables.is_empty(), "{name}: no table");
    }
    for t in &s.tables {
        assert!(!t.rows.is_empty(), "{name}: table {:?} has no rows", t.title);
        for r in &t.rows {
            assert_eq!(r.len(), t.columns.len(), "{name}: row {r:?} does not fit {:?}", t.columns);
            assert!(r.iter().all(|c| !c.contains('|')), "{name}: a cell would break the Markdown: {r:?}");
        }
        assert_eq!(t.markdown().lines().count(), 4 + t.rows.len(), "{name}: Markdown lines");
    }
    for c in &s.checks {
        if c.target.contains("lost") {
            assert!(c.met(), "{name}: {} = {}", c.target, c.value);
        }
    }
    let text = std::fs::read_to_string(out.join(format!("{name}.json"))).expect("JSON written");
    let back: Section = serde_json::from_str(&text).expect("JSON parses");
    assert_eq!(back.tables, s.tables, "{name}: JSON tables differ from the printed ones");
}

#[test]
fn every_workload_runs_and_loses_nothing() {
    let out = std::env::temp_dir().join(format!("kecho-bench-smoke-{}", std::process::id()));
    let sections = run_sections(&args(&out)).expect("the suite runs");
    let names: Vec<&str> = sections.iter().map(|s| s.workload.as_str()).collect();
    for w in Workload::EACH {
        assert!(names.contains(&w.name()), "{} missing from {names:?}", w.name());
    }
    assert!(names.contains(&"targets"), "no targets section");
    for s in &sections {
        check(s, &out);
    }
    // kecho's own rows in the throughput table: every expected event arrived.
    let tp = sections.iter().find(|s| s.workload == "throughput").expect("throughput");
    let rows = tp.data["rows"].as_array().expect("throughput rows");
    assert_eq!(rows.iter().filter(|r| r["system"] == "kecho").count(), 9, "3 shapes x 3 sizes");
    for r in rows.iter().filter(|r| r["system"] == "kecho") {
        assert_eq!(r["lost"], 0, "{r}");
        assert_eq!(r["received"], r["expected"], "{r}");
    }
    for plot in ["latency-cdf-100B.svg", "submit-cost.svg", "throughput.svg"] {
        let svg = std::fs::read_to_string(out.join(plot)).expect("plot written");
        assert!(svg.contains("<svg") && svg.contains("<polyline"), "{plot} has no line");
    }
    let _ = std::fs::remove_dir_all(&out);
}
