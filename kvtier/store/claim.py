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
import os
import stat
import threading
from pathlib import Path

META_DIR = ".kvtier"


class StoreInUse(RuntimeError):
    """Another engine uses this store in a way that excludes this one."""


def meta_dir(root: Path) -> Path:
    d = root / META_DIR
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise PermissionError(f"kvtier: {d} must be a directory of this user, writable by it "
                              "alone (not a symlink)")
    return d


def open_lockfile(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PermissionError(f"kvtier: {path} is not a regular file")
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
        fd = have[0] if have is not None else open_lockfile(meta_dir(root) / "owner")
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
