"""The store's upkeep, off the scheduler's path: the index rebuilt from the files
at start-up, and the file work the ledger hands out while the engine runs.

At start-up (``recover``): the blocks every TP rank holds, newest that fit the
budget, go into the ledger (kvtier.cache.ledger ``recover``); the expired, the
excess and the orphans (a record some rank lacks) are removed; temp files are
counted against the budget until they go. Then a background thread (or
``drain``, in tests) removes records (evicted, expired, dropped), refreshes
records' mtimes (their last use across restarts), expires blocks while the
engine is idle and sweeps stale temp files. Every ledger call is made under
the scheduler's lock.

On a shared store (kvtier.store.budget) the engine claims the store at
start-up and joins its budget; about every second the sweeper reaps dead
processes, trims the store when writes were refused, and sets the ledger's
disk budget to this engine's share (minus the free files it keeps). Without
``shared`` the engine claims the store for itself: a second engine on it is
refused at start-up.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable

from kvtier.cache.ledger import Ledger
from kvtier.store.claim import claim_store
from kvtier.store.disk import DiskStore

log = logging.getLogger("vllm.kvtier.store")

TEMP_SWEEP_EVERY_S = 60.0
IDLE_EXPIRY_EVERY_S = 5.0
BUDGET_EVERY_S = 1.0   # shared store: reap, trim, take this engine's share


class Sweeper:
    def __init__(self, stores: list[DiskStore], ledger: Ledger, lock: threading.RLock,
                 clock: Callable[[], float]):
        self.stores = stores
        self.ledger = ledger
        self.lock = lock
        self.clock = clock
        self._q: queue.Queue = queue.Queue()
        self._startup_temps: dict[str, int] = {}
        self.budget = stores[0].budget if stores else None
        # Kept by the ledger for free files (DiskStore.free_files), out of its share.
        self._spare = stores[0].free_files * ledger.record_size if stores else 0
        self._last_budget = time.monotonic()

    def recover(self) -> dict[str, int]:
        """Rebuild the disk index from the directory. Counts of what was found."""
        t0 = time.perf_counter()
        if self.stores:
            claim_store(self.stores[0].root, shared=self.budget is not None)
        if self.budget is not None:   # the share first: recovery keeps what fits it
            self._apply_share(self.budget.join_engine(0))
        per_rank = [s.scan_mtimes() for s in self.stores]
        if len(per_rank) == 1:
            mtimes, orphans = per_rank[0], set()
        else:
            common = set(per_rank[0]).intersection(*per_rank[1:])
            mtimes = {k: min(r[k] for r in per_rank) for k in common}
            orphans = set().union(*per_rank) - common
        expired, excess = self.ledger.recover(mtimes, self.clock())
        for key in orphans:
            self._q.put(("remove", key, False))
        for s in self.stores:
            s.sweep_temp()
            if s.budget is not None:   # the store's budget counts (and reaps) temp files
                continue
            for path, size in s.temp_files():   # a live writer's, or a crash's < 10 min old
                self._startup_temps[path] = size
        self.ledger.hold_disk(sum(self._startup_temps.values()))
        self.flush()
        found = {"blocks": len(self.ledger.disk), "expired": expired, "excess": excess,
                 "orphans": len(orphans)}
        log.info("kvtier: recovered %d blocks (%.1f GiB) from %s in %.2f s (%d expired, %d over "
                 "the budget, %d orphans)", found["blocks"], self.ledger.disk.used / 2**30,
                 self.stores[0].root, time.perf_counter() - t0, expired, excess, len(orphans))
        return found

    def flush(self) -> None:
        """Queue the removals the ledger handed out (call with the lock held)."""
        for key in self.ledger.take_removals():
            self._q.put(("remove", key, True))

    def touch(self, key: bytes, when: float) -> None:
        self._q.put(("touch", key, when))

    def start(self) -> None:
        threading.Thread(target=self._run, name="kvtier-sweeper", daemon=True).start()

    def drain(self) -> None:
        """Do the queued file work now, on this thread (tests, shutdown)."""
        while True:
            try:
                op, key, arg = self._q.get_nowait()
            except queue.Empty:
                return
            self._do(op, key, arg)

    def _run(self) -> None:
        last_temp_sweep = time.monotonic()
        wait = IDLE_EXPIRY_EVERY_S if self.budget is None else BUDGET_EVERY_S
        idle_since = time.monotonic()
        while True:
            try:
                op, key, arg = self._q.get(timeout=wait)
            except queue.Empty:
                op = None
            if self.budget is not None and time.monotonic() - self._last_budget >= BUDGET_EVERY_S:
                self.maintain_budget()
            if op is not None:
                self._do(op, key, arg)
                idle_since = time.monotonic()
                continue
            if time.monotonic() - idle_since < IDLE_EXPIRY_EVERY_S:
                continue
            idle_since = time.monotonic()
            with self.lock:
                self.ledger.expire(self.clock())
                self.flush()
            if time.monotonic() - last_temp_sweep >= TEMP_SWEEP_EVERY_S:
                last_temp_sweep = time.monotonic()
                self._sweep_temps()

    # -- a shared store's budget ----------------------------------------------
    def maintain_budget(self) -> None:
        """Reap, trim, and take this engine's share of the store's budget (no lock
        of the scheduler's is held while the store's lock is waited for)."""
        self._last_budget = time.monotonic()
        try:
            with self.lock:   # records, pending removals, the free files kept
                counted = self.ledger.disk.used + self.ledger.held_disk + self._spare
            share = self.budget.maintain(counted)
        except OSError as e:
            log.warning("kvtier: the shared store's budget could not be kept up: %s", e)
            return
        self._apply_share(share)

    def _apply_share(self, share: int) -> None:
        with self.lock:
            if self.ledger.disk is not None:
                target = max(0, share - self._spare)
                if target != self.ledger.disk_budget:
                    self.ledger.set_disk_budget(target, self.clock())
                    self.flush()

    def _do(self, op: str, key: bytes, arg) -> None:
        try:
            for s in self.stores:
                if op == "remove":
                    s.remove(key)
                else:
                    s.touch(key, arg)
        except OSError as e:
            log.warning("kvtier: %s of record %s failed: %s", op, key.hex(), e)
        if op == "remove" and arg:   # held in the budget until now
            with self.lock:
                self.ledger.removed(key)

    def _sweep_temps(self) -> None:
        for s in self.stores:
            s.sweep_temp()
        gone = [p for p in self._startup_temps if not os.path.exists(p)]
        if gone:
            with self.lock:
                self.ledger.hold_disk(-sum(self._startup_temps.pop(p) for p in gone))
