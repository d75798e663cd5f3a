"""Shared helpers of the end-to-end tests: prompts, a kvtier server, store files."""

import random
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvtier.serving import Server, cpu_defaults

BLOCK = 32
PROMPT_TOKENS = 750
FULL_BLOCK_TOKENS = (PROMPT_TOKENS - 1) // BLOCK * BLOCK   # the last token is recomputed
BLOCKS_PER_PROMPT = FULL_BLOCK_TOKENS // BLOCK
RECORD_BYTES = 4096 + 2 * 32 * 2 * 128 * 2   # header + 2 layers x 32 tok x 2 heads x (K+V) bf16
GPU_BLOCKS = 56                               # room for ~2 prompts


def prompts(n=6, length=PROMPT_TOKENS, seed=1):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(length)] for _ in range(n)]


def server(model_dir, store: Path, log: Path, env=None, vllm_args=(), **extra) -> Server:
    """A kvtier server on the tiny test model. Loads are always taken: on this tiny
    model recompute is about as fast as a load, and the tests check loads (the
    cost model has its own test, which sets load_policy "auto")."""
    cfg = {"dram_bytes": 80 * RECORD_BYTES, "disk_path": str(store), "disk_bytes": "1GiB",
           "load_policy": "always"}
    cfg.update(extra)
    args = cpu_defaults(1024) + ["--num-gpu-blocks-override", str(GPU_BLOCKS),
                                 "--enable-prompt-tokens-details", "--seed", "0",
                                 *vllm_args]
    return Server(model_dir, cfg, args, log_path=str(log), env=env)


def shared_store_config(tmp_path: Path) -> dict:
    """kvtier keys of an engine sharing its store with others: ``shared`` and a
    secret (written once per test directory, 0400)."""
    secret = tmp_path / "store-secret"
    if not secret.exists():
        import os
        secret.write_bytes(os.urandom(32).hex().encode())
        secret.chmod(0o400)
    return {"shared": True, "secret_file": str(secret)}


def cached(resp: dict) -> int:
    return (resp["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def text(resp: dict) -> str:
    return resp["choices"][0]["text"]


# Two engines compute the same request in a different order on vLLM's CPU
# backend: kvtier holds pages longer than plain vLLM (other page layouts), and a
# prefix hit prefills only the suffix against the cached prefix, where a cold
# run prefills the whole prompt. Logprobs then differ a little (measured up to
# ~0.03 for page layout alone, up to ~0.05 with batching and prefix hits), so
# where two tokens are that close greedy decoding may pick either. Accepted:
# equal tokens whose logprobs agree within NEAR_TIE, up to a first divergence
# at a near tie in both runs. Wrong KV moves logprobs by far more than this
# (the stress test's negative control).
NEAR_TIE = 0.1


def same_greedy(a_tokens, a_top, b_tokens, b_top, tol: float = NEAR_TIE) -> bool:
    """Two greedy generations agree (see NEAR_TIE); top logprobs as ``{token: lp}``."""
    for i, (x, y) in enumerate(zip(a_tokens, b_tokens)):
        x, y = str(x), str(y)
        if x == y:
            if x in a_top[i] and x in b_top[i] and abs(a_top[i][x] - b_top[i][x]) > tol:
                return False
            continue
        return all(y in top and x in top and abs(top[x] - top[y]) <= tol
                   for top in (a_top[i], b_top[i]))
    return len(a_tokens) == len(b_tokens)


def records(store: Path) -> set[Path]:
    return {p for p in store.rglob("*") if p.is_file() and p.parent.name != "tmp"
            and len(p.name) == 32}


def wait_records(store: Path, n: int, timeout: float = 60) -> set[Path]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = records(store)
        if len(got) >= n:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{len(records(store))} records on disk, expected {n}")


@contextmanager
def tmpfs(path: Path, size: str):
    """A size-limited tmpfs at ``path`` (real ENOSPC / EROFS); skips if not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
