"""The namespace: everything that changes KV bytes separates records."""

import json
import shutil
from types import SimpleNamespace

import pytest

from kvtier.cache.groups import FULL
from kvtier.vllm.namespace import namespace_of, weights_fingerprint
from kvtier.tinymodel import write_model


def test_weights_fingerprint_follows_the_checkpoint_not_the_path(tmp_path):
    a = write_model(tmp_path / "m", weights=True, seed=0)
    fp = weights_fingerprint(str(a))
    assert fp and fp == weights_fingerprint(str(a))
    # the same checkpoint elsewhere: the same fingerprint
    shutil.copytree(a, tmp_path / "copy")
    assert weights_fingerprint(str(tmp_path / "copy")) == fp
    # another fine-tune replaced under the same path: another fingerprint
    shutil.rmtree(a)
    write_model(a, weights=True, seed=1)
    assert weights_fingerprint(str(a)) not in ("", fp)
    # a changed config alone changes it too
    cfg = json.loads((tmp_path / "copy" / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (tmp_path / "copy" / "config.json").write_text(json.dumps(cfg))
    assert weights_fingerprint(str(tmp_path / "copy")) != fp


def test_weights_fingerprint_sees_one_changed_tensor(tmp_path):
    """One tensor changed in place: the safetensors header is the same, the samples
    spread over the file are not (a tensor of the size of the model's largest)."""
    from safetensors.torch import load_file, save_file
    a = write_model(tmp_path / "m", weights=True, seed=0)
    fp = weights_fingerprint(str(a))
    (f,) = a.glob("*.safetensors")
    tensors = load_file(f)
    name = max(tensors, key=lambda k: tensors[k].numel())
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, f, metadata={"format": "pt"})
    assert weights_fingerprint(str(a)) != fp


def test_unknown_model_has_no_fingerprint(tmp_path):
    assert weights_fingerprint(str(tmp_path / "nowhere")) == ""


def vllm_config(**model):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    import torch
    mc = SimpleNamespace(model="m", revision=None, dtype="torch.bfloat16", quantization=None,
                         hf_config=SimpleNamespace(rope_parameters={"rope_theta": 10000.0}),
                         hf_overrides={})
    for k, v in model.items():
        setattr(mc, k, v)
    vc = SimpleNamespace(model_config=mc, cache_config=SimpleNamespace(cache_dtype="auto"),
                         parallel_config=SimpleNamespace(tensor_parallel_size=1,
                                                         decode_context_parallel_size=1,
                                                         prefill_context_parallel_size=1),
                         load_config=SimpleNamespace(load_format="auto"))
    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    kc = KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    return vc, kc


@pytest.mark.parametrize("change", [
    {"dtype": "torch.float16"}, {"quantization": "fp8"},
    {"hf_config": SimpleNamespace(rope_parameters={"rope_theta": 10000.0, "factor": 4.0,
                                                   "rope_type": "yarn"})},
    {"hf_overrides": {"num_hidden_layers": 1}}])
def test_settings_that_change_kv_bytes_change_the_namespace(change):
    pytest.importorskip("vllm")
    base = namespace_of(*vllm_config(), FULL, fingerprint="w").digest()
    assert namespace_of(*vllm_config(**change), FULL, fingerprint="w").digest() != base
    assert namespace_of(*vllm_config(), FULL, fingerprint="w2").digest() != base
    vc, kc = vllm_config()
    vc.parallel_config.decode_context_parallel_size = 2
    assert namespace_of(vc, kc, FULL, fingerprint="w").digest() != base
