"""Trace loaders on both formats (Azure's 7-digit fractional timestamps, BurstGPT's seconds
and failed rows), windows, the largest-burst finder; and the real Azure traces when
``../shared/traces`` is there."""

from __future__ import annotations

from pathlib import Path

import pytest

from kunserve.bench.traces import (
    Trace,
    TraceRow,
    around_burst,
    detect_format,
    largest_burst,
    load_trace,
    parse_azure_timestamp,
    parse_azure_timestamp_ns,
    parse_window,
    window,
)

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"

AZURE = """\
TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.0319600,3180,8
2023-11-16 18:17:04.0781490,110,27
2023-11-16 18:17:59.9999999,7433,14
2023-11-16 18:18:00.0000001,20,1
"""

BURSTGPT = """\
Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,0,1087,Conversation log
47,GPT-4,417,276,693,API log
3.5,ChatGPT,100,20,120,API log
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_azure_timestamps_keep_all_seven_fractional_digits():
    ns = parse_azure_timestamp_ns
    base = ns("2023-11-16 18:17:03")
    assert base == 1700158623 * 10**9  # read as UTC
    assert ns("2023-11-16 18:17:03.9799600") - base == 979_960_000
    assert ns("2023-11-16 18:17:03.0000001") - base == 100  # the 7th digit: 100 ns
    assert ns("2023-11-16 18:17:03.5") - base == 500_000_000
    assert ns("2023-11-16 18:17:03.123456") - base == 123_456_000
    # across a minute, an hour and a day
    assert ns("2023-11-17 00:00:00.0000000") - ns("2023-11-16 23:59:59.9000000") == 10**8
    assert parse_azure_timestamp("2023-11-16 18:17:03.25") == 1700158623.25
    with pytest.raises(ValueError):
        ns("16/11/2023 18:17:03")


def test_azure_loader(tmp_path):
    trace = load_trace(_write(tmp_path, "azure.csv", AZURE))
    assert [r.arrival_s for r in trace.rows] == pytest.approx(
        [0.0, 0.052, 0.098189, 56.0200399, 56.0200401], abs=1e-6)
    assert trace.rows[0] == TraceRow(0.0, 4808, 10)
    assert [(r.input_tokens, r.output_tokens) for r in trace.rows[1:]] == [
        (3180, 8), (110, 27), (7433, 14), (20, 1)]
    assert trace.name == "azure.csv"
    assert trace.mean_rate == pytest.approx(4 / trace.duration_s)


def test_burstgpt_loader_sorts_rows_and_skips_failed_requests(tmp_path):
    trace = load_trace(_write(tmp_path, "burst.csv", BURSTGPT))
    assert trace.rows == [TraceRow(0.0, 100, 20), TraceRow(1.5, 472, 18),
                          TraceRow(43.5, 417, 276)]  # the 0-token failure at 45 s is gone


def test_format_told_by_the_header_or_given(tmp_path):
    assert detect_format(AZURE.splitlines()[0].split(",")) == "azure"
    assert detect_format(BURSTGPT.splitlines()[0].split(",")) == "burstgpt"
    with pytest.raises(ValueError, match="unknown trace format"):
        load_trace(_write(tmp_path, "x.csv", "a,b\n1,2\n"))
    with pytest.raises(ValueError, match="not a azure row"):
        load_trace(_write(tmp_path, "b.csv", BURSTGPT), "azure")
    with pytest.raises(ValueError, match=":3: not a azure row"):
        load_trace(_write(tmp_path, "bad.csv", AZURE.replace(",3180,", ",many,")))


def _trace(times: list[float]) -> Trace:
    return Trace([TraceRow(t, 10, 5) for t in times])


def test_window_cuts_and_rebases_times():
    trace = _trace([0, 1, 2, 3, 4])
    assert [r.arrival_s for r in window(trace, 1, 3).rows] == [0, 1]
    assert parse_window("10:20") == (10, 20)
    assert parse_window(":20") == (0, 20)
    assert parse_window("5:") == (5, float("inf"))
    with pytest.raises(ValueError):
        parse_window("20:10")
    with pytest.raises(ValueError, match="holds no request"):
        window(trace, 10, 20)


def test_largest_burst_finds_the_densest_window():
    trace = _trace([0, 1, 2, 2.1, 2.2, 2.3, 3.5, 5, 9])
    burst = largest_burst(trace, 1.0)
    assert (burst.start_s, burst.requests) == (2, 4)  # 2, 2.1, 2.2, 2.3 (3.5 is outside)
    assert burst.mean_rate == pytest.approx(8 / 9)
    assert burst.ratio == pytest.approx(4 / (8 / 9))
    around = around_burst(trace, burst, before_s=1.0, after_s=0.5)  # [1, 3.5)
    assert [r.arrival_s for r in around.rows] == pytest.approx([0, 1, 1.1, 1.2, 1.3])


@pytest.mark.skipif(not TRACES.is_dir(), reason=f"no traces at {TRACES}")
def test_real_azure_traces_load_and_the_code_trace_bursts():
    code = load_trace(TRACES / "AzureLLMInferenceTrace_code.csv")
    conv = load_trace(TRACES / "AzureLLMInferenceTrace_conv.csv")
    assert len(code.rows) == 8819 and len(conv.rows) == 19366
    assert 55 * 60 < code.duration_s < 59 * 60
    assert code.mean_rate == pytest.approx(2.57, abs=0.05)
    times = [r.arrival_s for r in code.rows]
    assert times == sorted(times)
    burst = largest_burst(code, 15.0)
    assert burst.ratio >= 8, burst
    assert largest_burst(conv, 15.0).ratio < burst.ratio / 2  # the conversation one is mild
