"""``kunserve bench compare`` end to end: two policies, each on a fresh ``kunserve up`` (real
NATS, Redis, worker), the same short trace replayed against both; every request accounted
for in both, one side-by-side table with each policy's ratio to kunserve, the files written."""

from __future__ import annotations

import contextlib
import csv
import io
import json

from kunserve.cli import main

POLICIES = ("kunserve", "vllm")
SENT = 6


def test_compare_replays_the_same_requests_against_each_policy(tmp_path, llama_dir):
    trace, out = tmp_path / "trace.csv", tmp_path / "out"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:17:0{k // 2}.{5 * (k % 2)}000000,{20 + 3 * k},{6 + k}\n"
        for k in range(SENT + 2)))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["bench", "compare", "--policies", ",".join(POLICIES), "--instances", "1",
                     "--model", llama_dir, "--trace", str(trace), "--time-scale", "1",
                     "--length-scale", "1", "--max-requests", str(SENT), "--no-profile",
                     "--out", str(out)])
    text = printed.getvalue()
    assert code == 0, text

    report = json.loads((out / "compare.json").read_text())
    assert sorted(report["policies"]) == sorted(POLICIES)
    for policy in POLICIES:
        summary = report["policies"][policy]["summary"]
        assert summary["sent"] == SENT and summary["completed"] == SENT, summary
        for name in ("requests.csv", "summary.json", "ttft_timeline.png"):
            assert (out / policy / name).is_file(), name
        # the very same requests (lengths) against each policy
        with open(out / policy / "requests.csv") as f:
            rows = list(csv.DictReader(f))
        shapes = [(r["input_tokens"], r["expected_output_tokens"]) for r in rows]
        if policy == POLICIES[0]:
            first = shapes
        assert shapes == first
    assert (out / "ttft_cdf.png").is_file() and (out / "compare.csv").is_file()
    header = next(line for line in text.splitlines() if "vllm/kunserve" in line)
    assert header.split() == ["kunserve", "vllm", "vllm/kunserve"]
    assert any(line.split()[:2] == ["requests", "sent"] and line.split()[2:4] == ["6", "6"]
               for line in text.splitlines()), text


def test_repeated_rounds_replay_the_same_requests_and_sum_up_round_by_round(tmp_path,
                                                                             llama_dir):
    """``--repeat 2``: each round runs every policy on fresh stacks and writes what a single
    run writes under ``OUT/round-K/``; ``OUT/repeats.json`` holds each figure per round and
    each policy's ratio to kunserve's of the same round."""
    trace, out = tmp_path / "trace.csv", tmp_path / "out"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:17:0{k // 2}.{5 * (k % 2)}000000,{20 + 3 * k},{6 + k}\n"
        for k in range(4)))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["bench", "compare", "--policies", ",".join(POLICIES), "--instances", "1",
                     "--model", llama_dir, "--trace", str(trace), "--time-scale", "1",
                     "--length-scale", "1", "--max-requests", "3", "--no-profile",
                     "--repeat", "2", "--out", str(out)])
    text = printed.getvalue()
    assert code == 0, text
    assert "== round 2 of 2" in text and "2 rounds, the same requests in each" in text

    shapes = set()
    p50 = {policy: [] for policy in POLICIES}
    for k in (1, 2):
        report = json.loads((out / f"round-{k}" / "compare.json").read_text())
        for policy in POLICIES:
            summary = report["policies"][policy]["summary"]
            assert summary["completed"] == 3 and summary["lost"] == 0
            p50[policy].append(1e3 * summary["ttft"]["percentiles"]["p50"])
            with open(out / f"round-{k}" / policy / "requests.csv") as f:
                shapes.add(tuple((r["input_tokens"], r["expected_output_tokens"])
                                 for r in csv.DictReader(f)))
    assert len(shapes) == 1  # the same requests in every round and policy

    repeats = json.loads((out / "repeats.json").read_text())
    assert repeats["rounds"] == 2
    rows = {(r["figure"], r["policy"]): r for r in repeats["rows"]}
    assert rows[("TTFT p50 (ms)", "kunserve")]["values"] == p50["kunserve"]
    vllm = rows[("TTFT p50 (ms)", "vllm")]
    assert vllm["values"] == p50["vllm"]
    assert vllm["ratios_to_kunserve"] == [v / b for v, b in zip(p50["vllm"], p50["kunserve"],
                                                                strict=True)]
    assert rows[("lost (rejected+failed)", "vllm")]["values"] == [0, 0]
