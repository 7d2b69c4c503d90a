#!/usr/bin/env bash
# Install ftk into ./.venv (or the active virtualenv) with everything the main job and the tests need.
#
#   bash scripts/install.sh            # then: .venv/bin/ftk pretrain +recipe=gpt-tiny
#
# torch goes in first and on its own: a bare `torch` requirement on a machine without it pulls the
# multi-GB CUDA build. On a CPU-only machine we ask for the CPU build; set FTK_TORCH to choose
# another spec (e.g. FTK_TORCH="torch==2.13.0" with FTK_TORCH_INDEX=https://download.pytorch.org/whl/cu128),
# FTK_TORCH_BUILD=cpu|cuda overrides the detection below.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC="${FTK_TORCH:-torch==2.13.0}"

# Which torch build: FTK_TORCH_BUILD=cpu|cuda says it; else a GPU (nvidia-smi) or a batch scheduler
# (a GPU cluster's login node has sbatch but often no GPU and no nvidia-smi: its jobs run on GPU nodes
# sharing this environment, so the CPU build would silently train them on CPUs) means CUDA.
torch_build() {
  if [ -n "${FTK_TORCH_BUILD:-}" ]; then echo "$FTK_TORCH_BUILD"
  elif command -v nvidia-smi >/dev/null 2>&1; then echo cuda
  elif command -v sbatch >/dev/null 2>&1 || command -v qsub >/dev/null 2>&1 || command -v bsub >/dev/null 2>&1; then echo cuda
  else echo cpu
  fi
}
BUILD="$(torch_build)"
case "$BUILD" in
  cpu|cuda) ;;
  *) echo "install.sh: FTK_TORCH_BUILD=$BUILD is not a torch build; use FTK_TORCH_BUILD=cpu or FTK_TORCH_BUILD=cuda" >&2; exit 2 ;;
esac
if [ "${1:-}" = "--torch-build" ]; then echo "$BUILD"; exit 0; fi   # what would be installed (tests, dry runs)

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY="$VIRTUAL_ENV/bin/python"
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ -n "${FTK_TORCH_INDEX:-}" ]; then
    "$PY" -m pip install -q "$TORCH_SPEC" --index-url "$FTK_TORCH_INDEX"
  elif [ "$BUILD" = cuda ]; then
    echo "install.sh: installing torch's CUDA build from PyPI (FTK_TORCH_BUILD=cpu for the CPU build)" >&2
    "$PY" -m pip install -q "$TORCH_SPEC"
  elif "$PY" -m pip download -q --no-index --no-deps -d "$(mktemp -d)" "$TORCH_SPEC" >/dev/null 2>&1; then
    "$PY" -m pip install -q "$TORCH_SPEC"   # a wheel on this machine's disk (find-links): the CPU build here
  else
    echo "install.sh: no GPU or batch scheduler here: installing torch's CPU build (FTK_TORCH_BUILD=cuda for CUDA)" >&2
    "$PY" -m pip install -q "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu   # CPU-only build
  fi
fi
"$PY" -m pip install -q -e ".[quant,test]"
"$PY" -c "import torch, ftk; print(f'ftk {ftk.__version__} installed with torch {torch.__version__}')"
