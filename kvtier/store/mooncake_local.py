"""A Mooncake Store on this machine, on loopback: a master and one dedicated storage
client (``mooncake_client``), each a process of the Mooncake wheel's binaries, on
free ports (tests, benchmarks). The master can be killed and started again (same
port). A fleet runs them as services instead (deploy/k8s/mooncake.yaml)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def _bin(name: str) -> str | None:
    here = Path(sys.executable).parent / name   # the venv's console scripts
    return str(here) if here.exists() else shutil.which(name)


def mooncake_available() -> bool:
    try:
        import mooncake.store  # noqa: F401
    except (ImportError, OSError):   # OSError: libibverbs.so.1 missing
        return False
    return _bin("mooncake_master") is not None and _bin("mooncake_client") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


class MooncakeCluster:
    def __init__(self, log_dir: Path, segment: str = "512MB"):
        """``log_dir``: where the two processes log; ``segment``: the storage
        client's memory for records."""
        self.log_dir = Path(log_dir)
        self.port = free_port()
        self.master_addr = f"127.0.0.1:{self.port}"
        self.segment = segment
        self.master: subprocess.Popen | None = None
        self.storage: subprocess.Popen | None = None

    def start(self) -> "MooncakeCluster":
        self.start_master()
        port = free_port()
        self.storage = subprocess.Popen(
            [_bin("mooncake_client"), f"--master_server_address={self.master_addr}",
             "--metadata_server=P2PHANDSHAKE", "--host=127.0.0.1", f"--port={port}",
             f"--global_segment_size={self.segment}", "--protocol=tcp"],
            stdout=open(self.log_dir / "mooncake_storage.log", "ab"), stderr=subprocess.STDOUT)
        _wait_port(port, self.storage, "mooncake_client")
        self._wait_segment()
        return self

    def _wait_segment(self, timeout: float = 30.0) -> None:
        """Until the storage client's memory is mounted at the master (a put works)."""
        c = self.client()
        try:
            end = time.monotonic() + timeout
            while c.put("kvtier-local-probe", b"x") != 0:
                if time.monotonic() > end:
                    raise RuntimeError(f"no storage mounted at {self.master_addr}")
                time.sleep(0.05)
            c.remove("kvtier-local-probe", True)
        finally:
            c.close()

    def start_master(self) -> None:
        self.master = subprocess.Popen(
            [_bin("mooncake_master"), "--rpc_address=127.0.0.1", f"--rpc_port={self.port}",
             "--metrics_host=127.0.0.1", f"--metrics_port={free_port()}"],
            stdout=open(self.log_dir / "mooncake_master.log", "ab"), stderr=subprocess.STDOUT)
        _wait_port(self.port, self.master, "mooncake_master")

    def kill_master(self) -> None:
        self.master.kill()
        self.master.wait()

    def remote(self, **kw) -> dict:
        """kv_connector_extra_config's ``remote`` for this cluster."""
        return {"kind": "mooncake", "master": self.master_addr, "local_hostname": "127.0.0.1",
                **kw}

    def client(self):
        """A plain Mooncake client of the cluster (what any process on it can do)."""
        from mooncake.store import MooncakeDistributedStore
        c = MooncakeDistributedStore()
        assert c.setup("127.0.0.1", "P2PHANDSHAKE", 0, 16 << 20, "tcp", "",
                       self.master_addr) == 0
        return c

    def stop(self) -> None:
        for p in (self.storage, self.master):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
