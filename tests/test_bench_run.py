"""``kunserve bench run`` against a real ``kunserve up``: a short trace whose first requests
arrive at once past the gateway's admission budget, so some are rejected (429); every request
sent is accounted for, and the JSON, CSV and PNG files are written. Also the cluster monitor's
pure parts: drops and restores read from state samples, Prometheus values."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest

from kunserve.bench.cluster_monitor import (
    ClusterSample,
    kv_blocks,
    metric_values,
    settled,
    topology_events,
)
from kunserve.cli import main
from tests.stack import running_stack

SENT = 11  # of the trace's 12 rows (--max-requests)
ADMITTED_AT_ONCE = 4  # the gateway's budget of requests in flight
FILES = ("requests.json", "requests.csv", "summary.json", "summary.csv", "slo.csv",
         "cluster.csv", "events.csv", "ttft_cdf.png", "ttft_timeline.png")


def _trace() -> str:
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 18:17:03.000000{k},{20 + 5 * k},12" for k in range(8)]  # a burst
    rows += [f"2023-11-16 18:17:0{4 + k}.5000000,{30 + k},{4 + 4 * k}" for k in range(4)]
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("bench-run")
    trace, out = root / "trace.csv", root / "out"
    trace.write_text(_trace())
    printed = io.StringIO()
    with running_stack(llama_dir, root / "state", instances=1, admin_token="t",
                       max_queued_requests=ADMITTED_AT_ONCE) as (_, url):
        with contextlib.redirect_stdout(printed):
            code = main(["bench", "run", "--url", url, "--admin-token", "t", "--trace",
                         str(trace), "--time-scale", "1", "--length-scale", "1",
                         "--max-requests", str(SENT), "--sample-interval", "0.2",
                         "--out", str(out)])
    assert code == 0, printed.getvalue()
    return out, printed.getvalue()


def test_every_request_sent_is_accounted_for(bench_run):
    out, _ = bench_run
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["sent"] == SENT
    assert summary["completed"] + summary["rejected"] + summary["failed"] == SENT
    assert summary["rejected"] >= 1  # 8 at once, 4 admitted
    assert summary["completed"] >= ADMITTED_AT_ONCE
    with open(out / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(SENT))
    assert sum(r["status"] == "rejected" for r in rows) == summary["rejected"]
    for row in rows:
        if row["status"] == "rejected":
            assert row["http_status"] == "429" and row["error"].startswith("HTTP 429")
        if row["status"] == "ok":
            assert row["output_tokens"] == row["expected_output_tokens"]
            assert float(row["ttft_s"]) > 0 and float(row["e2e_s"]) >= float(row["ttft_s"])


def test_results_are_written_as_json_csv_and_png(bench_run):
    out, printed = bench_run
    for name in FILES:
        assert (out / name).is_file(), name
    for name in ("ttft_cdf.png", "ttft_timeline.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "summary.json").read_text())
    assert [p["scale"] for p in data["slo"]] == list(range(1, 11))
    assert data["config"]["time_scale"] == 1 and data["config"]["requests"] == SENT
    with open(out / "cluster.csv") as f:
        samples = list(csv.DictReader(f))
    assert samples and all(s["blocks_total"] not in ("", "0") for s in samples)
    assert len(json.loads((out / "requests.json").read_text())) == SENT
    assert "requests sent" in printed and "TTFT p99.9 (ms)" in printed


def test_drops_and_restores_are_read_from_state_changes():
    states = [{"a": "solo", "b": "solo"}, {"a": "preparing", "b": "preparing"},
              {"a": "pipelined", "b": "pipelined"}, {"a": "restoring", "b": "restoring"},
              {"a": "solo", "b": "solo"}, {"a": "solo", "b": "solo"}]
    samples = [ClusterSample(float(t), None, t, s) for t, s in enumerate(states)]
    events = [(e.t_s, e.kind, e.instance) for e in topology_events(samples)]
    assert events == [(2.0, "drop", "a"), (2.0, "drop", "b"), (4.0, "restore", "a"),
                      (4.0, "restore", "b")]
    # already pipelined when sampling began: no drop seen, but its restore is
    late = [ClusterSample(0.0, None, 3, {"a": "pipelined"}), ClusterSample(1.0, None, 4,
                                                                          {"a": "solo"})]
    assert [e.kind for e in topology_events(late)] == ["restore"]


def test_settled_means_back_to_the_baseline_with_an_empty_cache():
    solo = {"a": "solo", "b": "solo"}
    assert settled(ClusterSample(0, 0.0, 1, dict(solo)), solo)
    assert not settled(ClusterSample(0, 0.3, 1, dict(solo)), solo)  # requests still hold KV
    dropped = {"a": "pipelined", "b": "pipelined"}
    assert not settled(ClusterSample(0, 0.0, 2, dropped), solo)  # not restored yet
    assert settled(ClusterSample(0, 0.0, 2, dropped), dropped)  # a static pipeline (vllm-pp)
    assert settled(ClusterSample(0, 0.0), None)  # no states known: the cache decides
    assert settled(None, solo)


def test_kv_usage_counts_each_block_table_once():
    # a solo instance and a 2-member group: the follower reports none of the group's blocks
    instances = [dict(id="a", stage=0, blocks_used=10, blocks_total=100),
                 dict(id="b", stage=0, blocks_used=120, blocks_total=130),
                 dict(id="c", stage=1, blocks_used=0, blocks_total=130)]
    assert kv_blocks(instances) == (130, 230)


def test_prometheus_values_by_metric_name():
    text = ('# HELP vllm:kv_cache_usage_perc KV\nvllm:kv_cache_usage_perc{instance="a"} 0.25\n'
            'vllm:kv_cache_usage_perc{instance="b"} 0.75\nvllm:kv_cache_usage_perc_x 9\n'
            "kunserve:topology_epoch 7.0\n")
    assert metric_values(text, "vllm:kv_cache_usage_perc") == [0.25, 0.75]
    assert metric_values(text, "kunserve:topology_epoch") == [7.0]
