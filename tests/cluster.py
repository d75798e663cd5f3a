"""Tests' access to a real Mooncake Store on loopback (kvtier.store.mooncake_local)."""

import pytest

from kvtier.store.mooncake_local import MooncakeCluster, mooncake_available

__all__ = ["MooncakeCluster", "needs_mooncake"]

needs_mooncake = pytest.mark.skipif(
    not mooncake_available(),
    reason="Mooncake is not installed (pip install mooncake-transfer-engine-non-cuda; "
           "libibverbs1)")
