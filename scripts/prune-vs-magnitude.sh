#!/usr/bin/env bash
# Prune SmolLM2 (or MODEL) with MaskPrune and with the one-shot magnitude baseline at exactly
# the same widths, then measure perplexity at seq-len 128 (WikiText-2, or EVAL_DATASET) of
# dense, MaskPrune and magnitude in the same run. Writes results/<name>/prune-<tag>.json.
#
#   scripts/prune-vs-magnitude.sh configs/smollm2-135m-50.toml [kv_group|query_head]
#
# Environment: MODEL (default: the imported SmolLM2), MAX_STEPS (cut the schedule),
# MAX_WINDOWS (WikiText-2 windows; default all 2,382), WORK (pruned models and runs; default
# ~/.cache/maskprune/runs), RESULTS (default results/smollm2-135m), EXTRA (more prune flags),
# REEXTRACT=1 (reuse a finished run in WORK: extraction, surgery and evaluation only),
# EVAL_DATASET (default wikitext2), MASKPRUNE_BIN (a built maskprune instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: scripts/prune-vs-magnitude.sh CONFIG [GRANULARITY]}
GRANULARITY=${2:-}
if [ -z "${MASKPRUNE_BIN:-}" ]; then
  cargo build --quiet --release -p maskprune-cli
fi
BIN="${MASKPRUNE_BIN:-${CARGO_TARGET_DIR:-target}/release/maskprune}"
MODEL=${MODEL:-$(MASKPRUNE_BIN=$BIN scripts/fetch-smollm2.sh | tail -n 1)}
WORK=${WORK:-$HOME/.cache/maskprune/runs}
RESULTS=${RESULTS:-results/smollm2-135m}
TAG=$(basename "$CONFIG" .toml)${GRANULARITY:+-$GRANULARITY}${MAX_STEPS:+-steps$MAX_STEPS}
mkdir -p "$WORK" "$RESULTS"
FLAGS=()
[ -n "$GRANULARITY" ] && FLAGS+=(--granularity "$GRANULARITY")
[ -n "${MAX_STEPS:-}" ] && FLAGS+=(--max-steps "$MAX_STEPS")
# shellcheck disable=SC2206
[ -n "${EXTRA:-}" ] && FLAGS+=($EXTRA)
EVAL=${EVAL_DATASET:-wikitext2}
PPL=(--dataset "$EVAL" --seq-len 128)
[ -n "${MAX_WINDOWS:-}" ] && PPL+=(--max-windows "$MAX_WINDOWS")

start=$(date +%s)
if [ "${REEXTRACT:-0}" = 1 ] && [ -d "$WORK/$TAG.run/checkpoint" ]; then
  # A finished run again: --resume goes straight to extraction with the current code.
  "$BIN" train-masks --config "$CONFIG" --model "$MODEL" --run-dir "$WORK/$TAG.run" --resume
  "$BIN" surgery --model "$MODEL" --plan "$WORK/$TAG.run/plan.json" \
    --lora "$WORK/$TAG.run/lora.safetensors" --out "$WORK/$TAG" --overwrite
else
  "$BIN" prune --config "$CONFIG" --model "$MODEL" --out "$WORK/$TAG" --run-dir "$WORK/$TAG.run" \
    --overwrite --overwrite-run "${FLAGS[@]}"
fi
prune_s=$(( $(date +%s) - start ))
"$BIN" rank --model "$MODEL" --method magnitude --widths-from "$WORK/$TAG.run/plan.json" \
  --out "$WORK/$TAG-magnitude.plan.json"
"$BIN" surgery --model "$MODEL" --plan "$WORK/$TAG-magnitude.plan.json" \
  --out "$WORK/$TAG-magnitude" --overwrite
# The dense number is measured once per window count and reused.
DENSE_JSON=$WORK/dense-ppl-$EVAL-128-${MAX_WINDOWS:-all}.json
if [ ! -f "$DENSE_JSON" ]; then
  echo "== $EVAL perplexity, seq-len 128: dense"
  "$BIN" eval ppl --model "$MODEL" "${PPL[@]}" --json "$DENSE_JSON"
fi
cp "$DENSE_JSON" "$WORK/$TAG-ppl-dense.json"
for m in maskprune magnitude; do
  dir=$WORK/$TAG
  [ $m = magnitude ] && dir=$WORK/$TAG-magnitude
  echo "== $EVAL perplexity, seq-len 128: $m"
  "$BIN" eval ppl --model "$dir" "${PPL[@]}" --json "$WORK/$TAG-ppl-$m.json"
done
python3 - "$WORK" "$TAG" "$prune_s" "$RESULTS/prune-$TAG.json" "$CONFIG" "$EVAL" <<'PY'
import json, sys, os
work, tag, prune_s, out, config, dataset = sys.argv[1:7]
load = lambda p: json.load(open(p))
summary = load(f"{work}/{tag}.run/summary.json")
row = {
    "config": config, "tag": tag, "wall_s": int(prune_s), "summary": summary,
    "provenance": load(f"{work}/{tag}/maskprune.json")["params"],
    f"{dataset}_128": {m: {k: load(f"{work}/{tag}-ppl-{m}.json")["result"][k] for k in ("ppl", "windows")}
                      for m in ("dense", "maskprune", "magnitude")},
}
tmp = out + ".tmp"
json.dump(row, open(tmp, "w"), indent=1)
os.replace(tmp, out)
w = summary["widths"]
print(f"{tag}: widths {w['query_heads']}q/{w['kv_heads']}kv/{w['channels']} in every layer; "
      f"params {summary['total_params'][0]} -> {summary['total_params'][1]}; "
      f"extraction gap {summary['loss_before_extraction']:.4f} -> {summary['loss_after_extraction']:.4f}; "
      + ", ".join(f"{m} {dataset} ppl {v['ppl']:.2f}" for m, v in row[f"{dataset}_128"].items())
      + f"; pruning took {prune_s} s -> {out}")
PY
