#!/usr/bin/env bash
# The paper-style results table (LLM-Pruner's Table 1 layout) for one model: dense, MaskPrune,
# the non-uniform ablation and the one-shot baselines (random, magnitude, wanda-sp, flap,
# taylor) at the same widths, for each sparsity; WikiText-2 and PTB perplexity at seq-len 128
# and the 7 zero-shot tasks; speed and size of each MaskPrune model against the dense one.
#
#   scripts/reproduce-table.sh            # SmolLM2-135M, sparsities 20 30 50
#   scripts/reproduce-table.sh --quick    # minutes: 1 sparsity, 2 training steps, few docs
#
# Resumable: every finished piece (pruned model, each evaluation) is kept and skipped when
# present, and each row's results go to RESULTS/rows/<method>-<sparsity>/ as soon as they
# exist, so the table can be completed across sessions; `maskprune table` then writes
# RESULTS/table.{md,csv,json} from the finished rows.
#
# Environment: MODEL (default: SmolLM2 imported from PyPI), NAME (default smollm2-135m; configs
# are configs/NAME-<sparsity>.toml), SPARSITIES ("20 30 50"), METHODS (default all),
# PPL_WINDOWS (256), ZS_LIMIT (100 documents per task), WORK (pruned models; default
# ~/.cache/maskprune/table/NAME), RESULTS (results/NAME; the --quick default is WORK/results),
# MASKPRUNE_BIN (a built maskprune to use instead of building one), CONFIGS (directory of
# the NAME-<sparsity>.toml configs; default configs).
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
NAME=${NAME:-smollm2-135m}
if [ -z "${MASKPRUNE_BIN:-}" ]; then
  cargo build --quiet --release -p maskprune-cli
fi
BIN=${MASKPRUNE_BIN:-${CARGO_TARGET_DIR:-target}/release/maskprune}
MODEL=${MODEL:-$(MASKPRUNE_BIN=$BIN scripts/fetch-smollm2.sh | tail -n 1)}
WORK=${WORK:-$HOME/.cache/maskprune/table/$NAME}
METHODS=${METHODS:-"maskprune maskprune-nonuniform random magnitude wanda-sp flap taylor"}
EXTRA=()
BENCH=(--shapes 1x512,4x256 --decode 1x128+128 --repeats 3)
if [ $QUICK = 1 ]; then
  WORK=${WORK}-quick
  SPARSITIES=${SPARSITIES:-50}
  PPL_WINDOWS=${PPL_WINDOWS:-4}
  ZS_LIMIT=${ZS_LIMIT:-3}
  RESULTS=${RESULTS:-$WORK/results}
  EXTRA=(--max-steps 2 --set train.init_batches=1 --set calibration.samples=24 --set train.eval_samples=4)
  BENCH=(--shapes 1x16 --decode 1x8+4 --repeats 1 --warmup 0)
fi
SPARSITIES=${SPARSITIES:-"20 30 50"}
PPL_WINDOWS=${PPL_WINDOWS:-256}
ZS_LIMIT=${ZS_LIMIT:-100}
RESULTS=${RESULTS:-results/$NAME}
ROWS=$RESULTS/rows
mkdir -p "$WORK" "$ROWS"
TASKS=boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa

# row_json DIR METHOD SPARSITY MODEL_DIR PRUNE_SECONDS
row_json() {
  local params
  params=$(python3 -c 'import json,sys,os
p=os.path.join(sys.argv[1],"maskprune.json")
print(json.load(open(p))["params"]["total_after"] if os.path.exists(p) else "null")' "$4")
  printf '{"method": "%s", "sparsity": %s, "model": "%s", "params": %s, "prune_seconds": %s}\n' \
    "$2" "$3" "$4" "$params" "$5" > "$1/row.json.tmp"
  mv "$1/row.json.tmp" "$1/row.json"
}

# evaluate ROW_DIR MODEL_DIR: perplexity and zero-shot, each skipped when already there.
evaluate() {
  local row=$1 model=$2
  for ds in wikitext2 ptb; do
    if [ ! -f "$row/$ds.json" ]; then
      echo "== $(basename "$row"): $ds perplexity"
      "$BIN" eval ppl --model "$model" --dataset $ds --seq-len 128 --max-windows "$PPL_WINDOWS" \
        --json "$row/$ds.json"
    fi
  done
  # zero-shot resumes task by task inside its own JSON.
  if [ ! -f "$row/zeroshot.done" ]; then
    echo "== $(basename "$row"): zero-shot"
    "$BIN" eval zeroshot --model "$model" --tasks $TASKS --limit "$ZS_LIMIT" --json "$row/zeroshot.json"
    touch "$row/zeroshot.done"
  fi
}

seconds_since() { echo $(( $(date +%s) - $1 )); }

# Dense.
mkdir -p "$ROWS/dense-0"
[ -f "$ROWS/dense-0/row.json" ] || row_json "$ROWS/dense-0" dense 0 "$MODEL" 0
evaluate "$ROWS/dense-0" "$MODEL"

for pct in $SPARSITIES; do
  sparsity=$(python3 -c "print($pct / 100)")
  config=${CONFIGS:-configs}/$NAME-$pct.toml
  [ -f "$config" ] || { echo "error: $config: no training config for $pct% (copy one from configs/)" >&2; exit 1; }
  dir=$WORK/s$pct
  mkdir -p "$dir"
  for method in $METHODS; do
    out=$dir/$method
    if [ ! -f "$out/maskprune.json" ]; then
      echo "== $pct%: pruning with $method"
      start=$(date +%s)
      flags=()
      case $method in
        maskprune|maskprune-nonuniform) ;;
        *)
          # Baselines take exactly the widths MaskPrune reached at this budget.
          [ -f "$dir/maskprune.run/plan.json" ] || {
            echo "error: $method at $pct% needs the MaskPrune plan; put maskprune first in METHODS" >&2; exit 1; }
          flags=(--widths-from "$dir/maskprune.run/plan.json")
          # Scores do not depend on the budget: reuse another sparsity's (same calibration).
          for other in "$WORK"/s*/"$method".run/scores.json; do
            [ -f "$other" ] && { flags+=(--scores-from "$other"); break; }
          done ;;
      esac
      "$BIN" prune --method "$method" --config "$config" --model "$MODEL" --out "$out" \
        --run-dir "$out.run" --overwrite --overwrite-run "${flags[@]}" "${EXTRA[@]}"
      seconds_since "$start" > "$out.seconds"
    fi
    row=$ROWS/$method-$pct
    mkdir -p "$row"
    [ -f "$row/row.json" ] || row_json "$row" "$method" "$sparsity" "$out" "$(cat "$out.seconds" 2>/dev/null || echo null)"
    evaluate "$row" "$out"
    if [ "$method" = maskprune ] && [ ! -f "$row/bench.json" ]; then
      echo "== $pct%: speed and size against dense"
      "$BIN" bench --model "$out" --baseline "$MODEL" "${BENCH[@]}" --json "$row/bench.json"
    fi
  done
done
"$BIN" table --rows "$ROWS" --out "$RESULTS" --title "$NAME: structured pruning at identical widths"
# Each mask-training run's report gets the table.
for run in "$WORK"/s*/maskprune*.run; do
  [ -f "$run/summary.json" ] && "$BIN" --quiet report "$run" --results "$RESULTS/table.md" > /dev/null
done
