"""The leader's first-stage rows computed ahead of a drop (``leader_runner.StageAhead``): a
micro-batch takes them only when every one of its chunks is the decode a row was computed
for, in the micro-batch's own order, and each row is taken once."""

from __future__ import annotations

import torch

from kunserve.worker.pipeline.leader_runner import StageAhead
from kunserve.worker.sampling_params import SamplingParams
from kunserve.worker.scheduler_output import ScheduledChunk


def chunk(rid: str, position: int, token: int, tokens: int = 1) -> ScheduledChunk:
    return ScheduledChunk(rid, [token] * tokens, position, [0], True, SamplingParams(), [])


def ahead() -> StageAhead:
    hidden = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # row i = request "r{i}"
    return StageAhead(hidden, {"r0": (10, 5, 0), "r1": (20, 6, 1), "r2": (30, 7, 2)})


def test_a_micro_batch_of_those_decodes_takes_their_rows_in_its_own_order():
    rows = ahead()
    got = rows.take([chunk("r2", 30, 7), chunk("r0", 10, 5)])
    assert torch.equal(got, rows.hidden[[2, 0]])
    assert list(rows.rows) == ["r1"]  # taken once
    assert rows.take([chunk("r0", 10, 5)]) is None
    assert torch.equal(rows.take([chunk("r1", 20, 6)]), rows.hidden[[1]])


def test_any_other_chunk_makes_the_micro_batch_compute_its_first_stage():
    for chunks in ([chunk("r0", 10, 5), chunk("x", 3, 1)],  # a request without a row
                   [chunk("r0", 11, 5)],  # another position
                   [chunk("r0", 10, 9)],  # another token
                   [chunk("r0", 10, 5, tokens=2)],  # not a single decode
                   []):
        rows = ahead()
        assert rows.take(chunks) is None
        assert list(rows.rows) == ["r0", "r1", "r2"]  # nothing was taken
