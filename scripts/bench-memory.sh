#!/usr/bin/env bash
# Peak RSS and wall time of what users run on billion-parameter checkpoints, from random-weight
# checkpoints with real shapes (scripts/make_shape_checkpoint.py: 1.7b = SmolLM2-1.7B's shape,
# 7b = a Qwen2-7B-style GQA shape, bf16 safetensors): `eval ppl` (2 windows of 128),
# `rank --method flap` (8 calibration windows of 128), `surgery` of that plan, and for the
# 1.7b shape one `train-masks` update (batch 4 x 128, one Fisher batch). Each row is one
# process under /usr/bin/time -v; peak RSS is compared with the checkpoint's bf16 bytes.
#
#   scripts/bench-memory.sh            # SHAPES="1.7b 7b"; writes results/memory-shapes.{json,md}
#
# Environment: SHAPES, WORK (default ~/.cache/maskprune/shapes; the 7b checkpoint takes
# 15.2 GB of disk, its pruned copy 11 GB more while the surgery row runs), PY (a Python with
# torch and safetensors, default /work/venv/bin/python or python3), MASKPRUNE_BIN, OUT
# (default results/memory-shapes).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MASKPRUNE_BIN:-}" ]; then
  cargo build --quiet --release -p maskprune-cli
fi
BIN=${MASKPRUNE_BIN:-${CARGO_TARGET_DIR:-target}/release/maskprune}
SHAPES=${SHAPES:-"1.7b 7b"}
WORK=${WORK:-$HOME/.cache/maskprune/shapes}
PY=${PY:-$( [ -x /work/venv/bin/python ] && echo /work/venv/bin/python || echo python3)}
OUT=${OUT:-results/memory-shapes}
TOKENIZER=$(MASKPRUNE_BIN=$BIN scripts/fetch-smollm2.sh | tail -n 1)
mkdir -p "$WORK"
rows=$WORK/rows.jsonl
: > "$rows"
COMMIT=$("$BIN" --version | sed -n 's/.*(commit \(.*\)).*/\1/p')

# measure SHAPE STAGE CMD...: one row (peak RSS, wall seconds, exit status) from time -v.
measure() {
  local shape=$1 stage=$2; shift 2
  local log=$WORK/$shape-$stage.time
  echo "== $shape: $stage"
  /usr/bin/time -v "$@" > "$WORK/$shape-$stage.out" 2> "$log" || true
  "$PY" - "$log" "$shape" "$stage" "$WORK/$shape" "$rows" <<'PY'
import json, os, re, sys
log, shape, stage, model, rows = sys.argv[1:]
text = open(log).read()
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
status = int(re.search(r"Exit status: (\d+)", text).group(1))
weights = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model) if f.endswith(".safetensors"))
row = {"shape": shape, "stage": stage, "peak_rss_bytes": rss, "wall_s": round(secs, 1),
       "weight_bytes_bf16": weights, "rss_over_weights": round(rss / weights, 3), "exit_status": status}
print(json.dumps(row))
open(rows, "a").write(json.dumps(row) + "\n")
PY
}

for shape in $SHAPES; do
  model=$WORK/$shape
  [ -f "$model/config.json" ] || "$PY" scripts/make_shape_checkpoint.py "$shape" "$model" "$TOKENIZER"
  "$BIN" --quiet calib --model "$model" --samples 8 --seq-len 128 --out "$WORK/$shape-calib.json"
  measure "$shape" "eval ppl" "$BIN" --quiet eval ppl --model "$model" --dataset wikitext2 \
    --seq-len 128 --max-windows 2
  measure "$shape" "rank flap" "$BIN" --quiet rank --model "$model" --method flap \
    --calib "$WORK/$shape-calib.json" --sparsity 0.3 --out "$WORK/$shape-flap.plan.json"
  measure "$shape" "surgery" "$BIN" --quiet surgery --model "$model" \
    --plan "$WORK/$shape-flap.plan.json" --out "$WORK/$shape-pruned" --overwrite
  rm -rf "$WORK/$shape-pruned"
  if [ "$shape" = 1.7b ]; then
    measure "$shape" "train-masks (1 update)" "$BIN" train-masks \
      --config configs/smollm2-135m-30.toml --model "$model" --calib "$WORK/$shape-calib.json" \
      --max-steps 1 --set train.init_batches=1 --set train.eval_samples=4 \
      --run-dir "$WORK/$shape-train.run" --overwrite-run
  fi
done
"$PY" - "$rows" "$OUT" "$COMMIT" <<'PY'
import json, os, platform, sys
rows_path, out, commit = sys.argv[1:]
rows = [json.loads(l) for l in open(rows_path)]
doc = {"commit": commit, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
       "rows": rows}
json.dump(doc, open(out + ".json.tmp", "w"), indent=1)
os.replace(out + ".json.tmp", out + ".json")
gib = lambda b: b / 2**30
lines = [f"Peak RSS and wall time on random-weight checkpoints of real shapes (build {commit}, "
         f"{os.cpu_count()} CPUs; `scripts/bench-memory.sh`).", "",
         "| shape | stage | bf16 weights | peak RSS | RSS / weights | wall |", "|---|---|---|---|---|---|"]
for r in rows:
    ok = "" if r["exit_status"] == 0 else f" (exit {r['exit_status']})"
    lines.append(f"| {r['shape']} | {r['stage']}{ok} | {gib(r['weight_bytes_bf16']):.2f} GiB | "
                 f"{gib(r['peak_rss_bytes']):.2f} GiB | {r['rss_over_weights']:.2f}x | {r['wall_s']:.0f} s |")
open(out + ".md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
