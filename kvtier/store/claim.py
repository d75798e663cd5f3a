"""A store's metadata directory and the engines' claims on a store.

``<disk_path>/.kvtier/`` holds what the engines on a store share besides the
records: the shared budget's lock, ledger and leases (kvtier.store.budget) and
``owner``, the file whose lock (flock) is an engine's claim of the store.
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


def open_lockfile(path: Path, write: bool = True) -> int:
    """A lock file of the metadata directory, made if needed (``write``: opened for
    writing too, which POSIX record locks need for an exclusive lock)."""
    fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CREAT | OPEN_SAFE, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeStore(f"kvtier: refusing the store: {path} is not a regular file "
                          "(remove it)")
    return fd


_claims: dict[tuple[str, int], tuple[int, bool]] = {}
_claims_lock = threading.Lock()


def _forget_claims_in_child() -> None:
    """A forked child does not hold its parent's claims (flock locks belong to the
    open file: the child's copies are closed, the parent's lock stays)."""
    for fd, _ in _claims.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _claims.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_claims_in_child)


def _lock(fd: int, shared: bool, path: Path) -> int:
    """flock the claim file; returns the fd holding the lock (another one when NFS,
    which emulates flock with record locks, wants a writable fd for LOCK_EX)."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return fd
    except OSError as e:
        if e.errno != errno.EBADF or shared:
            raise
    rw = open_lockfile(path, write=True)
    try:
        fcntl.flock(rw, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(rw)
        raise
    os.close(fd)
    return rw


def claim_store(root: str | os.PathLike, shared: bool) -> None:
    """An engine's claim of the store for as long as this process lives: a shared
    engine's is shared with other shared engines; a non-shared engine's excludes
    every other engine (it budgets alone). StoreInUse if another engine's claim
    conflicts.

    The claim is a BSD lock (flock) of ``.kvtier/owner`` opened read-only: the
    kernel drops it when the process dies, and an engine holds no file of the
    store open for writing (the store can be remounted read-only under it)."""
    root = Path(root)
    key = (str(root.resolve()), os.getpid())
    with _claims_lock:
        have = _claims.get(key)
        if have is not None and have[1] == shared:
            return
        path = root / META_DIR / "owner"
        try:
            fd = have[0] if have is not None else open_lockfile(
                meta_dir(root) / "owner", write=False)
        except OSError as e:
            if shared:
                raise OSError(e.errno, f"kvtier: a shared store needs its metadata directory "
                                       f"{root / META_DIR} writable ({e.strerror})") from None
            # A read-only store (its records are served, nothing is written): no claim.
            log.warning("kvtier: cannot claim the store %s (%s): another engine on it would "
                        "not be detected", root, e.strerror)
            return
        try:
            fd = _lock(fd, shared, path)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
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
