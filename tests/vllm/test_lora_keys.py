"""A LoRA adapter's KV is keyed by the adapter's name, path and files: records
outlive the process, so an adapter replaced under the same path between two
restarts must not reuse the old adapter's KV (vLLM's own hash takes the name and
path only: enough for a cache that dies with the process)."""

import json

from tests.conftest import needs_vllm

pytestmark = needs_vllm


def write_adapter(path, scale: float):
    import torch
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16,
                                                          "target_modules": ["q_proj"]}))
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.full((8, 64), scale)},
              str(path / "adapter_model.safetensors"))
    return str(path)


def keys(lora=None, tokens=tuple(range(100))):
    """The request's block keys, from a new scheduler (a restarted engine)."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    from kvtier.config import KVTierConfig
    from kvtier.store.slots import SlotGeometry
    from kvtier.vllm.scheduler import KVTierScheduler

    cfg = KVTierConfig.from_extra_config({"disk": False, "dram_bytes": 1 << 20})
    sched = KVTierScheduler(cfg, bytes(16), 1, 32, SlotGeometry(1024, 16), start_sweeper=False)
    req = Request("r", list(tokens), SamplingParams(max_tokens=1), None, lora_request=lora)
    return list(sched._keys(sched._state(req), 3))


def test_an_adapter_replaced_under_its_path_gets_other_keys(tmp_path):
    from vllm.lora.request import LoRARequest

    path = write_adapter(tmp_path / "a", 0.1)
    before = keys(LoRARequest("a", 1, path))
    assert keys(LoRARequest("a", 1, path)) == before   # stable across restarts
    assert keys() != before                            # the base model's are other keys
    assert keys(LoRARequest("a", 1, write_adapter(tmp_path / "b", 0.1))) != before
    write_adapter(tmp_path / "a", 0.2)                 # a new fine-tune, same name and path
    assert keys(LoRARequest("a", 1, path)) != before
