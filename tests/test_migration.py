"""Live migration (the llumnix policy) between two real engines over a real gloo link (two
threads, one TCPStore): the source copies its requests' full blocks and decodes on, then stops
them only to send the blocks written since; every request's tokens, whichever engine produced
them, are exactly transformers' greedy tokens, and no block is left held on either side.
``test_worker_drop.py`` runs the same through NATS and worker processes."""

from __future__ import annotations

from collections import defaultdict

import pytest

from kunserve.worker.engine import EngineConfig, LLMEngine
from kunserve.worker.pipeline.migration import MigrationDestination, MigrationSource
from kunserve.worker.pipeline.stage_link import StageLinkError
from kunserve.worker.pipeline.stage_messages import MigrateAnswer
from kunserve.worker.sampling_params import SamplingParams
from tests.conftest import hf_greedy, make_prompts
from tests.test_stage_link import _pair

MAX_TOKENS = 24
BLOCK = 8  # small blocks: the prompts fill several before the copy


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


class Pair:
    """A source engine with three requests (``short`` finishes during the copy) and a
    destination engine serving one of its own, both a few steps in."""

    def __init__(self, model_dir: str, dest_seqs: int = 128,
                 dest_blocks: int | None = None) -> None:
        self.src = LLMEngine(EngineConfig(model=model_dir, block_size=BLOCK))
        budget = None
        if dest_blocks is not None:  # a budget whose KV cache holds that many blocks
            memory = self.src.memory
            budget = memory.parameter_bytes + memory.reserve_bytes + (
                dest_blocks * memory.block_bytes)
        self.dst = LLMEngine(EngineConfig(model=model_dir, block_size=BLOCK,
                                          max_num_seqs=dest_seqs, memory_per_instance=budget))
        prompts = make_prompts(4, vocab=500, lengths=[37, 20, 50, 9])
        self.prompts = dict(zip(["m0", "short", "m2", "own"], prompts, strict=True))
        self.max_tokens = {"m0": MAX_TOKENS, "short": 6, "m2": MAX_TOKENS, "own": MAX_TOKENS}
        self.tokens: defaultdict[str, list[int]] = defaultdict(list)
        self.last_from: dict[str, str] = {}
        for rid in ("m0", "short", "m2"):
            self.src.add_request(self.prompts[rid], greedy(self.max_tokens[rid]), rid)
        self.dst.add_request(self.prompts["own"], greedy(), "own")
        for _ in range(3):
            self.step("src")
            self.step("dst")

    def step(self, name: str) -> None:
        for out in getattr(self, name).step():
            assert out.error is None, out.error
            self.tokens[out.request_id] += out.new_token_ids
            self.last_from[out.request_id] = name

    def finish(self) -> None:
        while self.src.has_unfinished() or self.dst.has_unfinished():
            self.step("src")
            self.step("dst")

    def assert_exact(self, model_dir: str) -> None:
        for rid, prompt in self.prompts.items():
            assert self.tokens[rid] == hf_greedy(model_dir, prompt, self.max_tokens[rid]), rid
        for engine in (self.src, self.dst):  # nothing held for a migration is left behind
            assert engine.block_manager.usage().used == 0


def test_a_live_migration_copies_while_decoding_and_stops_only_for_the_rest(llama_dir):
    pair = Pair(llama_dir)
    seen = {}

    def source(link):
        migration = MigrationSource(pair.src, link, max_blocks=1000)
        seen["at_copy"] = {rid: len(pair.tokens[rid]) for rid in ("m0", "m2")}
        seen["tables_at_copy"] = {rid: len(pair.src.block_manager.block_table(rid))
                                  for rid in ("m0", "m2")}
        for _ in range(4):  # the copy is under way: the requests decode on ("short" ends)
            pair.step("src")
        seen["at_stop"] = {rid: len(pair.tokens[rid]) for rid in ("m0", "m2")}
        seen["tables_at_stop"] = {rid: len(pair.src.block_manager.block_table(rid))
                                  for rid in ("m0", "m2")}
        while not migration.done:  # copy what filled up meanwhile, then the final stop
            migration.wait()
            migration.advance(pair.src)
        assert not pair.src.has_unfinished()
        return migration

    def destination(link):
        migration = MigrationDestination(pair.dst, link)
        pair.step("dst")
        while not migration.done:  # reserve and write each copy, then take the requests
            migration.wait()
            migration.advance(pair.dst)
            pair.step("dst")
        return migration

    src, dst = _pair(source, destination)
    assert sorted(src.moved) == sorted(dst.moved) == ["m0", "m2"]  # "short" ended meanwhile
    assert all(seen["at_stop"][r] == seen["at_copy"][r] + 4 for r in ("m0", "m2"))
    # the copies carried every block of the moved requests that was full at the stop: a
    # second round the ones filled during the first (the 4 steps filled one each); the stop
    # only their last, partly filled blocks (a request whose blocks are all full sends none)
    full = {when: sum((len(pair.prompts[r]) + seen[when][r] - 1) // BLOCK for r in ("m0", "m2"))
            for when in ("at_copy", "at_stop")}
    assert full["at_stop"] == full["at_copy"] + 2 and src.copy_rounds == 2
    # each side counts for itself; "short" had its 2 full blocks copied before it ended
    assert src.stats.copied_blocks == dst.stats.copied_blocks == full["at_stop"] + 2
    assert src.stats.stop_blocks == dst.stats.stop_blocks == (
        sum(seen["tables_at_stop"].values()) - full["at_stop"])
    assert 1 <= src.stats.stop_blocks <= 2
    phases = src.stats.phases()
    assert phases["requests"] == 2 and phases["stop"] > 0 and phases["copy"] > 0
    # the destination holds exactly its own request's blocks and the moved ones
    used = pair.dst.block_manager.usage().used
    assert used == sum(len(pair.dst.block_manager.block_table(r)) for r in ("own", "m0", "m2"))
    pair.finish()
    assert pair.last_from["m0"] == pair.last_from["m2"] == "dst"
    assert pair.last_from["short"] == "src"
    pair.assert_exact(llama_dir)


def test_a_destination_with_no_room_refuses_and_the_source_serves_on(llama_dir):
    pair = Pair(llama_dir, dest_seqs=1)  # it runs "own": it may take no other request

    def source(link):
        migration = MigrationSource(pair.src, link, max_blocks=1000)
        pair.step("src")
        migration.wait()
        migration.advance(pair.src)
        assert migration.done and migration.moved == []
        return migration

    def destination(link):
        migration = MigrationDestination(pair.dst, link)
        migration.wait()
        migration.advance(pair.dst)
        assert migration.done
        return migration

    _pair(source, destination)
    assert pair.dst.block_manager.usage().used == len(
        pair.dst.block_manager.block_table("own"))
    pair.finish()
    assert pair.last_from["m0"] == "src"
    pair.assert_exact(llama_dir)


@pytest.mark.parametrize(("dest_blocks", "copied", "moved"), [
    (14, 0, []),  # no room for the copy and a block for its own request to grow: refused
    (15, 12, []),  # room for the copy, then not for the rest at the stop: refused there
    (None, 12, ["m0", "m2", "short"])])
def test_a_destination_refuses_what_would_leave_its_own_requests_no_block(
        llama_dir, dest_blocks, copied, moved):
    """The first copy needs 12 blocks (4 + 2 + 6 full ones) and the stop 3 more (each
    request's last block); the destination's own request holds 2 and keeps a free one to grow
    into. Refused at either stage, the requests stay with the source, nothing stays held."""
    pair = Pair(llama_dir, dest_blocks=dest_blocks)

    def run(migration, engine):
        while not migration.done:
            migration.wait()
            migration.advance(engine)
        return migration

    src, dst = _pair(lambda link: run(MigrationSource(pair.src, link, 1000), pair.src),
                     lambda link: run(MigrationDestination(pair.dst, link), pair.dst))
    assert sorted(src.moved) == sorted(dst.moved) == moved
    assert src.stats.copied_blocks == 12 and dst.stats.copied_blocks == copied  # sent, taken
    pair.finish()
    pair.assert_exact(llama_dir)


def _source_that_gets_no_answer(pair: Pair):
    """The source's side of a migration whose final answer never comes: it copies, stops
    the requests (they leave its engine), finds the link broken and takes them back."""
    def source(link):
        migration = MigrationSource(pair.src, link, max_blocks=1000)
        migration.wait()
        migration.advance(pair.src)  # stopped: the requests left this engine
        assert not pair.src.has_unfinished()
        with pytest.raises(StageLinkError):
            migration.wait()
        migration.abort(pair.src)
        return migration

    return source


def _assert_the_source_finished_them(pair: Pair, llama_dir: str) -> None:
    """The moved requests are back on the source, which alone serves them, token-exact."""
    assert sorted(pair.src.scheduler.requests) == ["m0", "m2", "short"]
    pair.finish()
    assert {pair.last_from[r] for r in ("m0", "m2", "short")} == {"src"}
    pair.assert_exact(llama_dir)


def _destination_at_the_stop(pair: Pair, link) -> MigrationDestination:
    """The destination once it accepted the copy and received the final stop's requests
    (not taken yet: its next ``advance`` would)."""
    migration = MigrationDestination(pair.dst, link)
    migration.wait()
    migration.advance(pair.dst)
    migration.wait()
    return migration


def test_a_link_lost_after_the_stop_gives_the_requests_back_to_the_source(llama_dir):
    """The destination receives the final stop's requests but goes away before it answers:
    the source takes them back with the KV it held and finishes them, none lost."""
    pair = Pair(llama_dir)
    source = _source_that_gets_no_answer(pair)

    def destination(link):
        migration = _destination_at_the_stop(pair, link)  # it never takes them
        migration.abort(pair.dst)
        link.close()
        return migration

    _pair(source, destination)
    _assert_the_source_finished_them(pair, llama_dir)


def test_a_destination_that_cannot_answer_drops_what_it_took(llama_dir):
    """The destination adopts the stopped requests but its answer cannot go out: it drops
    them before any step runs them, the source takes them back; each request is served by
    exactly one engine, to the last token."""
    pair = Pair(llama_dir)
    source = _source_that_gets_no_answer(pair)

    def destination(link):
        migration = _destination_at_the_stop(pair, link)
        send = link.send_message

        def broken(message, dst, tensor=None):
            if isinstance(message, MigrateAnswer):
                link.close()
                raise StageLinkError("the link broke")
            return send(message, dst, tensor)

        link.send_message = broken
        with pytest.raises(StageLinkError):
            migration.advance(pair.dst)  # takes them, cannot answer, drops them
        assert migration.moved == [] and sorted(pair.dst.scheduler.requests) == ["own"]
        return migration

    _pair(source, destination)
    _assert_the_source_finished_them(pair, llama_dir)
