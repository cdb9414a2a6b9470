#!/usr/bin/env bash
# One row of the mask-training ablation (docs/method.md): prune SmolLM2 with MaskPrune at
# SPARSITY (default 30%) using configs/NAME-<pct>.toml plus the given `prune` flags, then
# record what it cost (training tokens, wall time), the selection metric — perplexity on
# held-out calibration text: C4's first 1,100 documents (256 windows of 128), which
# calibration never reads (it draws from documents 1,100-1,999), the same text for every
# variant whatever its calibration settings — the run's own held-out KL before and after
# extraction, and, for information only, WikiText-2 perplexity (first 1,024 windows).
# With TUNE=1 the pruned model also goes through the table's recovery fine-tuning
# (`maskprune finetune --teacher MODEL`, defaults, as scripts/reproduce-table.sh runs it) and
# the recovered model gets the same two perplexities (and PTB, for information): the plan that
# matters is the one that recovers best.
#
#   scripts/ablation.sh ROW [prune flags...]      # e.g. packed --set calibration.packed=true
#   PLAN=plan.json scripts/ablation.sh ROW        # a given plan, no adapters (surgery)
#   scripts/ablation.sh --table [--tuned]         # the ablation table of the finished rows
#                                                 # (--tuned: the rows' recovered models)
#
# Rows go to RESULTS/ablation-<pct>/ROW/ (row.json, summary.json, c4.json, wikitext2.json); models
# to WORK/ablation-<pct>/ROW. Environment: MODEL, NAME (smollm2-135m), SPARSITY (30), METHOD
# (maskprune, maskprune-nonuniform, or a one-shot baseline such as flap with
# `--widths-from` a MaskPrune row's plan.json, for reference), MASKPRUNE_BIN, WORK, RESULTS, PPL_WINDOWS (1024),
# TUNE (0; 1 adds the recovery), PLAN (a plan.json: cut the dense weights to it with `surgery`
# instead of running `prune`, so the row measures a given plan without mask-training adapters).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${NAME:-smollm2-135m}
PCT=${SPARSITY:-30}
RESULTS=${RESULTS:-results/$NAME}
DIR=$RESULTS/ablation-$PCT
if [ "${1:-}" = "--table" ]; then
  python3 - "$DIR" "${@:2}" <<'PY'
import json, os, sys
root = sys.argv[1]
rows = []
for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    try:
        row = json.load(open(os.path.join(d, "row.json")))
        s = json.load(open(os.path.join(d, "summary.json")))
        c4 = json.load(open(os.path.join(d, "c4.json")))["result"]["ppl"]
        w = json.load(open(os.path.join(d, "wikitext2.json")))["result"]["ppl"]
    except FileNotFoundError:
        continue
    tuned = None
    try:
        t = json.load(open(os.path.join(d, "tuned.json")))
        tuned = (t, *(json.load(open(os.path.join(d, f"tuned-{k}.json")))["result"]["ppl"]
                      for k in ("c4", "wikitext2", "ptb")))
    except FileNotFoundError:
        pass
    rows.append((row, s, c4, w, tuned))
rows.sort(key=lambda r: r[0]["started"])
kl = lambda v: "—" if v is None else f"{v:.4f}"
tuned_rows = [r for r in rows if r[4] is not None]
if "--tuned" in sys.argv[2:]:
    print("| row | method | flags | tokens (pruning + recovery) | recovery wall time | held-out C4 ppl before → after recovery (selection) | WikiText-2 after (not for selection) | PTB after (not for selection) |")
    print("|---|---|---|---|---|---|---|---|")
    for row, s, c4, w, (t, tc4, tw, tp) in tuned_rows:
        print(f"| {row['row']} | {row['method']} | `{' '.join(row['flags']) or '(config)'}` | "
              f"{row['tokens'] / 1e6:.2f}M + {t['tokens'] / 1e6:.2f}M | {t['seconds'] / 60:.1f} min | "
              f"{c4:.2f} → {tc4:.2f} | {tw:.2f} | {tp:.2f} |")
    sys.exit(0)
print("| row | method | flags | tokens | wall time | widths (q/kv/MLP) | run's held-out KL before → after extraction | held-out C4 ppl (selection) | WikiText-2 (not for selection) |")
print("|---|---|---|---|---|---|---|---|---|")
for row, s, c4, w, _ in rows:
    wd = s["widths"]
    print(f"| {row['row']} | {row['method']} | `{' '.join(row['flags']) or '(config)'}` | {row['tokens'] / 1e6:.2f}M | "
          f"{row['seconds'] / 60:.1f} min | {wd['query_heads']}/{wd['kv_heads']}/{wd['channels']} | "
          f"{kl(s['loss_before_extraction'])} → {kl(s['loss_after_extraction'])} | {c4:.2f} | {w:.2f} |")
PY
  exit 0
fi
ROW=${1:?usage: scripts/ablation.sh ROW [prune flags...] | --table [--tuned]}
shift
if [ -z "${MASKPRUNE_BIN:-}" ]; then
  cargo build --quiet --release -p maskprune-cli
fi
BIN=${MASKPRUNE_BIN:-${CARGO_TARGET_DIR:-target}/release/maskprune}
MODEL=${MODEL:-$(MASKPRUNE_BIN=$BIN scripts/fetch-smollm2.sh | tail -n 1)}
WORK=${WORK:-$HOME/.cache/maskprune/ablation/$NAME}/ablation-$PCT
METHOD=${METHOD:-maskprune}
out=$WORK/$ROW
row=$DIR/$ROW
mkdir -p "$WORK" "$row"
if [ ! -f "$out/maskprune.json" ]; then
  start=$(date +%s)
  if [ -n "${PLAN:-}" ]; then
    mkdir -p "$out.run"
    cp "$PLAN" "$out.run/plan.json"
    "$BIN" surgery --quiet --model "$MODEL" --plan "$out.run/plan.json" --out "$out" --overwrite
    method=plan flags=("PLAN=$PLAN")
  else
    "$BIN" prune --method "$METHOD" --config "configs/$NAME-$PCT.toml" --model "$MODEL" \
      --out "$out" --run-dir "$out.run" --overwrite --overwrite-run "$@"
    method=$METHOD flags=("$@")
  fi
  python3 - "$row" "$ROW" "$method" "$out.run" "$start" "$(date +%s)" "$("$BIN" --version)" "${flags[@]}" <<'PY'
import json, os, sys, tomllib
row, name, method, run, start, end, version, *flags = sys.argv[1:]
if os.path.exists(os.path.join(run, "summary.json")):
    summary = json.load(open(os.path.join(run, "summary.json")))
    config = tomllib.load(open(os.path.join(run, "config.toml"), "rb"))
    seq_len = json.load(open(os.path.join(run, "calibration.json")))["seq_len"]
    tokens = summary["steps"] * config["train"]["batch"] * seq_len
else:
    # A one-shot baseline reads its calibration windows once; a given plan (PLAN) reads none.
    layer = json.load(open(os.path.join(run, "plan.json")))["layers"][0]
    summary = {"train_seconds": 0, "loss_before_extraction": None, "loss_after_extraction": None,
               "widths": {k: len(layer[k]) for k in ("query_heads", "kv_heads", "channels")}}
    tokens = 0
    if os.path.exists(os.path.join(run, "calibration.json")):
        calibration = json.load(open(os.path.join(run, "calibration.json")))
        tokens = len(calibration["samples"]) * calibration["seq_len"]
out = {"row": name, "method": method, "flags": flags, "started": int(start),
       "seconds": int(end) - int(start), "train_seconds": summary["train_seconds"],
       "tokens": tokens, "version": version}
json.dump(out, open(os.path.join(row, "row.json"), "w"), indent=2)
json.dump(summary, open(os.path.join(row, "summary.json"), "w"), indent=2)
PY
fi
[ -f "$row/c4.json" ] || "$BIN" eval ppl --quiet --model "$out" --dataset c4 --seq-len 128 \
  --json "$row/c4.json"
[ -f "$row/wikitext2.json" ] || "$BIN" eval ppl --quiet --model "$out" --dataset wikitext2 \
  --seq-len 128 --max-windows "${PPL_WINDOWS:-1024}" --json "$row/wikitext2.json"
python3 -c "import json,sys; print(sys.argv[1], 'C4', json.load(open(sys.argv[2]))['result']['ppl'], 'WikiText-2', json.load(open(sys.argv[3]))['result']['ppl'])" "$ROW" "$row/c4.json" "$row/wikitext2.json"
[ "${TUNE:-0}" = 1 ] || exit 0
tuned=$out-tuned
if [ ! -f "$row/tuned.json" ]; then
  start=$(date +%s)
  "$BIN" finetune --model "$out" --teacher "$MODEL" --out "$tuned" --run-dir "$tuned.run" \
    --overwrite --overwrite-run
  python3 - "$row/tuned.json" "$tuned.run/summary.json" "$start" "$(date +%s)" "$("$BIN" --version)" <<'PY'
import json, sys
path, summary, start, end, version = sys.argv[1:]
out = {"seconds": int(end) - int(start), "tokens": json.load(open(summary))["tokens"], "version": version}
json.dump(out, open(path, "w"), indent=2)
PY
fi
for ds in c4 wikitext2 ptb; do
  windows=()
  [ $ds = c4 ] || windows=(--max-windows "${PPL_WINDOWS:-1024}")
  [ -f "$row/tuned-$ds.json" ] || "$BIN" eval ppl --quiet --model "$tuned" --dataset $ds \
    --seq-len 128 "${windows[@]}" --json "$row/tuned-$ds.json"
done
python3 -c "import json,sys; print(sys.argv[1], 'recovered: C4', *[json.load(open(f'{sys.argv[2]}/tuned-{k}.json'))['result']['ppl'] for k in ('c4',)], 'WikiText-2', json.load(open(f'{sys.argv[2]}/tuned-wikitext2.json'))['result']['ppl'], 'PTB', json.load(open(f'{sys.argv[2]}/tuned-ptb.json'))['result']['ppl'])" "$ROW" "$row"
