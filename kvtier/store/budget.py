"""One disk budget for every engine on a store (``shared: true``).

Several engines (and their TP workers: separate processes) write one store.
Each process budgets only what it sees, so without this N engines would use N
times ``disk_bytes``. Here the store keeps a usage ledger of its own, under a
lock, that every process that creates or removes a file goes through:

    <disk_path>/.kvtier/lock          the store lock (a POSIX record lock)
    <disk_path>/.kvtier/budget.json   the usage ledger (replaced whole, atomically)
    <disk_path>/.kvtier/leases/<id>   one per live process, locked while it lives
    (and <disk_path>/.kvtier/owner: engines' claims, kvtier.store.claim)

**Accounting.** ``used`` is the bytes of every regular file in the store but
the temp files of live processes; each live process's temp files are covered
by its ``reserved`` bytes. A write reserves its bytes *before* it creates them
(``reserve``: refused when ``used`` + every reservation + the write would pass
the budget), and publishes under the lock: the rename and the move of its bytes
from ``reserved`` to ``used`` are one step. A removal unlinks under the lock
and then subtracts. A write that takes over an evicted record's file moves
that file's bytes from ``used`` to its reservation (no new bytes: never
refused). So at any time the files in the store take at most ``used`` + the
reservations <= the budget. Renames and unlinks of a shared store happen only
under the lock (the native I/O engine only fills temp files there).

**Crash safety.** A process that dies (kill -9 included) leaves its lease
unlocked: the next process to look (every engine, about every second) reaps it
under the lock: its temp files are deleted, its reservations dropped, and
``used`` is recounted from the files (the recount also absorbs anything a dead
process did between a rename and its ledger update). Nothing a dead process
held stays lost; until it is reaped its reservations still count (the bound
holds meanwhile).

**Shares.** The store's budget is the smallest ``disk_bytes`` of the live
processes; each live engine's ledger (kvtier.cache.ledger) gets an equal share
of it at run time and evicts its own least recently used records to stay
within it. Files no live engine counts (a dead engine's, another namespace's
left behind) still count in ``used``: when a write is refused for room, the
next engine to look *trims* the store, removing the least recently used files
(records and free files, any namespace, by mtime) until the refused bytes fit.

Liveness uses POSIX record locks (``fcntl.lockf``): released by the kernel when
a process dies, not inherited by ``fork``, and honoured over NFS (NLM / NFSv4
locks; a dead client's locks go when its lease expires on the server).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from kvtier.store.claim import META_DIR, meta_dir, open_lockfile

log = logging.getLogger("vllm.kvtier.store")

STATE_VERSION = 1
RECOUNT_EVERY_S = 600.0   # a full recount now and then: anything that drifted comes back
TRIM_EVERY_S = 2.0        # a trim walks the store: at most this often per process


class BudgetExceeded(OSError):
    """A write that the shared store's budget has no room for (not an I/O error:
    no backoff; the store is trimmed and later writes go through)."""

    def __init__(self, nbytes: int, detail: str = ""):
        super().__init__(errno.ENOSPC, f"the shared store's budget has no room for "
                                       f"{nbytes} bytes{detail}")


@dataclass
class State:
    """budget.json. ``parts``: lease -> {"pid", "host", "reserved", "budget",
    "engine": bool, "counted": bytes its ledger counts (information)}."""
    used: int = 0
    parts: dict = field(default_factory=dict)
    wanted: int = 0          # bytes refused since the last trim
    budget: int = 0          # the last budget in force (when no process is live)
    recounted: float = 0.0
    trimmed: int = 0         # bytes removed by trims, ever (information)
    reaped: int = 0          # dead processes reaped, ever (information)

    def reserved(self) -> int:
        return sum(p["reserved"] for p in self.parts.values())

    def limit(self) -> int:
        budgets = [p["budget"] for p in self.parts.values() if p.get("budget", 0) > 0]
        return min(budgets) if budgets else self.budget

    def engines(self) -> int:
        return sum(1 for p in self.parts.values() if p.get("engine"))

    def room(self) -> int:
        return self.limit() - self.used - self.reserved()


class StoreBudget:
    """This process's side of a store's shared budget (``of(root)``: one per
    store and process). Thread-safe."""

    _instances: dict[tuple[str, int], "StoreBudget"] = {}
    _instances_lock = threading.Lock()

    @classmethod
    def of(cls, root: str | os.PathLike, budget_bytes: int) -> "StoreBudget":
        key = (str(Path(root).resolve()), os.getpid())
        with cls._instances_lock:
            b = cls._instances.get(key)
            if b is None:
                b = cls._instances[key] = cls(Path(root))
            b.declare(budget_bytes)
            return b

    def __init__(self, root: Path):
        self.root = root
        self.meta = meta_dir(root)
        self.leases = self.meta / "leases"
        self.leases.mkdir(mode=0o700, exist_ok=True)
        self.state_path = self.meta / "budget.json"
        self._tlock = threading.RLock()
        self._depth = 0
        self._lock_fd = open_lockfile(self.meta / "lock")
        self.lease = secrets.token_hex(8)
        self._lease_fd = os.open(self.leases / self.lease,
                                 os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600)
        fcntl.lockf(self._lease_fd, fcntl.LOCK_EX)
        self._budget = 0
        self._engine = False
        self._reserved = 0       # ours, mirrored (the state is rebuilt if it is lost)
        self._state: State | None = None
        self._last_trim = -TRIM_EVERY_S

    # ------------------------------------------------------------- the lock
    @contextmanager
    def locked(self) -> Iterator[State]:
        """The store lock, with the ledger loaded (saved on the way out)."""
        with self._tlock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._state
                finally:
                    self._depth -= 1
                return
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._state = st = self._load()
                self._depth = 1
                try:
                    yield st
                finally:
                    self._depth = 0
                    self._save(st)
            finally:
                self._state = None
                fcntl.lockf(self._lock_fd, fcntl.LOCK_UN)

    def _load(self) -> State:
        try:
            fd = os.open(self.state_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                raw = os.read(fd, 1 << 22) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
            finally:
                os.close(fd)
            d = json.loads(raw)
            if d.get("version") != STATE_VERSION:
                raise ValueError(f"version {d.get('version')}")
            st = State(int(d["used"]), dict(d["parts"]), int(d.get("wanted", 0)),
                       int(d.get("budget", 0)), float(d.get("recounted", 0.0)),
                       int(d.get("trimmed", 0)), int(d.get("reaped", 0)))
        except FileNotFoundError:
            st = State()
            st.recounted = -1.0   # never counted: count now
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("kvtier: the store's budget ledger %s is unreadable (%s): rebuilt "
                        "from the files", self.state_path, e)
            st = State()
            st.recounted = -1.0
        me = st.parts.get(self.lease)
        if me is None:
            me = st.parts[self.lease] = {"pid": os.getpid(), "host": socket.gethostname(),
                                         "reserved": self._reserved}
        me["reserved"] = self._reserved
        me["budget"] = self._budget
        me["engine"] = self._engine
        if st.recounted < 0:
            self._recount(st)
        return st

    def _save(self, st: State) -> None:
        st.budget = st.limit()
        blob = json.dumps({"version": STATE_VERSION, "used": st.used, "parts": st.parts,
                           "wanted": st.wanted, "budget": st.budget, "recounted": st.recounted,
                           "trimmed": st.trimmed, "reaped": st.reaped}).encode()
        tmp = self.meta / f"budget.json.{self.lease}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, blob)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path)

    def _set_reserved(self, st: State, delta: int) -> None:
        self._reserved = max(0, self._reserved + delta)
        st.parts[self.lease]["reserved"] = self._reserved

    # ------------------------------------------------------ who takes part
    def declare(self, budget_bytes: int) -> None:
        """This process's configured disk_bytes (the store's budget is the smallest)."""
        if budget_bytes > 0 and budget_bytes != self._budget:
            self._budget = int(budget_bytes)
            with self.locked():
                pass

    def join_engine(self, counted: int = 0) -> int:
        """This process runs an engine (a scheduler): it gets a share. Returns it."""
        self._engine = True
        return self.maintain(counted)

    def close(self) -> None:
        """Leave the store's ledger (a process that exits without it is reaped)."""
        with self.locked() as st:
            st.parts.pop(self.lease, None)
            try:
                os.unlink(self.leases / self.lease)
            except OSError:
                pass
        self._engine = False
        os.close(self._lease_fd)   # (the store lock's fd stays open: closing it would drop
        #                            the lock for any other holder in this process)
        with self._instances_lock:
            for k, v in list(self._instances.items()):
                if v is self:
                    del self._instances[k]

    @classmethod
    def recount_store(cls, root: str | os.PathLike) -> int:
        """Recount a shared store's ``used`` from its files (``kvtier store gc``)."""
        b = cls.of(root, 0)
        try:
            return b.recount()
        finally:
            if not b._engine:
                b.close()

    # ---------------------------------------------------- file operations
    def admit(self, st: State, nbytes: int) -> bool:
        """Reserve ``nbytes`` for a write (with the lock held); False: no room (counted
        in ``wanted``: the next maintenance trims the store)."""
        if nbytes <= 0:
            return True
        if st.room() < nbytes:
            st.wanted += nbytes
            return False
        self._set_reserved(st, nbytes)
        return True

    def release(self, st: State, nbytes: int) -> None:
        """A reservation ends without bytes published (its temp file is gone)."""
        self._set_reserved(st, -nbytes)

    def take_over(self, st: State, src: Path, tmp: Path, new_size: int) -> int | None:
        """Rename a counted file (an evicted record, a free file) to ``tmp`` for a write
        of ``new_size`` bytes over it; returns the bytes reserved for the write, None
        if ``src`` is gone, not a plain file of ours (then removed), or would grow
        past the budget."""
        try:
            s = os.lstat(src)
        except OSError:
            return None
        if not (stat.S_ISREG(s.st_mode) and s.st_nlink == 1 and s.st_uid == os.geteuid()):
            self.unlink(st, src)
            return None
        grow = max(0, new_size - s.st_size)
        if not self.admit(st, grow):
            return None
        try:
            os.rename(src, tmp)
        except OSError:
            self.release(st, grow)
            return None
        st.used -= s.st_size
        self._set_reserved(st, s.st_size)
        return s.st_size + grow

    def publish(self, st: State, tmp: Path, final: Path, reserved: int) -> None:
        """rename(tmp, final) and move its bytes from our reservation to ``used``
        (less those of a record it replaced). Raises OSError (tmp then removed)."""
        size = os.lstat(tmp).st_size
        try:
            old = os.lstat(final)
            replaced = old.st_size if stat.S_ISREG(old.st_mode) else 0
        except FileNotFoundError:
            replaced = 0
        try:
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                final.parent.mkdir(mode=0o700, exist_ok=True)
                os.rename(tmp, final)
        except OSError:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            self.release(st, reserved)
            raise
        st.used += size - replaced
        self._set_reserved(st, -reserved)

    def unlink(self, st: State, path: Path) -> bool:
        """Remove a counted file (with the lock held)."""
        try:
            s = os.lstat(path)
            os.unlink(path)
        except FileNotFoundError:
            return False
        if stat.S_ISREG(s.st_mode):
            st.used = max(0, st.used - s.st_size)
        return True

    def rename(self, st: State, src: Path, dst: Path) -> bool:
        """Move a counted file to another counted place (a record into free/)."""
        try:
            os.rename(src, dst)
            return True
        except FileNotFoundError:
            return False

    @staticmethod
    def temp_owner(name: str) -> str:
        """The lease in a temp file's name (``<key>.<lease>.<n>``; "" if none)."""
        parts = name.split(".")
        return parts[1] if len(parts) == 3 else ""

    def is_live_temp(self, st: State, name: str) -> bool:
        """A temp file a live process is writing (covered by its reservation)."""
        return self.temp_owner(name) in st.parts

    # --------------------------------------------------------- maintenance
    def maintain(self, counted: int | None = None) -> int:
        """Reap dead processes, recount when due, trim when writes were refused;
        returns this engine's share of the budget (0 if it is no engine)."""
        trim_to = None
        with self.locked() as st:
            dead = [lease for lease in st.parts if lease != self.lease and not self._alive(lease)]
            if dead:
                for lease in dead:
                    self._reap(lease)
                    st.parts.pop(lease, None)
                st.reaped += len(dead)
                log.info("kvtier: reaped %d dead process(es) of the shared store %s",
                         len(dead), self.root)
            if dead or time.time() - st.recounted >= RECOUNT_EVERY_S:
                self._recount(st)
            if counted is not None:
                st.parts[self.lease]["counted"] = int(counted)
            if st.wanted and time.monotonic() - self._last_trim >= TRIM_EVERY_S:
                # What no live engine counts (a dead engine's records, another
                # namespace's left behind) goes at once; else 1/16 to 1/4 of the
                # budget (refused writes are retried: ``wanted`` counts a want many
                # times over), least recently used first.
                counted = sum(p.get("counted", 0) for p in st.parts.values() if p.get("engine"))
                chunk = max(min(max(st.wanted, st.limit() // 16), st.limit() // 4),
                            st.used - counted)
                trim_to = st.limit() - chunk
                st.wanted = 0
                self._last_trim = time.monotonic()
            share = st.limit() // max(1, st.engines()) if self._engine else 0
        if trim_to is not None:
            self.trim(trim_to)
        return share

    def _alive(self, lease: str) -> bool:
        try:
            fd = os.open(self.leases / lease, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError:
            return True   # cannot tell: its reservations keep counting
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True   # its process holds the lock: alive
        finally:
            os.close(fd)  # (releases our lock, if we got it)
        return False

    def _reap(self, lease: str) -> None:
        """A dead process's temp files and lease go (with the lock held)."""
        for tmp_dir in self.root.glob("*/rank*/tmp"):
            try:
                for f in os.scandir(tmp_dir):
                    if self.temp_owner(f.name) == lease:
                        os.unlink(f.path)
            except OSError:
                pass
        try:
            os.unlink(self.leases / lease)
        except OSError:
            pass

    def _files(self) -> Iterator[tuple[os.DirEntry, os.stat_result, bool]]:
        """Every regular file of the store (no symlink followed): (entry, lstat,
        whether it is a temp file), the metadata directory left out."""
        stack = [self.root]
        while stack:
            d = stack.pop()
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            in_tmp = d.name == "tmp"
            for e in entries:
                if d == self.root and e.name == META_DIR:
                    continue
                try:
                    s = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(s.st_mode):
                    stack.append(Path(e.path))
                elif stat.S_ISREG(s.st_mode):
                    yield e, s, in_tmp

    def _recount(self, st: State) -> None:
        """``used`` := the files, but live processes' temp files (lock held)."""
        total = 0
        for e, s, in_tmp in self._files():
            if in_tmp and self.is_live_temp(st, e.name):
                continue
            total += s.st_size
        if st.recounted >= 0 and total != st.used:
            log.info("kvtier: shared store %s recounted: %d bytes (ledger said %d)",
                     self.root, total, st.used)
        st.used = total
        st.recounted = time.time()

    def recount(self) -> int:
        with self.locked() as st:
            self._recount(st)
            return st.used

    def trim(self, target: int) -> int:
        """Remove the least recently used files (records, free files) until ``used`` +
        reservations <= ``target``. Returns the bytes removed."""
        files = sorted((s.st_mtime, e.path) for e, s, in_tmp in self._files() if not in_tmp)
        freed = 0
        i = 0
        while i < len(files):
            with self.locked() as st:
                before = st.used
                for _ in range(64):
                    if i >= len(files) or st.used + st.reserved() <= target:
                        i = len(files)
                        break
                    self.unlink(st, Path(files[i][1]))
                    i += 1
                st.trimmed += before - st.used
                freed += before - st.used
        if freed:
            log.info("kvtier: trimmed %d bytes (least recently used) from the shared store %s",
                     freed, self.root)
        return freed

    def snapshot(self) -> dict:
        """The ledger as it stands (tests, ``kvtier store stats``)."""
        with self.locked() as st:
            return {"used": st.used, "reserved": st.reserved(), "limit": st.limit(),
                    "engines": st.engines(), "processes": len(st.parts),
                    "trimmed": st.trimmed, "reaped": st.reaped}


def read_state(root: str | os.PathLike) -> dict | None:
    """budget.json as it is (no lock: for reports), None if the store has none."""
    try:
        return json.loads((Path(root) / META_DIR / "budget.json").read_bytes())
    except (OSError, ValueError):
        return None
