"""The load generator's statistics against values computed by hand on a small recorded run:
percentiles (linear interpolation), TTFT/TPOT/ITL, throughput, SLO attainment and goodput;
rejected and failed requests counted and never met; the table's ratios."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kunserve.bench.report import format_table
from kunserve.bench.request_record import RequestRecord, Status
from kunserve.bench.stats import (
    SloReference,
    meets_slo,
    percentile,
    slo_points,
    slo_reference,
    summarize,
)

# A recorded run, as requests.json holds it: six requests, four completed, one rejected (429),
# one failed after two of its four tokens.
RECORDED = [
    dict(index=0, scheduled_s=0.0, input_tokens=10, expected_output_tokens=5, sent_s=0.0,
         first_token_s=0.1, end_s=0.5, chunk_times_s=[0.1, 0.2, 0.3, 0.4, 0.5],
         chunk_tokens=[1, 1, 1, 1, 1], output_tokens=5, status="ok", http_status=200,
         error=None),
    dict(index=1, scheduled_s=1.0, input_tokens=10, expected_output_tokens=4, sent_s=1.0,
         first_token_s=1.3, end_s=1.9, chunk_times_s=[1.3, 1.5, 1.9], chunk_tokens=[1, 2, 1],
         output_tokens=4, status="ok", http_status=200, error=None),
    dict(index=2, scheduled_s=2.0, input_tokens=10, expected_output_tokens=1, sent_s=2.0,
         first_token_s=2.2, end_s=2.2, chunk_times_s=[2.2], chunk_tokens=[1], output_tokens=1,
         status="ok", http_status=200, error=None),
    dict(index=3, scheduled_s=2.5, input_tokens=10, expected_output_tokens=4, sent_s=2.5,
         first_token_s=None, end_s=2.51, chunk_times_s=[], chunk_tokens=[], output_tokens=0,
         status="rejected", http_status=429, error="HTTP 429: queue full"),
    dict(index=4, scheduled_s=2.9, input_tokens=10, expected_output_tokens=4, sent_s=3.0,
         first_token_s=3.5, end_s=3.6, chunk_times_s=[3.5, 3.6], chunk_tokens=[1, 1],
         output_tokens=2, status="failed", http_status=200, error="2 of 4 tokens"),
    dict(index=5, scheduled_s=3.0, input_tokens=10, expected_output_tokens=3, sent_s=3.0,
         first_token_s=4.0, end_s=4.5, chunk_times_s=[4.0, 4.2, 4.5], chunk_tokens=[1, 1, 1],
         output_tokens=3, status="ok", http_status=200, error=None),
]


@pytest.fixture
def records() -> list[RequestRecord]:
    return [RequestRecord.from_dict(d) for d in RECORDED]


def test_percentile_interpolates_linearly_between_closest_ranks():
    xs = [0.3, 0.1, 1.0, 0.2]  # sorted: 0.1 0.2 0.3 1.0
    assert percentile(xs, 0) == 0.1 and percentile(xs, 100) == 1.0
    assert percentile(xs, 50) == pytest.approx(0.25)  # h = 1.5
    assert percentile(xs, 90) == pytest.approx(0.79)  # h = 2.7: 0.3 + 0.7 * 0.7
    assert percentile(xs, 99.9) == pytest.approx(0.9979)  # h = 2.997
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_percentile_is_numpys_default():
    rng = random.Random(5)
    for n in (1, 2, 3, 10, 101):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for p in (0, 12.5, 50, 90, 99, 99.9, 100):
            assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))


def test_per_request_latencies(records):
    r0, r1, r2, _, r4, r5 = records
    assert (r0.ttft_s, r0.e2e_s, r0.tpot_s) == pytest.approx((0.1, 0.5, 0.1))  # 0.4 / 4
    assert (r1.ttft_s, r1.tpot_s) == pytest.approx((0.3, 0.2))  # 0.6 / 3 tokens after the first
    assert r1.itls_s == pytest.approx([0.2, 0.4])  # per chunk: the 2-token chunk counts once
    assert r2.tpot_s is None  # one token: no TPOT
    assert r4.ttft_s == pytest.approx(0.5)
    assert r5.tpot_s == pytest.approx(0.25)


def test_summary_counts_every_request_and_keeps_latencies_to_the_completed(records):
    s = summarize(records)
    assert (s.sent, s.completed, s.rejected, s.failed, s.lost) == (6, 4, 1, 1, 2)
    assert s.duration_s == pytest.approx(4.5)  # first sent 0.0, last ended 4.5
    assert s.request_throughput == pytest.approx(4 / 4.5)
    assert s.output_throughput == pytest.approx((5 + 4 + 1 + 3) / 4.5)  # failed one's 2: out
    # TTFTs of the completed: 0.1 0.3 0.2 1.0 (the failed one's 0.5 is not among them)
    assert s.ttft.count == 4 and s.ttft.mean == pytest.approx(0.4)
    assert [s.ttft[k] for k in ("p50", "p90", "p99", "p99.9")] == pytest.approx(
        [0.25, 0.79, 0.979, 0.9979])
    # TPOTs: 0.1 0.2 0.25 (the one-token request has none)
    assert s.tpot.count == 3
    assert [s.tpot[k] for k in ("p50", "p90", "p99")] == pytest.approx([0.2, 0.24, 0.249])
    assert s.itl.count == 8 and s.itl.mean == pytest.approx(1.5 / 8)
    assert s.e2e["p50"] == pytest.approx((0.5 + 0.9) / 2)  # 0.2 0.5 0.9 1.5
    assert s.max_schedule_lag_s == pytest.approx(0.1)


def test_slo_attainment_and_goodput_by_hand(records):
    ref = slo_reference([summarize(records)])  # one run: its own P50s
    assert (ref.ttft_s, ref.tpot_s) == pytest.approx((0.25, 0.2))
    points = {p.scale: p for p in slo_points(records, ref)}
    assert sorted(points) == list(range(1, 11))
    # x1: TTFT <= 0.25 and TPOT <= 0.2: requests 0 and 2 (no TPOT: that half is met)
    assert points[1].met == 2
    assert points[1].attainment == pytest.approx(2 / 6)  # of all sent, lost ones included
    assert points[1].goodput == pytest.approx(2 / 4.5)
    assert points[2].met == 3  # + request 1 (0.3 s, 0.2 s/token)
    assert points[3].met == 3  # request 5's TTFT is 1.0 s
    assert points[5].met == 4
    assert points[10].met == 4  # the rejected and the failed one never meet an SLO
    assert points[10].attainment == pytest.approx(4 / 6)
    assert points[5].ttft_slo_s == pytest.approx(1.25)


def test_slo_reference_is_the_best_policys_p50_per_metric(records):
    other = [RequestRecord.from_dict(d) for d in RECORDED]
    for r in other:  # a policy twice as fast to the first token (so slower per token after)
        if r.first_token_s is not None:
            r.first_token_s = r.sent_s + (r.first_token_s - r.sent_s) / 2
    ref = slo_reference([summarize(records), summarize(other)])
    assert ref.ttft_s == pytest.approx(0.125)
    assert ref.tpot_s < 0.25 and ref.tpot_s == pytest.approx(0.2)
    assert slo_reference([]) is None


def test_a_lost_request_never_meets_an_slo(records):
    ref = SloReference(ttft_s=100.0, tpot_s=100.0)
    assert [meets_slo(r, ref, 1) for r in records] == [True, True, True, False, False, True]


def test_table_shows_each_policys_ratio_to_kunserve(records):
    fast = summarize(records)
    slow_records = [RequestRecord.from_dict(d) for d in RECORDED]
    for r in slow_records:
        if r.status is Status.OK:
            r.first_token_s = r.sent_s + 2 * (r.first_token_s - r.sent_s)
    slow = summarize(slow_records)
    ref = slo_reference([fast, slow])
    table = format_table({"kunserve": fast, "vllm": slow},
                         {"kunserve": slo_points(records, ref),
                          "vllm": slo_points(slow_records, ref)})
    lines = table.splitlines()
    assert lines[0].split() == ["kunserve", "vllm", "vllm/kunserve"]
    ttft_p50 = next(line for line in lines if line.startswith("TTFT p50 (ms)"))
    assert ttft_p50.split()[-3:] == ["250.0", "500.0", "2.00x"]
    lost = next(line for line in lines if line.startswith("lost"))
    assert lost.split()[-3:] == ["2", "2", "1.00x"]
    assert any(line.startswith("SLO attainment @5x (%)") for line in lines)
