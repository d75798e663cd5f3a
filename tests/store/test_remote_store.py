"""kvtier.store.remote against a real Mooncake master on loopback: a master that
is not there when the engine starts neither stops the process (Mooncake's
``setup`` would hold the GIL for ~90 s retrying) nor delays lookups; the tier
connects once the master is up."""

import threading
import time

from kvtier.config import RemoteConfig
from kvtier.store.mooncake_local import MooncakeCluster
from tests.cluster import needs_mooncake

pytestmark = needs_mooncake


def test_a_master_that_is_not_up_yet_stalls_nothing(tmp_path):
    cluster = MooncakeCluster(tmp_path)   # its port chosen, nothing listening yet
    cfg = RemoteConfig.parse({"master": cluster.master_addr, "local_hostname": "127.0.0.1",
                              "retry_seconds": 0.5})
    from kvtier.store.remote import RemoteStore
    ticks = []
    stop = threading.Event()

    def ticker():   # would stop for ~90 s if the GIL were held
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.01)
    t = threading.Thread(target=ticker)
    t.start()
    try:
        t0 = time.monotonic()
        store = RemoteStore(cfg)
        assert time.monotonic() - t0 < 0.5
        assert store.exists(["kvtier/x"]) == [False]
        time.sleep(2.0)
        assert not store.connected
        stop.set()   # (the launcher's own client below may hold the GIL a moment)
        t.join()
        cluster.start()
        deadline = time.monotonic() + 30
        while not store.connected:
            assert time.monotonic() < deadline, "never connected"
            time.sleep(0.05)
        assert store.exists(["kvtier/x"]) == [False]
    finally:
        stop.set()
        t.join()
        cluster.stop()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert max(gaps) < 1.0, f"the process stood still for {max(gaps):.1f} s"


def test_a_lookup_that_times_out_backs_the_tier_off(tmp_path):
    from kvtier.store.remote import RemoteStore
    cluster = MooncakeCluster(tmp_path).start()
    try:
        cfg = RemoteConfig.parse({"master": cluster.master_addr, "local_hostname": "127.0.0.1",
                                  "lookup_timeout_ms": 0.001, "retry_seconds": 30})
        store = RemoteStore(cfg)
        deadline = time.monotonic() + 30
        while not store.connected:
            assert time.monotonic() < deadline, "never connected"
            time.sleep(0.05)
        names = [f"kvtier/k{i}" for i in range(64)]
        assert store.exists(names) is None       # no answer within 1 us: an error
        time.sleep(0.5)                          # the call itself has ended by now
        t0 = time.monotonic()
        assert store.exists(names) == [False] * 64   # skipped: no call, no wait
        assert time.monotonic() - t0 < 0.01
    finally:
        cluster.stop()
