"""``kvtier store stats|verify|gc PATH``: inspect and maintain a disk store offline.

- stats:  blocks, bytes, age histogram (by last use), per namespace and rank;
- verify: read every record and check header, key, namespace, rank and payload
          checksum (exit 1 if any is bad; ``--delete`` removes the bad ones);
- gc:     remove crashed writers' temp files, blocks some rank lacks (orphans),
          records unused for ``--ttl-seconds``, then the least recently used
          blocks until ``--max-bytes`` holds.
A block is all its ranks' records: gc removes them together.

A store with a secret (``secret_file``) has keyed names: without
``--secret-file`` verify checks every record's structure and checksums (names
and header fields agree), with it also their MACs (``bad_mac``). No symlink is
followed and no file is opened but a regular one (O_NOFOLLOW|O_NONBLOCK), so a
planted link or FIFO can neither redirect a deletion nor block the tool. On a
shared store (``shared: true``) gc recounts the store's budget ledger after
removing files.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from kvtier.cliargs import ArgumentParser, checked, number
from kvtier.config import ConfigError, parse_size
from kvtier.store.budget import StoreBudget, read_state
from kvtier.store.claim import META_DIR
from kvtier.store.record import HEADER_BYTES, RecordError, check_mac, parse_header
from kvtier.store.secret import SecretError, StoreKeys

AGE_BUCKETS = ((60, "<1m"), (300, "<5m"), (3600, "<1h"), (86400, "<1d"), (float("inf"), ">=1d"))


@dataclass(frozen=True)
class Record:
    path: Path
    namespace: str
    rank: int
    key: str
    size: int
    mtime: float


def _listdir(d: Path) -> list[Path]:
    """``d``'s entries, sorted; none if it vanished (a live server removes files)."""
    try:
        return sorted(d.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_dir(p: Path) -> bool:
    """A real directory (a symlink to one is not followed)."""
    try:
        return stat.S_ISDIR(os.lstat(p).st_mode)
    except OSError:
        return False


def _rank_dirs(root: Path):
    """``(namespace, rank, directory)`` of every rank directory of the store."""
    for ns in _listdir(root):
        if len(ns.name) != 32 or not _is_dir(ns):
            continue
        for rank_dir in _listdir(ns):
            if not rank_dir.name.startswith("rank") or not _is_dir(rank_dir):
                continue
            try:
                rank = int(rank_dir.name[4:])
            except ValueError:
                continue
            yield ns.name, rank, rank_dir


def records(root: Path):
    """Every published record under ``root``. Files removed while the scan runs
    (a server evicting) are skipped, never an error."""
    for ns, rank, rank_dir in _rank_dirs(root):
        for sub in _listdir(rank_dir):
            if len(sub.name) != 2 or not _is_dir(sub):
                continue
            for f in _listdir(sub):
                if len(f.name) != 32:
                    continue
                try:
                    st = f.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield Record(f, ns, rank, f.name, st.st_size, st.st_mtime)


def _files(root: Path, sub: str) -> list[tuple[Path, os.stat_result]]:
    """Regular files in every rank directory's ``sub`` directory (not followed)."""
    out = []
    for _, _, rank_dir in _rank_dirs(root):
        d = rank_dir / sub
        if not _is_dir(d):
            continue
        for f in _listdir(d):
            try:
                st = f.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((f, st))
    return out


def temp_files(root: Path):
    return [f for f, _ in _files(root, "tmp")]


def free_files(root: Path):
    """Evicted records kept for writes to overwrite (store.DiskStore.free_files)."""
    return [f for f, _ in _files(root, "free")]


def ranks_of(root: Path, namespace: str) -> int:
    """How many TP ranks write this namespace (its rank directories)."""
    return sum(1 for d in _listdir(root / namespace)
               if d.name.startswith("rank") and _is_dir(d))


def _read_regular(path: Path) -> bytes:
    """A file's bytes, if it is a regular file (never through a link, never
    blocked by a FIFO); RecordError("not_regular") otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):
            raise RecordError("not_regular", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RecordError("not_regular", str(path))
        chunks, left = [], st.st_size
        while left > 0:
            b = os.read(fd, min(left, 64 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def cmd_stats(root: Path, as_json: bool) -> int:
    now = time.time()
    per = defaultdict(lambda: {"records": 0, "bytes": 0, "ages": Counter()})
    for r in records(root):
        s = per[(r.namespace, r.rank)]
        s["records"] += 1
        s["bytes"] += r.size
        age = now - r.mtime
        s["ages"][next(label for limit, label in AGE_BUCKETS if age < limit)] += 1
    rows = [{"namespace": ns, "rank": rank, "records": s["records"], "bytes": s["bytes"],
             "age_histogram": {label: s["ages"].get(label, 0) for _, label in AGE_BUCKETS}}
            for (ns, rank), s in sorted(per.items())]
    total = {"records": sum(r["records"] for r in rows), "bytes": sum(r["bytes"] for r in rows),
             "temp_files": len(temp_files(root))}
    state = read_state(root)
    shared = None if state is None else {
        "budget_bytes": state.get("budget"), "used_bytes": state.get("used"),
        "reserved_bytes": sum(p.get("reserved", 0) for p in state.get("parts", {}).values()),
        "processes": len(state.get("parts", {})),
        "engines": sum(1 for p in state.get("parts", {}).values() if p.get("engine")),
        "trimmed_bytes": state.get("trimmed"), "reaped": state.get("reaped")}
    if as_json:
        print(json.dumps({"path": str(root), "total": total, "namespaces": rows,
                          "shared_budget": shared}))
        return 0
    print(f"{root}: {total['records']} records, {total['bytes'] / 2**30:.3f} GiB, "
          f"{total['temp_files']} temp files")
    if shared is not None:
        print(f"  shared budget: {shared['used_bytes']} of {shared['budget_bytes']} bytes used, "
              f"{shared['reserved_bytes']} reserved, {shared['engines']} engine(s) and "
              f"{shared['processes']} process(es) as last recorded")
    for r in rows:
        ages = " ".join(f"{k}:{v}" for k, v in r["age_histogram"].items())
        print(f"  {r['namespace']} rank{r['rank']}: {r['records']} records, "
              f"{r['bytes'] / 2**20:.1f} MiB, last use {ages}")
    return 0


def check_file(r: Record, keys: StoreKeys | None = None) -> str | None:
    """None if the record is valid, else the reason it is not. ``keys``: the
    store's secret: the record must be authenticated and its MAC verify."""
    import xxhash
    try:
        data = _read_regular(r.path)
        h = parse_header(data)
        if h.namespace.hex() != r.namespace or h.rank != r.rank:
            return "wrong_namespace"
        if h.key.hex() != r.key:
            return "wrong_key"
        if len(data) < HEADER_BYTES + h.payload_len:
            return "truncated"
        if xxhash.xxh3_64_intdigest(data[HEADER_BYTES:HEADER_BYTES + h.payload_len]) \
                != h.checksum:
            return "checksum"
        if keys is not None:
            if not h.authenticated:
                return "bad_mac"
            check_mac(memoryview(data), keys, h.payload_len)
    except RecordError as e:
        return e.reason
    except FileNotFoundError:
        return None   # removed since the scan saw it (a server evicting): not bad
    except OSError:
        return "io_error"
    return None


def cmd_verify(root: Path, delete: bool, as_json: bool, keys: StoreKeys | None = None) -> int:
    bad: dict[str, list[str]] = defaultdict(list)
    n = 0
    for r in records(root):
        n += 1
        reason = check_file(r, keys)
        if reason is not None:
            bad[reason].append(str(r.path))
            if delete:
                r.path.unlink(missing_ok=True)
    nbad = sum(len(v) for v in bad.values())
    if as_json:
        print(json.dumps({"records": n, "bad": nbad, "by_reason": {k: len(v) for k, v in
                                                                    bad.items()}}))
    else:
        print(f"{root}: {n} records checked, {nbad} bad"
              + (" (deleted)" if delete and nbad else ""))
        for reason, paths in bad.items():
            print(f"  {reason}: {len(paths)}  e.g. {paths[0]}")
    return 1 if nbad and not delete else 0


def cmd_gc(root: Path, ttl: float, max_bytes: float, dry_run: bool, as_json: bool) -> int:
    now = time.time()
    removed = {"temp": 0, "free": 0, "orphan": 0, "expired": 0, "over_budget": 0}
    freed = 0
    for f, st in _files(root, "tmp"):
        if now - st.st_mtime > 600:
            removed["temp"] += 1
            if not dry_run:
                f.unlink(missing_ok=True)
    for f in free_files(root):
        removed["free"] += 1
        if not dry_run:
            f.unlink(missing_ok=True)
    blocks: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records(root):
        blocks[(r.namespace, r.key)].append(r)

    def drop(group, cause):
        nonlocal freed
        removed[cause] += 1
        freed += sum(r.size for r in group)
        if not dry_run:
            for r in group:
                r.path.unlink(missing_ok=True)

    live = []
    ranks = {ns: ranks_of(root, ns) for ns, _ in blocks}
    for (ns, _), group in blocks.items():
        last_use = max(r.mtime for r in group)
        if len({r.rank for r in group}) < ranks[ns]:
            drop(group, "orphan")   # some rank lacks its part: never loadable
        elif now - last_use >= ttl:
            drop(group, "expired")
        else:
            live.append((last_use, group))
    total = sum(r.size for _, g in live for r in g)
    for _, group in sorted(live, key=lambda x: x[0]):
        if total <= max_bytes:
            break
        total -= sum(r.size for r in group)
        drop(group, "over_budget")
    if not dry_run and (root / META_DIR / "budget.json").exists():
        StoreBudget.recount_store(root)   # the shared store's ledger sees what went
    out = {"removed_blocks": removed, "freed_bytes": freed, "bytes_left": total,
           "dry_run": dry_run}
    print(json.dumps(out) if as_json else
          f"{root}: removed {removed} ({freed / 2**20:.1f} MiB), {total / 2**20:.1f} MiB left"
          + (" [dry run]" if dry_run else ""))
    return 0


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="kvtier store", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("stats", "verify", "gc"))
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")
    p.add_argument("--delete", action="store_true", help="verify: remove bad records")
    p.add_argument("--ttl-seconds", type=number(0, allow_inf=True), default=float("inf"),
                   help="gc: expiry in seconds, or inf")
    p.add_argument("--max-bytes", type=checked(lambda t: parse_size("max_bytes", t), ConfigError),
                   default=float("inf"), help="gc: budget, e.g. 2TiB")
    p.add_argument("--dry-run", action="store_true", help="gc: only report")
    p.add_argument("--secret-file", default=None,
                   help="verify: the store's secret_file (checks every record's MAC)")
    a = p.parse_args(argv)
    if not a.path.is_dir():
        print(f"kvtier store: {a.path} is not a directory", file=sys.stderr)
        return 2
    if a.action == "stats":
        return cmd_stats(a.path, a.json)
    if a.action == "verify":
        try:
            keys = StoreKeys.load(a.secret_file) if a.secret_file else None
        except SecretError as e:
            print(f"kvtier store: {e}", file=sys.stderr)
            return 2
        return cmd_verify(a.path, a.delete, a.json, keys)
    return cmd_gc(a.path, a.ttl_seconds, a.max_bytes, a.dry_run, a.json)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
