"""Model-based test of the block lifecycle (kvtier.cache.ledger + scheduler + workers).

Hypothesis drives random sequences of what agentic traffic does to kvtier -
requests sharing prefixes, lookups and loads, stores, per-rank read / gather /
write failures, aborts (also mid-load), preemptions, a rank's answers arriving
a step late, TTL expiry, restarts - through ``tests.sim.MiniEngine`` (the real
scheduler and TP=2 real workers, vLLM's real request and output types). After
every step it checks:

- every page kvtier reloaded holds exactly its block's bytes on every rank
  (nothing wrong is served);
- no slot has two owners, free + owned + held slots add up, no budget is
  exceeded (the ledger's accounting, and the store's real bytes on disk);
- pins are exactly what in-flight work holds, and a block that is not ready
  is always held by the fill that will resolve it;
- a READY block's bytes are confirmed by every rank (its slot holds the key on
  each rank's worker), and once idle no pin is left.
"""

import shutil
import tempfile

import pytest

from tests.conftest import needs_vllm
from tests.sim import BS, MiniEngine

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

pytestmark = needs_vllm

PREFIXES = [list(range(p * 1000, p * 1000 + 6 * BS)) for p in range(3)]


class Lifecycle(RuleBasedStateMachine):
    admission = "write_through"

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvtier-model-")
        # a pin budget of 8 records (4 per tenant): pins are granted and refused
        record = 2 * 8192   # SlotGeometry(PAYLOAD, ...).record_bytes x TP ranks
        self.engine = MiniEngine(self.dir, tp=2, pages=40, slots=12, disk_records=24, ttl=600,
                                 max_pinned_bytes=8 * record,
                                 max_pinned_bytes_per_tenant=4 * record,
                                 disk_admission=self.admission,
                                 io_threads=int(__import__("os").environ.get("KVTIER_MODEL_IO", "1")))
        self.n = 0

    def teardown(self):
        try:
            self.engine.drain()
            for w in self.engine.workers:
                w.shutdown()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---------------------------------------------------------------- traffic
    @rule(prefix=st.integers(0, len(PREFIXES) - 1), blocks=st.integers(1, 6),
          tail=st.integers(0, 40), salt=st.sampled_from([None, "a"]),
          retention=st.sampled_from([None, {"ttl": 1200}, {"ttl": "1h", "pin": True},
                                     {"pin": True}, {"ttl": "bogus"}]))
    def request(self, prefix, blocks, tail, salt, retention):
        """An agent turn: part of a shared prefix, then its own tokens; some say how
        long they will be back (TTL), some pin it, some ask nonsense."""
        self.n += 1
        tokens = PREFIXES[prefix][:blocks * BS] + [7 + self.n] * tail
        self.engine.add(f"r{self.n}", tokens + [1], salt=salt, kvtier=retention)

    @rule(late=st.sets(st.integers(0, 1), max_size=1))
    def step(self, late):
        self.engine.hold_back = late
        self.engine.step()

    @precondition(lambda self: self.engine.active())
    @rule(data=st.data())
    def abort(self, data):
        self.engine.abort(data.draw(st.sampled_from(self.engine.active())))

    @precondition(lambda self: any(r.status == "running" for r in self.engine.reqs.values()))
    @rule(data=st.data())
    def preempt(self, data):
        running = [k for k, r in self.engine.reqs.items() if r.status == "running"]
        self.engine.preempt(data.draw(st.sampled_from(running)))

    # ----------------------------------------------------------------- faults
    @rule(rank=st.integers(0, 1), kind=st.sampled_from(["read", "gather", "write"]),
          how=st.sampled_from(["io", "checksum", "missing", "bug"]), n=st.integers(1, 3))
    def fault(self, rank, kind, how, n):
        self.engine.fail(rank, kind, how, n)

    @rule(seconds=st.sampled_from([1, 100, 700]))
    def time_passes(self, seconds):
        self.engine.now += seconds
        with self.engine.sched._lock:
            self.engine.sched.ledger.expire(self.engine.now)
            self.engine.sched._flush_removals()
        self.engine.sched.drain_sweeper()

    @rule()
    def restart(self):
        self.engine.restart()

    # ------------------------------------------------------------- invariants
    @invariant()
    def never_wrong_kv_and_ledger_consistent(self):
        e = self.engine
        assert not e.violations, e.violations
        e.sched.check_invariants()
        assert e.disk_bytes() <= e.cfg.disk_bytes, (e.disk_bytes(), e.cfg.disk_bytes)

    @invariant()
    def ready_means_every_rank_has_the_bytes(self):
        e = self.engine
        e.drain()
        for tier, block in e.sched.ledger.blocks():
            if tier == "dram" and block.state.value == "ready":
                for w in e.workers:
                    assert w._slot_key[block.slot] == block.key, (block, w.rank)

    @invariant()
    def pins_never_exceed_their_budget(self):
        L = self.engine.sched.ledger
        assert L.kept_bytes <= L.max_kept
        assert all(n <= L.max_kept_tenant for n in L.kept_by_tenant(self.engine.now).values())

    @invariant()
    def idle_means_no_pins(self):
        e = self.engine
        if not e.busy():
            e.drain()
            e.step()   # deliver what the workers finished
            if not e.busy() and not e._held:
                e.sched.check_invariants(idle=True)


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(max_examples=int(__import__("os").environ.get(
    "KVTIER_MODEL_EXAMPLES", "60")), stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class LifecycleSecondUse(Lifecycle):
    admission = "second_use"


class LifecycleWriteBack(Lifecycle):
    admission = "on_dram_evict"


# The two other disk admissions (records written from DRAM slots): fewer examples.
for _machine in (LifecycleSecondUse, LifecycleWriteBack):
    _case = _machine.TestCase
    _case.settings = settings(TestLifecycle.settings, max_examples=int(__import__("os").environ.get(
        "KVTIER_MODEL_EXAMPLES", "60")) // 2)
TestLifecycleSecondUse = LifecycleSecondUse.TestCase
TestLifecycleWriteBack = LifecycleWriteBack.TestCase
del _case, _machine
