import os
import sys
from pathlib import Path

import pytest

from kvtier.serving import NO_TELEMETRY

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Every vLLM engine and server the tests start inherits this: no usage
# statistics sent anywhere (kvtier.serving.Server sets the same for its servers).
os.environ.update(NO_TELEMETRY)
# One node: vLLM's address is the loopback's (else found by a UDP connect() to 8.8.8.8).
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

# KVTIER_CI=1 (.ci/run): a skipped test fails the run unless it is marked `cuda`
# (no GPU on the CI machine). Skip reasons are printed with -rs.
STRICT_SKIPS = os.environ.get("KVTIER_CI") == "1"
_skipped: list = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append((report.nodeid, "cuda" in report.keywords, _reason(report)))


def pytest_collectreport(report):
    if report.skipped:   # a whole module skipped at import (importorskip)
        _skipped.append((report.nodeid, False, _reason(report)))


def _reason(report) -> str:
    lr = report.longrepr
    return lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)


def _unexpected():
    return [(n, r) for n, cuda, r in _skipped if not cuda]


def pytest_sessionfinish(session, exitstatus):
    if STRICT_SKIPS and _unexpected() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if not STRICT_SKIPS:
        return
    cuda = sum(1 for _, c, _ in _skipped if c)
    bad = _unexpected()
    tr = terminalreporter
    tr.write_sep("=", "kvtier CI: skips", bold=True)
    tr.write_line(f"{cuda} skipped test(s) marked cuda (expected: no CUDA GPU here)")
    if bad:
        tr.write_line(f"{len(bad)} other skipped test(s): the run FAILS (KVTIER_CI=1):",
                      red=True, bold=True)
        for nodeid, reason in bad:
            tr.write_line(f"  {nodeid}: {reason}", red=True)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
        return True
    except ImportError:
        return False


needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")


@pytest.fixture(autouse=True)
def _close_mini_engines():
    """A test's MiniEngines (tests/sim.py) stop with it: no copy threads or pools left
    running into later tests, nothing of the native engines alive at exit."""
    yield
    sim = sys.modules.get("tests.sim")
    if sim is not None:
        sim.close_engines()


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


@pytest.fixture
def mooncake(tmp_path):
    """A Mooncake Store on loopback: a master and a storage client (tests.cluster)."""
    from tests.cluster import MooncakeCluster
    cluster = MooncakeCluster(tmp_path).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def secret(tmp_path):
    """A store secret file (hex, 0400): ``secret_file`` of the engines of a test."""
    p = tmp_path / "secret"
    p.write_bytes(os.urandom(32).hex().encode())
    p.chmod(0o400)
    return str(p)
