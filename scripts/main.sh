#!/usr/bin/env bash
# The main job on the bundled default: build strata (with FAISS), index the shared SmolLM2 dump,
# and evaluate strata against every baseline at a 2% budget. Results land in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
DUMP="${1:-../shared/data/smollm2-jargon-8k.safetensors}"
BUDGET="${BUDGET:-0.02}"
scripts/setup.sh
cargo build --release --features faiss -p strata
mkdir -p out
name="$(basename "$DUMP" .safetensors)"
./target/release/strata build "$DUMP" --out "out/$name.index" --force
./target/release/strata inspect "out/$name.index"
./target/release/strata eval "$DUMP" --index "out/$name.index" --budget "$BUDGET" \
  --method all --json "out/$name-eval.json"
