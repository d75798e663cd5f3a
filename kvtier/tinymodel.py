"""Small Llama checkpoints written on the spot, for the demo, tests and benchmarks.

No model download exists on CPU CI machines, so kvtier writes its own: a Llama
``config.json``, a byte-level tokenizer (any text encodes; 1 byte ~ 1 token) and,
when asked, seeded random weights saved as safetensors. Random *real* weights
matter for output-equality tests: vLLM's ``load_format="dummy"`` gives near-uniform
logits, so greedy outputs would agree by accident.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

VOCAB_SIZE = 512  # 256 byte tokens + 3 specials, padded


@dataclass(frozen=True)
class TinyLlama:
    """Shape of a generated Llama. Defaults: a ~2M-parameter model for tests."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 256
    max_position_embeddings: int = 8192
    initializer_range: float = 0.15
    # Hybrid attention (vLLM's hybrid KV cache manager): a window in tokens and
    # "full_attention" / "sliding_attention" per layer.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None

    def config(self) -> dict:
        extra = {}
        if self.layer_types is not None:
            extra = {"layer_types": list(self.layer_types), "sliding_window": self.sliding_window}
        return extra | {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "vocab_size": VOCAB_SIZE,
            "bos_token_id": 256,
            "eos_token_id": 257,
            "pad_token_id": 258,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }


# The benchmark model of the connector issue: ~100M parameters (8 layers, hidden
# 1024, 4 KV heads of 64).
BENCH_LLAMA = TinyLlama(
    hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4, head_dim=64,
    intermediate_size=2816,
)


# The demo's model (``kvtier demo``): ~3M parameters (4 layers, hidden 256, 2 KV
# heads of 64: 2 KiB of KV per token). Big enough that recomputing a 6,000-token
# context costs far more than reading its 12 MiB of KV back; small enough that
# the demo runs in about a minute on two CPU cores.
DEMO_LLAMA = TinyLlama(
    hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
    intermediate_size=512,
)


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # Stable order: the byte-level alphabet sorted by the byte it stands for.
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars, key=_byte_of))}
    for i, tok in enumerate(("<s>", "</s>", "<pad>")):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "add_bos_token": False, "model_max_length": 1 << 20,
    }))


def _byte_of(ch: str) -> int:
    # GPT-2's byte->unicode map: printable bytes map to themselves, the others
    # to 256 + n in order.
    code = ord(ch)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def write_model(path: str | os.PathLike, shape: TinyLlama = TinyLlama(),
                weights: bool = False, seed: int = 0) -> Path:
    """Write config + tokenizer (+ seeded random weights) to ``path``; idempotent."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / ".kvtier-model.json"
    want = {"config": shape.config(), "weights": weights, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return path
    (path / "config.json").write_text(json.dumps(shape.config(), indent=1))
    _write_tokenizer(path)
    if weights:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = LlamaConfig(**shape.config())
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(str(path), safe_serialization=True)
        (path / "config.json").write_text(json.dumps(shape.config(), indent=1))
    marker.write_text(json.dumps(want))
    return path
