"""Streaming ``/v1/completions`` client: one request -> TTFT, TPOT, latency, tokens."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import aiohttp


@dataclass
class RequestResult:
    user: int
    session: str
    agent: str
    turn: int
    start: float                 # s since the run started
    end: float = 0.0
    ttft: float | None = None    # s, first streamed token
    tpot: float | None = None    # s per output token after the first
    prompt_tokens: int = 0
    cached_tokens: int | None = None   # server-reported prefix hit (needs
    output_tokens: int = 0             # --enable-prompt-tokens-details)
    ok: bool = False
    error: str = ""

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tokens_per_s(self) -> float | None:
        """Output tokens/s seen by this request after its first token."""
        if self.tpot is None:
            return None
        return 1.0 / self.tpot if self.tpot > 0 else float("inf")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["e2e"] = self.e2e
        return d


async def complete(http: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
                   max_tokens: int, result: RequestResult, t0: float,
                   clock=time.monotonic) -> RequestResult:
    """Send one streamed completion; fill ``result`` (times relative to ``t0``)."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens,
        "min_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
    }
    result.prompt_tokens = len(prompt)
    first = last = None
    n_chunks = 0
    usage = None
    try:
        async with http.post(url.rstrip("/") + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    result.error = str(obj["error"])[:300]
                    return result
                if obj.get("choices"):
                    now = clock()
                    first = first if first is not None else now
                    last = now
                    n_chunks += 1
                if obj.get("usage"):
                    usage = obj["usage"]
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"[:300]
        return result
    finally:
        result.end = clock() - t0
    if first is None:
        result.error = "no tokens streamed"
        return result
    result.ttft = first - t0 - result.start
    result.output_tokens = n_chunks
    if usage:
        result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
        result.output_tokens = usage.get("completion_tokens", n_chunks)
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = details.get("cached_tokens")
    if result.output_tokens > 1:
        result.tpot = (last - first) / (result.output_tokens - 1)
    result.ok = True
    return result
