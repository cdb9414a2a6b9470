//! A mask-training run's report: plots drawn from its files (`log.jsonl`, `summary.json`,
//! `masks.json`, `snapshots/`, `plan.json`) as SVG and PNG, and `report.md` plus a
//! self-contained `report.html` in `RUN/report/`.

mod plots;

use std::path::{Path, PathBuf};

use maskprune_model::output::{write_dir_atomically, write_file_atomically};
use serde_json::Value;

pub use plots::{heatmap, line_chart, svg_to_png, Series};

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: invalid JSON: {e}", path.display()))
}

fn read_log(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| format!("{}:{}: invalid JSON: {e}", path.display(), i + 1))
        })
        .collect()
}

/// A figure of the report: file stem, caption and SVG text.
struct Figure {
    stem: String,
    caption: String,
    svg: String,
}

fn column(log: &[Value], key: &str) -> Vec<(f64, f64)> {
    log.iter()
        .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
        .collect()
}

fn stat(log: &[Value], key: &str, f: fn(&[f64]) -> f64) -> Vec<(f64, f64)> {
    log.iter()
        .filter_map(|r| {
            let v: Vec<f64> = r[key]
                .as_array()?
                .iter()
                .filter_map(Value::as_f64)
                .collect();
            Some((r["step"].as_f64()?, f(&v)))
        })
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn max(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::MIN, f64::max)
}

/// `|m|` per layer and unit from a masks file's `m_attention` / `m_channels`.
fn mask_rows(v: &Value, key: &str) -> Vec<Vec<f64>> {
    v[key]
        .as_array()
        .map(|layers| {
            layers
                .iter()
                .map(|l| {
                    l.as_array()
                        .map(|u| u.iter().map(|x| x.as_f64().unwrap_or(0.0).abs()).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn figures(run: &Path, log: &[Value]) -> Result<Vec<Figure>, String> {
    let mut out = Vec::new();
    let mut losses = vec![
        Series::new("Lagrangian", column(log, "lagrangian")),
        Series::new("distillation KL", column(log, "distill")),
        Series::new("uniformity term", column(log, "uniformity_term")),
        Series::new("budget term", column(log, "budget_term")),
    ];
    let ntp = column(log, "ntp");
    if !ntp.is_empty() {
        losses.push(Series::new("next-token", ntp));
    }
    out.push(Figure {
        stem: "loss".into(),
        caption: "Loss terms per update".into(),
        svg: line_chart("Loss terms", "update", "value", &losses)?,
    });
    let masks = read_json(&run.join("masks.json")).ok();
    let units_attention = masks
        .as_ref()
        .and_then(|m| m["attention_units"].as_f64())
        .unwrap_or(1.0);
    let units_channels = masks
        .as_ref()
        .and_then(|m| m["m_channels"][0].as_array().map(|a| a.len() as f64))
        .unwrap_or(1.0);
    let frac = |key: &str, n: f64| -> Vec<(f64, f64)> {
        column(log, key)
            .into_iter()
            .map(|(s, v)| (s, v / n))
            .collect()
    };
    let kept = |key: &str, n: f64| -> Vec<(f64, f64)> {
        stat(log, key, mean)
            .into_iter()
            .map(|(s, v)| (s, v / n))
            .collect()
    };
    let target: Vec<(f64, f64)> = log
        .iter()
        .filter_map(|r| {
            let dense = log.first()?["params_achieved"].as_f64()?;
            Some((r["step"].as_f64()?, r["params_target"].as_f64()? / dense))
        })
        .collect();
    out.push(Figure {
        stem: "widths".into(),
        caption: "Shared widths s (fraction of the units) and the mean units kept per layer, with the scheduled parameter target (fraction of dense)".into(),
        svg: line_chart(
            "Widths",
            "update",
            "fraction",
            &[
                Series::new("s_attention / units", frac("s_attention", units_attention)),
                Series::new("s_channels / channels", frac("s_channels", units_channels)),
                Series::new("kept attention (mean over layers)", kept("kept_attention", units_attention)),
                Series::new("kept channels (mean over layers)", kept("kept_channels", units_channels)),
                Series::new("parameter target", target),
            ],
        )?,
    });
    let millions = |key: &str| -> Vec<(f64, f64)> {
        column(log, key)
            .into_iter()
            .map(|(s, v)| (s, v / 1e6))
            .collect()
    };
    out.push(Figure {
        stem: "params".into(),
        caption: "Decoder-layer linear parameters (millions): achieved by the masks, implied by s, the scheduled target and the final target".into(),
        svg: line_chart(
            "Parameters",
            "update",
            "millions",
            &[
                Series::new("achieved (masks)", millions("params_achieved")),
                Series::new("at s", millions("params_s")),
                Series::new("scheduled target", millions("params_target")),
                Series::new("final target", millions("params_final_target")),
            ],
        )?,
    });
    out.push(Figure {
        stem: "multipliers".into(),
        caption: "Multipliers: the budget's μ and the per-layer y (mean and max over layers)"
            .into(),
        svg: line_chart(
            "Multipliers",
            "update",
            "value",
            &[
                Series::new("μ (budget)", column(log, "mu")),
                Series::new("y attention, mean", stat(log, "y_attention", mean)),
                Series::new("y attention, max", stat(log, "y_attention", max)),
                Series::new("y channels, mean", stat(log, "y_channels", mean)),
                Series::new("y channels, max", stat(log, "y_channels", max)),
            ],
        )?,
    });
    // Mask heatmaps: the snapshots (start, middle) and the final masks.
    let mut states: Vec<(String, Value)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(run.join("snapshots")) {
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files {
            let v = read_json(&f)?;
            let step = v["step"].as_u64().unwrap_or(0);
            states.push((format!("step {step}"), v));
        }
    }
    if let Some(m) = &masks {
        states.push(("end".into(), m.clone()));
    }
    for (i, (label, v)) in states.iter().enumerate() {
        for (key, what) in [
            ("m_attention", "attention units"),
            ("m_channels", "MLP channels"),
        ] {
            let rows = mask_rows(v, key);
            if rows.is_empty() {
                continue;
            }
            let stem = format!(
                "masks-{i}-{}",
                if key == "m_attention" {
                    "attention"
                } else {
                    "channels"
                }
            );
            out.push(Figure {
                caption: format!("|m| of the {what} per layer, {label} (0 = pruned)"),
                svg: heatmap(&format!("{what}, {label}"), what, &rows)?,
                stem,
            });
        }
    }
    let plan = read_json(&run.join("plan.json")).ok();
    if let Some(layers) = plan.as_ref().and_then(|p| p["layers"].as_array()) {
        let count = |k: &str| -> Vec<(f64, f64)> {
            layers
                .iter()
                .enumerate()
                .map(|(l, p)| (l as f64, p[k].as_array().map_or(0, Vec::len) as f64))
                .collect()
        };
        let channels: Vec<(f64, f64)> = count("channels")
            .into_iter()
            .map(|(l, c)| (l, c / units_channels))
            .collect();
        // Attention units are KV groups or query heads, as the run's masks count them.
        let by_groups = masks.as_ref().and_then(|m| m["granularity"].as_str()) == Some("kv_group");
        let attention: Vec<(f64, f64)> = count(if by_groups { "kv_heads" } else { "query_heads" })
            .into_iter()
            .map(|(l, h)| (l, h / units_attention))
            .collect();
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
    let mut lines = Vec::new();
    if let Ok(s) = read_json(&run.join("summary.json")) {
        let w = &s["widths"];
        lines.push(format!(
            "- widths in every layer: {} query heads, {} KV heads, {} MLP channels ({})",
            w["query_heads"],
            w["kv_heads"],
            w["channels"],
            s["granularity"].as_str().unwrap_or("")
        ));
        lines.push(format!(
            "- parameters: {} → {} (decoder-layer linear: {} → {}, target {})",
            s["total_params"][0],
            s["total_params"][1],
            s["decoder_linear"][0],
            s["decoder_linear"][1],
            s["decoder_linear"][2]
        ));
        lines.push(format!(
            "- {} updates in {:.0} s; held-out KL {:.4} before extraction, {:.4} after (dense with the adapters: {:.4})",
            s["steps"],
            s["train_seconds"].as_f64().unwrap_or(0.0),
            s["loss_before_extraction"].as_f64().unwrap_or(f64::NAN),
            s["loss_after_extraction"].as_f64().unwrap_or(f64::NAN),
            s["loss_dense_with_lora"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    lines
}

/// Writes `RUN/report/` (replacing an older one): one SVG and one PNG per figure,
/// `report.md` and `report.html`; `results` (a markdown table, e.g. `table.md`) is appended
/// when given. Returns the report directory.
pub fn write_report(run: &Path, results: Option<&Path>) -> Result<PathBuf, String> {
    let log = read_log(&run.join("log.jsonl"))?;
    if log.is_empty() {
        return Err(format!(
            "{}: no training steps logged yet",
            run.join("log.jsonl").display()
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
