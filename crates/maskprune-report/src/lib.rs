//! A mask-training run's report: plots drawn from its files (`log.jsonl`, `summary.json`,
//! `masks.json`, `snapshots/`, `plan.json`) as SVG and PNG, and `report.md` plus a
//! self-contained `report.html` in `RUN/report/`.

mod plots;

use std::path::{Path, PathBuf};

use maskprune_model::output::{write_dir_atomically, write_file_atomically};
use maskprune_records::run::files;
use maskprune_records::{
    read_json, read_json_lines, Granularity, MaskSnapshot, MaskState, StepRecord, TrainSummary,
};
use serde::Deserialize;

pub use plots::{heatmap, line_chart, svg_to_png, Series};

/// A figure of the report: file stem, caption and SVG text.
struct Figure {
    stem: String,
    caption: String,
    svg: String,
}

/// `(update, f(record))` for every logged update.
fn column(log: &[StepRecord], f: impl Fn(&StepRecord) -> f64) -> Vec<(f64, f64)> {
    log.iter().map(|r| (r.step as f64, f(r))).collect()
}

fn mean(v: &[usize]) -> f64 {
    v.iter().sum::<usize>() as f64 / v.len().max(1) as f64
}

/// `|m|` per layer and unit.
fn mask_rows(m: &[Vec<f32>]) -> Vec<Vec<f64>> {
    m.iter()
        .map(|l| l.iter().map(|x| x.abs() as f64).collect())
        .collect()
}

/// The budget's multiplier and the spread of the per-layer uniformity multipliers.
fn multipliers(log: &[StepRecord]) -> Vec<Series> {
    vec![
        Series::new("μ (budget)", column(log, |r| r.mu)),
        Series::new("y attention, mean", column(log, |r| r.y_attention.mean)),
        Series::new("y attention, max", column(log, |r| r.y_attention.max)),
        Series::new("y channels, mean", column(log, |r| r.y_channels.mean)),
        Series::new("y channels, max", column(log, |r| r.y_channels.max)),
    ]
}

/// What the report reads of `plan.json` (written by `maskprune_surgery::PrunePlan`).
#[derive(Deserialize)]
struct PlanCounts {
    layers: Vec<LayerCounts>,
}

/// One layer of `plan.json`: the kept units' indices.
#[derive(Deserialize)]
struct LayerCounts {
    query_heads: Vec<usize>,
    kv_heads: Vec<usize>,
    channels: Vec<usize>,
}

fn figures(run: &Path, log: &[StepRecord]) -> Result<Vec<Figure>, String> {
    let mut out = Vec::new();
    let mut losses = vec![
        Series::new("Lagrangian", column(log, |r| r.lagrangian)),
        Series::new("distillation KL", column(log, |r| r.distill)),
        Series::new("uniformity term", column(log, |r| r.uniformity_term)),
        Series::new("budget term", column(log, |r| r.budget_term)),
    ];
    if log.iter().all(|r| r.ntp.is_some()) {
        losses.push(Series::new(
            "next-token",
            column(log, |r| r.ntp.unwrap_or(f64::NAN)),
        ));
    }
    if log.iter().all(|r| r.hidden.is_some()) {
        losses.push(Series::new(
            "hidden-state distillation",
            column(log, |r| r.hidden.unwrap_or(f64::NAN)),
        ));
    }
    out.push(Figure {
        stem: "loss".into(),
        caption: "Loss terms per update".into(),
        svg: line_chart("Loss terms", "update", "value", &losses)?,
    });
    let masks: Option<MaskState> = read_json(&run.join(files::MASKS)).ok();
    let units_attention = masks.as_ref().map_or(1.0, |m| m.attention_units as f64);
    let units_channels = masks
        .as_ref()
        .and_then(|m| m.m_channels.first())
        .map_or(1.0, |l| l.len() as f64);
    let dense = log[0].params_achieved;
    out.push(Figure {
        stem: "widths".into(),
        caption: "Shared widths s (fraction of the units) and the mean units kept per layer, with the scheduled parameter target (fraction of dense)".into(),
        svg: line_chart(
            "Widths",
            "update",
            "fraction",
            &[
                Series::new("s_attention / units", column(log, |r| r.s_attention / units_attention)),
                Series::new("s_channels / channels", column(log, |r| r.s_channels / units_channels)),
                Series::new("kept attention (mean over layers)", column(log, |r| mean(&r.kept_attention) / units_attention)),
                Series::new("kept channels (mean over layers)", column(log, |r| mean(&r.kept_channels) / units_channels)),
                Series::new("parameter target", column(log, |r| r.params_target / dense)),
            ],
        )?,
    });
    out.push(Figure {
        stem: "params".into(),
        caption: "Decoder-layer linear parameters (millions): achieved by the masks, implied by s, the scheduled target and the final target".into(),
        svg: line_chart(
            "Parameters",
            "update",
            "millions",
            &[
                Series::new("achieved (masks)", column(log, |r| r.params_achieved / 1e6)),
                Series::new("at s", column(log, |r| r.params_s / 1e6)),
                Series::new("scheduled target", column(log, |r| r.params_target / 1e6)),
                Series::new("final target", column(log, |r| r.params_final_target as f64 / 1e6)),
            ],
        )?,
    });
    out.push(Figure {
        stem: "multipliers".into(),
        caption: "Multipliers: the budget's μ and the per-layer y (mean and max over layers)"
            .into(),
        svg: line_chart("Multipliers", "update", "value", &multipliers(log))?,
    });
    // Mask heatmaps: the snapshots (start, middle) and the final masks.
    let mut states: Vec<(String, MaskSnapshot)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(run.join(files::SNAPSHOTS)) {
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for f in paths {
            let v: MaskSnapshot = read_json(&f)?;
            states.push((format!("step {}", v.step), v));
        }
    }
    if let Some(m) = &masks {
        let end = MaskSnapshot {
            step: log[log.len() - 1].step,
            m_attention: m.m_attention.clone(),
            m_channels: m.m_channels.clone(),
        };
        states.push(("end".into(), end));
    }
    for (i, (label, v)) in states.iter().enumerate() {
        for (m, what, kind) in [
            (&v.m_attention, "attention units", "attention"),
            (&v.m_channels, "MLP channels", "channels"),
        ] {
            if m.is_empty() {
                continue;
            }
            out.push(Figure {
                stem: format!("masks-{i}-{kind}"),
                caption: format!("|m| of the {what} per layer, {label} (0 = pruned)"),
                svg: heatmap(&format!("{what}, {label}"), what, &mask_rows(m))?,
            });
        }
    }
    if let Ok(plan) = read_json::<PlanCounts>(&run.join(files::PLAN)) {
        // Attention units are KV groups or query heads, as the run's masks count them.
        let by_groups = masks
            .as_ref()
            .is_some_and(|m| m.granularity == Granularity::KvGroup);
        let per_layer = |f: &dyn Fn(&LayerCounts) -> f64| -> Vec<(f64, f64)> {
            plan.layers
                .iter()
                .enumerate()
                .map(|(l, p)| (l as f64, f(p)))
                .collect()
        };
        let attention = per_layer(&|p| {
            let kept = if by_groups {
                &p.kv_heads
            } else {
                &p.query_heads
            };
            kept.len() as f64 / units_attention
        });
        let channels = per_layer(&|p| p.channels.len() as f64 / units_channels);
        out.push(Figure {
            stem: "kept".into(),
            caption: "Units kept per layer in the extracted plan (fraction of the layer's query heads and MLP channels)".into(),
            svg: line_chart(
                "Kept per layer",
                "layer",
                "fraction kept",
                &[
                    Series::new("attention units", attention),
                    Series::new("MLP channels", channels),
                ],
            )?,
        });
    }
    Ok(out)
}

fn summary_lines(run: &Path) -> Vec<String> {
    let Ok(s) = read_json::<TrainSummary>(&run.join(files::SUMMARY)) else {
        return Vec::new();
    };
    let granularity = match s.granularity {
        Granularity::KvGroup => "kv_group",
        Granularity::QueryHead => "query_head",
    };
    vec![
        format!(
            "- widths in every layer: {} query heads, {} KV heads, {} MLP channels ({granularity})",
            s.widths.query_heads, s.widths.kv_heads, s.widths.channels
        ),
        format!(
            "- parameters: {} → {} (decoder-layer linear: {} → {}, target {})",
            s.total_params[0],
            s.total_params[1],
            s.decoder_linear[0],
            s.decoder_linear[1],
            s.decoder_linear[2]
        ),
        format!(
            "- {} updates in {:.0} s{}; held-out KL {:.4} before extraction, {:.4} after (dense with the adapters: {:.4})",
            s.steps,
            s.train_seconds,
            match s.committed_steps {
                0 => String::new(),
                n => format!(" (the last {n} at the extracted widths)"),
            },
            s.loss_before_extraction,
            s.loss_after_extraction,
            s.loss_dense_with_lora
        ),
    ]
}

/// Writes `RUN/report/` (replacing an older one): one SVG and one PNG per figure,
/// `report.md` and `report.html`; `results` (a markdown table, e.g. `table.md`) is appended
/// when given. Returns the report directory.
pub fn write_report(run: &Path, results: Option<&Path>) -> Result<PathBuf, String> {
    let log_path = run.join(files::LOG);
    let log: Vec<StepRecord> = read_json_lines(&log_path)?;
    if log.is_empty() {
        return Err(format!(
            "{}: no training steps logged yet",
            log_path.display()
        ));
    }
    let figs = figures(run, &log)?;
    let results_md = match results {
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|e| format!("{}: cannot read: {e}", p.display()))?,
        ),
        None => None,
    };
    let title = format!("Run report: {}", run.display());
    let summary = summary_lines(run);
    let mut md = format!("# {title}\n\n");
    for l in &summary {
        md += l;
        md += "\n";
    }
    let mut html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}figure{{margin:1em 0}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px}}</style></head><body><h1>{title}</h1><ul>"
    );
    for l in &summary {
        html += &format!("<li>{}</li>", escape(l.trim_start_matches("- ")));
    }
    html += "</ul>";
    md += "\n";
    for f in &figs {
        md += &format!("## {}\n\n![{}]({}.png)\n\n", f.caption, f.caption, f.stem);
        html += &format!(
            "<figure>{}<figcaption>{}</figcaption></figure>",
            f.svg,
            escape(&f.caption)
        );
    }
    if let Some(r) = &results_md {
        md += "## Results\n\n";
        md += r;
        html += &format!("<h2>Results</h2><pre>{}</pre>", escape(r));
    }
    html += "</body></html>\n";
    let out = run.join("report");
    write_dir_atomically(&out, true, |dir| {
        for f in &figs {
            write_file_atomically(&dir.join(format!("{}.svg", f.stem)), f.svg.as_bytes())?;
            let png = svg_to_png(&f.svg).map_err(|m| maskprune_model::ModelError::new(dir, m))?;
            write_file_atomically(&dir.join(format!("{}.png", f.stem)), &png)?;
        }
        write_file_atomically(&dir.join("report.md"), md.as_bytes())?;
        write_file_atomically(&dir.join("report.html"), html.as_bytes())
    })
    .map_err(|e| e.to_string())?;
    Ok(out)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use maskprune_records::run::OverLayers;
    use maskprune_records::Widths;

    fn record(step: u64, y: [f64; 2]) -> StepRecord {
        StepRecord {
            step,
            steps: 2,
            lagrangian: 1.0,
            distill: 0.5,
            ntp: None,
            hidden: None,
            uniformity_term: 0.1,
            budget_term: 0.2,
            s_attention: 3.0,
            s_channels: 100.0,
            params_s: 900.0,
            params_achieved: 1000.0,
            params_target: 800.0,
            params_final_target: 700,
            mu: 0.3,
            y_attention: y.into(),
            y_channels: OverLayers {
                mean: 0.0,
                max: 0.0,
            },
            kept_attention: vec![4, 2],
            kept_channels: vec![128, 64],
            seconds: 1.0,
        }
    }

    #[test]
    fn the_y_curves_are_the_logged_mean_and_max() {
        let log = [record(1, [0.25, 2.0]), record(2, [0.5, 3.0])];
        let series = multipliers(&log);
        let by_label = |l: &str| &series.iter().find(|s| s.label == l).unwrap().points;
        assert_eq!(
            by_label("y attention, mean"),
            &vec![(1.0, 0.25), (2.0, 0.5)]
        );
        assert_eq!(by_label("y attention, max"), &vec![(1.0, 2.0), (2.0, 3.0)]);
    }

    #[test]
    fn a_run_directory_gives_a_report_with_its_summary_and_figures() {
        let run = std::env::temp_dir().join(format!("maskprune-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).unwrap();
        let log: String = [record(1, [0.0, 0.0]), record(2, [0.1, 0.2])]
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        std::fs::write(run.join(files::LOG), log).unwrap();
        let widths = Widths {
            query_heads: 2,
            kv_heads: 1,
            channels: 64,
        };
        let summary = TrainSummary {
            steps: 2,
            train_seconds: 12.0,
            granularity: Granularity::KvGroup,
            widths,
            s: [1.0, 64.0],
            decoder_linear: [1000, 700, 700],
            total_params: [5000, 4700],
            loss_before_extraction: 0.25,
            loss_after_extraction: 0.5,
            rounding: vec![(widths, 0.5)],
            loss_dense_with_lora: 0.125,
            nonuniform_kept: None,
            committed_steps: 0,
        };
        std::fs::write(
            run.join(files::SUMMARY),
            serde_json::to_vec(&summary).unwrap(),
        )
        .unwrap();
        let out = write_report(&run, None).unwrap();
        let md = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(
            md.contains("2 query heads, 1 KV heads, 64 MLP channels (kv_group)"),
            "{md}"
        );
        assert!(md.contains("5000 → 4700"), "{md}");
        assert!(
            md.contains("held-out KL 0.2500 before extraction, 0.5000 after"),
            "{md}"
        );
        for stem in ["loss", "widths", "params", "multipliers"] {
            assert!(out.join(format!("{stem}.svg")).is_file(), "{stem}.svg");
            assert!(out.join(format!("{stem}.png")).is_file(), "{stem}.png");
        }
        // A log line of another shape is an error naming the file and line.
        std::fs::write(run.join(files::LOG), "{\"step\": 1}\n").unwrap();
        let err = write_report(&run, None).unwrap_err();
        assert!(err.contains("log.jsonl:1: invalid"), "{err}");
        let _ = std::fs::remove_dir_all(&run);
    }
}
