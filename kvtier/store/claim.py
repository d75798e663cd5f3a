"""A store's metadata directory and the engines' claims on a store.

``<disk_path>/.kvtier/`` holds what the engines on a store share besides the
records: the shared budget's lock, ledger and leases (kvtier.store.budget) and
``owner``, the file whose POSIX record lock is an engine's claim of the store.
An engine claims its store at start-up (kvtier.store.sweeper) for as long as
its process lives: engines with ``shared: true`` share the claim; an engine
without it excludes every other (it budgets its disk alone, so a second engine
would double the store's use). The kernel drops a dead process's claim.

The directory must be a real directory of this user, writable by it alone,
and every lock file a regular file (opened O_NOFOLLOW|O_NONBLOCK): nothing
planted there can redirect or block an engine.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
from pathlib import Path

from kvtier.store.safety import OPEN_SAFE, UnsafeStore, make_dir

log = logging.getLogger("vllm.kvtier.store")

META_DIR = ".kvtier"


class StoreInUse(RuntimeError):
    """Another engine uses this store in a way that excludes this one."""


def meta_dir(root: Path) -> Path:
    """``<root>/.kvtier``, made if needed. UnsafeStore if it is not a real
    directory of this user that only it can write; OSError if it cannot be made."""
    d = root / META_DIR
    make_dir(d)
    return d


def open_lockfile(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | OPEN_SAFE, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeStore(f"kvtier: refusing the store: {path} is not a regular file "
                          "(remove it)")
    return fd


_claims: dict[tuple[str, int], tuple[int, bool]] = {}
_claims_lock = threading.Lock()


def claim_store(root: str | os.PathLike, shared: bool) -> None:
    """An engine's claim of the store for as long as this process lives: a shared
    engine's is shared with other shared engines; a non-shared engine's excludes
    every other engine (it budgets alone). StoreInUse if another engine's claim
    conflicts."""
    root = Path(root)
    key = (str(root.resolve()), os.getpid())
    with _claims_lock:
        have = _claims.get(key)
        if have is not None and have[1] == shared:
            return
        try:
            fd = have[0] if have is not None else open_lockfile(meta_dir(root) / "owner")
        except OSError as e:
            if shared:
                raise OSError(e.errno, f"kvtier: a shared store needs its metadata directory "
                                       f"{root / META_DIR} writable ({e.strerror})") from None
            # A read-only store (its records are served, nothing is written): no claim.
            log.warning("kvtier: cannot claim the store %s (%s): another engine on it would "
                        "not be detected", root, e.strerror)
            return
        try:
            fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            if have is None:
                os.close(fd)
            if shared:
                raise StoreInUse(
                    f"kvtier: the store {root} is in use by an engine without `shared: true`; "
                    "every engine on one store must set shared (and the same secret_file)") \
                    from None
            raise StoreInUse(
                f"kvtier: the store {root} is in use by another engine; several engines on one "
                "store need `shared: true` and a `secret_file` on every one of them (one disk "
                "budget for all), or give each engine its own disk_path") from None
        _claims[key] = (fd, shared)
