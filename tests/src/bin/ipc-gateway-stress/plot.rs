//! Samples of the daemon as CSV and as an SVG plot (RSS above, descriptors below), and the
//! least-squares line through them.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::Sample;

/// y = slope x + intercept, drawn from `from` to `to` (seconds).
#[derive(Debug, Clone, Copy)]
pub struct Line {
    pub slope: f64,
    pub intercept: f64,
    pub from: f64,
    pub to: f64,
}

impl Line {
    fn at(&self, x: f64) -> f64 {
        self.slope * x + self.intercept
    }
}

/// The least-squares line through `points` (x, y); `None` for fewer than two distinct x.
pub fn least_squares(points: &[(f64, f64)]) -> Option<Line> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let slope = sxy / sxx;
    let xs = points.iter().map(|p| p.0);
    Some(Line {
        slope,
        intercept: mean_y - slope * mean_x,
        from: xs.clone().fold(f64::INFINITY, f64::min),
        to: xs.fold(f64::NEG_INFINITY, f64::max),
    })
}

/// `seconds,rss_kb,fds`, one line a sample.
pub fn write_csv(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut text = String::from("seconds,rss_kb,fds\n");
    for s in samples {
        text += &format!("{:.3},{},{}\n", s.secs, s.rss_kb, s.fds);
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// What is drawn besides the samples.
#[derive(Default)]
pub struct Extras<'a> {
    /// The least-squares lines of RSS (in kB) and of descriptors.
    pub fits: Option<(Line, Line)>,
    /// Vertical lines with a name, at seconds.
    pub marks: Vec<(f64, &'a str)>,
    /// A horizontal line on the RSS panel, in kB, with a name (the memory bound).
    pub rss_limit: Option<(u64, &'a str)>,
}

/// Two panels, RSS in MiB and descriptors, against seconds.
pub fn write_svg(path: &Path, title: &str, samples: &[Sample], extras: &Extras<'_>) -> Result<()> {
    let (fits, marks) = (extras.fits, &extras.marks[..]);
    let root = SVGBackend::new(path, (1000, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(340);
    let rss: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (s.secs, s.rss_kb as f64 / 1024.0))
        .collect();
    let fds: Vec<(f64, f64)> = samples.iter().map(|s| (s.secs, s.fds as f64)).collect();
    let mib_fit = fits.map(|(r, _)| Line {
        slope: r.slope / 1024.0,
        intercept: r.intercept / 1024.0,
        ..r
    });
    let per_min =
        |l: &Line, unit: &str| format!("least squares: {:+.1} {unit}/min", l.slope * 60.0);
    let rss_label = fits.map(|(r, _)| per_min(&r, "kB"));
    let fds_label = fits.map(|(_, f)| per_min(&f, "fds"));
    let limit = extras
        .rss_limit
        .map(|(kb, name)| (kb as f64 / 1024.0, name));
    let rss_fit = mib_fit.zip(rss_label);
    panel(&top, "daemon RSS (MiB)", &rss, rss_fit, marks, limit)?;
    let fds_fit = fits.map(|f| f.1).zip(fds_label);
    panel(
        &bottom,
        "daemon open descriptors",
        &fds,
        fds_fit,
        marks,
        None,
    )?;
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    what: &str,
    points: &[(f64, f64)],
    fit: Option<(Line, String)>,
    marks: &[(f64, &str)],
    limit: Option<(f64, &str)>,
) -> Result<()> {
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let ys = points.iter().map(|p| p.1).chain(limit.map(|l| l.0));
    let hi = ys.fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.1).max(hi.abs() * 0.01).max(1.0);
    let (lo, hi) = ((lo - pad).max(0.0), hi + pad);
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, lo..hi)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(what)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(points.iter().copied(), &BLUE))
        .map_err(|e| anyhow!("{e}"))?
        .label(what)
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    if let Some((line, label)) = fit {
        let ends = [(line.from, line.at(line.from)), (line.to, line.at(line.to))];
        chart
            .draw_series(LineSeries::new(ends, RED.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(label)
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    }
    if let Some((y, name)) = limit {
        let green = GREEN.stroke_width(2);
        chart
            .draw_series(LineSeries::new([(0.0, y), (x_max, y)], green))
            .map_err(|e| anyhow!("{e}"))?
            .label(name.to_string())
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN));
    }
    for (i, &(x, name)) in marks.iter().enumerate() {
        let grey = BLACK.mix(0.4);
        chart
            .draw_series(LineSeries::new([(x, lo), (x, hi)], grey))
            .map_err(|e| anyhow!("{e}"))?;
        // Names one under the other, so that marks close together stay readable; left of
        // the line near the right edge, where they would be cut off.
        let y = hi - (hi - lo) * 0.07 * i as f64;
        let (text, h) = if x > 0.8 * x_max {
            (format!("{name} "), HPos::Right)
        } else {
            (format!(" {name}"), HPos::Left)
        };
        let style = TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(h, VPos::Top));
        chart
            .draw_series([Text::new(text, (x, y), style)])
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_recovers_a_line() {
        let points: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 2.0)).collect();
        let line = least_squares(&points).unwrap();
        assert!((line.slope - 3.0).abs() < 1e-9);
        assert!((line.intercept - 2.0).abs() < 1e-9);
        assert!(least_squares(&points[..1]).is_none());
    }
}
