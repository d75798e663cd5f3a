"""A store's secret: authenticated records and keyed file names.

With ``secret_file`` set, every record carries an HMAC-SHA256 over its header
and payload under a key derived from the secret, and every name in the store
is keyed: a record's file name is a keyed permutation of its block key, the
namespace directory a keyed hash of the namespace digest. Without the secret
nobody can write a record a reader accepts (a record without a valid MAC is a
miss), nor tell from the names which prefixes or models were processed.

The file name permutation is a 4-round Feistel network over the 16-byte key
(each round function a keyed BLAKE2b): it is invertible with the secret, so
the restart scan turns names back into keys without reading a byte of a record.

The secret file is read once at start-up. It must be a regular file (a symlink
to one is fine: Kubernetes mounts Secrets that way) of at least 16 bytes, not
readable or writable by every user; surrounding whitespace is ignored, so
``openssl rand -hex 32 > secret`` and 32 random bytes both work.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import threading

MAC_BYTES = 32             # HMAC-SHA256
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 1 << 16
_ROUNDS = 4
_HALF = 8


class SecretError(ValueError):
    """The secret file cannot be used (its message says why and what to do)."""


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return hashlib.blake2b(secret, digest_size=32, person=b"kvtier-" + purpose).digest()


class StoreKeys:
    """What the secret gives: ``mac`` over records, ``name``/``key_of`` for file
    names, ``namespace_id`` for namespace directories. Thread-safe."""

    def __init__(self, secret: bytes):
        if len(secret) < MIN_SECRET_BYTES:
            raise SecretError(f"the secret is {len(secret)} bytes; at least "
                              f"{MIN_SECRET_BYTES} are needed (e.g. openssl rand -hex 32)")
        self._mac = hmac.new(_derive(secret, b"mac"), digestmod="sha256")
        name_key = _derive(secret, b"names")
        self._rounds = [hashlib.blake2b(digest_size=_HALF, key=name_key, salt=bytes([i]) * 16)
                        for i in range(_ROUNDS)]
        self._ns = hashlib.blake2b(digest_size=16, key=_derive(secret, b"namespace"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StoreKeys":
        return cls(read_secret(path))

    # -- records ---------------------------------------------------------------
    def mac(self, header: bytes, payload) -> bytes:
        """HMAC-SHA256 over ``header`` then ``payload`` (any buffer; the GIL is
        released while a large payload is hashed)."""
        m = self._mac.copy()
        m.update(header)
        m.update(payload)
        return m.digest()

    def verify(self, header: bytes, payload, tag: bytes) -> bool:
        return hmac.compare_digest(self.mac(header, payload), bytes(tag))

    # -- names -----------------------------------------------------------------
    def _f(self, i: int, half: bytes) -> int:
        h = self._rounds[i].copy()
        h.update(half)
        return int.from_bytes(h.digest(), "little")

    def name(self, key: bytes) -> bytes:
        """The 16 bytes a record of ``key`` is named by (a keyed permutation)."""
        if len(key) != 2 * _HALF:
            raise ValueError("keys are 16 bytes")
        left, right = key[:_HALF], key[_HALF:]
        for i in range(_ROUNDS):
            left, right = right, (int.from_bytes(left, "little") ^ self._f(i, right)
                                  ).to_bytes(_HALF, "little")
        return left + right

    def key_of(self, name: bytes) -> bytes:
        """The block key a record named ``name`` holds (``name``'s inverse)."""
        if len(name) != 2 * _HALF:
            raise ValueError("names are 16 bytes")
        left, right = name[:_HALF], name[_HALF:]
        for i in reversed(range(_ROUNDS)):
            left, right = (int.from_bytes(right, "little") ^ self._f(i, left)
                           ).to_bytes(_HALF, "little"), left
        return left + right

    def namespace_id(self, namespace: bytes) -> bytes:
        """The 16 bytes naming ``namespace``'s directory (and in its records' headers)."""
        h = self._ns.copy()
        h.update(namespace)
        return h.digest()


def read_secret(path: str | os.PathLike) -> bytes:
    """The secret's bytes, after the checks of this module's docstring."""
    path = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO planted in its place must not block start-up.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise SecretError(f"cannot open the secret file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"the secret file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            raise SecretError(
                f"the secret file {path} is readable or writable by every user (mode "
                f"{mode:04o}): anyone on this machine could forge records; chmod 0400 it "
                "(Kubernetes: the Secret volume's defaultMode: 0400)")
        if st.st_size > MAX_SECRET_BYTES:
            raise SecretError(f"the secret file {path} is {st.st_size} bytes; a secret is "
                              f"16 to {MAX_SECRET_BYTES} bytes")
        chunks = []
        while True:
            b = os.read(fd, MAX_SECRET_BYTES + 1)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(fd)
    secret = b"".join(chunks).strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(f"the secret file {path} holds {len(secret)} bytes; at least "
                          f"{MIN_SECRET_BYTES} are needed (e.g. openssl rand -hex 32 > {path})")
    return secret


_cache: dict[tuple, StoreKeys] = {}
_cache_lock = threading.Lock()


def keys_for(path: str | os.PathLike) -> StoreKeys:
    """``StoreKeys.load(path)``, once per file content in a process (every rank
    store of a scheduler shares it)."""
    secret = read_secret(path)
    with _cache_lock:
        k = hashlib.sha256(secret).digest()
        keys = _cache.get(k)
        if keys is None:
            keys = _cache[k] = StoreKeys(secret)
        return keys
