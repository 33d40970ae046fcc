"""The drop plan (the paper's greedy) and the group capacity estimate it works with (pure):
examples, the estimate against the worker's own arithmetic, and properties over random
clusters (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kunserve.planner.drop_plan import PlanGroup, plan_drop
from kunserve.planner.group_capacity import GroupCapacity
from kunserve.protocol import InstanceLoad
from kunserve.worker.layer_range import LayerRange

KIB = 1024


def capacity(num_layers: int = 4, parameter_bytes: int = 854 * KIB, kv_bytes: int = 384 * KIB,
             reserve_bytes: int = 6 * KIB * KIB, layer_block_bytes: int = 4 * KIB,
             block_size: int = 16) -> GroupCapacity:
    """Alike instances whose budget holds the parameters, the reserve and ``kv_bytes``."""
    return GroupCapacity(num_layers=num_layers,
                         budget_bytes=parameter_bytes + reserve_bytes + kv_bytes,
                         reserve_bytes=reserve_bytes, parameter_bytes=parameter_bytes,
                         layer_block_bytes=layer_block_bytes, block_size=block_size)


def solo(*ids: str, deficits: dict[str, int] | None = None) -> list[PlanGroup]:
    deficits = deficits or {}
    return [PlanGroup((i,), deficits.get(i, 0)) for i in ids]


# -- the estimate ------------------------------------------------------------------------------


def test_a_solo_instance_holds_what_its_load_says():
    load = InstanceLoad(instance_id="w0", blocks_total=24, block_size=16, kv_bytes=24 * 16 * KIB,
                        budget_bytes=854 * KIB + 6 * KIB * KIB + 24 * 16 * KIB,
                        reserve_bytes=6 * KIB * KIB, parameter_bytes=854 * KIB)
    estimate = GroupCapacity.from_solo_load(load, num_layers=4)
    assert estimate.tokens(1) == 24 * 16
    assert GroupCapacity.from_solo_load(InstanceLoad(instance_id="old", blocks_total=8), 4) is None


def test_each_even_merge_turns_one_model_copy_into_kv():
    estimate = capacity()
    per_token = 4 * estimate.layer_block_bytes // estimate.block_size  # whole model, bytes
    copy = estimate.parameter_bytes // per_token
    assert abs(estimate.gain(2, [1, 1]) - copy) <= estimate.block_size
    assert abs(estimate.gain(4, [2, 2]) - copy) <= estimate.block_size
    assert estimate.tokens(5) == 0  # more members than layers: no such group


@pytest.mark.parametrize(("num_layers", "size"), [(3, 2), (5, 4)])
def test_an_uneven_split_at_usual_budgets_gains_nothing(num_layers, size):
    """Parameters 40% of the budget: the member holding the extra layer bounds the group below
    what its members hold solo (the worker refuses such a group: 'gains no KV cache')."""
    estimate = GroupCapacity(num_layers=num_layers, budget_bytes=10 * num_layers * KIB * KIB,
                             reserve_bytes=0, parameter_bytes=4 * num_layers * KIB * KIB,
                             layer_block_bytes=4 * KIB, block_size=16)
    assert estimate.gain(size, [1] * size) <= 0


@pytest.mark.parametrize(("num_layers", "kv_kib"), [(4, 384), (5, 384), (4, 96), (3, 256)])
def test_the_estimate_agrees_with_the_worker_on_which_groups_gain(tmp_path, num_layers, kv_kib):
    """The worker's own arithmetic (exact parameter bytes per stage, ``plan_memory``) against
    the estimate, for every group size of a tiny model at a small budget."""
    import torch

    from kunserve.tiny_model import make_tiny_model
    from kunserve.worker.instance_memory import model_parameter_bytes
    from kunserve.worker.memory_budget import KVGeometry, plan_memory
    from kunserve.worker.model.llama import LlamaStage
    from kunserve.worker.model_config import ModelConfig

    model_dir = make_tiny_model(tmp_path / "m", layers=num_layers, hidden_size=64, heads=4,
                                kv_heads=2, intermediate_size=128, vocab_size=512)
    model = ModelConfig.from_dir(str(model_dir))
    whole, reserve = model_parameter_bytes(model, "float32"), 6 * KIB * KIB
    budget = whole + reserve + kv_kib * KIB

    def geometry(layers: int) -> KVGeometry:
        return KVGeometry(layers, 16, model.num_kv_heads, model.head_dim, 4)

    solo_plan = plan_memory(budget, whole, reserve, geometry(num_layers))
    load = InstanceLoad(instance_id="w", blocks_total=solo_plan.num_blocks, block_size=16,
                        kv_bytes=solo_plan.kv_bytes, budget_bytes=budget, reserve_bytes=reserve,
                        parameter_bytes=whole)
    estimate = GroupCapacity.from_solo_load(load, num_layers)
    for size in range(2, num_layers + 1):
        blocks = []
        for rank in range(size):
            layers = LayerRange.for_stage(rank, size, num_layers)
            with torch.device("meta"):
                kept = LlamaStage(model, layers, torch.float32).parameter_bytes()
            blocks.append(plan_memory(budget, kept, reserve, geometry(layers.size)).num_blocks)
        worker_gains = min(blocks) > size * solo_plan.num_blocks  # its DropRefused rule
        assert (estimate.gain(size, [1] * size) > 0) == worker_gains, (size, blocks)


# -- the plan ----------------------------------------------------------------------------------


def test_a_topology_that_already_suffices_is_left_alone():
    plan = plan_drop(solo("w0", "w1", "w2"), 0, capacity())
    assert plan.merges == 0 and plan.new_groups == ()
    assert plan.groups == (("w0",), ("w1",), ("w2",))
    assert plan.sufficient


def test_the_neediest_pair_merges_first_and_only_as_far_as_needed():
    estimate = capacity()
    pair = estimate.gain(2, [1, 1])
    groups = solo("w0", "w1", "w2", "w3", deficits={"w1": 300, "w3": 200})
    one = plan_drop(groups, pair - 1, estimate)
    assert one.new_groups == (("w1", "w3"),) and one.merges == 1
    assert one.groups == (("w0",), ("w2",), ("w1", "w3"))
    two = plan_drop(groups, pair + 1, estimate)
    assert two.new_groups == (("w1", "w3"), ("w0", "w2"))
    four = plan_drop(groups, 2 * pair + 1, estimate)
    assert four.new_groups == (("w1", "w3", "w0", "w2"),) and four.sufficient


def test_a_plan_that_cannot_cover_the_need_merges_as_far_as_it_helps_and_says_so():
    estimate = capacity()
    plan = plan_drop(solo("w0", "w1", "w2", "w3"), 10**9, estimate)
    assert plan.new_groups == (("w0", "w1", "w2", "w3"),)
    assert plan.gain_tokens == estimate.tokens(4) - 4 * estimate.tokens(1)
    assert not plan.sufficient
    assert plan.shortfall_tokens == 10**9 - plan.gain_tokens


def test_when_a_pair_gains_nothing_a_third_member_is_taken_in():
    """3 layers at parameters 40% of the budget: 2 members gain nothing, 3 do."""
    estimate = GroupCapacity(num_layers=3, budget_bytes=30 * KIB * KIB, reserve_bytes=0,
                             parameter_bytes=12 * KIB * KIB, layer_block_bytes=4 * KIB,
                             block_size=16)
    plan = plan_drop(solo("w0", "w1", "w2", "w3"), 1, estimate)
    assert plan.new_groups == (("w0", "w1", "w2"),)
    none = plan_drop(solo("w0", "w1"), 1, estimate)
    assert none.merges == 0 and none.shortfall_tokens == 1


def test_a_group_larger_than_the_layer_count_is_refused():
    with pytest.raises(ValueError, match="one member per layer"):
        plan_drop([PlanGroup(("a", "b", "c", "d", "e"))], 1, capacity(num_layers=4))


# -- properties ----------------------------------------------------------------------------------


@st.composite
def clusters(draw):
    """A capacity estimate and the groups of a cluster (mostly solo, some already grouped),
    with random deficits, and a need."""
    num_layers = draw(st.integers(1, 12))
    parameter_kib = draw(st.integers(64, 4096))
    estimate = capacity(num_layers=num_layers, parameter_bytes=parameter_kib * KIB,
                        kv_bytes=draw(st.integers(16, 8192)) * KIB,
                        reserve_bytes=draw(st.integers(0, 2048)) * KIB,
                        layer_block_bytes=draw(st.sampled_from([1, 4, 16])) * KIB)
    sizes = draw(st.lists(st.one_of(st.just(1), st.integers(1, num_layers)), max_size=40))
    groups, n = [], 0
    for size in sizes:
        groups.append(PlanGroup(tuple(f"w{n + i}" for i in range(size)),
                                draw(st.integers(0, 5000))))
        n += size
    need = draw(st.integers(-1000, 4 * estimate.tokens(1) * max(1, len(groups))))
    return estimate, groups, need


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_plan_properties(cluster):
    estimate, groups, need = cluster
    plan = plan_drop(groups, need, estimate)
    size_of = {m: len(g.members) for g in groups for m in g.members}
    origin = {m: g.members for g in groups for m in g.members}

    # every instance stays, in exactly one group
    assert sorted(m for g in plan.groups for m in g) == sorted(size_of)
    # every group holds exactly one complete copy of the layers
    for group in plan.groups:
        assert len(group) <= estimate.num_layers
        ranges = [LayerRange.for_stage(r, len(group), estimate.num_layers)
                  for r in range(len(group))]
        assert [layer for r in ranges for layer in range(r.start, r.end)] == list(
            range(estimate.num_layers))
    # every new group gains over the groups it was made of, and the gains add up
    total = 0
    for group in plan.new_groups:
        parts = {origin[m] for m in group}
        assert len(parts) >= 2
        gain = estimate.tokens(len(group)) - sum(estimate.tokens(len(p)) for p in parts)
        assert gain > 0
        total += gain
    assert total == plan.gain_tokens
    # no merge the demand did not need; a sufficient topology is left alone
    if need <= 0:
        assert plan.merges == 0 and plan.groups == tuple(g.members for g in groups)
    if plan.merges:
        assert plan.gain_tokens - plan.last_gain_tokens < need
    # falling short: no merge that helps is left
    if not plan.sufficient:
        again = plan_drop([PlanGroup(g) for g in plan.groups], plan.shortfall_tokens, estimate)
        assert again.merges == 0
