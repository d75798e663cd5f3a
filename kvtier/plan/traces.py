"""Trace readers: kv-cache-tester, Mooncake and jsonl traces -> a ``Trace``
(per request: time and block keys)."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kvtier.cache.retention import duration


FORMATS = ("auto", "kv-cache-tester", "mooncake", "jsonl")
TIER_NAMES = ("hbm", "dram", "nvme")
_NATIVE_BLOCK = {"mooncake": 512}
_FAST_ID_BITS = 40          # key = namespace << 40 | id for ids in [0, 2**40)


class PlanError(ValueError):
    """Bad input: unreadable trace, inconsistent options."""


# --------------------------------------------------------------------------- traces
@dataclass
class Trace:
    """Requests ready to replay, sorted by arrival.

    Request ``i`` arrives at ``arrival[i]`` (s), completes at ``end[i]``, has
    ``input_tokens[i]`` prompt tokens and the block keys ``keys[offsets[i]:offsets[i+1]]``
    (ints; equal key = equal block and equal prefix, within its namespace). Every block
    holds ``block_tokens`` tokens except a request's last one, which holds ``last_tokens[i]``.
    """

    block_tokens: int
    arrival: np.ndarray
    end: np.ndarray
    input_tokens: np.ndarray
    last_tokens: np.ndarray
    offsets: np.ndarray
    keys: np.ndarray
    sources: list[str] = field(default_factory=list)
    namespaces: int = 0
    _distinct: int | None = None
    # Per request: the TTL it asked for (jsonl 'ttl': kvtier's kv_transfer_params
    # kvtier.ttl); 0 = the tier's. None: no request asked.
    ttl: np.ndarray | None = None
    # Per request: its session (int, in order of first appearance), what a
    # session-affine router hashes: kv-cache-tester: the conversation (file; sub-agents
    # share it); jsonl: 'namespace'/'session'; Mooncake: the file. None: unknown.
    session: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def num_blocks(self) -> int:
        return int(self.offsets[-1])

    @property
    def distinct_blocks(self) -> int:
        if self._distinct is None:
            self._distinct = int(np.unique(self.keys).size) if self.keys.size else 0
        return self._distinct

    @property
    def total_input_tokens(self) -> int:
        return int(self.input_tokens.sum())

    @property
    def span_s(self) -> float:
        if not len(self):
            return 0.0
        return float(max(self.end.max(), self.arrival.max()) - self.arrival.min())

    def summary(self) -> dict[str, Any]:
        return {"sources": len(self.sources), "namespaces": self.namespaces,
                "requests": len(self), "input_tokens": self.total_input_tokens,
                "blocks": self.num_blocks, "distinct_blocks": self.distinct_blocks,
                "block_tokens": self.block_tokens, "span_s": self.span_s}


@dataclass
class _Req:
    t: float
    end: float
    input_tokens: int
    keys: list[int]
    last_tokens: int
    ttl: float = 0.0
    session: int = 0


class _Builder:
    """Collects requests; maps (namespace, hash id) to int keys."""

    def __init__(self, block_tokens: int):
        self.block_tokens = block_tokens
        self.reqs: list[_Req] = []
        self.sources: list[str] = []
        self._ns: dict[Any, int] = {}
        self._sessions: dict[Any, int] = {}
        self._interned: dict[tuple, int] = {}
        self.offset_s = 0.0         # added to the times of the file being read

    def namespace(self, name: Any) -> int:
        ns = self._ns.get(name)
        if ns is None:
            ns = self._ns[name] = len(self._ns)
        return ns

    def keys(self, ns: int, ids: Sequence[Any]) -> list[int]:
        """Int keys for hash ids of namespace ``ns`` (small ints: arithmetic; else interned)."""
        base = ns << _FAST_ID_BITS
        try:
            if all(type(h) is int and 0 <= h < (1 << _FAST_ID_BITS) for h in ids):
                return [base + h for h in ids]
        except TypeError:
            pass
        out = []
        interned = self._interned
        for h in ids:
            if isinstance(h, list):
                h = tuple(h)
            k = interned.get((ns, h))
            if k is None:
                k = interned[(ns, h)] = -1 - len(interned)
            out.append(k)
        return out

    def add(self, t: float, end: float, input_tokens: int | None, keys: list[int],
            native_block: int, source: str, ttl: float = 0.0, session: Any = None) -> None:
        """One request whose ``keys`` are blocks of ``native_block`` tokens (last maybe
        partial); ``session``: its session's name (any hashable; None: the source's)."""
        bt = self.block_tokens
        n = len(keys)
        hashed = n * native_block
        if input_tokens is None:
            input_tokens = hashed
        if input_tokens < 0 or not math.isfinite(t) or not math.isfinite(end) or end < t:
            raise PlanError(f"{source}: bad request (t={t}, end={end}, input={input_tokens})")
        # the trace's own last block holds what is left of the prompt (Mooncake hashes a
        # partial last block); never more than a block, never less than one token
        last_native = native_block
        if n and input_tokens < hashed:
            last_native = max(1, input_tokens - (n - 1) * native_block)
        if bt != native_block:          # coarsen: keep full groups only (like vLLM / kvtier)
            m = bt // native_block
            full = n // m
            if full * m == n and n and last_native < native_block:
                full -= 1   # the last group holds a partial trace block: not a full block
            keys = keys[m - 1:full * m:m]
            n, last_native = full, bt
        name = source if session is None else session
        sid = self._sessions.get(name)
        if sid is None:
            sid = self._sessions[name] = len(self._sessions)
        self.reqs.append(_Req(t + self.offset_s, end + self.offset_s, int(input_tokens), keys,
                              int(last_native) if n else bt, ttl, sid))

    def build(self) -> Trace:
        reqs = sorted(self.reqs, key=lambda r: r.t)   # stable: ties keep file order
        lens = np.fromiter((len(r.keys) for r in reqs), dtype=np.int64, count=len(reqs))
        offsets = np.zeros(len(reqs) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        keys = np.empty(int(offsets[-1]), dtype=np.int64)
        for r, o in zip(reqs, offsets[:-1]):
            keys[o:o + len(r.keys)] = r.keys
        return Trace(
            _distinct=int(np.unique(keys).size),
            block_tokens=self.block_tokens,
            arrival=np.array([r.t for r in reqs], dtype=np.float64),
            end=np.array([r.end for r in reqs], dtype=np.float64),
            input_tokens=np.array([r.input_tokens for r in reqs], dtype=np.int64),
            last_tokens=np.array([r.last_tokens for r in reqs], dtype=np.int64),
            offsets=offsets, keys=keys, sources=list(self.sources),
            namespaces=len(self._ns),
            ttl=np.array([r.ttl for r in reqs], dtype=np.float64)
            if any(r.ttl for r in reqs) else None,
            session=np.array([r.session for r in reqs], dtype=np.int64))


def _files(paths: Iterable[str | os.PathLike], suffixes: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in suffixes)
            if not found:
                raise PlanError(f"{p}: no {'/'.join(suffixes)} files in this directory")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise PlanError(f"{p}: no such file or directory")
    return out


def _check_block(block_tokens: int, native: int, source: str) -> None:
    if block_tokens <= 0 or block_tokens % native:
        raise PlanError(f"{source}: --block-tokens {block_tokens} must be a positive multiple "
                        f"of the trace's block size ({native} tokens)")


def read_kv_cache_tester(b: _Builder, path: Path) -> None:
    """One kv-cache-tester conversation (``{id, block_size, hash_id_scope, requests}``).

    Request time = ``t``; completion = ``t + api_time`` (0 when absent). Sub-agents
    (``{"type": "subagent", t, requests}``) run at parent ``t`` + their own ``t`` and
    share the conversation's hash-id namespace (``hash_id_scope: "local"``; ``"global"``
    shares one namespace across files).
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{path}: not a kv-cache-tester JSON trace ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("requests"), list):
        raise PlanError(f"{path}: not a kv-cache-tester trace (no 'requests' list)")
    native = int(doc.get("block_size", 64))
    _check_block(b.block_tokens, native, str(path))
    scope = doc.get("hash_id_scope", "local")
    ns = b.namespace(("kvct-global",) if scope == "global" else ("kvct", str(path.resolve())))
    src = str(path)
    b.sources.append(src)

    def walk(reqs: list, base: float) -> None:
        for r in reqs:
            if r.get("type") == "subagent":
                walk(r.get("requests") or [], base + float(r.get("t", 0.0)))
                continue
            try:
                t = base + float(r["t"])
                ids = r["hash_ids"]
                api = r.get("api_time")
                end = t + (float(api) if api is not None and api > 0 else 0.0)
                n_in = r.get("in")
            except (KeyError, TypeError, ValueError) as e:
                raise PlanError(f"{path}: bad request {str(r)[:120]} ({e})") from None
            b.add(t, end, None if n_in is None else int(n_in), b.keys(ns, ids), native, src,
                  session=conv)

    conv = ("kvct", str(path.resolve()))     # one session per conversation, any scope
    walk(doc["requests"], 0.0)


def _jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    try:
        fh = path.open()
    except OSError as e:
        raise PlanError(f"{path}: {e}") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise PlanError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(rec, dict):
                raise PlanError(f"{path}:{lineno}: expected a JSON object per line")
            yield lineno, rec


def read_mooncake(b: _Builder, path: Path, native: int = 512) -> None:
    """Mooncake trace: ``{timestamp (ms), input_length, output_length, hash_ids}`` per line.

    Hash ids are chained 512-token blocks, global across the file's requests (one
    namespace per file); the last block may be partial. No latency is recorded:
    completion = arrival.
    """
    _check_block(b.block_tokens, native, str(path))
    ns_name = ("mooncake", str(path.resolve()))     # no sessions recorded: the file
    ns = b.namespace(ns_name)
    src = str(path)
    b.sources.append(src)
    for lineno, rec in _jsonl(path):
        try:
            t = float(rec["timestamp"]) / 1000.0
            ids = rec["hash_ids"]
            n_in = rec.get("input_length")
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{path}:{lineno}: not a Mooncake record ({e})") from None
        b.add(t, t, None if n_in is None else int(n_in), b.keys(ns, ids), native, src,
              session=ns_name)


def _token_keys(ns: int, tokens: Sequence[int], block: int) -> list[int]:
    """Chained keys of the full ``block``-token blocks of ``tokens`` (deterministic)."""
    keys = []
    prev = ns
    for i in range(0, len(tokens) - block + 1, block):
        prev = hash((prev, tuple(tokens[i:i + block])))
        keys.append(prev)
    return keys


def read_jsonl(b: _Builder, path: Path, hash_block: int | None = None) -> None:
    """kvtier's own JSONL: one request per line.

    ``t`` (s, required); ``hash_ids`` (chained block hashes, blocks of ``hash_block``
    tokens, default ``--block-tokens``) or ``tokens`` (token ids: hashed here into full
    blocks); optional ``input_tokens``, ``output_tokens``, ``duration`` (s: completion =
    t + duration, default 0), ``namespace`` (hash ids match only within a namespace;
    default one global namespace; ``session`` is accepted as its alias), ``ttl`` (the
    TTL the request asks kvtier for, as its ``kv_transfer_params.kvtier.ttl``: seconds
    or "5m"/"1h"; its blocks then live at least that long in DRAM and NVMe).
    """
    native = hash_block or b.block_tokens
    src = str(path)
    b.sources.append(src)
    for lineno, rec in _jsonl(path):
        where = f"{path}:{lineno}"
        if "t" not in rec:
            raise PlanError(f"{where}: missing 't' (arrival time in seconds)")
        try:
            t = float(rec["t"])
            dur = float(rec.get("duration") or 0.0)
        except (TypeError, ValueError):
            raise PlanError(f"{where}: 't' and 'duration' must be numbers (seconds)") from None
        if dur < 0:
            raise PlanError(f"{where}: negative duration")
        ns_name = ("jsonl", str(rec.get("namespace", rec.get("session", ""))))
        ns = b.namespace(ns_name)
        n_in = rec.get("input_tokens")
        if "hash_ids" in rec:
            _check_block(b.block_tokens, native, where)
            ids = rec["hash_ids"]
            if not isinstance(ids, list):
                raise PlanError(f"{where}: 'hash_ids' must be a list")
            keys = b.keys(ns, ids)
            blk = native
        elif "tokens" in rec:
            toks = rec["tokens"]
            if not isinstance(toks, list):
                raise PlanError(f"{where}: 'tokens' must be a list of token ids")
            keys = _token_keys(ns, toks, b.block_tokens)
            blk = b.block_tokens
            if n_in is None:
                n_in = len(toks)
        else:
            raise PlanError(f"{where}: needs 'hash_ids' or 'tokens'")
        try:
            n_in = None if n_in is None else int(n_in)
        except (TypeError, ValueError):
            raise PlanError(f"{where}: 'input_tokens' must be an integer") from None
        ttl = 0.0
        if rec.get("ttl") is not None:
            try:
                ttl = duration(rec["ttl"])
            except ValueError as e:
                raise PlanError(f"{where}: 'ttl': {e}") from None
        b.add(t, t + dur, n_in, keys, blk, where, ttl, session=ns_name)


def detect_format(path: Path) -> str:
    """kv-cache-tester (.json with 'requests'), mooncake ('timestamp' lines) or jsonl."""
    if not path.exists():
        raise PlanError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in (".json", ".jsonl"))
        if not files:
            raise PlanError(f"{path}: no .json/.jsonl files to detect a format from")
        path = files[0]
    with path.open() as fh:
        head = fh.read(4096)
    if path.suffix == ".json" or head.lstrip().startswith("{\n") or '"requests"' in head:
        if '"requests"' in head or '"hash_id_scope"' in head:
            return "kv-cache-tester"
    first = head.splitlines()[0] if head else ""
    if '"timestamp"' in first and '"input_length"' in first:
        return "mooncake"
    return "jsonl"


def load(paths: Sequence[str | os.PathLike], fmt: str = "auto", block_tokens: int | None = None,
         hash_block_tokens: int | None = None, stagger_s: float = 0.0) -> Trace:
    """Read traces (files or directories) into one :class:`Trace`.

    ``block_tokens``: the planner's block (default: the trace's own block: 64 for the
    kv-cache-tester traces, 512 for Mooncake, required for jsonl unless ``tokens`` with
    the default 64); it must be a multiple of the trace's block. ``hash_block_tokens``:
    block size behind jsonl ``hash_ids`` (default ``block_tokens``). ``stagger_s``: file
    ``i`` (in path order, directories sorted) starts ``i x stagger_s`` later (default: all
    files keep their own times, so kv-cache-tester conversations all start at 0).
    """
    if not paths:
        raise PlanError("no trace paths given")
    if fmt not in FORMATS:
        raise PlanError(f"unknown format {fmt!r}; one of {FORMATS}")
    if fmt == "auto":
        fmts = {detect_format(Path(p)) for p in paths}
        if len(fmts) > 1:
            raise PlanError(f"paths mix formats {sorted(fmts)}; pass --format")
        fmt = fmts.pop()
    suffixes = (".json",) if fmt == "kv-cache-tester" else (".jsonl", ".json")
    files = _files(paths, suffixes)
    if block_tokens is None:
        if fmt == "kv-cache-tester":
            try:
                with files[0].open() as fh:
                    m = re.search(r'"block_size"\s*:\s*(\d+)', fh.read(1 << 16))
            except OSError:
                m = None
            block_tokens = int(m.group(1)) if m else 64
        elif fmt == "mooncake":
            block_tokens = _NATIVE_BLOCK["mooncake"]
        else:
            block_tokens = hash_block_tokens or 64
    b = _Builder(int(block_tokens))
    for i, f in enumerate(files):
        b.offset_s = i * stagger_s
        if fmt == "kv-cache-tester":
            read_kv_cache_tester(b, f)
        elif fmt == "mooncake":
            read_mooncake(b, f)
        else:
            read_jsonl(b, f, hash_block_tokens)
    return b.build()
