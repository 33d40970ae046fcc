"""Group lifecycle transitions and the checks a drop or restore request passes before it
starts (pure)."""

from __future__ import annotations

import pytest

from kunserve.planner.group_transitions import (
    IllegalTransition,
    back_to_solo,
    begin_drop,
    begin_restore,
    commit_drop,
    members_of,
    stage_entries,
)
from kunserve.planner.membership import solo_instance
from kunserve.planner.reconfigure_validation import (
    ReconfigureRejected,
    drop_members,
    restore_members,
)
from kunserve.protocol import InstanceInfo, Topology, decode, encode

L = 7


def solo_topology(*ids: str, epoch: int = 4) -> Topology:
    return Topology(epoch=epoch, instances=[solo_instance(i, L) for i in ids])


def layers(topology: Topology) -> dict[str, tuple[str, str, int, int, int]]:
    return {i.instance_id: (i.state, i.group_id, i.stage, i.layer_start, i.layer_end)
            for i in topology.instances}


# -- transitions -----------------------------------------------------------------------------


@pytest.mark.parametrize(("group_size", "num_layers", "ranges"), [
    (2, 6, [(0, 3), (3, 6)]),
    (3, 7, [(0, 3), (3, 5), (5, 7)]),  # not divisible: earlier stages take the remainder
    (4, 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
])
def test_stages_split_the_layers_evenly_and_cover_them_once(group_size, num_layers, ranges):
    members = [f"w{r}" for r in range(group_size)]
    entries = stage_entries("g1", members, num_layers)
    assert [(e.layer_start, e.layer_end) for e in entries] == ranges
    assert [e.stage for e in entries] == list(range(group_size))
    assert {e.state for e in entries} == {"pipelined"} and {e.group_id for e in entries} == {"g1"}


def test_a_drop_and_its_restore_bump_the_epoch_at_every_step_and_touch_only_members():
    topology = solo_topology("a", "b", "c", epoch=4)
    preparing = begin_drop(topology, ["c", "a"], L)
    assert preparing.epoch == 5
    assert layers(preparing) == {"a": ("preparing", "g5", 0, 0, 7), "b": ("solo", "b", 0, 0, 7),
                                 "c": ("preparing", "g5", 0, 0, 7)}
    pipelined = commit_drop(preparing, "g5", ["c", "a"], L)  # c leads: stage 0
    assert pipelined.epoch == 6
    assert layers(pipelined) == {"a": ("pipelined", "g5", 1, 4, 7), "b": ("solo", "b", 0, 0, 7),
                                 "c": ("pipelined", "g5", 0, 0, 4)}
    assert members_of(pipelined, "g5") == ["c", "a"]
    restoring = begin_restore(pipelined, "g5")
    assert restoring.epoch == 7
    assert layers(restoring)["a"] == ("restoring", "g5", 1, 4, 7)  # still holds its stage
    restored = back_to_solo(restoring, ["c", "a"], L)
    assert restored.epoch == 8 and restored.instances == topology.instances


def test_an_abort_returns_preparing_members_to_solo():
    topology = solo_topology("a", "b")
    aborted = back_to_solo(begin_drop(topology, ["a", "b"], L), ["a", "b"], L)
    assert aborted.epoch == topology.epoch + 2 and aborted.instances == topology.instances


def test_transitions_the_lifecycle_lacks_are_refused():
    topology = solo_topology("a", "b")
    with pytest.raises(IllegalTransition, match="a: solo -> pipelined"):
        commit_drop(topology, "g9", ["a", "b"], L)
    with pytest.raises(IllegalTransition, match="preparing -> restoring"):
        begin_restore(begin_drop(topology, ["a", "b"], L), "g5")
    with pytest.raises(IllegalTransition, match="solo -> solo"):
        back_to_solo(topology, ["a"], L)


def test_a_member_that_left_meanwhile_is_not_added_back():
    preparing = begin_drop(solo_topology("a", "b", "c"), ["a", "b"], L)
    without_b = Topology(epoch=preparing.epoch + 1,
                         instances=[i for i in preparing.instances if i.instance_id != "b"])
    after = back_to_solo(without_b, ["a", "b"], L)
    assert [i.instance_id for i in after.instances] == ["a", "c"]


# -- drop requests ---------------------------------------------------------------------------


def rejected(call, *args) -> tuple[int, str]:
    with pytest.raises(ReconfigureRejected) as info:
        call(*args)
    return info.value.status, info.value.message


def test_a_drop_keeps_the_requested_order_and_empty_means_every_free_solo_instance():
    topology = commit_drop(begin_drop(solo_topology("a", "b", "c", "d", "e"), ["d", "e"], L),
                           "g5", ["d", "e"], L)
    assert drop_members(["c", "a"], topology, set(), L) == ["c", "a"]
    assert drop_members([], topology, set(), L) == ["a", "b", "c"]
    assert drop_members([], topology, {"b"}, L) == ["a", "c"]


def test_drop_requests_that_cannot_work_are_400():
    topology = solo_topology("a", "b", "c")
    assert rejected(drop_members, ["a", "x", "y"], topology, set(), L) == \
        (400, "unknown or not live instances: x, y")
    assert rejected(drop_members, ["a", "b", "a"], topology, set(), L) == \
        (400, "instances listed twice: a")
    assert rejected(drop_members, ["a"], topology, set(), L) == \
        (400, "a drop needs at least 2 instances, got 1")
    assert rejected(drop_members, [], solo_topology("a"), set(), L) == \
        (400, "a drop needs at least 2 live solo instances, got 1")
    assert rejected(drop_members, [], solo_topology(), set(), L) == \
        (400, "a drop needs at least 2 live solo instances, got 0")
    status, message = rejected(drop_members, ["a", "b", "c"], topology, set(), 2)
    assert status == 400 and "cannot split the model's 2 layers over 3 instances" in message


def test_drop_requests_that_conflict_with_other_reconfigurations_are_409():
    topology = begin_drop(solo_topology("a", "b", "c", "d"), ["a", "b"], L)
    assert rejected(drop_members, ["c", "b"], topology, {"a", "b"}, L) == \
        (409, "instance b is being reconfigured")
    pipelined = commit_drop(topology, "g5", ["a", "b"], L)
    assert rejected(drop_members, ["c", "a"], pipelined, set(), L) == \
        (409, "instance a is already in group g5 (pipelined)")
    # every instance but one in a group: an empty drop can succeed once the group is restored
    assert rejected(drop_members, [], pipelined, {"d"}, L) == \
        (409, "a drop needs at least 2 live solo instances, got 1 (of 4 live: the others are "
              "in groups or being reconfigured)")


def test_each_conflict_says_which_in_its_code():
    topology = begin_drop(solo_topology("a", "b", "c"), ["a", "b"], L)
    pipelined = commit_drop(topology, "g5", ["a", "b"], L)
    cases = [(drop_members, ["c", "b"], topology, {"a", "b"}, L),
             (drop_members, ["c", "a"], pipelined, set(), L),
             (drop_members, [], pipelined, set(), L),
             (restore_members, "g5", pipelined, {"a"})]
    codes = []
    for call, *args in cases:
        with pytest.raises(ReconfigureRejected) as info:
            call(*args)
        codes.append(info.value.code)
    assert codes == ["reconfiguration_in_progress", "instance_in_group",
                     "not_enough_solo_instances", "reconfiguration_in_progress"]


# -- restore requests ------------------------------------------------------------------------


def test_a_restore_takes_a_pipelined_group_in_stage_order():
    topology = commit_drop(begin_drop(solo_topology("a", "b", "c"), ["c", "a"], L), "g5",
                           ["c", "a"], L)
    assert restore_members("g5", topology, set()) == ["c", "a"]
    assert rejected(restore_members, "g5", topology, {"a"}) == \
        (409, "group g5 is being reconfigured (pipelined)")
    assert rejected(restore_members, "g5", begin_restore(topology, "g5"), set()) == \
        (409, "group g5 is being reconfigured (restoring)")


def test_restoring_an_unknown_or_solo_group_is_400():
    topology = solo_topology("a", "b")
    assert rejected(restore_members, "g3", topology, set()) == \
        (400, "unknown group g3: no pipelined group has that id")
    assert rejected(restore_members, "a", topology, set())[0] == 400  # a solo instance's group
    assert rejected(restore_members, "", topology, set()) == (400, "a restore needs a group")


def test_an_entry_is_plain_wire_data():
    """States are written as plain strings: what the router and gateway read back."""
    topology = commit_drop(begin_drop(solo_topology("a", "b"), ["a", "b"], L), "g5", ["a", "b"], L)
    assert decode(encode(topology), Topology) == topology
    assert b'"state":"pipelined"' in encode(topology.instances[0])
    assert isinstance(topology.instances[0], InstanceInfo)
