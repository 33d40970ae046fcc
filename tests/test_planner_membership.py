"""Membership (pure): instances joining and leaving, and pipeline groups that break when a
member dies or falls back to solo, without touching instances a reconfiguration holds."""

from __future__ import annotations

import msgspec

from kunserve.planner.group_transitions import (
    begin_drop,
    begin_restore,
    commit_drop,
    stage_entries,
)
from kunserve.planner.membership import Membership, solo_instance
from kunserve.protocol import InstanceInfo, InstanceLoad, Topology

L = 6


def loads(*ids: str, **states: tuple[str, str]) -> dict[str, InstanceLoad]:
    """Live loads; ``states``: instance -> (state, group) its load reports (default solo)."""
    result = {}
    for i in ids:
        state, group = states.get(i, ("solo", i))
        result[i] = InstanceLoad(instance_id=i, state=state, group_id=group)
    return result


def grouped(*members: str, others: tuple[str, ...] = (), epoch: int = 10) -> Topology:
    """A topology at ``epoch`` + 2 where ``members`` form group g<epoch+1> (pipelined)."""
    solo = Topology(epoch=epoch, instances=[solo_instance(i, L)
                                            for i in sorted((*members, *others))])
    preparing = begin_drop(solo, list(members), L)
    return commit_drop(preparing, f"g{epoch + 1}", list(members), L)


# -- joining and leaving ---------------------------------------------------------------------


def test_new_instances_join_solo_with_every_layer_in_natural_order():
    topology = Membership(L).next_topology(Topology(), loads("worker-10", "worker-2"))
    assert topology.epoch == 1
    assert topology.instances == [
        InstanceInfo(instance_id="worker-2", state="solo", group_id="worker-2", stage=0,
                     layer_start=0, layer_end=6),
        InstanceInfo(instance_id="worker-10", state="solo", group_id="worker-10", stage=0,
                     layer_start=0, layer_end=6)]


def test_no_change_gives_none_and_leavers_bump_the_epoch():
    current = Topology(epoch=4, instances=[solo_instance("a", L), solo_instance("b", L)])
    membership = Membership(L)
    assert membership.next_topology(current, loads("b", "a")) is None
    after = membership.next_topology(current, loads("a"))
    assert after.epoch == 5 and [i.instance_id for i in after.instances] == ["a"]


def test_staying_pipelined_instances_keep_their_entries():
    current = grouped("a", "b")
    after = Membership(L).next_topology(current, loads("a", "b", "c"))
    assert after.epoch == current.epoch + 1
    assert after.instances == [*current.instances, solo_instance("c", L)]


# -- groups breaking -------------------------------------------------------------------------


def test_a_dead_member_breaks_its_group_and_the_survivors_go_solo():
    current = grouped("a", "b", "c", others=("d",))
    after = Membership(L).next_topology(current, loads("a", "c", "d"))  # b's key expired
    assert after.epoch == current.epoch + 1
    assert after.instances == [solo_instance(i, L) for i in ("a", "c", "d")]


def test_a_solo_load_right_after_the_commit_is_stale_not_a_fallback():
    """The load still written before the drop says solo; only a member that has said
    pipelined in this group and then says solo has fallen back."""
    current = grouped("a", "b")
    membership = Membership(L)
    assert membership.next_topology(current, loads("a", "b")) is None  # stale solo loads
    confirmed = loads("a", "b", a=("pipelined", "g11"), b=("pipelined", "g11"))
    assert membership.next_topology(current, confirmed) is None
    fell_back = loads("a", "b", a=("pipelined", "g11"))  # b's group broke: b serves solo
    after = membership.next_topology(current, fell_back)
    assert after.instances == [solo_instance("a", L), solo_instance("b", L)]


def test_a_pipelined_load_of_another_group_does_not_confirm_this_one():
    current = grouped("a", "b")
    membership = Membership(L)
    membership.next_topology(current, loads("a", "b", b=("pipelined", "g3")))
    assert membership.next_topology(current, loads("a", "b")) is None


def test_busy_instances_are_left_to_the_coordinator_even_when_dead():
    solo = Topology(epoch=3, instances=[solo_instance(i, L) for i in ("a", "b", "c")])
    preparing = begin_drop(solo, ["a", "b"], L)
    membership = Membership(L)
    # b died mid-prepare, c left: only c's entry goes; the coordinator publishes a and b
    after = membership.next_topology(preparing, loads("a"), busy={"a", "b"})
    assert after.instances == preparing.instances[:2]
    restoring = begin_restore(commit_drop(after, "g4", ["a", "b"], L), "g4")
    assert membership.next_topology(restoring, loads("a"), busy={"a", "b"}) is None


def test_a_transitional_entry_nobody_drives_becomes_solo():
    """A planner that stopped mid-reconfiguration left 'preparing' or 'restoring' behind."""
    preparing = begin_drop(Topology(epoch=1, instances=[solo_instance("a", L),
                                                         solo_instance("b", L)]), ["a", "b"], L)
    after = Membership(L).next_topology(preparing, loads("a", "b"))
    assert after.instances == [solo_instance("a", L), solo_instance("b", L)]
    restoring = Topology(epoch=9, instances=[msgspec.structs.replace(e, state="restoring")
                                             for e in stage_entries("g7", ["a", "b"], L)])
    after = Membership(L).next_topology(restoring, loads("a", "b"))
    assert after.instances == [solo_instance("a", L), solo_instance("b", L)]

