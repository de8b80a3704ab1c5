//! `--chart`: an SVG of the run over time, latency percentiles (p50, p99, max) above and
//! throughput below (deliveries per second on the left axis, events published per second on
//! the right one), drawn with `plotters`.

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::Interval;

/// A line: its legend, colour and value in each interval.
type Series = (&'static str, RGBColor, fn(&Interval) -> f64);

const LATENCY: [Series; 3] = [
    ("p50", BLUE, |r| r.p50_ms),
    ("p99", RED, |r| r.p99_ms),
    ("max", RGBColor(120, 120, 120), |r| r.max_ms),
];

pub fn write_svg(path: &Path, title: &str, rows: &[Interval]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (upper, lower) = root.split_vertically(350);
    let t_max = rows.last().map(|r| r.t_s).unwrap_or(1.0).max(1.0);
    latency(&upper, title, t_max, rows)?;
    throughput(&lower, t_max, rows)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("chart: {e}")
}

fn latency<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    t_max: f64,
    rows: &[Interval],
) -> anyhow::Result<()> {
    // Intervals without deliveries have no latency: they are left out, not drawn as zero.
    let rows: Vec<&Interval> = rows.iter().filter(|r| r.delivered_per_s > 0.0).collect();
    let y_max = rows.iter().map(|r| r.max_ms).fold(1.0, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{title}: latency"), ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms")
        .draw()
        .map_err(plot_error)?;
    for (name, color, value) in LATENCY {
        chart
            .draw_series(LineSeries::new(
                rows.iter().map(|r| (r.t_s, value(r))),
                color.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    legend(
        chart.configure_series_labels(),
        SeriesLabelPosition::UpperLeft,
    )
}

fn throughput<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    t_max: f64,
    rows: &[Interval],
) -> anyhow::Result<()> {
    let delivered_max = rows.iter().map(|r| r.delivered_per_s).fold(1.0, f64::max) * 1.05;
    let published_max = rows.iter().map(|r| r.published_per_s).fold(1.0, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption("throughput", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..delivered_max)
        .map_err(plot_error)?
        .set_secondary_coord(0f64..t_max, 0f64..published_max);
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("delivered/s")
        .draw()
        .map_err(plot_error)?;
    chart
        .configure_secondary_axes()
        .y_desc("published/s")
        .draw()
        .map_err(plot_error)?;
    let delivered = RGBColor(0, 150, 0);
    chart
        .draw_series(LineSeries::new(
            rows.iter().map(|r| (r.t_s, r.delivered_per_s)),
            delivered.stroke_width(2),
        ))
        .map_err(plot_error)?
        .label("delivered/s (left)")
        .legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], delivered.stroke_width(2))
        });
    chart
        .draw_secondary_series(LineSeries::new(
            rows.iter().map(|r| (r.t_s, r.published_per_s)),
            MAGENTA.stroke_width(2),
        ))
        .map_err(plot_error)?
        .label("published/s (right)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA.stroke_width(2)));
    legend(
        chart.configure_series_labels(),
        SeriesLabelPosition::LowerRight,
    )
}

fn legend<'a, 'b, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    mut labels: plotters::chart::SeriesLabelStyle<'a, 'b, DB, CT>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    labels
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}
