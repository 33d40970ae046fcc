"""``kunserve bench drop`` at a tiny size: two real member processes drop into a group, serve
pipelined and restore, once with the KV exchange overlapping serving and once before it; the
tables have every row and their figures add up (no timing targets)."""

from __future__ import annotations

import json

import pytest

from kunserve.cli import main

ROWS = ["prepare", "handover", "free", "KV exchange", "drop total", "release params",
        "first stage ahead (leader)", "first pipelined step (leader)", "restore: pull layers",
        "restore: KV exchange", "restore total"]


@pytest.fixture(scope="module")
def drop_runs(tmp_path_factory) -> tuple[str, list[dict]]:
    import contextlib
    import io

    from kunserve.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("bench-drop")
    model = make_tiny_model(root / "llama4", arch="llama", layers=4, hidden_size=64, heads=4,
                            kv_heads=2, intermediate_size=128, vocab_size=512, seed=3)
    out, text = root / "drop.json", io.StringIO()
    with contextlib.redirect_stdout(text):
        code = main(["bench", "drop", "--model", str(model), "--instances", "2",
                     "--requests-per-instance", "2", "--prompt-len", "12", "--output-len", "64",
                     "--steps", "3", "--queued-per-instance", "2", "--json",
                     str(out)])
    assert code == 0, text.getvalue()
    results = json.loads(out.read_text())
    assert [r["exchange_mode"] for r in results] == ["overlapped", "before serving"]
    return text.getvalue(), results


@pytest.fixture(params=[0, 1], ids=["overlapped", "before"])
def drop_run(drop_runs, request) -> tuple[str, dict]:
    text, results = drop_runs
    return text, results[request.param]


def test_the_table_has_every_section(drop_run):
    text, _ = drop_run
    for row in ROWS:
        assert f"\n{row} " in text, row
    for line in ("KV exchange vs raw torch.distributed", "longest inter-token gap across the "
                 "drop", "solo (2 instances side by side)", "pipelined (one 2-stage group)",
                 "pipelined / solo TPOT", "share this machine's", "CPU time (every thread"):
        assert line in text, line
    assert text.count("every request got all 64 tokens: yes") == 2
    assert "the layer pull overlapped" in text
    assert "KV exchange overlapped with serving vs before it" in text  # side by side
    for mode in ("overlapped", "before serving"):
        assert f"KV exchange {mode}  (" in text


def test_queued_requests_are_served_and_timed_from_the_drop(drop_run):
    _, r = drop_run
    queued = r["queued"]
    assert queued["count"] == 2 * 2
    assert 0 < queued["first_token_p50_s"] <= queued["first_token_max_s"]
    # they are done before the pipelined window, which holds decodes of the moved requests
    # only, as the solo one does
    assert r["queued_left_in_window"] == 0
    # overlapped: one micro-batch of the leader's own moved requests went out at the drop
    assert queued["sent_at_drop"] == (0 if r["exchange_mode"] == "before serving" else 1)
    if r["exchange_mode"] == "before serving":
        assert queued["steps_during_exchange"] == 0
        # nothing is served before the exchange is over
        assert queued["first_token_p50_s"] > r["all_in_s"]


def test_phase_times_are_positive_and_nest(drop_run):
    _, r = drop_run
    phases = r["phases_s"]
    assert list(phases) == ROWS
    assert all(v > 0 for values in phases.values() for v in values)
    assert len(phases["first pipelined step (leader)"]) == 1
    for m in range(2):
        parts = sum(phases[p][m] for p in ("handover", "free", "KV exchange"))
        assert phases["drop total"][m] >= parts
        # the layers are pulled back while the group serves, before the restore proper
        assert phases["restore total"][m] >= phases["restore: KV exchange"][m]
    # the leader served (or waited) until its own pull was done
    pull = r["pull"]
    assert pull["seconds"] >= phases["restore: pull layers"][0] > 0
    assert pull["steps"] >= 0 and 0 <= pull["waited_s"] <= pull["seconds"]


def test_exchange_and_raw_link_move_the_same_bytes(drop_run):
    _, r = drop_run
    exchange = r["exchange"]
    assert [e["rank"] for e in exchange] == [0, 1]
    for e in exchange:
        assert e["bytes_sent"] == e["raw_bytes_sent"] > 0  # the raw replay of the same chunks
        assert e["exchange_s"] > 0 and e["raw_s"] > 0
        assert e["gb_s"] == pytest.approx(e["bytes_sent"] / e["exchange_s"] / 1e9)
    assert sum(e["bytes_sent"] for e in exchange) == sum(e["bytes_received"] for e in exchange)
    assert r["exchange_vs_raw"] == pytest.approx(r["exchange_gb_s"] / r["raw_gb_s"])
    # the aggregate is timed from the last member in: within the slowest member's own time
    assert 0 < r["all_in_s"] <= max(e["exchange_s"] for e in exchange)
    assert r["exchange_gb_s"] == pytest.approx(
        sum(e["bytes_sent"] for e in exchange) / r["all_in_s"] / 1e9)
    # the exchange replayed between the raw rounds moves the drop's bytes once per round
    assert r["replay_bytes_sent"] == sum(e["bytes_sent"] for e in exchange)
    assert len(r["replay_rounds_s"]) == len(r["raw_rounds_s"]) and min(r["replay_rounds_s"]) > 0
    assert r["replay_vs_raw"] == pytest.approx(
        r["replay_bytes_sent"] / min(r["replay_rounds_s"]) / 1e9 / r["raw_gb_s"])
    assert min(r["raw_rounds_s"]) == pytest.approx(max(e["raw_s"] for e in exchange))
    assert all(e["exchange_cpu_s"] > 0 and e["raw_cpu_s"] > 0 for e in exchange)
    assert r["raw_vs_exchange_cpu"] == pytest.approx(
        sum(e["raw_cpu_s"] for e in exchange) / sum(e["exchange_cpu_s"] for e in exchange))


@pytest.mark.parametrize("size", [2, 3, 4])
def test_the_exchange_order_pairs_every_send_with_its_receive(size):
    """What the raw replay and ``move_kv`` both follow: round k sends to rank + k and receives
    from rank - k, and between any two members the receiver expects the sender's chunks in
    the sender's order (gloo matches them first in, first out)."""
    from kunserve.worker.group_layout import drop_layout
    from kunserve.worker.pipeline.kv_transfer import exchange_order

    tables = [{f"m{m}-{i}": list(range(3 * i, 3 * i + 3)) for i in range(2)}
              for m in range(size)]
    for layers in (8, 5):  # even (zero-copy) and uneven (local pieces too)
        pieces = drop_layout(layers, tables, [1 << 20] * size).pieces
        orders = [exchange_order(pieces, rank, size) for rank in range(size)]
        for rank, (outgoing, incoming) in enumerate(orders):
            sends = [p.dst for p in outgoing if p.dst != rank]
            assert sends == sorted(sends, key=lambda d: (d - rank) % size)
            assert [p.dst for p in outgoing if p.dst == rank] == [rank] * (len(outgoing)
                                                                       - len(sends))
            assert [p.src for p in incoming] == sorted((p.src for p in incoming),
                                                      key=lambda s: (rank - s) % size)
            for src in range(size):
                if src != rank:
                    assert ([p for p in orders[src][0] if p.dst == rank]
                            == [p for p in incoming if p.src == src])
        assert sum(len(out) for out, _ in orders) == len(pieces)


def test_gap_and_decode_figures_are_consistent(drop_run):
    _, r = drop_run
    gap = r["gap"]
    assert gap["requests"] == 4 and 0 <= gap["within_bound"] <= 4
    assert gap["worst"]["gap_s"] > 0 and gap["worst_restore_gap_s"] > 0
    assert gap["exchange_s"] == r["all_in_s"]
    assert gap["worst"]["bound_s"] > gap["exchange_s"]
    # every member reports how long it idled before the drop for want of tokens (the
    # output length keeps a solo window's worth for the wait at the commit)
    assert set(gap["stalled_s"]) == {"0", "1"} and min(gap["stalled_s"].values()) >= 0
    decode = r["decode"]
    for phase in ("solo", "pipelined"):
        row = decode[phase]
        assert row["tokens"] == 4 * 3  # every request, --steps tokens in each window
        assert row["tok_s"] == pytest.approx(row["tokens"] / row["seconds"])
        assert row["itl_ms"] > 0
    assert decode["tpot_ratio"] == pytest.approx(
        decode["pipelined"]["itl_ms"] / decode["solo"]["itl_ms"])
    assert r["every_request_complete"]
    assert r["kv_tokens"]["group"] > 2 * r["kv_tokens"]["solo_per_instance"]


def test_too_short_an_output_is_refused_before_spawning(capsys):
    assert main(["bench", "drop", "--model", "unused", "--output-len", "10",
                 "--steps", "4"]) == 2
    assert "--output-len must be at least" in capsys.readouterr().err


def test_repeated_runs_are_summed_up_by_median_and_range(tmp_path):
    """``--repeat 2``: two runs with fresh processes, both in the JSON; the summary's median,
    min and max are those of the runs' own figures."""
    import contextlib
    import io
    import statistics

    from kunserve.bench.drop import repeat_summary
    from kunserve.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "llama4", arch="llama", layers=4, hidden_size=64,
                            heads=4, kv_heads=2, intermediate_size=128, vocab_size=512, seed=3)
    out, text = tmp_path / "drop.json", io.StringIO()
    with contextlib.redirect_stdout(text):
        code = main(["bench", "drop", "--model", str(model), "--instances", "2",
                     "--requests-per-instance", "2", "--prompt-len", "12", "--output-len", "64",
                     "--steps", "3", "--queued-per-instance", "0", "--exchange", "before",
                     "--repeat", "2", "--json", str(out)])
    printed = text.getvalue()
    assert code == 0, printed
    runs = json.loads(out.read_text())
    assert len(runs) == 2 and all(r["every_request_complete"] for r in runs)
    assert "run 2 of 2" in printed
    assert "2 instances, KV exchange before serving: 2 runs" in printed
    assert printed.count("\ndrop bench: ") == 1  # the full tables: the last run's
    rows = {label: (values, median, low, high)
            for label, values, median, low, high in repeat_summary(runs)}
    ratios = [100 * r["exchange_vs_raw"] for r in runs]
    assert rows["exchange vs raw (%)"] == (ratios, statistics.median(ratios), min(ratios),
                                           max(ratios))
    gaps = [1e3 * r["gap"]["worst"]["gap_s"] for r in runs]
    assert rows["longest gap across the drop (ms)"][0] == gaps
    for label in rows:
        assert f"\n{label} " in printed, label
    assert "queued requests' first token, p50 (ms)" not in rows  # none queued: not measured


def test_repeat_below_one_is_refused(capsys):
    assert main(["bench", "drop", "--model", "unused", "--repeat", "0"]) == 2
    assert "--repeat must be >= 1" in capsys.readouterr().err


def test_requests_no_solo_instance_could_hold_are_refused_before_spawning(tmp_path, capsys):
    from kunserve.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "llama4", arch="llama", layers=4, hidden_size=64,
                            heads=4, kv_heads=2, intermediate_size=128, vocab_size=512, seed=3)
    assert main(["bench", "drop", "--model", str(model), "--instances", "2",
                 "--requests-per-instance", "64", "--prompt-len", "1024",
                 "--output-len", "1024", "--steps", "8"]) == 2
    err = capsys.readouterr().err
    assert "KV blocks per instance" in err and "lower --requests-per-instance" in err


@pytest.mark.parametrize("spare", [None, 5, 0], ids=["plenty", "five-tokens", "none"])
def test_a_member_serves_until_the_commit_or_says_how_long_it_idled(spare):
    """A member that finished its solo window first steps on until the last one has (the
    commit), as a worker serves until the commit reaches it; one whose requests have no
    tokens to spare for that stops and reports how long it idled (time its requests' gaps
    then include). A real store; the engine is a stand-in that yields one token per step."""
    import datetime
    import threading
    import time

    import torch.distributed as dist

    from kunserve.bench.drop import DropBenchSpec, _Member, tokens_kept
    from kunserve.worker.engine import RequestOutput

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    spec = DropBenchSpec("unused", 2, 1, 8, output_len=1000, steps=4, threads=1)
    member = _Member(spec, store.port, 0)
    keep = tokens_kept(spec)
    if spare is not None:  # tokens already out: ``spare`` left beyond what comes after
        member.tokens["r"] = [(0.0, "solo")] * (spec.output_len - keep - spare)

    class Engine:
        steps = 0

        def step(self):
            self.steps += 1
            time.sleep(0.002)
            return [RequestOutput("r", [7], "", False)]

    engine, wait_s = Engine(), 0.2
    other = threading.Timer(wait_s, lambda: store.add("window-done", 1))  # the slower member
    other.start()
    member.serve_until_commit(engine, {"r": [1, 2]})
    other.join()
    stalled = member.report["stalled_s"]
    if spare is None:  # 200 ms (or more, on a busy machine) of steps of 2 ms: never short
        assert engine.steps > 5 and stalled == 0
    elif spare:  # it stepped until its tokens ran short, then idled for the rest of the wait
        assert engine.steps == spare and 0.1 < stalled < 5
    else:
        assert engine.steps == 0 and 0.8 * wait_s < stalled < 5
