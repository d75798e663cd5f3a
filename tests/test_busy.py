"""benchmarks/busy.py: the CPU a measured process tree, this process and the rest
of the machine used over a window."""

import subprocess
import sys
import time

import pytest

from benchmarks.busy import BusyMeter, machine_busy_s, tree_cpu_s

pytestmark = pytest.mark.skipif(machine_busy_s() is None, reason="needs Linux /proc/stat")


def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_busy_child_counts_as_measured_and_this_process_as_the_load_generator():
    # a child that burns ~0.6 s of CPU: inside the measured tree, not "others"
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nend = time.process_time() + 0.6\n"
                              "while time.process_time() < end: pass\ntime.sleep(30)"])
    try:
        m = BusyMeter([child.pid])
        m.start()
        spin(0.3)                                   # the load generator's own work
        deadline = time.monotonic() + 20
        while tree_cpu_s(child.pid) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.05)
        out = m.stop()
    finally:
        child.kill()
        child.wait()
    assert out["measured_cpu_s"] >= 0.5
    assert out["loadgen_cpu_s"] >= 0.3
    assert 0 <= out["others_cpu_share"] <= 1 and out["others_cpu_s"] >= 0
    assert out["wall_s"] > 0 and out["load_avg_start"] is not None


def test_a_gone_process_counts_nothing():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert tree_cpu_s(p.pid) == 0.0
