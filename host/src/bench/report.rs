//! The text table of a run, the ratios between systems, and the plots.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Point, Report, Workload};

/// The results as a text table, then the ratios between systems.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let header = [
        "system",
        "workload",
        "clients",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "conflicts",
        "errors",
        "cpu us/op",
        "guest us/op",
        "host us/op",
        "fsync/op",
        "commit us/op",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let opt = |v: Option<f64>, digits: usize| {
        v.map(|v| format!("{v:.digits$}"))
            .unwrap_or_else(|| "-".into())
    };
    for p in &report.points {
        let b = p.breakdown.as_ref();
        rows.push(vec![
            p.system.clone(),
            p.workload.name().into(),
            p.clients.to_string(),
            format!("{:.0}", p.ops_per_sec),
            format!("{:.2}", p.p50_ms),
            format!("{:.2}", p.p99_ms),
            format!("{:.1}", p.max_ms),
            p.conflicts.to_string(),
            p.errors.to_string(),
            opt(p.server_cpu_us_per_op, 0),
            opt(b.map(|b| b.guest_us_per_op), 1),
            opt(b.map(|b| b.host_cpu_us_per_op), 0),
            opt(b.map(|b| b.fsyncs_per_op), 2),
            opt(b.map(|b| b.storage_us_per_op), 0),
        ]);
    }
    out.push_str(&render(&rows));
    // Ratios against the other systems measured in the same run.
    let mut by: BTreeMap<(Workload, usize), Vec<&Point>> = BTreeMap::new();
    for p in &report.points {
        by.entry((p.workload, p.clients)).or_default().push(p);
    }
    let mut ratios: Vec<Vec<String>> = vec![vec![
        "workload".into(),
        "clients".into(),
        "ratio".into(),
        "throughput".into(),
        "p50".into(),
        "p99".into(),
    ]];
    for ((workload, clients), points) in &by {
        let find = |name: &str| points.iter().find(|p| p.system == name);
        let pairs = [
            ("ballot-wasm", "etcd"),
            ("ballot-native", "etcd"),
            ("ballot-wasm", "ballot-native"),
        ];
        for (a, b) in pairs {
            if let (Some(a), Some(b)) = (find(a), find(b)) {
                let div = |x: f64, y: f64| {
                    if y > 0.0 {
                        format!("{:.2}", x / y)
                    } else {
                        "-".into()
                    }
                };
                ratios.push(vec![
                    workload.name().into(),
                    clients.to_string(),
                    format!("{}/{}", a.system, b.system),
                    div(a.ops_per_sec, b.ops_per_sec),
                    div(a.p50_ms, b.p50_ms),
                    div(a.p99_ms, b.p99_ms),
                ]);
            }
        }
    }
    if ratios.len() > 1 {
        out.push('\n');
        out.push_str(&render(&ratios));
    }
    let goals = goals(report);
    if goals.len() > 1 {
        out.push('\n');
        out.push_str(&render(&goals));
    }
    out
}

/// What Ballot aims for against etcd on these machines, as ratios measured
/// in the same run: (workload, clients, measure, target, whether the
/// ratio of each Ballot build to etcd must be at least or at most it).
const GOALS: [(Workload, usize, Measure, f64, bool); 5] = [
    (Workload::Put, 16, Measure::Throughput, 2.0, true),
    (Workload::Put, 16, Measure::P99, 1.0, false),
    (Workload::Spread, 64, Measure::Throughput, 2.0, true),
    (Workload::Spread, 64, Measure::P99, 1.5, false),
    (Workload::Create, 64, Measure::Throughput, 3.0, true),
];

#[derive(Clone, Copy)]
enum Measure {
    Throughput,
    P50,
    P99,
}

impl Measure {
    fn of(self, p: &Point) -> f64 {
        match self {
            Measure::Throughput => p.ops_per_sec,
            Measure::P50 => p.p50_ms,
            Measure::P99 => p.p99_ms,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Measure::Throughput => "throughput",
            Measure::P50 => "p50",
            Measure::P99 => "p99",
        }
    }
}

/// The goals table: each goal whose points were measured, the ratio, and
/// whether it is met (or by what factor it is missed); then wasm against
/// native on every workload, and client-visible errors.
fn goals(report: &Report) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "goal".to_string(),
        "clients".into(),
        "measure".into(),
        "ratio".into(),
        "target".into(),
        "met".into(),
    ]];
    let find = |system: &str, w: Workload, c: usize| {
        report
            .points
            .iter()
            .find(|p| p.system == system && p.workload == w && p.clients == c)
    };
    let mut row =
        |label: String, clients: usize, measure: &str, ratio: f64, target: f64, at_least: bool| {
            let met = if at_least {
                ratio >= target
            } else {
                ratio <= target
            };
            let verdict = if met {
                "yes".to_string()
            } else if at_least {
                format!("no, {:.2}x short", target / ratio.max(1e-9))
            } else {
                format!("no, {:.2}x over", ratio / target)
            };
            rows.push(vec![
                label,
                clients.to_string(),
                measure.into(),
                format!("{ratio:.2}"),
                format!("{}{target:.2}", if at_least { ">= " } else { "<= " }),
                verdict,
            ]);
        };
    let create_1 = (Workload::Create, 1, Measure::P50, 0.9, false);
    for system in ["ballot-wasm", "ballot-native"] {
        for (w, c, m, target, at_least) in GOALS.iter().copied().chain([create_1]) {
            if let (Some(a), Some(e)) = (find(system, w, c), find("etcd", w, c)) {
                if m.of(e) > 0.0 {
                    let label = format!("{}: {} / etcd", w.name(), system);
                    row(label, c, m.name(), m.of(a) / m.of(e), target, at_least);
                }
            }
        }
    }
    for p in report.points.iter().filter(|p| p.system == "ballot-wasm") {
        if let Some(n) = find("ballot-native", p.workload, p.clients) {
            if n.ops_per_sec > 0.0 {
                let label = format!("{}: wasm / native", p.workload.name());
                row(
                    label,
                    p.clients,
                    "throughput",
                    p.ops_per_sec / n.ops_per_sec,
                    0.9,
                    true,
                );
            }
        }
    }
    let errors: u64 = report
        .points
        .iter()
        .filter(|p| p.system.starts_with("ballot"))
        .map(|p| p.errors)
        .sum();
    if rows.len() > 1 {
        rows.push(vec![
            "client-visible errors, every Ballot point".into(),
            "-".into(),
            "count".into(),
            errors.to_string(),
            "= 0".into(),
            if errors == 0 {
                "yes".into()
            } else {
                "no".into()
            },
        ]);
    }
    rows
}

pub(super) fn render(rows: &[Vec<String>]) -> String {
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i < 2 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The workloads a run measured, in their order.
pub(super) fn workloads(report: &Report) -> Vec<Workload> {
    let mut w: Vec<Workload> = report.points.iter().map(|p| p.workload).collect();
    w.sort();
    w.dedup();
    w
}

/// The systems a run measured, in the order they were first measured.
pub(super) fn systems(report: &Report) -> Vec<String> {
    let mut s: Vec<String> = Vec::new();
    for p in &report.points {
        if !s.contains(&p.system) {
            s.push(p.system.clone());
        }
    }
    s
}

/// One color per system in the plots.
pub(super) const PALETTE: [plotters::style::RGBColor; 4] = [
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(214, 39, 40),
    plotters::style::RGBColor(148, 103, 189),
];

/// Throughput and p99 against clients, one row of two charts per workload.
pub fn plot(report: &Report, path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let workloads = workloads(report);
    let systems = systems(report);
    let height = 320 * workloads.len().max(1) as u32;
    let root = SVGBackend::new(path, (1100, height)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| format!("plotting: {e:?}");
    root.fill(&WHITE).map_err(e)?;
    let rows = root.split_evenly((workloads.len().max(1), 2));
    let max_clients = report.points.iter().map(|p| p.clients).max().unwrap_or(1) as f64;
    for (w, workload) in workloads.iter().enumerate() {
        for (m, metric) in ["throughput (ops/s)", "p99 latency (ms)"]
            .iter()
            .enumerate()
        {
            let area = &rows[w * 2 + m];
            let value = |p: &Point| if m == 0 { p.ops_per_sec } else { p.p99_ms };
            let points: Vec<&Point> = report
                .points
                .iter()
                .filter(|p| p.workload == *workload)
                .collect();
            let top = points.iter().map(|p| value(p)).fold(0.0, f64::max) * 1.15 + 1e-9;
            let mut chart = ChartBuilder::on(area)
                .caption(format!("{}: {metric}", workload.name()), ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(64)
                .build_cartesian_2d((1f64..max_clients.max(2.0)).log_scale(), 0f64..top)
                .map_err(e)?;
            chart
                .configure_mesh()
                .x_desc("clients")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .draw()
                .map_err(e)?;
            for (s, system) in systems.iter().enumerate() {
                let color = PALETTE[s % PALETTE.len()];
                let series: Vec<(f64, f64)> = points
                    .iter()
                    .filter(|p| &p.system == system)
                    .map(|p| (p.clients as f64, value(p)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
                    .map_err(e)?
                    .label(system.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(
                        series
                            .iter()
                            .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                    )
                    .map_err(e)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
        }
    }
    root.present().map_err(e)
}
