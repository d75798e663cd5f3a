"""Start vLLM's OpenAI server with kvtier wired in, and talk to it.

Used by ``kvtier serve``/``kvtier demo``, the end-to-end tests and the benchmarks,
so they all run the very command line an operator would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kvtier.vllm.watchdog import HANG_MARK

CONNECTOR = {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.connector",
             "kv_role": "kv_both"}


# Set for every server kvtier starts (``kvtier serve``, and ``Server``: the demo, the
# tests): vLLM sends usage statistics to a remote endpoint otherwise, and
# DO_NOT_TRACK is the common opt-out that vLLM and its libraries honour.
NO_TELEMETRY = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def server_env(base: dict | None = None, extra: dict | None = None) -> dict:
    """The environment of a server kvtier starts: ``base`` (default ``os.environ``),
    then ``extra``, with telemetry off (NO_TELEMETRY always wins)."""
    env = dict(os.environ if base is None else base)
    env.update(extra or {})
    env.update(NO_TELEMETRY)
    return env


def has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def kv_transfer_config(extra: dict | None) -> str:
    cfg = dict(CONNECTOR)
    cfg["kv_load_failure_policy"] = "recompute"
    if extra:
        cfg["kv_connector_extra_config"] = extra
    return json.dumps(cfg)


def server_command(model: str, port: int, kvtier: dict | None, vllm_args: list[str] = (),
                   connector: bool = True) -> list[str]:
    """The vLLM server command line (``python -m`` works for the CPU and GPU wheels)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port)]
    if connector:
        cmd += ["--kv-transfer-config", kv_transfer_config(kvtier)]
    return cmd + list(vllm_args)


def cpu_defaults(max_model_len: int = 4096) -> list[str]:
    """Settings vLLM's CPU build needs (block size multiple of 32, no graphs)."""
    return ["--block-size", "32", "--enforce-eager", "--max-model-len", str(max_model_len),
            "--gpu-memory-utilization", "0.3"]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A vLLM server subprocess; ``with Server(...) as s:`` waits until it is healthy."""

    model: str
    kvtier: dict | None = None
    vllm_args: list[str] = field(default_factory=list)
    connector: bool = True
    port: int = 0
    log_path: str | None = None
    env: dict | None = None
    startup_timeout: float = 600.0

    def __post_init__(self):
        self.port = self.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        cmd = server_command(self.model, self.port, self.kvtier, self.vllm_args, self.connector)
        env = server_env(extra=self.env)
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        # A server on 127.0.0.1 (one node): vLLM need not find its host address by
        # connecting a UDP socket towards 8.8.8.8 (no packet goes out, but it is a
        # connect() to a public address all the same).
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode} during "
                                   f"start-up; log: {self.log_path}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vLLM server not healthy after {self.startup_timeout:.0f} s")

    def _log_lines(self) -> list[str]:
        if not self.log_path or not Path(self.log_path).exists():
            return []
        return Path(self.log_path).read_text(errors="replace").splitlines()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self._log_lines()[-n:])

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def kill(self) -> None:
        """kill -9 the whole server (API server, engine core, workers)."""
        self.stop(signal.SIGKILL)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- client ----------------------------------------------------------------
    def complete(self, prompt, max_tokens: int = 8, timeout: float = 600, **params) -> dict:
        """POST /v1/completions (greedy by default); returns the JSON response."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, **params}
        req = urllib.request.Request(self.url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:   # say why: the server's answer and its log
            body = e.read().decode(errors="replace")[:2000]
            raise RuntimeError(f"HTTP {e.code} from {self.url}/v1/completions: {body}\n"
                               f"{self.hang_dump()}server log ({self.log_path}), last lines:\n"
                               f"{self.log_tail(80)}") from e

    def hang_dump(self) -> str:
        """The stacks kvtier's step watchdog dumped into the log (kvtier.vllm.watchdog),
        if it did: where a hung engine was stuck (the whole dump, every thread)."""
        lines = self._log_lines()
        at = [i for i, line in enumerate(lines) if HANG_MARK in line]
        if not at:
            return ""
        end = at[-1] + 1
        while end < len(lines) and (not lines[end].strip() or lines[end].startswith(
                ("Thread 0x", "Current thread 0x", "  File ", "  <"))):
            end += 1
        return "the engine's step watchdog dumped:\n" + "\n".join(lines[at[-1]:end]) + "\n"

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            return r.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples in Prometheus text whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        base, _, lab = head.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in lab for k, v in labels.items()):
            total += float(value)
    return total
