#!/usr/bin/env bash
# Install ftk into ./.venv (or the active virtualenv) with everything the main job and the tests need.
#
#   bash scripts/install.sh            # then: .venv/bin/ftk pretrain +recipe=gpt-tiny
#
# torch goes in first and on its own: a bare `torch` requirement on a machine without it pulls the
# multi-GB CUDA build. On a CPU-only machine we ask for the CPU build; set FTK_TORCH to choose
# another spec (e.g. FTK_TORCH="torch==2.13.0" with FTK_TORCH_INDEX=https://download.pytorch.org/whl/cu128).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY="$VIRTUAL_ENV/bin/python"
fi

TORCH_SPEC="${FTK_TORCH:-torch==2.13.0}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ -n "${FTK_TORCH_INDEX:-}" ]; then
    "$PY" -m pip install -q "$TORCH_SPEC" --index-url "$FTK_TORCH_INDEX"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "$TORCH_SPEC"   # CUDA build from PyPI
  elif "$PY" -m pip download -q --no-index --no-deps -d "$(mktemp -d)" "$TORCH_SPEC" >/dev/null 2>&1; then
    "$PY" -m pip install -q "$TORCH_SPEC"   # a wheel on this machine's disk (find-links): the CPU build here
  else
    "$PY" -m pip install -q "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu   # CPU-only build
  fi
fi
"$PY" -m pip install -q -e ".[quant,test]"
"$PY" -c "import torch, ftk; print(f'ftk {ftk.__version__} installed with torch {torch.__version__}')"
