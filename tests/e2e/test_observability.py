"""Observability end to end: a real Prometheus scrapes a real vLLM + kvtier server.

One vLLM server for the module (each start costs 30-60 s on the CPU machine).
Traffic as in test_e2e_connector: six distinct 750-token prompts twice, with a
GPU KV cache of ~2 prompts and a DRAM tier of ~3, so the second round (newest
first) hits kvtier's DRAM and disk tiers. Once before Prometheus starts (the
labelled series then exist: a counter's first increment is invisible to
rate()), once more with new prompts while it scrapes. Prometheus (Debian's
package; deploy/setup-venv.sh installs it with KVTIER_TEST_PACKAGES=1, the
tests skip without it, and fail without it in CI) scrapes every second on a
loopback port, with deploy/'s PrometheusRule loaded as its rules file:

- PromQL over Prometheus' HTTP API returns kvtier's hit tokens by tier;
- every metric the Grafana dashboard and the alert rules use is in the server's
  /metrics; every dashboard query, and every query in the docs, evaluates, and
  the panels show numbers; every rule evaluates cleanly and none fires on a
  healthy server;
- promtool checks the rules and unit-tests each alert's expression on synthetic
  series (fires when it should, stays quiet when it should not).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from kvtier.serving import free_port, metric_value
from tests.conftest import needs_vllm
from tests.helpers import BLOCKS_PER_PROMPT, prompts, records, server, wait_records
from tests.test_deploy import (dashboard_exprs, prometheus_rules, promql_metrics,
                               referenced_metrics, rules_file_text)

pytestmark = [pytest.mark.e2e, needs_vllm]

HIT_TOKENS_BY_TIER = 'sum by (tier) (kvtier_hit_tokens_total{job="kvtier"})'
# Grafana's variables, as a dashboard showing everything would expand them.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "10m", "$__interval": "15s",
                "$namespace": ".*", "$pod": ".*", "$model_name": ".*"}


# ------------------------------------------------------------------- Prometheus
@pytest.fixture(scope="session")
def prometheus_bins() -> tuple[str, str]:
    """(prometheus, promtool). The tests install nothing: deploy/setup-venv.sh installs
    Debian's `prometheus` package with KVTIER_TEST_PACKAGES=1 (as .ci/run does). Absent:
    a skip with the reason, but a failure in CI (KVTIER_CI=1), which must run these."""
    p, t = shutil.which("prometheus"), shutil.which("promtool")
    if p and t:
        return p, t
    why = ("Prometheus is not installed (prometheus and promtool not on PATH): "
           "KVTIER_TEST_PACKAGES=1 bash deploy/setup-venv.sh installs it (root, apt-get), "
           "or apt-get install prometheus")
    if os.environ.get("KVTIER_CI") == "1":
        pytest.fail(why)
    pytest.skip(why)


def _get(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, promql: str) -> list[dict]:
        q = urllib.parse.urlencode({"query": promql})
        body = _get(f"{self.url}/api/v1/query?{q}")
        assert body["status"] == "success", body
        return body["data"]["result"]

    def api(self, path: str) -> dict:
        body = _get(f"{self.url}/api/v1/{path}")
        assert body["status"] == "success", body
        return body["data"]

    def wait(self, what: str, check, timeout: float = 90):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                last = check()
                if last:
                    return last
            except (urllib.error.URLError, OSError, KeyError, AssertionError) as e:
                last = e
            time.sleep(0.5)
        raise AssertionError(f"Prometheus: {what} not seen in {timeout:.0f} s (last: {last!r})")


# ----------------------------------------------------------------------- server
def drive(s, store: Path, ps: list[list[int]]) -> None:
    """Two rounds of ``ps``: the second, newest first, comes back from kvtier (the GPU
    holds ~2 prompts, DRAM ~3, the disk all 6)."""
    before = len(records(store))
    for p in ps:
        s.complete(p)
    wait_records(store, before + len(ps) * BLOCKS_PER_PROMPT)
    for p in reversed(ps):
        s.complete(p)


def hits_by_tier(metrics_text: str) -> dict[str, float]:
    return {t: metric_value(metrics_text, "kvtier_hit_tokens_total", tier=t)
            for t in ("dram", "disk")}


@pytest.fixture(scope="module")
def kvtier_server(model_dir, tmp_path_factory):
    """A vLLM + kvtier server that already hit both tiers once (so the labelled
    series exist before Prometheus' first scrape: a counter's first increment
    is invisible to rate())."""
    tmp = tmp_path_factory.mktemp("obs")
    with server(model_dir, tmp / "store", tmp / "server.log") as s:
        s.store = tmp / "store"
        drive(s, s.store, prompts(seed=1))
        assert all(hits_by_tier(s.metrics()).values()), s.log_tail()
        yield s


@pytest.fixture(scope="module")
def prometheus(prometheus_bins, kvtier_server, tmp_path_factory):
    """A Prometheus on a free loopback port scraping the server every second, with
    deploy/k8s/prometheusrule.yaml's groups as its rules; stopped at the end."""
    binary, _ = prometheus_bins
    tmp = tmp_path_factory.mktemp("prometheus")
    (tmp / "kvtier.rules.yml").write_text(rules_file_text())
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                   "scrape_timeout": "1s"},
        "rule_files": [str(tmp / "kvtier.rules.yml")],
        "scrape_configs": [{
            "job_name": "kvtier", "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"127.0.0.1:{kvtier_server.port}"]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        def ready():
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            with urllib.request.urlopen(prom.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        prom.wait("/-/ready", ready, timeout=60)
        # A few scrapes in: rate() over the dashboard's windows needs >= 2 samples.
        prom.wait("3 scrapes of kvtier_lookups_total", lambda: any(
            float(r["value"][1]) >= 3 for r in prom.query(
                'count_over_time(kvtier_lookups_total{job="kvtier"}[1m])')))
        yield prom
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
        log.close()


@pytest.fixture(scope="module")
def scraped(kvtier_server, prometheus):
    """More traffic while Prometheus scrapes (new prompts, hits from both tiers);
    returns the server's final hit tokens by tier once Prometheus has them."""
    before = hits_by_tier(kvtier_server.metrics())
    drive(kvtier_server, kvtier_server.store, prompts(seed=2))
    after = hits_by_tier(kvtier_server.metrics())
    assert all(after[t] > before[t] for t in after), (before, after)

    def caught_up():
        got = {r["metric"]["tier"]: float(r["value"][1])
               for r in prometheus.query(HIT_TOKENS_BY_TIER)}
        return got == after
    prometheus.wait("the final values scraped", caught_up)
    return after


def exposed_names(text: str) -> tuple[set[str], set[str]]:
    """(every series name /metrics exports, the names with at least one sample).

    A metric family with no sample yet (a counter before its first increment)
    is exported by its # TYPE line; histograms export _bucket/_sum/_count."""
    declared, sampled = set(), set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            declared.add(name)
            if kind.strip() == "histogram":
                declared |= {name + "_bucket", name + "_sum", name + "_count"}
            elif kind.strip() == "summary":
                declared |= {name + "_sum", name + "_count"}
        elif line and not line.startswith("#"):
            sampled.add(re.match(r"[^{\s]+", line).group(0))
    return declared | sampled, sampled


def expand(expr: str) -> str:
    for var in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(var, GRAFANA_VARS[var])
    assert "$" not in expr, f"unexpanded Grafana variable in {expr}"
    return expr


# ------------------------------------------------------------------------ tests
def test_promql_hit_tokens_by_tier(prometheus, scraped, kvtier_server):
    targets = prometheus.api("targets")["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets

    result = prometheus.query(HIT_TOKENS_BY_TIER)
    by_tier = {r["metric"]["tier"]: float(r["value"][1]) for r in result}
    print(f"\nPromQL: {HIT_TOKENS_BY_TIER}\nresult: {json.dumps(result)}")
    assert by_tier["dram"] > 0 and by_tier["disk"] > 0
    assert by_tier == scraped   # what the server exports (no traffic since)
    # Prometheus saw hits from both tiers happen while it scraped.
    recent = {r["metric"]["tier"]: float(r["value"][1]) for r in prometheus.query(
        'sum by (tier) (increase(kvtier_hit_tokens_total{job="kvtier"}[10m]))')}
    print(f"increase over 10m: {recent}")
    assert recent.get("dram", 0) > 0 and recent.get("disk", 0) > 0, recent
    # vLLM's own hit-by-source counter, filled by kvtier: host = DRAM, disk = disk.
    by_source = {r["metric"]["source"]: float(r["value"][1]) for r in prometheus.query(
        'sum by (source) (vllm:prompt_tokens_cached_by_source_total{source=~"host|disk"})')}
    print(f"vllm:prompt_tokens_cached_by_source_total: {by_source}")
    assert by_source == {"host": by_tier["dram"], "disk": by_tier["disk"]}


def test_dashboard_and_alert_metrics_are_exported(kvtier_server):
    declared, _ = exposed_names(kvtier_server.metrics())
    used = referenced_metrics()
    assert {"kvtier_hit_tokens_total", "kvtier_io_errors_total",
            "vllm:prompt_tokens_cached_by_source_total"} <= used.keys()
    missing = {name: sorted(where) for name, where in used.items() if name not in declared}
    assert not missing, f"used by the dashboard/alerts but not in /metrics: {missing}"


def test_dashboard_queries_show_the_traffic(prometheus, scraped, kvtier_server):
    """Every panel query evaluates; one over metrics that have samples shows a number
    (a label typo in a ratio, say, would return nothing or only NaN)."""
    _, sampled = exposed_names(kvtier_server.metrics())
    blank, shown = [], {}
    for title, expr in dashboard_exprs():
        result = prometheus.query(expand(expr))   # asserts status == success
        values = [float(r["value"][1]) for r in result]
        shown.setdefault(title, []).extend(values)
        if promql_metrics(expr) <= sampled and not any(math.isfinite(v) for v in values):
            blank.append((title, expr, values))
    assert not blank, f"dashboard queries with data but no number: {blank}"
    hit_rate = [v for v in shown["kvtier hit rate"] if math.isfinite(v)]
    assert hit_rate and 0 < hit_rate[0] <= 1, shown["kvtier hit rate"]


def doc_queries(path: Path) -> list[str]:
    """The PromQL queries of a doc's ```promql blocks (one per comment or blank line)."""
    out = []
    for block in re.findall(r"```promql\n(.*?)```", path.read_text(), re.S):
        cur: list[str] = []
        for line in block.splitlines() + [""]:
            if line.startswith("#") or not line.strip():
                if cur:
                    out.append("\n".join(cur))
                cur = []
            else:
                cur.append(line)
    return out


def test_documented_queries_evaluate(prometheus, scraped, kvtier_server):
    declared, _ = exposed_names(kvtier_server.metrics())
    docs = Path(__file__).resolve().parents[2] / "docs"
    queries = [(d, q) for d in ("metrics.md", "operators.md") for q in doc_queries(docs / d)]
    assert len(queries) >= 10
    for doc, q in queries:
        assert promql_metrics(q) <= declared, (doc, q)
        prometheus.query(q)   # parses and evaluates


def test_alert_rules_load_evaluate_and_stay_quiet(prometheus, scraped):
    want = {r["alert"] for r in prometheus_rules() if "alert" in r}

    def evaluated():
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        done = [r for r in rules if not r["lastEvaluation"].startswith("0001")]
        return rules if len(done) == len(rules) == len(want) else None

    rules = prometheus.wait("every rule evaluated", evaluated, timeout=60)
    assert {r["name"] for r in rules} == want
    for r in rules:
        assert r["health"] == "ok" and not r.get("lastError"), r
    # A healthy server (no errors, disk far from full) triggers nothing.
    assert prometheus.api("alerts")["alerts"] == []


# ------------------------------------------------------ promtool: alert logic
def _alert_expr(name: str) -> str:
    (rule,) = [r for r in prometheus_rules() if r.get("alert") == name]
    return rule["expr"].strip()


def _series(**labels) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _count_by_pod(alert: str, t: str, pods: list[str]) -> dict:
    return {"expr": f"count by (pod) ({_alert_expr(alert)})", "eval_time": t,
            "exp_samples": [{"labels": _series(pod=p), "value": 1} for p in pods]}


def alert_unit_tests() -> list[dict]:
    """promtool unit tests: each alert expression on synthetic series (1-minute steps)."""
    ns = "kvtier"
    lookups = "0+60000x400"   # 1000 looked-up tokens/s

    def s(name, values, **labels):
        return {"series": name + _series(namespace=ns, **labels), "values": values}

    return [
        {   # Store errors: a series born with its first error (no zero sample before
            # it) counts; so does an increase of an old one; an old flat one does not.
            "interval": "1m",
            "input_series": [
                s("kvtier_io_errors_total", "_x15 1x25", pod="new"),
                s("kvtier_io_errors_total", "0x19 0 2 2x20", pod="old"),
                s("kvtier_io_errors_total", "3x40", pod="flat"),
                s("kvtier_checksum_failures_total", "_x15 1x25", pod="new"),
                s("kvtier_checksum_failures_total", "0x19 0 4 4x20", pod="old"),
                s("kvtier_checksum_failures_total", "3x40", pod="flat"),
            ],
            "promql_expr_test": [
                _count_by_pod("KVTierStoreIOErrors", "18m", ["new"]),
                _count_by_pod("KVTierStoreIOErrors", "25m", ["old"]),
                _count_by_pod("KVTierStoreIOErrors", "39m", []),
                _count_by_pod("KVTierChecksumFailures", "18m", ["new"]),
                _count_by_pod("KVTierChecksumFailures", "25m", ["old"]),
                _count_by_pod("KVTierChecksumFailures", "39m", []),
            ],
        },
        {   # Disk budget: 95% full fires, 50% does not; DRAM full is normal.
            "interval": "1m",
            "input_series": [
                s("kvtier_occupancy_bytes", "95x10", pod="full", tier="disk"),
                s("kvtier_capacity_bytes", "100x10", pod="full", tier="disk"),
                s("kvtier_occupancy_bytes", "50x10", pod="half", tier="disk"),
                s("kvtier_capacity_bytes", "100x10", pod="half", tier="disk"),
                s("kvtier_occupancy_bytes", "100x10", pod="half", tier="dram"),
                s("kvtier_capacity_bytes", "100x10", pod="half", tier="dram"),
            ],
            "promql_expr_test": [_count_by_pod("KVTierDiskBudgetNearFull", "5m", ["full"])],
        },
        {   # Hit rate 60% for 6 h, then: "drop" falls to 10%, "gone" loses its hit
            # series entirely (a restart with a cold cache), "steady" stays at 60%,
            # "idle" drops but looks up too little to matter.
            "interval": "1m",
            "input_series": [
                s("kvtier_lookup_tokens_total", lookups, pod="drop"),
                s("kvtier_hit_tokens_total", "0+36000x360 12966000+6000x39", pod="drop"),
                s("kvtier_lookup_tokens_total", lookups, pod="gone"),
                s("kvtier_hit_tokens_total", "0+36000x360 _x39", pod="gone"),
                s("kvtier_lookup_tokens_total", lookups, pod="steady"),
                s("kvtier_hit_tokens_total", "0+36000x400", pod="steady"),
                s("kvtier_lookup_tokens_total", "0+600x400", pod="idle"),
                s("kvtier_hit_tokens_total", "0+360x360 129600+60x39", pod="idle"),
            ],
            "promql_expr_test": [
                _count_by_pod("KVTierHitRateDrop", "300m", []),
                _count_by_pod("KVTierHitRateDrop", "395m", ["drop", "gone"]),
            ],
        },
        {   # Disk loads: p99 of ~2 s fires, ~0.3 s does not.
            "interval": "1m",
            "input_series": [
                *(s("kvtier_load_seconds_bucket", v, pod="slow", tier="disk", le=le)
                  for le, v in (("0.5", "0x20"), ("1.0", "0x20"), ("2.5", "0+10x20"),
                                ("+Inf", "0+10x20"))),
                *(s("kvtier_load_seconds_bucket", v, pod="fast", tier="disk", le=le)
                  for le, v in (("0.5", "0+10x20"), ("1.0", "0+10x20"), ("2.5", "0+10x20"),
                                ("+Inf", "0+10x20"))),
            ],
            "promql_expr_test": [_count_by_pod("KVTierDiskLoadsSlow", "15m", ["slow"])],
        },
    ]


def test_alert_rules_promtool(prometheus_bins, tmp_path):
    _, promtool = prometheus_bins
    rules = tmp_path / "kvtier.rules.yml"
    rules.write_text(rules_file_text())
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    # Every alert has a unit test.
    tested = {re.search(r"count by \(pod\) \((.*)\)$", t["expr"], re.S).group(1)
              for case in alert_unit_tests() for t in case["promql_expr_test"]}
    assert {r["expr"].strip() for r in prometheus_rules() if "alert" in r} <= tested
    unit = tmp_path / "kvtier.rules.test.yml"
    unit.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m",
                                    "tests": alert_unit_tests()}, sort_keys=False))
    run = subprocess.run([promtool, "test", "rules", unit.name], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
