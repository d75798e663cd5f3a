"""Disk admission on a real vLLM server: with second_use a prompt seen once
stays in DRAM only (no disk bytes), its second use writes it from DRAM, and
after a restart it is a disk hit that gives the same answer."""

import time

import pytest

from tests.conftest import needs_vllm
from tests.helpers import BLOCKS_PER_PROMPT, FULL_BLOCK_TOKENS, cached, prompts, records, \
    server, text, wait_records

pytestmark = [pytest.mark.e2e, needs_vllm]


def test_second_use_spares_the_disk_until_a_prefix_is_used_again(model_dir, tmp_path):
    store, ps = tmp_path / "store", prompts(2, seed=51)
    with server(model_dir, store, tmp_path / "a.log", disk_admission="second_use") as s:
        first = s.complete(ps[0])
        s.complete(ps[1])
        time.sleep(2)                          # what would be written is written by now
        assert records(store) == set()          # each used once: DRAM only
        again = s.complete(ps[0])              # the second use: written from DRAM
        assert cached(again) >= FULL_BLOCK_TOKENS
        wait_records(store, BLOCKS_PER_PROMPT)
        time.sleep(1)
        assert len(records(store)) == BLOCKS_PER_PROMPT   # ps[1] still not written
    with server(model_dir, store, tmp_path / "b.log", disk_admission="second_use") as s:
        after = s.complete(ps[0])
        assert cached(after) >= FULL_BLOCK_TOKENS      # from disk (DRAM is new)
        assert text(after) == text(first)
        assert cached(s.complete(ps[1])) == 0          # never written: recomputed
