//! `ballot bench --wan`: the per-region table, the goals, and a plot per
//! region, against the physical floor each region has.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::report::{render, systems, workloads, PALETTE};
use super::{Point, Report, Workload};
use crate::wan::Topology;

/// What the topology says about each region, and where etcd's leader was.
#[derive(Clone, Debug, Serialize)]
pub struct WanFacts {
    pub regions: Vec<RegionFacts>,
    /// The region of etcd's leader when the load started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_leader: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RegionFacts {
    pub name: String,
    /// The replica this region's clients use.
    pub replica: u32,
    /// Round trip from that replica to the nearest classic quorum (a
    /// majority, itself counted): no consensus write can do better.
    pub floor_ms: f64,
    /// Round trip to the nearest fast quorum (what a fast round waits for).
    pub fast_ms: f64,
}

pub(super) fn facts(topology: &Topology, etcd_leader: Option<u32>) -> WanFacts {
    let n = topology.nodes() as usize;
    let classic = ballot_core::quorum_classic(n);
    let fast = ballot_core::quorum_fast(n);
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    WanFacts {
        regions: topology
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| RegionFacts {
                name: r.name.clone(),
                replica: r.replicas[0],
                floor_ms: ms(topology.floor(i, classic)),
                fast_ms: ms(topology.floor(i, fast)),
            })
            .collect(),
        etcd_leader: etcd_leader
            .and_then(|id| topology.region_of(id))
            .map(|r| topology.regions[r].name.clone()),
    }
}

/// The per-region table, then the goals of a geo deployment.
pub fn wan_table(report: &Report) -> String {
    let Some(facts) = &report.wan else {
        return super::table(report);
    };
    let floor = |region: &str| {
        facts
            .regions
            .iter()
            .find(|r| r.name == region)
            .map(|r| r.floor_ms)
            .unwrap_or(0.0)
    };
    let mut rows: Vec<Vec<String>> = vec![[
        "workload",
        "region",
        "system",
        "clients",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "floor ms",
        "p50/floor",
        "errors",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()];
    for p in &report.points {
        let region = p.region.clone().unwrap_or_default();
        let f = floor(&region);
        rows.push(vec![
            p.workload.name().into(),
            region,
            p.system.clone(),
            p.clients.to_string(),
            format!("{:.0}", p.ops_per_sec),
            format!("{:.1}", p.p50_ms),
            format!("{:.1}", p.p99_ms),
            format!("{f:.0}"),
            if f > 0.0 {
                format!("{:.2}", p.p50_ms / f)
            } else {
                "-".into()
            },
            p.errors.to_string(),
        ]);
    }
    let mut out = String::new();
    out.push_str("regions (the replica each region's clients use; round trips to the nearest classic and fast quorum):\n");
    for r in &facts.regions {
        out.push_str(&format!(
            "  {:<12} replica {}  classic quorum {:>5.0} ms  fast quorum {:>5.0} ms\n",
            r.name, r.replica, r.floor_ms, r.fast_ms
        ));
    }
    if let Some(leader) = &facts.etcd_leader {
        out.push_str(&format!("  etcd's leader: {leader}\n"));
    }
    out.push('\n');
    out.push_str(&render(&rows));
    let goals = goals(report);
    if goals.len() > 1 {
        out.push('\n');
        out.push_str(&render(&goals));
    }
    out
}

/// What a geo deployment aims for, per region: Ballot's p50 for
/// writes at most 0.6x etcd's and within 1.2x of the floor, p99 at most
/// 2x p50, linearizable get p50 at most etcd's; no client-visible errors.
fn goals(report: &Report) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "goal".to_string(),
        "region".into(),
        "ratio".into(),
        "target".into(),
        "met".into(),
    ]];
    let Some(facts) = &report.wan else {
        return rows;
    };
    // In the topology's order of regions.
    let index = |region: &str| facts.regions.iter().position(|r| r.name == region);
    let mut by: BTreeMap<(Workload, Option<usize>, usize), Vec<&Point>> = BTreeMap::new();
    for p in &report.points {
        let region = index(p.region.as_deref().unwrap_or_default());
        by.entry((p.workload, region, p.clients))
            .or_default()
            .push(p);
    }
    let mut row = |label: String, region: &str, ratio: f64, target: f64| {
        let verdict = if ratio <= target {
            "yes".to_string()
        } else {
            format!("no, {:.2}x over", ratio / target)
        };
        rows.push(vec![
            label,
            region.to_string(),
            format!("{ratio:.2}"),
            format!("<= {target:.2}"),
            verdict,
        ]);
    };
    for ((workload, region, clients), points) in &by {
        let etcd = points.iter().find(|p| p.system == "etcd");
        let (region, floor) = match region.map(|r| &facts.regions[r]) {
            Some(r) => (r.name.as_str(), r.floor_ms),
            None => ("", 0.0),
        };
        for p in points.iter().filter(|p| p.system.starts_with("ballot")) {
            let w = workload.name();
            let what = format!("{w} x{clients}: {}", p.system);
            let writes = matches!(workload, Workload::Create | Workload::Put);
            if let Some(e) = etcd.filter(|e| e.p50_ms > 0.0) {
                let target = if writes { 0.6 } else { 1.0 };
                row(
                    format!("{what} p50 / etcd p50"),
                    region,
                    p.p50_ms / e.p50_ms,
                    target,
                );
            }
            if writes && floor > 0.0 {
                row(format!("{what} p50 / floor"), region, p.p50_ms / floor, 1.2);
            }
            if p.p50_ms > 0.0 {
                row(
                    format!("{what} p99 / p50"),
                    region,
                    p.p99_ms / p.p50_ms,
                    2.0,
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
    rows.push(vec![
        "client-visible errors, every Ballot point".into(),
        "-".into(),
        errors.to_string(),
        "= 0".into(),
        if errors == 0 { "yes" } else { "no" }.into(),
    ]);
    rows
}

/// One chart per region: p50 and p99 of each system per workload, with
/// the region's floor as a line.
pub fn wan_plot(report: &Report, path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let Some(facts) = &report.wan else {
        return super::plot(report, path);
    };
    let workloads = workloads(report);
    let systems = systems(report);
    let regions = &facts.regions;
    let height = 300 * regions.len().max(1) as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| format!("plotting: {e:?}");
    root.fill(&WHITE).map_err(e)?;
    let areas = root.split_evenly((regions.len().max(1), 1));
    let slots = (workloads.len() * (systems.len() + 1)).max(1);
    for (area, region) in areas.iter().zip(regions) {
        let points: Vec<&Point> = report
            .points
            .iter()
            .filter(|p| p.region.as_deref() == Some(&region.name))
            .collect();
        let top = points
            .iter()
            .map(|p| p.p99_ms)
            .fold(region.floor_ms, f64::max)
            * 1.15
            + 1e-9;
        let names: Vec<&str> = workloads.iter().map(|w| w.name()).collect();
        let per = systems.len() + 1;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{}: p50 (bar) and p99 (tick) per workload; dashed: nearest quorum {:.0} ms",
                    region.name, region.floor_ms
                ),
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..slots as f64, 0f64..top)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .light_line_style(WHITE)
            .y_desc("ms")
            .draw()
            .map_err(e)?;
        // Each group of bars is named above it.
        chart
            .draw_series(names.iter().enumerate().map(|(w, name)| {
                Text::new(
                    name.to_string(),
                    ((w * per) as f64 + 0.1, top * 0.97),
                    ("sans-serif", 15).into_font(),
                )
            }))
            .map_err(e)?;
        for (s, system) in systems.iter().enumerate() {
            let color = PALETTE[s % PALETTE.len()];
            let mut bars = Vec::new();
            let mut ticks = Vec::new();
            for (w, workload) in workloads.iter().enumerate() {
                if let Some(p) = points
                    .iter()
                    .find(|p| &p.system == system && p.workload == *workload)
                {
                    let x = (w * per + s) as f64 + 0.1;
                    bars.push(Rectangle::new(
                        [(x, 0.0), (x + 0.8, p.p50_ms)],
                        color.filled(),
                    ));
                    ticks.push(PathElement::new(
                        vec![(x, p.p99_ms), (x + 0.8, p.p99_ms)],
                        BLACK.stroke_width(2),
                    ));
                }
            }
            chart
                .draw_series(bars)
                .map_err(e)?
                .label(system.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
            chart.draw_series(ticks).map_err(e)?;
        }
        let floor = region.floor_ms;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, floor), (slots as f64, floor)],
                6,
                4,
                BLACK.stroke_width(1),
            ))
            .map_err(e)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
    }
    root.present().map_err(e)
}
