//! SVG plots of a run: latency CDFs per system, submission cost against the number of sinks, throughput against the
//! payload size. Drawn from the sections' JSON figures, so a plot shows exactly what was recorded. The SVG back-end
//! writes text as `<text>` elements, so no font files or system libraries are needed.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde_json::Value;

use crate::report::Section;

const PALETTE: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// One line of a plot.
struct Line {
    label: String,
    points: Vec<(f64, f64)>,
}

/// Draws every plot the sections have data for; returns the files written.
pub fn draw(sections: &[Section], dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for s in sections {
        match s.workload.as_str() {
            "latency" => {
                for size in [100u64, 1024] {
                    let lines = latency_lines(&s.data, size);
                    if lines.is_empty() {
                        continue;
                    }
                    let path = dir.join(format!("latency-cdf-{size}B.svg"));
                    let title = format!("one-way and ping-pong latency, {size} B: CDF");
                    plot(&path, &title, "latency (us, log)", "fraction of messages", true, &lines, Some((0.0, 1.0)))?;
                    written.push(path);
                }
            }
            "submit" => {
                let lines = submit_lines(&s.data);
                if !lines.is_empty() {
                    let path = dir.join("submit-cost.svg");
                    let title = "source CPU time per event vs number of sinks (Fig. 6)";
                    plot(&path, title, "sinks", "CPU time per event (us)", false, &lines, None)?;
                    written.push(path);
                }
            }
            "throughput" => {
                let lines = throughput_lines(&s.data);
                if !lines.is_empty() {
                    let path = dir.join("throughput.svg");
                    let title = "throughput 1->1 vs payload size";
                    plot(&path, title, "payload bytes (log)", "MB/s (payload)", true, &lines, None)?;
                    written.push(path);
                }
            }
            "flows" => {
                for (size, lines) in flows_round_lines(&s.data) {
                    let path = dir.join(format!("flows-decrypt-{size}B.svg"));
                    let title = format!("TCP -> decrypt -> file, {size} B records: records/s per alternating round");
                    plot(&path, &title, "round", "records/s", false, &lines, None)?;
                    written.push(path);
                }
                for (direction, lines) in flows_move_lines(&s.data) {
                    let path = dir.join(format!("flows-move-{}.svg", direction.replace(" -> ", "-to-")));
                    let title = format!("pure move {direction}: CPU seconds per GB vs size");
                    plot(&path, &title, "bytes moved (log)", "CPU s/GB", true, &lines, None)?;
                    written.push(path);
                }
            }
            "resources" => {
                let lines = placement_lines(&s.data);
                if !lines.is_empty() {
                    let path = dir.join("resources-placement-cdf.svg");
                    let title = "placement latency, 32 agents, 16 requesters: CDF";
                    plot(
                        &path,
                        title,
                        "request to confirmed reservation (ms, log)",
                        "fraction of placements",
                        true,
                        &lines,
                        Some((0.0, 1.0)),
                    )?;
                    written.push(path);
                }
            }
            _ => {}
        }
    }
    Ok(written)
}

/// Lines of `rows` (objects) grouped by the string field `group` and then `label`, points (`x`, `y`).
fn grouped(rows: &[Value], group: &str, label: &str, x: &str, y: &str) -> Vec<(String, Vec<Line>)> {
    let mut out: Vec<(String, Vec<Line>)> = Vec::new();
    for r in rows {
        let (Some(g), Some(l), Some(px), Some(py)) = (
            r[group].as_str().map(str::to_owned).or_else(|| r[group].as_u64().map(|v| v.to_string())),
            r[label].as_str(),
            r[x].as_f64(),
            r[y].as_f64(),
        ) else {
            continue;
        };
        let gi = match out.iter().position(|(k, _)| *k == g) {
            Some(i) => i,
            None => {
                out.push((g, Vec::new()));
                out.len() - 1
            }
        };
        let lines = &mut out[gi].1;
        match lines.iter_mut().find(|line| line.label == l) {
            Some(line) => line.points.push((px, py)),
            None => lines.push(Line { label: l.to_owned(), points: vec![(px, py)] }),
        }
    }
    out
}

fn flows_round_lines(data: &Value) -> Vec<(String, Vec<Line>)> {
    let rows = data.get("decrypt_rounds").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    grouped(rows, "size", "program", "round", "records_per_s")
}

fn flows_move_lines(data: &Value) -> Vec<(String, Vec<Line>)> {
    let rows = data.get("moves").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    grouped(rows, "direction", "program", "size", "cpu_s_per_gb")
}

/// The placement latency CDFs of the resources workload's traces (`trace_base`: baseline settings, `trace_32`:
/// current settings), in milliseconds.
fn placement_lines(data: &Value) -> Vec<Line> {
    let mut lines = Vec::new();
    for (key, label) in [("trace_base", "baseline settings"), ("trace_32", "current settings")] {
        let mut ms: Vec<f64> = data[key]
            .as_array()
            .map(|t| t.iter().filter_map(|r| r["latency"].as_f64()).map(|s| (s * 1e3).max(1e-3)).collect())
            .unwrap_or_default();
        if ms.is_empty() {
            continue;
        }
        ms.sort_by(f64::total_cmp);
        let n = ms.len() as f64;
        // At most 500 points: every k-th sorted latency with its rank.
        let step = (ms.len() / 500).max(1);
        let mut points: Vec<(f64, f64)> =
            ms.iter().enumerate().step_by(step).map(|(i, v)| (*v, (i + 1) as f64 / n)).collect();
        if let Some(last) = ms.last() {
            points.push((*last, 1.0));
        }
        lines.push(Line { label: label.to_owned(), points });
    }
    lines
}

fn rows(data: &Value) -> &[Value] {
    data.get("rows").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

fn latency_lines(data: &Value, size: u64) -> Vec<Line> {
    let mut lines = Vec::new();
    for r in rows(data) {
        if r["size"].as_u64() != Some(size) {
            continue;
        }
        let points: Vec<(f64, f64)> = r["cdf"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((p.get(0)?.as_f64()? / 1e3, p.get(1)?.as_f64()?)))
                    .filter(|(x, _)| *x > 0.0)
                    .collect()
            })
            .unwrap_or_default();
        if !points.is_empty() {
            let label = format!("{} {}", r["system"].as_str().unwrap_or("?"), r["mode"].as_str().unwrap_or("?"));
            lines.push(Line { label, points });
        }
    }
    lines
}

fn submit_lines(data: &Value) -> Vec<Line> {
    let mut lines = Vec::new();
    for size in [100u64, 1024] {
        for (key, what) in [("node_ns", "source node"), ("call_ns", "submit call")] {
            let points: Vec<(f64, f64)> = rows(data)
                .iter()
                .filter(|r| r["size"].as_u64() == Some(size))
                .filter_map(|r| Some((r["sinks"].as_f64()?, r["cost"][key].as_f64()? / 1e3)))
                .collect();
            if !points.is_empty() {
                lines.push(Line { label: format!("{size} B, {what}"), points });
            }
        }
        let raw: Vec<(f64, f64)> = rows(data)
            .iter()
            .filter(|r| r["size"].as_u64() == Some(size))
            .filter_map(|r| Some((r["sinks"].as_f64()?, r["raw_ns"].as_f64()? / 1e3)))
            .collect();
        if !raw.is_empty() {
            lines.push(Line { label: format!("{size} B, raw TCP writer"), points: raw });
        }
    }
    lines
}

fn throughput_lines(data: &Value) -> Vec<Line> {
    let mut systems: Vec<String> = Vec::new();
    for r in rows(data) {
        if let Some(s) = r["system"].as_str() {
            if !systems.iter().any(|x| x == s) {
                systems.push(s.to_owned());
            }
        }
    }
    systems
        .into_iter()
        .map(|sys| {
            let points = rows(data)
                .iter()
                .filter(|r| r["system"].as_str() == Some(&sys) && r["shape"].as_str() == Some("1->1"))
                .filter_map(|r| Some((r["size"].as_f64()?, r["mb_per_sec"].as_f64()?)))
                .collect();
            Line { label: sys, points }
        })
        .filter(|l| !l.points.is_empty())
        .collect()
}

fn plot(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    log_x: bool,
    lines: &[Line],
    y_range: Option<(f64, f64)>,
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (x_min, x_max) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let y_max = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)).fold(0.0f64, f64::max);
    let (y0, y1) = y_range.unwrap_or((0.0, (y_max * 1.1).max(1e-9)));
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder.caption(title, ("sans-serif", 20)).margin(15).x_label_area_size(45).y_label_area_size(65);
    // Two coordinate types (log and linear x) make two chart types, hence the macro-like duplication.
    if log_x {
        let (lo, hi) = (x_min.max(1e-3) * 0.8, (x_max * 1.25).max(x_min * 2.0));
        let mut chart = builder.build_cartesian_2d((lo..hi).log_scale(), y0..y1).map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(|e| err(&e))?;
        for (i, l) in lines.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(l.points.iter().copied(), c.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(&l.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    } else {
        let mut chart = builder.build_cartesian_2d(x_min..x_max, y0..y1).map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(|e| err(&e))?;
        for (i, l) in lines.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(l.points.iter().copied(), c.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(&l.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            chart.draw_series(l.points.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
