"""The workload's scaling: lengths to the served context, the KV-demand rule that picks the
replay's time scale, and the seeded request list every policy gets."""

from __future__ import annotations

import random

import pytest

from kunserve.bench.kv_demand import (
    DemandRequest,
    ServiceSpeed,
    choose_time_scale,
    estimate,
    mean_demand,
    peak_demand,
)
from kunserve.bench.traces import Trace, TraceRow
from kunserve.bench.workload import (
    FIRST_PROMPT_TOKEN,
    Shape,
    default_length_scale,
    gamma_arrivals,
    make_requests,
    scale_lengths,
    scale_shapes,
    trace_shapes,
)

# prefill free, one second per output token: hold = output tokens, in seconds
SPEED = ServiceSpeed(prefill_s_per_token=0.0, tpot_s=1.0)
# held I + O/2 tokens for O seconds: 101 tokens over [0, 2), 52 over [1, 5), 11 over [10, 12)
REQUESTS = [DemandRequest(0.0, 100, 2), DemandRequest(1.0, 50, 4), DemandRequest(10.0, 10, 2)]


def test_lengths_scale_and_fit_the_context():
    assert scale_lengths(1000, 200, 0.5, 2048) == (500, 100)
    assert scale_lengths(3, 1, 0.1, 2048) == (1, 1)  # never below one token
    assert scale_lengths(4000, 1500, 1.0, 2048) == (1024, 1024)  # output: half the context
    assert scale_lengths(4000, 10, 1.0, 2048) == (2038, 10)  # the prompt takes the rest


def test_default_length_scale_fits_the_p99_request():
    shapes = [Shape(0, 900, 100)] * 99 + [Shape(0, 3000, 1000)]
    p99 = 1000 + 0.01 * 3000  # linear interpolation between 1000 and 4000 tokens
    assert default_length_scale(shapes, 512) == pytest.approx(512 / p99)
    assert default_length_scale([Shape(0, 10, 10)], 2048) == 1.0  # never scaled up
    # an instance of 2000 tokens holds 4 requests of the mean size (1000 + 30 = 1030 tokens)
    mean = (99 * 1000 + 4000) / 100
    assert default_length_scale(shapes, 512, tokens_per_instance=2000) == pytest.approx(
        2000 / (4 * mean))
    assert default_length_scale(shapes, 512, tokens_per_instance=10**9) == pytest.approx(
        512 / p99)


def test_demand_by_hand():
    assert peak_demand(REQUESTS, SPEED, 1.0) == 153  # 101 + 52 over [1, 2)
    # 101*2 + 52*4 + 11*2 = 432 token-seconds over a 10 s span
    assert mean_demand(REQUESTS, SPEED, 1.0) == pytest.approx(43.2)
    assert mean_demand(REQUESTS, SPEED, 2.0) == pytest.approx(21.6)
    assert peak_demand(REQUESTS, SPEED, 2.0) == 101  # the second starts as the first ends
    assert peak_demand(REQUESTS, SPEED, 0.0) == 164  # all at once


def test_rule_overloads_the_burst_by_half_when_the_mean_allows():
    # capacity 100: the burst may reach 150 tokens; 153 at x1 is over, so the first two
    # requests must stop overlapping: X = 2 (mean then 21.6%, under 60%)
    chosen = choose_time_scale(REQUESTS, SPEED, capacity_tokens=100, burst_target=1.5)
    assert chosen.time_scale == pytest.approx(2.0)
    assert chosen.peak_tokens == 101 and chosen.mean_fraction == pytest.approx(0.216)
    assert chosen.exceeds


def test_rule_holds_the_mean_at_sixty_percent_first():
    # capacity 40: the mean (432 / (X * 10)) must be at most 24 tokens -> X = 1.8, where the
    # first two still overlap (153 tokens: the burst exceeds capacity, allowed up to 60)
    chosen = choose_time_scale(REQUESTS, SPEED, capacity_tokens=40, burst_target=10.0)
    assert chosen.time_scale == pytest.approx(1.8)
    assert chosen.mean_fraction == pytest.approx(0.6)
    assert chosen.peak_tokens == 153


def test_rule_takes_the_mean_from_the_whole_trace():
    # the replayed window is the burst; the whole trace around it is ten times as long
    whole = [*REQUESTS, DemandRequest(100.0, 10, 2)]
    alone = choose_time_scale(REQUESTS, SPEED, 40, burst_target=10.0)
    with_whole = choose_time_scale(REQUESTS, SPEED, 40, burst_target=10.0, mean_requests=whole)
    assert with_whole.time_scale < alone.time_scale
    assert with_whole.mean_fraction == pytest.approx(0.6)  # of the whole trace
    assert estimate(REQUESTS, SPEED, 40, 1.0, whole).peak_tokens == 153


def test_stretching_arrivals_never_raises_the_peak():
    rng = random.Random(3)
    requests = [DemandRequest(rng.uniform(0, 30), rng.randint(1, 500), rng.randint(1, 50))
                for _ in range(200)]
    speed = ServiceSpeed(0.001, 0.02)
    peaks = [peak_demand(requests, speed, x) for x in (0.1, 0.3, 1, 2, 5, 20)]
    assert peaks == sorted(peaks, reverse=True)
    chosen = choose_time_scale(requests, speed, capacity_tokens=5000)
    assert chosen.peak_tokens <= 1.5 * 5000 + 1e-6 and chosen.mean_fraction <= 0.6 + 1e-9


def test_the_request_list_is_the_same_for_the_same_seed():
    lengths = Trace([TraceRow(0, 100 + k, 10 + k) for k in range(50)])
    arrivals = Trace([TraceRow(t, 1, 1) for t in (0.0, 0.5, 2.0, 2.1)])
    shapes = trace_shapes(arrivals, lengths, seed=7)
    assert [s.arrival_s for s in shapes] == [0.0, 0.5, 2.0, 2.1]
    assert shapes == trace_shapes(arrivals, lengths, seed=7)
    assert shapes != trace_shapes(arrivals, lengths, seed=8)
    assert all(s.output_tokens == s.input_tokens - 90 for s in shapes)  # pairs kept together
    scaled = scale_shapes(shapes, 0.5, 2048, time_scale=3.0)
    assert [s.arrival_s for s in scaled] == [0.0, 1.5, 6.0, pytest.approx(6.3)]
    first, again = make_requests(scaled, 1024, seed=1), make_requests(scaled, 1024, seed=1)
    assert first == again and first != make_requests(scaled, 1024, seed=2)
    assert [r.input_tokens for r in first] == [s.input_tokens for s in scaled]
    assert all(FIRST_PROMPT_TOKEN <= t < 1024 for r in first for t in r.prompt_token_ids)


def test_gamma_arrivals_have_the_asked_rate():
    times = gamma_arrivals(rate=20.0, burstiness=0.5, n=4000, seed=0)
    assert times[0] == 0.0 and times == sorted(times)
    assert len(times) / times[-1] == pytest.approx(20.0, rel=0.1)
    assert times == gamma_arrivals(20.0, 0.5, 4000, seed=0)


def test_a_scenario_fits_every_request_in_one_solo_instance_s_kv_cache(tmp_path):
    """Lengths are cut to what one solo instance holds when that is less than the context, so
    no policy has to refuse a request the burst benchmark sends."""
    import argparse
    import asyncio

    from kunserve.bench.scenario import add_scenario_args, build_scenario
    from kunserve.bench.stack_probe import StackInfo

    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:15:46.6805900,374,44\n"
                     "2023-11-16 18:15:47.0000000,1900,120\n"
                     "2023-11-16 18:15:48.5000000,30,400\n")
    parser = argparse.ArgumentParser()
    add_scenario_args(parser)
    args = parser.parse_args(["--trace", str(trace), "--length-scale", "1",
                              "--time-scale", "1"])
    info = StackInfo(model="m", max_model_len=2048, vocab_size=1000, capacity_tokens=2 * 300,
                     instances=2)
    scenario = asyncio.run(build_scenario(args, "http://unused", info))
    sizes = [(r.input_tokens, r.output_tokens) for r in scenario.requests]
    assert sizes == [(256, 44), (180, 120), (30, 150)]  # output <= 300 // 2, prompt the rest
    assert scenario.description["max_request_tokens"] == 300


def test_the_compute_bound_keeps_the_busiest_window_within_the_instances():
    """Work = I x prefill + O x decode instance-seconds; the busiest 15 trace-seconds of work,
    over instances x X x 15 s, is held at the compute target when memory alone would allow a
    faster replay."""
    from kunserve.bench.kv_demand import busiest_work, compute_load

    speed = ServiceSpeed(prefill_s_per_token=0.01, tpot_s=0.1, decode_s_per_token=0.05)
    spaced = [DemandRequest(t, 10, 10) for t in (0.0, 10.0, 20.0, 30.0)]  # 0.6 s of work each
    assert busiest_work(spaced, speed, 15.0) == pytest.approx(1.2)  # two within any 15 s
    assert compute_load(spaced, speed, 2, 1.0) == pytest.approx(1.2 / 30)
    assert compute_load(spaced, ServiceSpeed(0.01, 0.1), 2, 1.0) is None  # decode cost unknown
    burst = [DemandRequest(t, 10, 10) for t in (0.0, 1.0, 2.0, 3.0)]
    chosen = choose_time_scale(burst, speed, capacity_tokens=10**9, instances=2)
    assert chosen.time_scale == pytest.approx(2.4 / (2 * 15) / 0.8)  # memory alone: ~0
    assert chosen.compute_load == pytest.approx(0.8)
    without = choose_time_scale(burst, speed, capacity_tokens=10**9)  # instances unknown
    assert without.time_scale < 1e-3 and without.compute_load is None
