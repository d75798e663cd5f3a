"""What makes two KV blocks interchangeable: the namespace of a record.

Two engines may share a record only if the same tokens give the same KV bytes
in both. Everything vLLM's configuration says that changes those bytes is in
the namespace (``namespace_of``); a setting that changes them in a way kvtier
cannot name is refused at start-up (``check_supported`` in connector.py).

In the namespace: the model path and revision; a fingerprint of the weights
(``weights_fingerprint``); the model dtype and the KV cache dtype; the
quantization method and load format; rope parameters and ``hf_overrides``;
the KV layout, block size, TP size and context-parallel sizes; the KV cache
group structure of hybrid models; the record format version.

The weights fingerprint hashes ``config.json`` (a LoRA adapter's
``adapter_config.json``) and, for each weight file, its
name, size, safetensors header (tensor names, dtypes, shapes, offsets) and 16
4-KiB samples spread over the file: a checkpoint replaced under the same path
(a new fine-tune, other shards) gets another fingerprint, at the cost of a few
hundred small reads at start-up. It does not read every byte: two checkpoints
equal in every sampled byte and every header share KV. A model that is not a
local directory or in the Hugging Face cache gets no fingerprint (logged);
pin ``--revision`` then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from kvtier.cache.groups import KVGroup
from kvtier.cache.keys import Namespace

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger("vllm.kvtier")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAMPLES, SAMPLE_BYTES = 16, 4096


def _model_dir(model: str, revision: str | None) -> Path | None:
    if os.path.isdir(model):
        return Path(model)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:   # not cached, no hub library, offline...
        return None


def _file_digest(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}\n".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            n = int.from_bytes(f.read(8), "little")
            if 0 < n <= min(size - 8, 100 << 20):
                h.update(f.read(n))
        for i in range(SAMPLES):
            f.seek(size * i // SAMPLES)
            h.update(f.read(SAMPLE_BYTES))


def weights_fingerprint(model: str, revision: str | None = None) -> str:
    """A short digest of the checkpoint's config and weight files ("" if not found)."""
    root = _model_dir(model, revision)
    if root is None:
        log.warning("kvtier: model %s is neither a directory nor in the Hugging Face cache: "
                    "its weights are not fingerprinted (pin --revision)", model)
        return ""
    h = hashlib.blake2b(digest_size=16, person=b"kvtier-weights")
    configs = [c for c in (root / "config.json", root / "adapter_config.json") if c.is_file()]
    for config in configs:   # config.json alone as before (the same fingerprints)
        h.update(config.read_bytes() if config.name == "config.json"
                 else b"adapter_config.json\n" + config.read_bytes())
    files = sorted(p for p in root.iterdir()
                   if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    for p in files:
        _file_digest(h, p)
    return h.hexdigest() if files or configs else ""


def adapter_identity(name: str, path: str) -> str:
    """What names a LoRA adapter's KV in the keys: its name, its path and the
    fingerprint of its files (vLLM's own hash takes the name and path; kvtier's
    records outlive the process, so an adapter replaced under the same path
    between restarts must not reuse them)."""
    return f"{name}\0{path}\0{weights_fingerprint(path) if path else ''}"


def _rope(hf_config) -> str:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling",
                                                                   None)
    return json.dumps(params, sort_keys=True, default=str)


def namespace_of(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig",
                 groups: tuple[KVGroup, ...], fingerprint: str | None = None) -> Namespace:
    """The namespace of this engine's records (see the module docstring)."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    extra = ""
    if len(groups) > 1 or groups[0].windowed:
        extra = "groups=" + ";".join(f"{len(g.layer_names)}:{g.window_blocks or 'full'}"
                                     for g in groups)
    model_dtype = str(mc.dtype).replace("torch.", "")
    kv_dtype = cc.cache_dtype if cc.cache_dtype != "auto" else model_dtype
    load_format = getattr(vllm_config, "load_config", None)
    compute = {
        "dtype": model_dtype,
        "quantization": mc.quantization,
        "load_format": str(getattr(load_format, "load_format", "auto")),
        "rope": _rope(mc.hf_config),
        "hf_overrides": json.dumps(mc.hf_overrides, sort_keys=True, default=str)
        if not callable(mc.hf_overrides) else repr(mc.hf_overrides),
        "dcp": getattr(pc, "decode_context_parallel_size", 1),
        "pcp": getattr(pc, "prefill_context_parallel_size", 1),
        "kv_scales": bool(getattr(cc, "calculate_kv_scales", False)),
        "weights": weights_fingerprint(mc.model, mc.revision) if fingerprint is None
        else fingerprint,
    }
    return Namespace(
        model=f"{mc.model}@{mc.revision or ''}",
        kv_dtype=kv_dtype,
        layout=str(kv_cache_config.kv_cache_layout or "default"),
        block_size=kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size,
        tp_size=pc.tensor_parallel_size,
        extra=extra,
        compute=json.dumps(compute, sort_keys=True),
    )
