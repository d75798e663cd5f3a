"""The cluster tier: records in a Mooncake Store that every engine of a fleet reaches.

A record there is the disk tier's record, byte for byte (header, namespace, key,
rank, checksums, MAC), under the name :func:`record_name`; whoever reads one
validates it exactly as a disk read (``DiskStore.check``). Nothing here decides
what to store or load: the scheduler asks :meth:`RemoteStore.exists`, the workers
:meth:`~RemoteStore.get_into` and :meth:`~RemoteStore.put_from`.

A slow or absent cluster never stalls an engine:
- the connection is made on a thread of its own, and only once the master's port
  answers (Mooncake's ``setup`` retries for about 90 s against a master that is
  down, holding the GIL: the whole process would stop); until it is up,
  everything is a miss;
- a lookup waits at most ``lookup_timeout_ms`` (then it is a miss, counted as an
  error, and the tier backs off as after an error; the call goes on on its
  thread, and further lookups miss at once until it has returned);
- cluster reads and writes run on the workers' own threads for this tier, so a
  hung cluster (each call then waits up to ~30 s) holds up no disk read or write;
- after an error (a master that went away answers each call in about 4 s) the
  tier is skipped for ``retry_seconds``, then tried again: Mooncake's client
  reconnects to a master that came back by itself.

One client per process and master (the scheduler and a worker of one process
share it); it lends the cluster ``segment_bytes`` of memory (default none: data
lives in dedicated storage clients, deploy/k8s/mooncake.yaml).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError as FutureTimeout
from typing import Sequence

from kvtier.config import RemoteConfig

log = logging.getLogger("vllm.kvtier.remote")

LOCAL_BUFFER_BYTES = 16 << 20   # Mooncake's own staging buffer (kvtier registers its slots)
NOT_FOUND = -704                # Mooncake's OBJECT_NOT_FOUND
CLUSTER_FAILURE = -800          # this and below: transfer, RPC (master gone), HA errors;
                                # above: a refusal about one object (no room, bad length)


def record_name(namespace_id: bytes, name: bytes, rank: int, tp_size: int) -> str:
    """A record's name in the cluster store: the disk tier's namespace and file name
    (both keyed when the store has a secret) and the TP rank."""
    return f"kvtier/{namespace_id.hex()}/{name.hex()}/{rank}of{tp_size}"


class RemoteUnavailable(Exception):
    """The cluster tier cannot be used now (not connected yet, or backing off)."""


class RemoteStore:
    _instances: dict[RemoteConfig, "RemoteStore"] = {}
    _instances_lock = threading.Lock()

    @classmethod
    def of(cls, cfg: RemoteConfig) -> "RemoteStore":
        """This process's client of ``cfg``'s cluster (made and connected once)."""
        with cls._instances_lock:
            store = cls._instances.get(cfg)
            if store is None:
                store = cls._instances[cfg] = cls(cfg)
            return store

    def __init__(self, cfg: RemoteConfig, client_factory=None):
        if client_factory is None:
            _mooncake()   # not installed: a clear error at start-up, not a silent miss
        self.cfg = cfg
        self._factory = client_factory or _mooncake_client
        self._client = None
        self._lock = threading.Lock()
        self._buffers: list[tuple[int, int]] = []      # (address, bytes) to register
        self._down_until = 0.0
        self._lookups = ThreadPoolExecutor(1, thread_name_prefix="kvtier-remote-lookup")
        self._inflight: Future | None = None
        self._connector = threading.Thread(target=self._connect, name="kvtier-remote-connect",
                                           daemon=True)
        self._connector.start()

    # -- connection ----------------------------------------------------------
    def _connect(self) -> None:
        host, _, port = self.cfg.master.rpartition(":")
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
            except OSError as e:   # never into setup's GIL-holding retries
                log.warning("kvtier: Mooncake master %s not reachable (%s); retrying in %.0f s",
                            self.cfg.master, e, self.cfg.retry_seconds)
                time.sleep(self.cfg.retry_seconds)
                continue
            try:
                client = self._factory(self.cfg)
            except Exception as e:   # master down: Mooncake's setup retried ~90 s
                log.warning("kvtier: cluster tier %s not reachable (%s); retrying in %.0f s",
                            self.cfg.master, e, self.cfg.retry_seconds)
                time.sleep(self.cfg.retry_seconds)
                continue
            with self._lock:
                self._client = client
                buffers = list(self._buffers)
            for addr, nbytes in buffers:
                self._register(client, addr, nbytes)
            log.info("kvtier: cluster tier connected (Mooncake master %s)", self.cfg.master)
            return

    @staticmethod
    def _register(client, addr: int, nbytes: int) -> None:
        rc = client.register_buffer(addr, nbytes)
        if rc != 0:   # TCP reads and writes work unregistered too (through a copy)
            log.warning("kvtier: registering %d bytes with Mooncake failed (%d)", nbytes, rc)

    def register(self, addr: int, nbytes: int) -> None:
        """Memory that reads land in and writes come from (the DRAM slots)."""
        with self._lock:
            self._buffers.append((addr, nbytes))
            client = self._client
        if client is not None:
            self._register(client, addr, nbytes)

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _usable(self):
        client = self._client
        if client is None or time.monotonic() < self._down_until:
            raise RemoteUnavailable(self.cfg.master)
        return client

    def _failed(self, op: str, detail: object = "") -> None:
        """The cluster failed a call: skip it for ``retry_seconds``."""
        with self._lock:
            first = time.monotonic() >= self._down_until
            self._down_until = time.monotonic() + self.cfg.retry_seconds
        if first:
            log.warning("kvtier: cluster tier %s failed (%s: %s); skipping it for %.0f s",
                        self.cfg.master, op, detail, self.cfg.retry_seconds)

    # -- operations ----------------------------------------------------------
    def exists(self, names: Sequence[str]) -> list[bool] | None:
        """Which records the cluster holds (all False while it is unavailable or an
        earlier lookup still waits on it); None: it failed or did not answer within
        ``lookup_timeout_ms`` (an error)."""
        try:
            client = self._usable()
        except RemoteUnavailable:
            return [False] * len(names)
        if not names or (self._inflight is not None and not self._inflight.done()):
            return [False] * len(names)
        fut = self._inflight = self._lookups.submit(client.batch_is_exist, list(names))
        fut.add_done_callback(self._lookup_done)   # also when it ends after the timeout
        try:
            rcs = fut.result(timeout=self.cfg.lookup_timeout_ms / 1e3)
        except FutureTimeout:   # the call goes on (lookups miss until it ends)
            self._failed("lookup", "no answer within lookup_timeout_ms")
            return None
        except Exception:       # the callback backs off
            return None
        if len(rcs) != len(names) or any(rc < 0 for rc in rcs):
            return None
        return [rc == 1 for rc in rcs]

    def _lookup_done(self, fut: Future) -> None:
        e = fut.exception()
        if e is not None:
            self._failed("lookup", e)
        elif any(rc < 0 for rc in fut.result()):
            self._failed("lookup", f"rc {min(fut.result())}")

    def get_into(self, names: Sequence[str], addrs: Sequence[int], nbytes: int) -> list:
        """Read records into memory: per name the bytes read (an int), "missing",
        "error" (the cluster failed: proves nothing about the record) or "skipped"
        (the tier is unavailable now)."""
        try:
            client = self._usable()
        except RemoteUnavailable:
            return ["skipped"] * len(names)
        try:
            rcs = client.batch_get_into(list(names), list(addrs), [nbytes] * len(names))
        except Exception as e:
            self._failed("get", e)
            return ["error"] * len(names)
        if len(rcs) != len(names):
            return ["error"] * len(names)
        out = [rc if rc >= 0 else "missing" if rc == NOT_FOUND else "error" for rc in rcs]
        if min(rcs, default=0) <= CLUSTER_FAILURE:
            self._failed("get", f"rc {min(rcs)}")
        return out

    def put_from(self, names: Sequence[str], addrs: Sequence[int], nbytes: int) -> list[str]:
        """Publish records: per name "ok", "error" (refused or failed: a full cluster
        evicts or refuses, as its master decides) or "skipped" (unavailable now)."""
        try:
            client = self._usable()
        except RemoteUnavailable:
            return ["skipped"] * len(names)
        try:
            rcs = client.batch_put_from(list(names), list(addrs), [nbytes] * len(names))
        except Exception as e:
            self._failed("put", e)
            return ["error"] * len(names)
        down = [rc for rc in rcs if rc <= CLUSTER_FAILURE]
        if down:
            self._failed("put", f"rc {down[0]}")
        return ["ok" if rc == 0 else "error" for rc in rcs]

    def remove(self, name: str) -> None:
        """Take a record that failed validation out of the cluster (best effort)."""
        try:
            client = self._usable()
            client.remove(name, True)
        except Exception:
            pass


def _mooncake():
    try:
        from mooncake.store import MooncakeDistributedStore
    except (ImportError, OSError) as e:
        raise RuntimeError(
            "kvtier config 'remote': the cluster tier needs Mooncake: pip install "
            "mooncake-transfer-engine (GPU) or mooncake-transfer-engine-non-cuda (CPU), "
            f"and libibverbs1 (Debian/Ubuntu) ({e})") from None
    return MooncakeDistributedStore


def _mooncake_client(cfg: RemoteConfig):
    client = _mooncake()()
    rc = client.setup(cfg.local_hostname or socket.gethostname(), cfg.metadata_server,
                      cfg.segment_bytes, LOCAL_BUFFER_BYTES, cfg.protocol, cfg.device,
                      cfg.master)
    if rc != 0:
        raise RuntimeError(f"Mooncake setup returned {rc}")
    return client
