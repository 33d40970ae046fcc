"""``kunserve bench plan``: the plans it times for 1,024 instances are the ones the scenarios
describe. How long they take is the benchmark's figure (README), not a test's: a timed assert
fails on a busy machine, not on slow code."""

from __future__ import annotations

import json

from kunserve.bench.plan import measure
from kunserve.cli import main


def test_the_timed_plans_for_1024_instances_are_the_scenarios():
    rows = {row.scenario: row for row in measure(1024, layers=48, repeats=3, seed=0)}
    assert (rows["one pair"].merges, rows["one pair"].new_groups) == (1, 1)
    assert rows["half"].new_groups == 256 and not rows["half"].shortfall_tokens
    assert rows["everything"].shortfall_tokens > 0 and rows["everything"].new_groups == 22
    for row in rows.values():
        assert 0 < row.plan_ms_min <= row.plan_ms_p50 <= row.plan_ms_p99, row


def test_the_command_prints_and_writes_its_figures(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["bench", "plan", "--instances", "64", "--layers", "8", "--repeats", "3",
                 "--json", str(out)]) == 0
    assert "everything" in capsys.readouterr().out
    assert [row["scenario"] for row in json.loads(out.read_text())] == [
        "one pair", "half", "everything"]
