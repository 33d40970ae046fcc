"""``kunserve bench migrate`` at a tiny size: two real processes, requests moved both ways
(stop-and-copy, live); every request moves, the live rounds copy the full blocks ahead and stop
only for the rest (no timing targets)."""

from __future__ import annotations

import contextlib
import io
import json

from kunserve.cli import main

PROMPT = 40  # blocks of 16 tokens: 2 full ones per request once prefilled


def test_live_rounds_stop_for_the_partial_blocks_only(tmp_path, llama_dir):
    out, text = tmp_path / "migrate.json", io.StringIO()
    with contextlib.redirect_stdout(text):
        code = main(["bench", "migrate", "--model", llama_dir, "--requests", "2", "--own", "1",
                     "--prompt-len", str(PROMPT), "--rounds", "2", "--json", str(out)])
    assert code == 0, text.getvalue()
    result = json.loads(out.read_text())
    copy, live = result["rounds"]
    assert (copy["mode"], live["mode"]) == ("stop-and-copy", "live")
    assert copy["moved"] == live["moved"] == 2
    # a request holds at least 3 blocks at the stop (more if it decoded past 48 tokens
    # while the source waited): stop-and-copy moves them all in the stop; live moves the 2
    # full ones of the prompt (at least) ahead, and only the rest in the stop
    assert copy["copied_blocks"] == 0 and copy["stop_blocks"] == copy["held_blocks"] >= 2 * 3
    assert live["copied_blocks"] >= 2 * 2 and live["stop_blocks"] >= 2
    assert live["held_blocks"] >= 2 * 3
    assert live["held_blocks"] - live["stop_blocks"] >= 2 * 2  # copied ahead, not in the stop
    assert live["max_gap_s"] > 0 and copy["max_gap_s"] > 0
    for line in ("stop-and-copy: median stop", "live: median stop"):
        assert line in text.getvalue()
