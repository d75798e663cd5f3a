#!/usr/bin/env bash
# CI check of the packaging: `pip wheel .` builds a wheel with the native
# extension in it, and that wheel installs into a virtualenv that has vLLM and
# works there with no compiler and no build tool on PATH (the extension is
# compiled and libxxhash linked into it at wheel-build time; nothing is built
# at install time).
#   bash deploy/check-wheel.sh          (after deploy/setup-venv.sh; ~1-2 min)
# The new virtualenv sees the set-up's packages (vLLM, torch, numpy...) through
# a .pth file instead of installing them again; kvtier itself comes from the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVTIER_VENV:-.venv}
PY="$VENV/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say() { echo "check-wheel: $*"; }

# 1. The wheel, as a user builds it (isolated build environment from the
#    configured package indexes), in a build directory of its own.
"$PY" -m pip wheel -q --no-deps -w "$work/dist" -Cbuild-dir="$work/build" .
whl=$(echo "$work"/dist/kvtier-*.whl)
[ -f "$whl" ] || { say "no wheel built"; exit 1; }
"$PY" - "$whl" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
ext = [n for n in names if n.startswith("kvtier/_copy_engine") and n.endswith(".so")]
assert ext, f"the wheel has no kvtier/_copy_engine*.so: {names}"
print(f"check-wheel: {sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, extension {ext[0]}")
EOF

# 2. A fresh virtualenv that has vLLM (the set-up's site-packages, read-only).
"$PY" -m venv "$work/venv"
site_new=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
site_setup=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site_setup" > "$site_new/_setup_venv_packages.pth"

# 3. Install the wheel with no compiler, no cmake, no index: PATH holds nothing.
env -i HOME="$work" PATH="$work/empty-path" CC=/bin/false CXX=/bin/false \
  PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
  "$work/venv/bin/python" -m pip install -q --no-deps --no-build-isolation "$whl"

# 4. It works there: the extension loads (its store engine computes the payload
#    checksum that the xxhash package computes) and the connector imports with vLLM.
cd "$work"
env -i HOME="$work" PATH="$work/empty-path" VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
  "$work/venv/bin/python" - "$work/venv" <<'EOF'
import os, sys, tempfile
import numpy as np, xxhash
import kvtier, kvtier._copy_engine as ce
assert kvtier.__file__.startswith(sys.argv[1]), f"kvtier from {kvtier.__file__}, not the wheel"
from kvtier.copy.engine import HostPool
from kvtier.store.disk import DiskStore
from kvtier.store.record import HEADER_BYTES, RecordError, pack_header, record_bytes
payload = 3 * 4096 + 5
pool = HostPool(3, record_bytes(payload))
rec = pool.slot(0)
rec[HEADER_BYTES:HEADER_BYTES + payload] = np.arange(payload) % 251
digest = xxhash.xxh3_64_intdigest(rec[HEADER_BYTES:HEADER_BYTES + payload])
ns, key = bytes(16), bytes(range(16))
pack_header(rec, ns, key, 0, 1, payload, digest)
with tempfile.TemporaryDirectory() as d:
    s = DiskStore(d, ns, 0, 1, native_io="threads")
    assert s._io is not None, "the native store engine did not load from the wheel"
    s.write(key, rec[:record_bytes(payload)])
    # The native reader validates the payload against the header's xxhash digest
    # (written by the Python package above): a differing checksum is a RecordError.
    s.read(key, pool.slot(1), payload)
    assert (pool.slot(1)[:record_bytes(payload)] == rec[:record_bytes(payload)]).all()
    # and a flipped payload byte is caught by the native checksum
    bad = rec.copy()
    bad[HEADER_BYTES + 7] ^= 1
    s.write(key, bad[:record_bytes(payload)])
    try:
        s.read(key, pool.slot(2), payload)
        raise AssertionError("a corrupt payload passed the native checksum")
    except RecordError:
        pass
import kvtier.connector, vllm
print(f"check-wheel: installed without a compiler; kvtier from {os.path.dirname(kvtier.__file__)}"
      f", extension {os.path.basename(ce.__file__)}, vLLM {vllm.__version__}: OK")
EOF
so=$(echo "$work"/venv/lib/python*/site-packages/kvtier/_copy_engine*.so)
if command -v ldd >/dev/null 2>&1 && ldd "$so" | grep -q xxhash; then
  say "note: the extension links libxxhash dynamically: $(ldd "$so" | grep xxhash)"
fi
