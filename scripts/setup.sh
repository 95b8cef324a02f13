#!/usr/bin/env bash
# Installs the system packages strata's build needs: cmake and OpenBLAS (FAISS is built from
# source and linked statically by the `faiss` feature), and a C++ compiler.
set -euo pipefail
need=()
for pkg in cmake libopenblas-dev g++; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
