//! What a run leaves: the samples as CSV, a plot of them with the faults marked (SVG), and the
//! summary table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use ipc_gateway_tests::nats_load::{Outcome, Record};
use plotters::prelude::*;

use crate::observer::{FaultRun, Observer, Violation};
use crate::sampler::Sample;
use crate::schedule::Kind;

/// A fault as the report shows it: times in seconds since the start of the run.
pub struct FaultRow {
    pub run: FaultRun,
    pub start: f64,
    pub end: Option<f64>,
    /// From the fault's end to the next OK reply.
    pub recovery: Option<f64>,
    /// The longest time without an OK reply between the fault's start and its recovery.
    pub gap: Option<f64>,
    /// From the fault's end to the first OK reply after which no error reply comes for
    /// [`STABLE_FOR`] seconds: when the errors the fault caused are over (an open breaker
    /// keeps answering error 8 after the first success came).
    pub stable: Option<f64>,
}

/// How long replies must be all OK for service to count as stable again, in seconds.
pub const STABLE_FOR: f64 = 2.0;

/// The arrival times of the replies that are OK (`ok`) or not, sorted, in seconds since the
/// start of the run.
fn reply_times(records: &[Record], obs: &Observer, ok: bool) -> Vec<f64> {
    let mut t: Vec<f64> = records
        .iter()
        .filter(|r| (r.outcome == Outcome::Ok) == ok)
        .map(|r| obs.secs(r.answered))
        .collect();
    t.sort_by(f64::total_cmp);
    t
}

pub fn fault_rows(faults: Vec<FaultRun>, records: &[Record], obs: &Observer) -> Vec<FaultRow> {
    let oks = reply_times(records, obs, true);
    let errors = reply_times(records, obs, false);
    faults
        .into_iter()
        .map(|run| {
            let start = obs.secs(run.started);
            let end = run.ended.map(|e| obs.secs(e));
            let next_ok = end.and_then(|e| {
                let i = oks.partition_point(|&t| t < e);
                oks.get(i).copied()
            });
            let recovery = end.zip(next_ok).map(|(e, ok)| ok - e);
            let gap = next_ok.map(|until| {
                let from = oks.partition_point(|&t| t < start);
                let mut last = start;
                let mut longest = 0f64;
                for &t in oks[from..].iter().take_while(|&&t| t <= until) {
                    longest = longest.max(t - last);
                    last = t;
                }
                longest
            });
            let stable = end.and_then(|e| {
                let from = oks.partition_point(|&t| t < e);
                oks[from..]
                    .iter()
                    .find(|&&t| {
                        let i = errors.partition_point(|&x| x <= t);
                        errors.get(i).is_none_or(|&x| x > t + STABLE_FOR)
                    })
                    .map(|&t| t - e)
            });
            FaultRow {
                run,
                start,
                end,
                recovery,
                gap,
                stable,
            }
        })
        .collect()
}

/// Latency percentiles in milliseconds: (p50, p99, max).
pub fn latency_ms(records: &[Record], only_ok: bool) -> Option<(f64, f64, f64)> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).ok()?;
    for r in records
        .iter()
        .filter(|r| !only_ok || r.outcome == Outcome::Ok)
    {
        h.saturating_record(r.latency().as_micros() as u64);
    }
    if h.is_empty() {
        return None;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Some((
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
    ))
}

/// Replies per second between consecutive samples: (ok, error 5, error 8, other errors).
fn rates(samples: &[Sample], records: &[Record], obs: &Observer) -> Vec<[f64; 4]> {
    let mut answered: Vec<(f64, usize)> = records
        .iter()
        .map(|r| {
            let column = match r.outcome {
                Outcome::Ok => 0,
                Outcome::Error(5) => 1,
                Outcome::Error(8) => 2,
                Outcome::Error(_) => 3,
            };
            (obs.secs(r.answered), column)
        })
        .collect();
    answered.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut i = 0;
    let mut prev = 0f64;
    samples
        .iter()
        .map(|s| {
            let mut counts = [0f64; 4];
            while i < answered.len() && answered[i].0 <= s.t {
                if answered[i].0 > prev {
                    counts[answered[i].1] += 1.0;
                }
                i += 1;
            }
            let span = (s.t - prev).max(1e-3);
            prev = s.t;
            counts.map(|c| c / span)
        })
        .collect()
}

fn active_at(faults: &[FaultRow], t: f64) -> String {
    faults
        .iter()
        .filter(|f| f.start <= t && f.end.is_none_or(|e| t <= e))
        .map(|f| f.run.planned.kind.name())
        .collect::<Vec<_>>()
        .join("+")
}

pub fn write_csv(
    path: &Path,
    samples: &[Sample],
    records: &[Record],
    faults: &[FaultRow],
    obs: &Observer,
) -> Result<()> {
    let mut out = String::from(
        "t_s,rss_kib,fds,inflight,connections,upstream_pending,reconnect_buffer_bytes,breaker,\
         nats_state,nats_server,ok_per_s,err5_per_s,err8_per_s,err_other_per_s,late_replies,\
         duplicate_replies,reconnects,faults_active\n",
    );
    let num = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    for (s, r) in samples.iter().zip(rates(samples, records, obs)) {
        let _ = writeln!(
            out,
            "{:.3},{},{},{},{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.1},{},{},{},{}",
            s.t,
            num(s.rss_kib),
            num(s.fds.map(|f| f as u64)),
            num(s.stat_u64("inflight")),
            num(s.stat_u64("connections")),
            num(s.stat_u64("upstream_pending")),
            num(s.stat_u64("reconnect_buffer_bytes")),
            s.stat_str("breaker").unwrap_or(""),
            s.stat_str("nats_state").unwrap_or(""),
            s.stat_str("nats_server").unwrap_or(""),
            r[0],
            r[1],
            r[2],
            r[3],
            num(s.stat_u64("late_replies")),
            num(s.stat_u64("duplicate_replies")),
            num(s.stat_u64("reconnects")),
            active_at(faults, s.t),
        );
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

fn kind_color(kind: Kind) -> RGBColor {
    match kind {
        Kind::NodeKill => RGBColor(220, 40, 40),
        Kind::NodeStop => RGBColor(240, 140, 0),
        Kind::NodeLameDuck => RGBColor(180, 120, 0),
        Kind::DoubleCrash => RGBColor(150, 40, 180),
        Kind::SlowReplies => RGBColor(30, 120, 220),
        Kind::DuplicateReplies => RGBColor(0, 160, 160),
        Kind::ClientChurn => RGBColor(90, 160, 40),
        Kind::GarbageFrames => RGBColor(120, 120, 120),
        Kind::NeverReader => RGBColor(200, 60, 140),
    }
}

/// A line of the plot: its name, its colour and its points (t, value).
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

/// One panel of the plot: a title, a unit, and its lines.
struct Panel {
    title: &'static str,
    unit: &'static str,
    series: Vec<Series>,
}

pub fn write_svg(
    path: &Path,
    title: &str,
    samples: &[Sample],
    records: &[Record],
    faults: &[FaultRow],
    obs: &Observer,
) -> Result<()> {
    let rates = rates(samples, records, obs);
    let points = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter_map(|s| f(s).map(|v| (s.t, v)))
            .collect()
    };
    let rate_series = |column: usize| -> Vec<(f64, f64)> {
        samples
            .iter()
            .zip(&rates)
            .map(|(s, r)| (s.t, r[column]))
            .collect()
    };
    let panels = [
        Panel {
            title: "well-behaved replies per second",
            unit: "replies/s",
            series: vec![
                ("OK", RGBColor(30, 150, 30), rate_series(0)),
                ("error 5", RGBColor(240, 140, 0), rate_series(1)),
                ("error 8", RGBColor(220, 40, 40), rate_series(2)),
                ("other", BLACK, rate_series(3)),
            ],
        },
        Panel {
            title: "daemon in-flight requests and client connections (stats line)",
            unit: "count",
            series: vec![
                (
                    "in-flight",
                    RGBColor(30, 90, 200),
                    points(&|s| s.stat_u64("inflight").map(|v| v as f64)),
                ),
                (
                    "connections",
                    RGBColor(120, 120, 120),
                    points(&|s| s.stat_u64("connections").map(|v| v as f64)),
                ),
            ],
        },
        Panel {
            title: "daemon resident memory",
            unit: "MiB",
            series: vec![(
                "RSS",
                RGBColor(150, 40, 180),
                points(&|s| s.rss_kib.map(|v| v as f64 / 1024.0)),
            )],
        },
        Panel {
            title: "daemon open file descriptors",
            unit: "fds",
            series: vec![(
                "fds",
                RGBColor(0, 130, 130),
                points(&|s| s.fds.map(|v| v as f64)),
            )],
        },
    ];
    let t_max = samples.last().map_or(1.0, |s| s.t).max(1.0);

    let root = SVGBackend::new(path, (1400, 1100)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let height = root.dim_in_pixel().1 as i32;
    let (charts, strip) = root.split_vertically(height - 32);
    let areas = charts.split_evenly((panels.len(), 1));
    for (p, (panel, area)) in panels.iter().zip(&areas).enumerate() {
        let y_max = panel
            .series
            .iter()
            .flat_map(|(_, _, pts)| pts.iter().map(|&(_, v)| v))
            .fold(1.0f64, f64::max)
            * 1.35;
        let mut chart = ChartBuilder::on(area)
            .margin(8)
            .caption(panel.title, ("sans-serif", 15))
            .x_label_area_size(28)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_desc(panel.unit)
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        // The faults: a shaded span each, numbered on the first panel.
        for f in faults {
            let end = f.end.unwrap_or(t_max).max(f.start + 0.15);
            let color = kind_color(f.run.planned.kind);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(f.start, 0.0), (end, y_max)],
                color.mix(0.18).filled(),
            )))?;
            if p == 0 {
                chart.draw_series(std::iter::once(Text::new(
                    format!("#{}", f.run.planned.index),
                    // Staggered, so that the numbers of faults close together stay apart.
                    (
                        f.start,
                        y_max * (0.97 - 0.06 * (f.run.planned.index % 3) as f64),
                    ),
                    ("sans-serif", 11).into_font().color(&color),
                )))?;
            }
        }
        for (name, color, pts) in &panel.series {
            let color = *color;
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 11))
            .draw()?;
    }
    // The legend of the fault colours, in a strip of its own under the panels.
    let mut kinds: Vec<Kind> = faults.iter().map(|f| f.run.planned.kind).collect();
    kinds.sort();
    kinds.dedup();
    let font = ("sans-serif", 13).into_font();
    strip.draw(&Text::new(
        "faults (#n: number in the schedule):",
        (70, 8),
        font.clone(),
    ))?;
    let mut x = 330;
    for kind in kinds {
        let color = kind_color(kind);
        strip.draw(&Rectangle::new(
            [(x, 6), (x + 18, 22)],
            color.mix(0.4).filled(),
        ))?;
        strip.draw(&Text::new(kind.name(), (x + 24, 8), font.clone()))?;
        x += 24 + 8 * kind.name().len() as i32 + 18;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Everything the summary shows besides the records and faults.
pub struct Totals {
    pub seed: u64,
    pub secs: u64,
    pub chaos_from: f64,
    pub run_secs: f64,
    pub setup: String,
    pub end_state: Vec<String>,
    pub daemon_counters: String,
    pub harness_error: Option<String>,
}

pub fn summary(
    totals: &Totals,
    records: &[Record],
    faults: &[FaultRow],
    violations: &[Violation],
) -> String {
    let mut s = String::new();
    let verdict = match (&totals.harness_error, violations.len()) {
        (Some(_), _) => "HARNESS ERROR".to_owned(),
        (None, 0) => "PASS".to_owned(),
        (None, n) => format!("FAIL ({n} violations)"),
    };
    let _ = writeln!(
        s,
        "== ipc-gateway-chaos seed {} · {} s of chaos (from {:.1} s) · run {:.1} s · {verdict} ==",
        totals.seed, totals.secs, totals.chaos_from, totals.run_secs
    );
    let _ = writeln!(s, "setup       {}", totals.setup);
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    for r in records {
        let key = match r.outcome {
            Outcome::Ok => "OK".to_owned(),
            Outcome::Error(code) => format!("error {code}"),
        };
        *by_outcome.entry(key).or_default() += 1;
    }
    let outcomes: Vec<String> = by_outcome.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let _ = writeln!(
        s,
        "requests    {} answered to well-behaved clients: {}",
        records.len(),
        outcomes.join(", ")
    );
    let fmt_lat = |l: Option<(f64, f64, f64)>| match l {
        Some((p50, p99, max)) => format!("p50 {p50:.2} ms, p99 {p99:.1} ms, max {max:.0} ms"),
        None => "none".to_owned(),
    };
    // Requests sent while some were asked for slow replies are slow on purpose.
    let slow_windows: Vec<(Instant, Instant)> = faults
        .iter()
        .filter(|f| f.run.planned.kind == Kind::SlowReplies)
        .map(|f| (f.run.started, f.run.ended.unwrap_or_else(Instant::now)))
        .collect();
    let outside_slow: Vec<Record> = records
        .iter()
        .filter(|r| {
            !slow_windows
                .iter()
                .any(|&(a, b)| a <= r.sent && r.sent <= b)
        })
        .cloned()
        .collect();
    let _ = writeln!(
        s,
        "latency     OK replies: {}; all replies: {}",
        fmt_lat(latency_ms(records, true)),
        fmt_lat(latency_ms(records, false))
    );
    let _ = writeln!(
        s,
        "            OK replies to requests sent outside slow_replies: {}",
        fmt_lat(latency_ms(&outside_slow, true))
    );
    let mut kinds: BTreeMap<Kind, usize> = BTreeMap::new();
    for f in faults {
        *kinds.entry(f.run.planned.kind).or_default() += 1;
    }
    let kinds: Vec<String> = Kind::ALL
        .iter()
        .map(|k| format!("{k} {}", kinds.get(k).copied().unwrap_or(0)))
        .collect();
    let _ = writeln!(
        s,
        "faults      {} in all: {}",
        faults.len(),
        kinds.join(", ")
    );
    let recoveries: Vec<f64> = faults
        .iter()
        .filter(|f| f.run.planned.kind.is_infra())
        .filter_map(|f| f.recovery)
        .collect();
    let stables: Vec<f64> = faults
        .iter()
        .filter(|f| f.run.planned.kind.is_infra())
        .filter_map(|f| f.stable)
        .collect();
    let mean_max = |v: &[f64]| {
        let max = v.iter().copied().fold(0.0, f64::max);
        (v.iter().sum::<f64>() / v.len().max(1) as f64, max)
    };
    if !recoveries.is_empty() {
        let (mean, max) = mean_max(&recoveries);
        let (smean, smax) = mean_max(&stables);
        let _ = writeln!(
            s,
            "recovery    infrastructure faults: fault end to next OK reply: mean {mean:.3} s, max {max:.3} s; \
             to stable ({STABLE_FOR} s without an error reply): mean {smean:.3} s, max {smax:.3} s"
        );
    }
    let _ = writeln!(s, "daemon      {}", totals.daemon_counters);
    for line in &totals.end_state {
        let _ = writeln!(s, "end state   {line}");
    }
    let _ = writeln!(s, "violations  {}", violations.len());
    for v in violations.iter().take(50) {
        let _ = writeln!(s, "  [{:7.1}s] {}: {}", v.at, v.source, v.text);
    }
    if violations.len() > 50 {
        let _ = writeln!(s, "  … and {} more", violations.len() - 50);
    }
    if let Some(e) = &totals.harness_error {
        let _ = writeln!(s, "harness     {e}");
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        " #   start     end  kind          target                              recovery  stable     gap  notes"
    );
    for f in faults {
        let secs = |v: Option<f64>, w: usize| match v {
            Some(v) => format!("{v:>w$.2}"),
            None => format!("{:>w$}", "-"),
        };
        let _ = writeln!(
            s,
            "{:>2} {:>7.2} {} {:<13} {:<35} {}s {}s {}s  {}",
            f.run.planned.index,
            f.start,
            secs(f.end, 7),
            f.run.planned.kind.name(),
            f.run.target,
            secs(f.recovery, 7),
            secs(f.stable, 6),
            secs(f.gap, 6),
            f.run.notes.join("; ")
        );
    }
    s
}

/// Seconds since `start`, for messages.
pub fn since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}
