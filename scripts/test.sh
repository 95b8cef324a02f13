#!/usr/bin/env bash
# The test command: every test of the workspace (FAISS baseline included), then format and lints.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release --workspace --all-features
cargo fmt --all -- --check
cargo clippy --release --workspace --all-features --all-targets -- -D warnings
