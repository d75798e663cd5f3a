import pytest

from kvtier.config import ConfigError, KVTierConfig, parse_size


@pytest.mark.parametrize("text,value", [
    ("64GiB", 64 << 30), ("512MB", 512 * 10**6), ("2TiB", 2 << 40), ("1.5GiB", 3 << 29),
    (4096, 4096), ("4096", 4096), ("10 mib", 10 << 20)])
def test_sizes(text, value):
    assert parse_size("dram_bytes", text) == value


def test_full_config_and_defaults(tmp_path):
    cfg = KVTierConfig.from_extra_config({"dram_bytes": "1GiB", "disk_path": str(tmp_path),
                                          "disk_bytes": "2GiB", "ttl_seconds": 60})
    assert (cfg.dram_bytes, cfg.disk_bytes, cfg.ttl_seconds) == (1 << 30, 2 << 30, 60.0)
    d = KVTierConfig.from_extra_config(None)
    assert d.dram_bytes > 0 and d.disk_bytes > 0 and d.ttl_seconds == 3600
    assert d.disk_path.endswith("kvtier")
    assert KVTierConfig.from_extra_config({"ttl_seconds": "inf"}).ttl_seconds == float("inf")


@pytest.mark.parametrize("extra,words", [
    ({"dram_byte": "1GiB"}, ["dram_byte", "accepted keys", "dram_bytes"]),
    ({"dram_bytes": "lots"}, ["dram_bytes", "'lots'", "64GiB"]),
    ({"dram_bytes": -5}, ["dram_bytes", ">= 0"]),
    ({"disk_bytes": True}, ["disk_bytes"]),
    ({"ttl_seconds": 0}, ["ttl_seconds", "> 0"]),
    ({"ttl_seconds": "soon"}, ["ttl_seconds"]),
    ({"disk": "maybe"}, ["disk", "true or false"]),
    ({"io_threads": 0}, ["io_threads", ">= 1"]),
    ({"o_direct": "yes"}, ["o_direct", "auto"]),
    ({"disk_path": ""}, ["disk_path"]),
])
def test_bad_values_name_the_key(extra, words):
    with pytest.raises(ConfigError) as e:
        KVTierConfig.from_extra_config(extra)
    for w in words:
        assert w in str(e.value)
