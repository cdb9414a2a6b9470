#!/usr/bin/env bash
# Update time of real data-parallel `train-masks` runs against one device: SmolLM2-135M with
# the 30% config, `--max-steps $STEPS` (batch 4 x 128), once with `--devices cpu` and once
# with each list in DEVICE_LISTS, alternated ROUNDS times, each run its own process; an entry
# `nodes:N` runs N processes over loopback (`--nodes N`, one CPU device each; node 0's log
# counts). The update time is the mean of `log.jsonl`'s `seconds` after the first update; the JSON holds
# every run's updates, each device list's mean, min and max over rounds, and its ratio to
# one device (< 1 is faster).
#
#   scripts/bench-devices.sh     # writes results/bench-devices.json
#
# Environment: MASKPRUNE_BIN, STEPS (20), ROUNDS (2), DEVICE_LISTS ("cpu,cpu nodes:2"), OUT, WORK.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MASKPRUNE_BIN:-}" ]; then
  cargo build --quiet --release -p maskprune-cli
fi
BIN=${MASKPRUNE_BIN:-${CARGO_TARGET_DIR:-target}/release/maskprune}
STEPS=${STEPS:-20}
ROUNDS=${ROUNDS:-2}
DEVICE_LISTS=${DEVICE_LISTS:-"cpu,cpu nodes:2"}
OUT=${OUT:-results/bench-devices.json}
WORK=${WORK:-$(mktemp -d)}
MODEL=$(MASKPRUNE_BIN=$BIN scripts/fetch-smollm2.sh | tail -n 1)
COMMIT=$("$BIN" --version | sed -n 's/.*(commit \(.*\)).*/\1/p')
mkdir -p "$WORK"
# One calibration set for every run: the config's, drawn once.
"$BIN" --quiet calib --model "$MODEL" --dataset c4 --samples 264 --seq-len 128 --seed 0 \
  --out "$WORK/calib.json"
runs=$WORK/runs.jsonl
: > "$runs"
for round in $(seq 1 "$ROUNDS"); do
  for devices in cpu $DEVICE_LISTS; do
    run=$WORK/run-$round-${devices//[,:]/_}
    echo "round $round: $devices" >&2
    train=("$BIN" --quiet train-masks --config configs/smollm2-135m-30.toml --model "$MODEL"
      --calib "$WORK/calib.json" --max-steps "$STEPS" --overwrite-run)
    case $devices in
      nodes:*)
        n=${devices#nodes:}
        at=127.0.0.1:$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
        pids=()
        for k in $(seq $((n - 1)) -1 0); do
          dir=$run; [ "$k" = 0 ] || dir=$run-node$k
          "${train[@]}" --nodes "$n" --node-rank "$k" --coordinator "$at" --run-dir "$dir" > /dev/null &
          pids+=($!)
        done
        for p in "${pids[@]}"; do wait "$p"; done ;;
      *) "${train[@]}" --devices "$devices" --run-dir "$run" > /dev/null ;;
    esac
    python3 - "$run/log.jsonl" "$devices" "$round" >> "$runs" <<'PY'
import json, sys
updates = [json.loads(l)["seconds"] for l in open(sys.argv[1])]
print(json.dumps({"devices": sys.argv[2], "round": int(sys.argv[3]), "update_seconds": updates}))
PY
  done
done
python3 - "$runs" "$OUT" "$COMMIT" "$STEPS" "$(nproc)" <<'PY'
import json, os, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def mean(x):
    return sum(x) / len(x)
by = {}
for r in runs:
    by.setdefault(r["devices"], []).append(mean(r["update_seconds"][1:]))
base = by["cpu"]
summary = {
    d: {
        "mean_update_seconds": mean(v),
        "range": [min(v), max(v)],
        "ratio_to_one_device": mean(v) / mean(base),
        "ratio_range": [min(v) / max(base), max(v) / min(base)],
    }
    for d, v in by.items()
}
out = {
    "what": "mean update time of real train-masks runs (SmolLM2-135M, configs/smollm2-135m-30.toml, batch 4 x 128), first update excluded",
    "commit": sys.argv[3],
    "steps": int(sys.argv[4]),
    "cpus": int(sys.argv[5]),
    "summary": summary,
    "runs": runs,
}
tmp = sys.argv[2] + ".tmp"
with open(tmp, "w") as f:
    json.dump(out, f, indent=1)
os.replace(tmp, sys.argv[2])
for d, s in summary.items():
    print(f"{d}: {s['mean_update_seconds']:.3f} s/update (range {s['range'][0]:.3f}-{s['range'][1]:.3f}), ratio to one device {s['ratio_to_one_device']:.3f}")
PY
