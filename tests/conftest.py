import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
        return True
    except ImportError:
        return False


needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Llama with seeded random weights (real logits for equality tests)."""
    from kvtier.tinymodel import write_model
    return str(write_model(tmp_path_factory.mktemp("model"), weights=True))


@pytest.fixture(scope="session")
def shared_dir():
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not found (the shared traces sit beside the repo)")
    return SHARED
