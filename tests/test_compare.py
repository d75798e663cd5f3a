"""benchmarks/compare.py without a server: the profile, the batching cache size,
the request set's working set against it, the headline (same request set,
ratios, preemptions) and the plots. The run itself: tests/e2e/test_compare_smoke.py."""

import json

import pytest

from benchmarks import compare as C


def profile(*sets, duration=None):
    argv = [x for s in sets for x in ("--set", s)]
    if duration:
        argv += ["--duration", str(duration)]
    return C.make_profile(C.parse_args(argv))


def test_profile_overrides_and_bad_input():
    p = profile("users=8", "arrival=poisson", "rate=0.5", 'model={"hidden_size": 64}')
    assert (p.users, p.arrival, p.rate, p.model) == (8, "poisson", 0.5, {"hidden_size": 64})
    assert p.fixed and not profile(duration=20).fixed
    with pytest.raises(SystemExit, match="unknown profile field 'userz'"):
        profile("userz=8")
    with pytest.raises(SystemExit, match="closed or poisson"):
        profile("arrival=burst")
    with pytest.raises(SystemExit, match="rate > 0"):
        profile("arrival=poisson", "rate=0")
    with pytest.raises(SystemExit, match="fixed request set"):
        profile("arrival=poisson", duration=20)


def test_small_cache_holds_the_asked_contexts():
    p = profile("max_context=2500", "max_output_tokens=16", "block_size=32",
                "gpu_cache_contexts=4", "small_cache_slack_blocks=4")
    assert p.max_model_len == 2528 and p.context_blocks == 79    # 2516 tokens, rounded up
    assert p.small_cache_blocks == 4 * 79 + 4
    assert p.small_cache_blocks // p.context_blocks == 4


def test_request_set_info_sizes_the_working_set_against_the_cache(tmp_path):
    p = profile("sessions=6", "max_turns=3", "max_context=1024", "gpu_cache_contexts=1")
    args = C.parse_args(["--synthetic", "--trace-dir", str(tmp_path / "none")])
    wl = C.workload(p, args)
    info = C.request_set_info(p, wl)
    assert info["sessions"] == 6 and info["gpu_cache_blocks"] == p.small_cache_blocks
    assert info["working_set_x_gpu_cache"] == round(
        info["working_set_blocks"] / p.small_cache_blocks, 1)
    assert C.request_set_info(p, C.workload(p, args))["digest"] == info["digest"]
    assert C.request_set_info(profile(duration=5), wl) is None


def summary(tok_s, digest="d1", preemptions=2.0, hit=0.5):
    return {"mode": "fixed", "output_tok_s": tok_s, "hit_rate": hit,
            "ttft": {"p50": 0.1, "p95": 0.5, "p99": 0.9}, "preemptions": preemptions,
            "reprefilled_blocks": 7, "requests_ok": 10, "goodput_rps": 1.0, "working_set_blocks": 99,
            "max_users_within_slo": None, "makespan_s": 100.0 / tok_s,
            "cached_by_source": {"device": 5.0, "host": 0.0},
            "request_set": {"digest": digest}}


def recs(digests=("d1", "d1", "d1")):
    return [{"name": "baseline", "status": "ok", "summary": summary(10.0, digests[0], 40.0)},
            {"name": "kvtier-nvme", "status": "ok", "summary": summary(36.0, digests[1])},
            {"name": "ideal", "status": "ok", "summary": summary(40.0, digests[2], 0.0)},
            {"name": "example-disk", "status": "failed", "error": "engine died"}]


def test_headline_ratios_preemptions_and_the_same_request_set():
    p = profile()
    rset = {"sessions": 3, "requests": 10, "prompt_tokens": 1, "output_tokens": 1,
            "working_set_blocks": 99, "digest": "d1", "working_set_x_gpu_cache": 12.5}
    h = C.headline(recs(), p, "out", rset)
    c = h["configs"]
    assert h["same_request_set"] and h["working_set_x_small_cache"] == 12.5
    assert c["kvtier-nvme"]["tok_s_vs_ideal"] == 0.9 and c["kvtier-nvme"]["tok_s_vs_baseline"] == 3.6
    assert c["baseline"]["preemptions"] == 40 and c["ideal"]["preemptions"] == 0
    assert c["baseline"]["makespan_s"] == 10.0
    assert c["kvtier-nvme"]["cached_by_source"] == {"device": 5}     # zero sources left out
    assert c["example-disk"] == {"status": "failed", "error": "engine died"}
    json.dumps(h)
    assert not C.headline(recs(("d1", "d2", "d1")), p, "out", rset)["same_request_set"]


def test_plots_are_written_from_a_compare_document(tmp_path):
    rs = [r for r in recs() if r["status"] == "ok"]
    for i, r in enumerate(rs):
        r.update(completions=[[1.0 + i, 5], [2.0 + i, 7]], ttfts=[0.1, 0.2, 0.4],
                 timeline=[{"t": 1.0, "hit_rate": 0.2}, {"t": 2.0, "hit_rate": None}],
                 reprefill_histogram={"0": 10, "2": 3 - i})
    doc = {"configs": rs + [recs()[-1]],
           "headline": C.headline(recs(), profile(), "out", None),
           "stamp": {"date_utc": "2026-01-01 00:00", "commit": "abc", "machine": "m"}}
    files = C.plot(doc, tmp_path, "compare-")
    assert files == ["compare-" + f for f in C.PLOTS]
    for f in files:
        assert (tmp_path / f).stat().st_size > 5000


def test_headline_carries_queue_time_and_the_machine_s_other_work():
    rs = recs()
    rs[1]["summary"]["server"] = {"queue_time_s_mean": 1.23456, "prefill_time_s_mean": 0.5}
    rs[1]["machine_during_load"] = {"measured_cpu_s": 80.0, "others_cpu_share": 0.25}
    c = C.headline(rs, profile(), "out", None)["configs"]
    assert (c["kvtier-nvme"]["queue_s_mean"], c["kvtier-nvme"]["prefill_s_mean"]) == (1.235, 0.5)
    assert (c["kvtier-nvme"]["server_cpu_s"], c["kvtier-nvme"]["others_cpu_share"]) == (80.0, 0.25)
    assert c["baseline"]["queue_s_mean"] is None and c["baseline"]["others_cpu_share"] is None
