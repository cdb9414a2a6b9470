//! Line charts and heatmaps as SVG (plotters), and PNG rendered from the SVG (resvg).

use plotters::prelude::*;

/// One line of a chart: a label and (x, y) points.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A labelled series.
    pub fn new(label: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.to_string(),
            points,
        }
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad)
}

/// A line chart of `series` (empty series are left out), 900x480 SVG.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let shown: Vec<&Series> = series.iter().filter(|s| !s.points.is_empty()).collect();
        let (x0, x1) = range(shown.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
        let (y0, y1) = range(shown.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, s) in shown.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().cloned().filter(|p| p.1.is_finite()),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// A heatmap of `rows` (one per layer, values ≥ 0, coloured up to the 98th percentile):
/// layers down, units across (neighbours averaged beyond 768 columns); white is 0.
pub fn heatmap(title: &str, x_label: &str, rows: &[Vec<f64>]) -> Result<String, String> {
    let units = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let cols = units.min(768);
    let binned: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| {
            (0..cols)
                .map(|c| {
                    let (a, b) = (
                        c * units / cols,
                        ((c + 1) * units / cols).max(c * units / cols + 1),
                    );
                    let part = &r[a.min(r.len())..b.min(r.len())];
                    part.iter().sum::<f64>() / part.len().max(1) as f64
                })
                .collect()
        })
        .collect();
    // Colour scale up to the 98th percentile, so a few large values do not wash out the rest.
    let mut sorted: Vec<f64> = binned
        .iter()
        .flatten()
        .cloned()
        .filter(|v| v.is_finite())
        .collect();
    sorted.sort_by(f64::total_cmp);
    let top = sorted
        .get((sorted.len() as f64 * 0.98) as usize)
        .or(sorted.last())
        .cloned()
        .unwrap_or(1.0)
        .max(1e-12);
    let mut svg = String::new();
    {
        let height = (rows.len() * 12 + 110).clamp(240, 800) as u32;
        let width = (cols as u32 + 120).max(500);
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..units as f64, rows.len() as f64..0.0)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(format!("{x_label} (index)"))
            .y_desc("layer")
            .draw()
            .map_err(|e| e.to_string())?;
        let width = units as f64 / cols as f64;
        chart
            .draw_series(binned.iter().enumerate().flat_map(|(l, r)| {
                r.iter().enumerate().map(move |(c, &v)| {
                    let t = (v / top).clamp(0.0, 1.0);
                    // White (0) to dark blue (largest).
                    let color = RGBColor(
                        (255.0 * (1.0 - 0.85 * t)) as u8,
                        (255.0 * (1.0 - 0.6 * t)) as u8,
                        (255.0 * (1.0 - 0.2 * t)) as u8,
                    );
                    Rectangle::new(
                        [
                            (c as f64 * width, l as f64),
                            ((c + 1) as f64 * width, (l + 1) as f64),
                        ],
                        color.filled(),
                    )
                })
            }))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Renders SVG text to PNG bytes (text with the system's fonts; without any, text is left out).
pub fn svg_to_png(svg: &str) -> Result<Vec<u8>, String> {
    let mut opt = resvg::usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_system_fonts();
    // plotters asks for the generic `sans-serif`; map it to a sans face the system has.
    let sans = db
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .find(|name| name.contains("Sans") && !name.contains("Mono"))
        .or_else(|| {
            db.faces()
                .next()
                .and_then(|f| f.families.first().map(|(n, _)| n.clone()))
        });
    if let Some(name) = sans {
        db.set_sans_serif_family(name);
    }
    let tree = resvg::usvg::Tree::from_str(svg, &opt).map_err(|e| format!("SVG: {e}"))?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| "empty image".to_string())?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    pixmap.encode_png().map_err(|e| format!("PNG: {e}"))
}
