"""deploy/: Kubernetes manifests, the Grafana dashboard, the alert rules, the image.

Fast, no server: the core kinds are validated against the Kubernetes OpenAPI
schemas bundled with ``kubernetes-validate`` (offline, strict: unknown fields
fail); the Prometheus Operator kinds (ServiceMonitor, PrometheusRule), which
have no bundled schema, structurally. The live checks (a real Prometheus
scraping a real server, every dashboard/alert metric exported, the rules
evaluated) are in tests/e2e/test_observability.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kvtier.config import KVTierConfig
from kvtier.vllm.metrics import METRICS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "kvtier-dashboard.json"
RULES = K8S / "prometheusrule.yaml"
# The Kubernetes version the manifests are validated against (bundled schemas).
K8S_VERSION = "1.31.0"
CORE_KINDS = {"Namespace", "StorageClass", "PersistentVolume", "StatefulSet", "Deployment",
              "Service", "ConfigMap"}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


# ------------------------------------------------------------------ PromQL names
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                 "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _AGGREGATIONS | _GROUPING | {"offset", "bool", "and", "or", "unless", "atan2",
                                         "inf", "nan", "start", "end"}
_TOKEN = re.compile(r"\d[\w.]*(?:[eE][+-]?\d+)?|[A-Za-z_:][A-Za-z0-9_:]*|\S")
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*$")


def promql_metrics(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (Grafana variables allowed)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    s = re.sub(r"#[^\n]*", " ", s)                 # comments
    s = re.sub(r"\{[^}]*\}", " ", s)               # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)              # ranges, subqueries
    toks = _TOKEN.findall(s)
    names: set[str] = set()
    i = 0
    while i < len(toks):
        t, nxt = toks[i], toks[i + 1] if i + 1 < len(toks) else ""
        if _NAME.match(t):
            if t in _GROUPING and nxt == "(":       # by (label, ...): labels, not metrics
                i = toks.index(")", i + 1) + 1
                continue
            if nxt != "(" and t not in _KEYWORDS and not t.startswith("$"):
                names.add(t)
        i += 1
    return names


def grafana_query_metrics(query: str) -> set[str]:
    """Metric names of a Grafana templating query (label_values(...)) or PromQL."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.S)
    if m:
        return promql_metrics(m.group(1))
    if re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", query):
        return set()
    return promql_metrics(query)


def quantity(q) -> int:
    """A Kubernetes resource quantity ("128Gi", "1800Gi", "500M", "8") in bytes/units."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTPE]i?|[kmgtpe])?", str(q))
    assert m, f"not a quantity: {q!r}"
    unit = m.group(2) or ""
    mult = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}[unit]
    return int(float(m.group(1)) * mult)


# ---------------------------------------------------------------- loading files
def load_manifests() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(dash: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target."""
    dash = dash or dashboard()
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", ()):
            out.append((p["title"], t["expr"]))
    return out


def dashboard_variable_queries(dash: dict | None = None) -> list[str]:
    dash = dash or dashboard()
    out = []
    for v in dash.get("templating", {}).get("list", ()):
        if v.get("type") == "query":
            q = v["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def prometheus_rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def rules_file_text() -> str:
    """The PrometheusRule's groups as a plain Prometheus rules file."""
    doc = yaml.safe_load(RULES.read_text())
    return yaml.safe_dump({"groups": doc["spec"]["groups"]}, sort_keys=False)


def referenced_metrics() -> dict[str, set[str]]:
    """metric name -> where it is used (dashboard panels, variables, alerts)."""
    used: dict[str, set[str]] = {}
    for title, expr in dashboard_exprs():
        for n in promql_metrics(expr):
            used.setdefault(n, set()).add(f"panel {title!r}")
    for q in dashboard_variable_queries():
        for n in grafana_query_metrics(q):
            used.setdefault(n, set()).add(f"variable {q!r}")
    for r in prometheus_rules():
        for n in promql_metrics(r["expr"]):
            used.setdefault(n, set()).add(f"rule {r.get('alert') or r.get('record')}")
    return used


def kvtier_series_names() -> set[str]:
    """Every series name kvtier's METRICS produce (histograms: _bucket/_sum/_count)."""
    out = set()
    for name, (kind, _, _) in METRICS.items():
        out.add(name)
        if kind == "histogram":
            out |= {name + "_bucket", name + "_sum", name + "_count"}
    return out


def workloads(manifests=None) -> list[dict]:
    """The Deployments and StatefulSets (their pod templates carry the labels)."""
    manifests = manifests or load_manifests()
    return [d for _, d in manifests if d["kind"] in ("Deployment", "StatefulSet")]


def workload(name: str, manifests=None) -> tuple[dict, dict]:
    """The workload ``name`` and its (only) container."""
    (w,) = [d for d in workloads(manifests) if d["metadata"]["name"] == name]
    (c,) = w["spec"]["template"]["spec"]["containers"]
    return w, c


def vllm_container(manifests=None) -> tuple[dict, dict]:
    manifests = manifests or load_manifests()
    (sts,) = [d for d in workloads(manifests) if d["kind"] == "StatefulSet"
              and any(c["name"] == "vllm" for c in d["spec"]["template"]["spec"]["containers"])]
    (c,) = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm"]
    return sts, c


def transfer_config(container: dict) -> dict:
    args = container["args"]
    return json.loads(args[args.index("--kv-transfer-config") + 1])


# ------------------------------------------------------------------------ tests
def test_promql_metrics_parser():
    assert promql_metrics('sum by (tier) (rate(kvtier_hit_tokens_total{tier="dram"}[5m]))') \
        == {"kvtier_hit_tokens_total"}
    assert promql_metrics(
        'histogram_quantile(0.99, sum by (le, tier) (rate(kvtier_load_seconds_bucket'
        '{model_name=~"$model_name"}[$__rate_interval]))) > 1e-3') \
        == {"kvtier_load_seconds_bucket"}
    assert promql_metrics("a / on (pod) group_left (x) b offset 5m and bool c or vector(0)") \
        == {"a", "b", "c"}
    assert promql_metrics('sum(rate(vllm:prompt_tokens_total[1m])) - sum(x) without (le)') \
        == {"vllm:prompt_tokens_total", "x"}
    assert promql_metrics("(x unless x offset 10m) or increase(y[10m]) # kvtier_z") \
        == {"x", "y"}
    assert grafana_query_metrics('label_values(kvtier_lookups_total{ns=~"$ns"}, pod)') \
        == {"kvtier_lookups_total"}


def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:   # a failure, not a skip: CI must validate the manifests
        pytest.fail("kubernetes-validate is not installed (the `test` extra has it): "
                    "pip install -e '.[test]'")
    return kubernetes_validate


def test_kubernetes_validate_bundles_the_version():
    kubernetes_validate()
    from kubernetes_validate.utils import all_versions
    assert K8S_VERSION in all_versions()


def test_manifests_validate_against_kubernetes_schemas(monkeypatch):
    kv = kubernetes_validate()
    import socket

    def offline(*a, **k):
        raise AssertionError("kubernetes-validate tried the network")
    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    manifests = load_manifests() + [(DEPLOY / "kustomization.yaml", d)
                                    for d in generated_configmaps()]
    kinds = {d["kind"] for _, d in manifests}
    assert CORE_KINDS <= kinds, CORE_KINDS - kinds
    assert CRD_KINDS <= kinds, CRD_KINDS - kinds
    assert kinds <= CORE_KINDS | CRD_KINDS, f"unvalidated kinds: {kinds - CORE_KINDS - CRD_KINDS}"
    for path, doc in manifests:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: "
                        f"{'.'.join(map(str, e.path))}: {e.message}")


def generated_configmaps() -> list[dict]:
    """The ConfigMaps kustomize's configMapGenerator makes (files -> data)."""
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    out = []
    for gen in kust.get("configMapGenerator", ()):
        data = {Path(f).name: (DEPLOY / f).read_text() for f in gen.get("files", ())}
        labels = (gen.get("options") or {}).get("labels", {})
        out.append({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": gen["name"], "namespace": kust.get("namespace"),
                                 "labels": labels}, "data": data})
    return out


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    resources = kust["resources"]
    for r in resources:
        assert (DEPLOY / r).is_file(), r
    assert sorted(resources) == sorted(str(p.relative_to(DEPLOY)) for p in K8S.glob("*.yaml")), \
        "every file in deploy/k8s must be in kustomization.yaml's resources"
    files = [f for g in kust["configMapGenerator"] for f in g["files"]]
    assert "grafana/kvtier-dashboard.json" in files
    for f in files:
        assert (DEPLOY / f).is_file(), f
    # kubectl rejects a ConfigMap over 1 MiB (and Grafana's sidecar reads it whole).
    assert len(DASHBOARD.read_bytes()) < 1 << 20


def test_statefulset_runs_vllm_with_kvtier():
    manifests = load_manifests()
    sts, c = vllm_container(manifests)
    pod = sts["spec"]["template"]["spec"]
    assert c["command"][:2] == ["vllm", "serve"]
    cfg = transfer_config(c)
    assert cfg["kv_connector"] == "KVTierConnector"
    assert cfg["kv_connector_module_path"] == "kvtier.connector"
    assert cfg["kv_role"] == "kv_both"
    assert cfg.get("kv_load_failure_policy") == "recompute"
    extra = cfg["kv_connector_extra_config"]
    kcfg = KVTierConfig.from_extra_config(extra)   # kvtier's own validation, as at start-up
    assert kcfg.disk_enabled and kcfg.ttl_seconds == 3600

    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {t["metadata"]["name"]: t for t in sts["spec"].get("volumeClaimTemplates", ())}
    # disk_path lives on the NVMe volume (a local PV claim, or a hostPath).
    nvme = [(p, n) for p, n in mounts.items()
            if Path(kcfg.disk_path).is_relative_to(p) and p != "/"]
    assert nvme, f"disk_path {kcfg.disk_path} is on no mounted volume"
    path, name = max(nvme, key=lambda pn: len(pn[0]))
    if name in claims:
        claim = claims[name]["spec"]
        size = quantity(claim["resources"]["requests"]["storage"])
        assert kcfg.disk_bytes <= 0.95 * size, "disk_bytes must stay under the volume size"
        sc = claim["storageClassName"]
        (storage_class,) = [d for _, d in manifests if d["kind"] == "StorageClass"
                            and d["metadata"]["name"] == sc]
        assert storage_class["volumeBindingMode"] == "WaitForFirstConsumer"
        pvs = [d for _, d in manifests if d["kind"] == "PersistentVolume"]
        assert pvs and all(pv["spec"]["storageClassName"] == sc and "local" in pv["spec"]
                           and "nodeAffinity" in pv["spec"] for pv in pvs)
    else:
        assert "hostPath" in volumes[name], f"volume {name} is neither a claim nor a hostPath"

    # /dev/shm: memory-backed and sized.
    shm = volumes[mounts["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"].get("sizeLimit")
    # Pinned memory: IPC_LOCK, and a memory limit that holds the DRAM tier (all TP
    # ranks), /dev/shm and vLLM itself.
    assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
    tp = 1
    for a in c["args"]:
        if a.startswith("--tensor-parallel-size="):
            tp = int(a.split("=", 1)[1])
    limit = quantity(c["resources"]["limits"]["memory"])
    shm_bytes = quantity(shm["emptyDir"]["sizeLimit"])
    assert limit >= kcfg.dram_bytes * tp + shm_bytes + (16 << 30), (limit, kcfg.dram_bytes)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(tp)

    # Probes on vLLM's /health, on the container's port.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    served = int(next(a.split("=")[1] for a in c["args"] if a.startswith("--port=")))
    assert ports["http"] == served
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", served), probe


def test_services_and_servicemonitor_select_the_pods():
    manifests = load_manifests()
    services = [d for _, d in manifests if d["kind"] == "Service"]
    names = {s["metadata"]["name"] for s in services}
    for w in workloads(manifests):
        pod_labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        if w["kind"] == "StatefulSet":
            assert w["spec"]["serviceName"] in names, w["metadata"]["name"]
    sts, _ = vllm_container(manifests)
    assert any(s["metadata"]["name"] == sts["spec"]["serviceName"] for s in services)
    for s in services:
        # Each Service selects the pods of exactly one workload, on their ports.
        selected = [w for w in workloads(manifests) if s["spec"]["selector"].items()
                    <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, s["metadata"]["name"]
        ports = [p for c in selected[0]["spec"]["template"]["spec"]["containers"]
                 for p in c["ports"]]
        for p in s["spec"]["ports"]:
            assert p["targetPort"] in {cp["name"] for cp in ports} | {
                cp["containerPort"] for cp in ports}, (s["metadata"]["name"], p)

    (sm,) = [d for _, d in manifests if d["kind"] == "ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["name"]
    sel = sm["spec"]["selector"]["matchLabels"]
    scraped = [s for s in services if sel.items() <= s["metadata"]["labels"].items()]
    assert len(scraped) == 1, "the ServiceMonitor must select exactly one Service " \
        "(else each pod is scraped twice)"
    endpoints = sm["spec"]["endpoints"]
    assert endpoints
    port_names = {p["name"] for p in scraped[0]["spec"]["ports"]}
    for ep in endpoints:
        assert ep["port"] in port_names
        assert ep.get("path", "/metrics") == "/metrics"
        assert re.fullmatch(r"\d+[smh]", ep["interval"])


def test_mooncake_cluster_tier():
    """deploy/k8s/mooncake.yaml: the storage clients find the master's Service, lend
    the memory they are given, and the vLLM StatefulSet's (commented) remote example
    names the same master."""
    manifests = load_manifests()
    services = {d["metadata"]["name"]: d for _, d in manifests if d["kind"] == "Service"}
    master, mc = workload("kvtier-mooncake-master", manifests)
    storage, sc = workload("kvtier-mooncake-storage", manifests)
    assert master["kind"] == "Deployment" and master["spec"]["replicas"] == 1
    assert master["spec"]["strategy"]["type"] == "Recreate"   # never two masters
    assert mc["command"] == ["mooncake_master"] and sc["command"] == ["mooncake_client"]
    flags = lambda c: dict(a.lstrip("-").split("=", 1) for a in c["args"])  # noqa: E731
    mflags, sflags = flags(mc), flags(sc)
    (master_svc,) = [s for s in services.values() if s["spec"]["selector"].items()
                     <= master["spec"]["template"]["metadata"]["labels"].items()]
    rpc = {p["name"]: p["port"] for p in master_svc["spec"]["ports"]}["rpc"]
    assert int(mflags["rpc_port"]) == {p["name"]: p["containerPort"] for p in mc["ports"]}["rpc"]
    master_addr = f"{master_svc['metadata']['name']}:{rpc}"
    assert sflags["master_server_address"] == master_addr
    assert sflags["metadata_server"] == "P2PHANDSHAKE" and sflags["protocol"] == "tcp"
    # Its own address: the pod IP, from the downward API.
    assert sflags["host"] == "$(POD_IP)"
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} \
        in sc["env"]
    assert int(sflags["port"]) in {p["containerPort"] for p in sc["ports"]}
    assert services[storage["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    # Memory: the segment ("64GB" is 64 GiB to Mooncake) plus room for the process,
    # requested as much as allowed (a pod evicted under pressure loses its cache).
    m = re.fullmatch(r"(\d+)([MG])B", sflags["global_segment_size"])
    assert m, "Mooncake reads MB/GB (binary); it does not accept GiB"
    segment = int(m.group(1)) << (20 if m.group(2) == "M" else 30)
    res = sc["resources"]
    assert res["requests"]["memory"] == res["limits"]["memory"]
    assert segment + (1 << 30) <= quantity(res["limits"]["memory"]) <= segment * 1.25 + (8 << 30)
    for c in (mc, sc):
        assert c["readinessProbe"] and c["livenessProbe"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # The engines' example (statefulset.yaml, commented out: remote is off by default).
    sts, c = vllm_container(manifests)
    assert "remote" not in transfer_config(c)["kv_connector_extra_config"]
    text = (K8S / "statefulset.yaml").read_text()
    m = re.search(r'^\s*#\s+("secret_file".*?\})\s*$\n\s*- --kv-transfer-config', text, re.M | re.S)
    assert m, "statefulset.yaml: the commented remote example is gone"
    example = json.loads("{" + re.sub(r"\n\s*#", "", m.group(1)) + "}")
    from kvtier.config import RemoteConfig
    assert RemoteConfig.parse(example["remote"]).master == master_addr
    assert Path(example["secret_file"]).parent.as_posix() in text   # its mount, commented


def test_prometheusrule_structure():
    doc = yaml.safe_load(RULES.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"]
    groups = doc["spec"]["groups"]
    assert groups and len({g["name"] for g in groups}) == len(groups)
    alerts = {}
    for g in groups:
        assert g["name"] and g["rules"], g
        for r in g["rules"]:
            assert ("alert" in r) != ("record" in r), r
            assert isinstance(r["expr"], str) and r["expr"].strip(), r
            assert promql_metrics(r["expr"]), r
            if "alert" in r:
                assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", r["alert"])
                assert r["labels"]["severity"] in ("critical", "warning", "info")
                assert r["annotations"]["summary"] and r["annotations"]["description"]
                assert re.fullmatch(r"(\d+[smhdwy])+", str(r.get("for", "0s")))
                alerts[r["alert"]] = promql_metrics(r["expr"])
            else:
                assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", r["record"])
    assert len(alerts) == sum(1 for r in prometheus_rules() if "alert" in r), "duplicate alert"
    used = [set(m) for m in alerts.values()]
    # The alerts the operators asked for: hit-rate drop, store errors, disk near full.
    assert any({"kvtier_hit_tokens_total", "kvtier_lookup_tokens_total"} <= m for m in used)
    assert any("kvtier_io_errors_total" in m for m in used)
    assert any("kvtier_checksum_failures_total" in m for m in used)
    assert any({"kvtier_occupancy_bytes", "kvtier_capacity_bytes"} <= m for m in used)


def test_dashboard_panels_all_query_something():
    dash = dashboard()
    assert dash["title"] and dash["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(graphs) >= 10
    for p in graphs:
        assert p.get("targets"), f"panel {p['title']!r} has no targets"
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys()
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]
            assert promql_metrics(t["expr"]), (p["title"], t["expr"])
            assert t["datasource"]["type"] == "prometheus"
    variables = {v["name"] for v in dash["templating"]["list"]}
    for _, expr in dashboard_exprs(dash):
        for var in re.findall(r"\$(\w+)", expr):
            assert var.startswith("__") or var in variables, f"${var} is not a variable"
    # The hit tokens by tier and where vLLM's prompt tokens came from are on it.
    exprs = " ".join(e for _, e in dashboard_exprs(dash))
    assert "kvtier_hit_tokens_total" in exprs
    assert "vllm:prompt_tokens_cached_by_source_total" in exprs


def test_dashboard_and_rules_use_only_kvtier_metrics_that_exist():
    """Static half of test_observability's check: kvtier_* names are in METRICS."""
    known = kvtier_series_names()
    used = referenced_metrics()
    assert "kvtier_hit_tokens_total" in used
    unknown = {n: sorted(w) for n, w in used.items() if n.startswith("kvtier") and n not in known}
    assert not unknown, f"not in kvtier.vllm.metrics.METRICS: {unknown}"


def test_dockerfile_builds_on_vllm_openai():
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and froms[-1].startswith("vllm/vllm-openai:"), froms
    assert re.search(r"pip install[^\n]*--no-build-isolation[^\n]*/opt/kvtier", text)
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"COPY {part}: not in the repository"
    assert "with_cuda" in text, "the image build must fail when the CUDA path is missing"


def test_every_counter_kvtier_updates_is_exported():
    """Each name kvtier's code passes to stats.inc/set/observe is a declared metric, and
    KVTierPromMetrics.observe takes a payload with all of them: an undeclared name
    raised KeyError in vLLM's API server (it stopped serving) on the first update."""
    from kvtier.vllm.metrics import KVTierPromMetrics, StatsRecorder
    used = set()
    for src in (ROOT / "kvtier").rglob("*.py"):
        used |= set(re.findall(r"stats\.(?:inc|set|observe)\(\s*\"(kvtier_\w+)\"",
                               src.read_text()))
    assert "kvtier_hit_tokens_total" in used             # the pattern finds the calls
    assert used <= set(METRICS), f"not in kvtier.vllm.metrics.METRICS: {sorted(used - set(METRICS))}"
    rec = StatsRecorder()
    for name in sorted(used):
        kind, _, labels = METRICS[name]
        lab = {k: "disk" if k == "tier" else "x" for k in labels}
        (rec.observe if kind == "histogram" else rec.set if kind == "gauge" else rec.inc)(
            name, 1, **lab)
    prom = object.__new__(KVTierPromMetrics)              # vLLM's metric classes aside
    seen = []
    prom._metrics = {n: (None, METRICS[n][2]) for n in METRICS}
    prom._last = {}
    prom._child = lambda name, engine_idx, lkey: type("C", (), {
        "inc": lambda self, v: seen.append(name), "set": lambda self, v: seen.append(name),
        "observe": lambda self, v: seen.append(name)})()
    prom.observe(rec.take().data)
    assert set(seen) == used


def test_metrics_doc_covers_every_metric():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for name, (kind, _, labels) in METRICS.items():
        assert f"`{name}`" in doc, f"docs/metrics.md does not document {name}"
        for label in labels:
            assert f"`{label}`" in doc, f"docs/metrics.md: label {label} of {name}"
    assert "vllm:prompt_tokens_cached_by_source_total" in doc


def test_operators_doc_covers_every_config_key():
    from dataclasses import fields
    doc = (ROOT / "docs" / "operators.md").read_text()
    for f in fields(KVTierConfig):
        assert f"`{f.name}`" in doc, f"docs/operators.md does not describe {f.name}"
    assert "kvtier plan" in doc
