"""What the store trusts of the filesystem, and how it opens files.

A store directory anyone else can write is a store anyone can poison (plant a
record, a symlink that redirects a write, a FIFO that blocks a reader), so:

- the store directory (``disk_path``, which may be reached through a symlink:
  an operator's choice) must belong to this user and not be world-writable;
- kvtier's own directories under it (namespace, rank, shard, ``tmp/``,
  ``free/``) must be real directories (no symlinks) of this user that neither
  group nor others can write;

else the store refuses to open (``UnsafeStore``, saying why and what to do).

Every open of a store file is ``OPEN_SAFE`` (O_NOFOLLOW: a symlink is refused
with ELOOP, never followed; O_NONBLOCK: a FIFO does not block the open) and
then takes only a regular file (fstat, S_ISREG); a file is written over only
if it is ``own_plain_file`` (regular, this user's, one link: a hard link to a
file elsewhere is never written through). The native engine (csrc/io) applies
the same rules.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# Opening a store file: never through a symlink, never blocked by a FIFO.
OPEN_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# An open that fails with these met a symlink (O_NOFOLLOW), a socket or a device.
NOT_REGULAR_ERRNOS = (errno.ELOOP, errno.ENXIO, errno.ENODEV)
HEX = frozenset("0123456789abcdef")


class UnsafeStore(RuntimeError):
    """The store's directories could let someone else plant or redirect records."""


def is_regular(path) -> bool:
    """A regular file at ``path`` itself (a symlink is not followed)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def own_plain_file(st: os.stat_result) -> bool:
    """A file this process may write over: regular, this user's, one link."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()


def planted(st: os.stat_result) -> bool:
    """Something planted where a record should be: neither a regular file nor a
    directory (a FIFO, device, socket or symlink). A directory is no record and
    no fault of one: it is an OSError (EISDIR), and left alone."""
    return not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode))


def not_regular_error(e: OSError, path) -> bool:
    """Whether an open's error means something was planted at ``path`` (EINVAL:
    O_DIRECT on a FIFO or device, which do not take it)."""
    if e.errno in NOT_REGULAR_ERRNOS:
        return True
    if e.errno != errno.EINVAL:
        return False
    try:
        return planted(os.lstat(path))
    except OSError:
        return False


def check_dir(path: Path, top: bool = False) -> None:
    """Refuse a directory someone else could plant records or links in (``top``:
    the store directory itself, which may be a symlink and group-writable)."""
    try:
        st = os.stat(path) if top else os.lstat(path)
    except OSError as e:
        raise UnsafeStore(f"kvtier: cannot use the store directory {path}: {e.strerror}") \
            from None
    if not stat.S_ISDIR(st.st_mode):
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UnsafeStore(f"kvtier: refusing the store: {path} is {what} (kvtier's "
                          "directories must be real directories; remove it)")
    me = os.geteuid()
    if st.st_uid != me:
        raise UnsafeStore(
            f"kvtier: refusing the store: {path} is owned by uid {st.st_uid}, not by this "
            f"user (uid {me}); another user could plant, read or remove records there. "
            "chown it to this user or pick another disk_path")
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        raise UnsafeStore(
            f"kvtier: refusing the store: {path} is world-writable (mode {mode:04o}); "
            "anyone on this machine could plant records, symlinks or FIFOs in it. "
            f"chmod 0700 {path}, or pick another disk_path")
    if not top and mode & stat.S_IWGRP:
        raise UnsafeStore(
            f"kvtier: refusing the store: {path} is group-writable (mode {mode:04o}); "
            f"kvtier's own directories are 0700. chmod 0700 {path}")


def make_dir(path: Path) -> None:
    """Create one of kvtier's directories (0700) or check the one there."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    check_dir(path)


def check_shards(rank_dir: Path) -> None:
    """The shard directories of existing records (``<name[:2]>/``) pass ``check_dir``."""
    try:
        entries = list(os.scandir(rank_dir))
    except OSError:
        return
    for e in entries:
        if len(e.name) == 2 and set(e.name) <= HEX:
            check_dir(Path(e.path))
