//! Plots and CSV files for the experiments: PNG line charts drawn in Rust (plotters), text
//! in the vendored DejaVu Sans (`fixtures/fonts`), so no system font is needed.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../../fixtures/fonts/DejaVuSans.ttf");

/// One line of a chart.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points (x, y).
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
pub struct Chart<'a> {
    /// Title.
    pub title: &'a str,
    /// X axis label.
    pub x: &'a str,
    /// Y axis label.
    pub y: &'a str,
    /// The lines.
    pub series: Vec<Series>,
    /// An x interval to shade (e.g. an outage), with its legend label.
    pub shade: Option<(f64, f64, &'a str)>,
}

fn register() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws `chart` into a 1000×600 PNG at `path`.
pub fn line_chart(path: &Path, chart: &Chart) -> anyhow::Result<()> {
    register();
    let xs = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1));
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let y1 = ys.fold(0.0f64, f64::max);
    let (x0, x1) = if x0 < x1 { (x0, x1) } else { (0.0, 1.0) };
    let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..y1)?;
    c.configure_mesh()
        .x_desc(chart.x)
        .y_desc(chart.y)
        .label_style(("sans-serif", 15))
        .draw()?;
    if let Some((a, b, label)) = chart.shade {
        let grey = RGBColor(200, 200, 200).mix(0.5);
        c.draw_series(std::iter::once(Rectangle::new(
            [(a, 0.0), (b, y1)],
            grey.filled(),
        )))?
        .label(label)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], grey.filled()));
    }
    for (i, s) in chart.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        c.draw_series(LineSeries::new(
            s.points.iter().copied(),
            colour.stroke_width(2),
        ))?
        .label(s.label.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], colour.stroke_width(2)));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes rows as CSV (`header` first); fields must not contain commas.
pub fn csv(path: &Path, header: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut text = header.join(",");
    text.push('\n');
    for r in rows {
        text.push_str(&r.join(","));
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
