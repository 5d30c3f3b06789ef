//! `kecho bench flows` once with tiny counts: every part runs, the byte counts agree (the bench checks them), the
//! tables are well-formed, the rounds and moves are recorded for the plots, and the plots are drawn. Nothing here
//! looks at a timing.

use kecho_bench::{run_sections, BenchArgs, Workload};

#[test]
fn the_flows_bench_runs_every_part() {
    let out = std::env::temp_dir().join(format!("kecho-bench-flows-smoke-{}", std::process::id()));
    let args = BenchArgs { workload: Workload::Flows, scale: 1e-6, out: out.clone(), ..BenchArgs::default() };
    let sections = run_sections(&args).expect("the flows bench runs");
    let s = sections.iter().find(|s| s.workload == "flows").expect("a flows section");
    let titles: Vec<&str> = s.tables.iter().map(|t| t.title.as_str()).collect();
    for part in ["machine limits", "decrypt ->", "replicated", "pure move"] {
        assert!(titles.iter().any(|t| t.contains(part)), "no {part} table in {titles:?}");
    }
    for t in &s.tables {
        assert!(!t.rows.is_empty(), "{}: no rows", t.title);
        for r in &t.rows {
            assert_eq!(r.len(), t.columns.len(), "{}: {r:?}", t.title);
        }
    }
    // The targets are all recorded (met or not).
    assert_eq!(s.checks.len(), 4, "{:?}", s.checks);
    let rounds = s.data["decrypt_rounds"].as_array().expect("rounds");
    // One round at this scale: memory-centric and two flows, at 64 B and 1 KB.
    assert_eq!(rounds.len(), 6, "{rounds:?}");
    assert!(s.data["moves"].as_array().is_some_and(|m| m.len() >= 8), "{:?}", s.data["moves"]);
    // The pure moves are repeated: the table says how many rounds each median is of.
    let moves = s.tables.iter().find(|t| t.title.contains("pure move")).expect("a pure move table");
    let rounds = moves.columns.iter().position(|c| c == "rounds").expect("a rounds column");
    assert!(moves.rows.iter().all(|r| r[rounds].parse::<u32>().is_ok_and(|n| n >= 1)), "{:?}", moves.rows);
    for plot in ["flows-decrypt-64B.svg", "flows-decrypt-1024B.svg", "flows-move-socket-to-file.svg"] {
        assert!(out.join(plot).exists(), "{plot} not drawn");
    }
    let _ = std::fs::remove_dir_all(&out);
}
