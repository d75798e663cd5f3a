"""kvtier.cache.admission: the disk admission policies' answers."""

import pytest

from kvtier.cache.admission import POLICIES, DiskAdmission
from kvtier.config import ConfigError, KVTierConfig


def test_write_through_writes_every_new_block_and_nothing_else():
    a = DiskAdmission("write_through")
    assert a.at_store(b"k", 0) and a.at_store(b"k", 1)
    assert not a.at_hit(b"k", 2) and not a.at_dram_evict(expired=False)
    assert not a.writes_back


def test_second_use_writes_on_the_second_use_within_the_ttl():
    a = DiskAdmission("second_use", ttl=10, remember=2)
    assert not a.at_store(b"a", 0)          # first use: DRAM only
    assert a.at_store(b"a", 5)              # stored again (DRAM lost it): second use
    assert not a.at_store(b"b", 0)
    assert not a.at_store(b"b", 10)         # the first use expired: a first use again
    assert a.at_hit(b"c", 0)                # a hit of a block in DRAM: a second use
    for k in (b"x", b"y", b"z"):            # remembers 2: x forgotten
        a.at_store(k, 20)
    assert not a.at_store(b"x", 21)


def test_on_dram_evict_writes_what_dram_lets_go_within_its_ttl():
    a = DiskAdmission("on_dram_evict")
    assert a.writes_back
    assert not a.at_store(b"k", 0) and not a.at_hit(b"k", 1)
    assert a.at_dram_evict(expired=False) and not a.at_dram_evict(expired=True)


def test_the_policy_is_validated():
    with pytest.raises(ValueError, match="disk_admission must be one of"):
        DiskAdmission("sometimes")
    assert KVTierConfig.from_extra_config({"disk_admission": "second_use"}).disk_admission \
        == "second_use"
    with pytest.raises(ConfigError, match="disk_admission"):
        KVTierConfig.from_extra_config({"disk_admission": "write_back"})
    assert set(POLICIES) == {"write_through", "second_use", "on_dram_evict"}
