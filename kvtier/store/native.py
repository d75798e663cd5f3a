"""The store's native I/O engine (``kvtier._copy_engine.IoEngine``, csrc/io/io_*):
whether this build has it, which backend a store uses, and one engine per
process.

The ``KVTIER_NATIVE_IO`` environment variable (or ``DiskStore(native_io=...)``)
picks: ``auto`` (default: native when built), ``threads`` (native, required),
``off`` (Python, kvtier.store.pyio).
"""

from __future__ import annotations

import os
import threading

try:
    from kvtier import _copy_engine as _ext
    IoEngine = _ext.IoEngine
    scan_records = _ext.scan_records
except (ImportError, AttributeError):   # not built, or built before csrc/io/io_engine.cpp
    IoEngine = scan_records = None
else:
    if hasattr(_ext, "chain_keys"):   # built with libcrypto (csrc/cache/key_bindings.cpp)
        from kvtier.cache.keys import install_native_hashers, native_keys_agree
        if native_keys_agree(_ext.chain_keys, _ext.group_keys):
            install_native_hashers(chain_keys=_ext.chain_keys, group_keys=_ext.group_keys)

NATIVE_IO_MODES = ("auto", "threads", "off")
_FORKED_ENGINES: list = []   # engines inherited through fork(): kept, never joined


def pick_backend(mode: str | None) -> str:
    """"threads" (native engine) or "python", from ``native_io`` / the environment."""
    mode = (mode or os.environ.get("KVTIER_NATIVE_IO") or "auto").strip().lower()
    if mode in ("0", "false", "no", "python"):
        mode = "off"
    if mode not in NATIVE_IO_MODES:
        raise ValueError(f"kvtier: native I/O mode {mode!r}: expected one of {NATIVE_IO_MODES}")
    if mode == "off":
        return "python"
    if IoEngine is None:
        if mode != "auto":
            raise RuntimeError(f"kvtier: native I/O {mode!r} asked for, but the "
                               "kvtier._copy_engine extension has no IoEngine")
        return "python"
    return "threads"


class EngineHandle:
    """A store's engine, made on first use (the scheduler's stores do no I/O); one
    per process: after a fork the parent's engine, whose threads stayed behind,
    is set aside, never destroyed."""

    def __init__(self, threads: int):
        self.threads = threads
        self._engine = None   # (IoEngine, pid)
        self._lock = threading.Lock()

    def get(self):
        engine = self._engine
        if engine is None or engine[1] != os.getpid():
            with self._lock:
                engine = self._engine
                if engine is not None and engine[1] != os.getpid():
                    _FORKED_ENGINES.append(engine[0])
                    engine = None
                if engine is None:
                    engine = self._engine = (IoEngine(self.threads), os.getpid())
        return engine[0]
