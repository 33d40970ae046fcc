"""The drop plan: which groups to merge so that the freed parameter memory covers the KV
demand that does not fit (the KunServe paper's greedy, Fig. 6). Pure (no NATS, no Redis).

    queue = the groups by size (smallest first; equal sizes: the neediest first)
    while the merges so far gain fewer tokens than needed and two groups are left:
        merge the two smallest            # one model copy's parameters become KV
        if that gains nothing (an uneven layer split, ``group_capacity.py``), absorb the next
        smallest too, until it gains or would have more members than layers
        no gaining merge left: stop, the plan falls short (``shortfall_tokens``)
        else push the merged group back

A merge is made only while the demand is not yet covered, so the last merge is always one the
demand needed, and a topology that already suffices (``need_tokens <= 0``) gets no change.
Every group keeps exactly one copy of the layers: its members split them by
``LayerRange.for_stage``, which the group never outgrows (at most one member per layer).
O(N log N) for N groups.

Where its job ends: the plan. Which groups are offered (the planner offers solo instances
only: the two-phase protocol merges solo instances, it does not re-form a group) and running
it are the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter

from kunserve.planner.group_capacity import GroupCapacity

# a queue entry: (size, -deficit, seq, members); seq orders equal deficits, says which are new
_Entry = tuple[int, int, int, tuple[str, ...]]


@dataclass(frozen=True)
class PlanGroup:
    """A group the plan may merge: its members (stage order) and the demand in tokens its
    capacity does not cover (equal sizes merge neediest first)."""

    members: tuple[str, ...]
    deficit_tokens: int = 0


@dataclass(frozen=True)
class DropPlan:
    need_tokens: int  # demand the topology does not hold, in KV tokens
    gain_tokens: int  # what the merges add (the estimate)
    new_groups: tuple[tuple[str, ...], ...]  # the groups to form: one drop each
    merges: int  # greedy steps taken
    last_gain_tokens: int = 0  # what the last step added (it was needed: gain - this < need)
    _entries: tuple[_Entry, ...] = field(default=(), repr=False, compare=False)

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """Every group after the plan: the untouched ones in the order given, new ones last
        (ordered when asked for, not on the planner's path)."""
        return tuple(entry[3] for entry in sorted(self._entries, key=itemgetter(2)))

    @property
    def shortfall_tokens(self) -> int:
        return max(0, self.need_tokens - self.gain_tokens)

    @property
    def sufficient(self) -> bool:
        return self.shortfall_tokens == 0


def plan_drop(groups: Sequence[PlanGroup], need_tokens: int,
              capacity: GroupCapacity) -> DropPlan:
    """Merge ``groups`` greedily until the merges gain ``need_tokens`` (module docstring)."""
    queue = _SizeQueue(groups, capacity.num_layers)
    gain = merges = last = 0
    while gain < need_tokens and queue.count >= 2:
        step = queue.merge_pairs(capacity, need_tokens - gain) or queue.merge_smallest(capacity)
        if step is None:
            break
        steps, delta = step
        gain += steps * delta
        merges += steps
        last = delta
    entries = queue.entries()
    new = [entry for entry in entries if entry[2] >= len(groups)]
    new.sort(key=itemgetter(2))
    return DropPlan(need_tokens=need_tokens, gain_tokens=gain,
                    new_groups=tuple(entry[3] for entry in new), merges=merges,
                    last_gain_tokens=last, _entries=tuple(entries))


class _SizeQueue:
    """The greedy's priority queue, as one list per group size (sizes are at most the layer
    count): the smallest group is the head of the smallest non-empty size. Equal-size groups
    pair off in bulk, so 1,024 instances plan in well under a millisecond."""

    def __init__(self, groups: Sequence[PlanGroup], num_layers: int) -> None:
        # one integer key per group (size first, then the neediest; a stable sort keeps the
        # given order among equals): far cheaper to sort than the entries themselves
        needs = [-g.deficit_tokens for g in groups]
        span = 2 * max(map(abs, needs), default=0) + 1
        keys = [len(g.members) * span + need for g, need in zip(groups, needs, strict=True)]
        keyed = [(len(groups[seq].members), needs[seq], seq, groups[seq].members)
                 for seq in sorted(range(len(groups)), key=keys.__getitem__)]
        if keyed and not (0 < keyed[0][0] and keyed[-1][0] <= num_layers):
            raise ValueError(f"groups of {keyed[0][0]} to {keyed[-1][0]} members cannot hold "
                             f"{num_layers} layers, one member per layer at most")
        self.buckets: list[list[_Entry]] = [[] for _ in range(num_layers + 1)]
        for size, run in groupby(keyed, key=itemgetter(0)):
            self.buckets[size] = list(run)
        self._unsorted: set[int] = set()
        self.count = len(groups)
        self.seq = len(groups)

    def entries(self) -> list[_Entry]:
        return [entry for bucket in self.buckets for entry in bucket]

    def merge_pairs(self, capacity: GroupCapacity, need: int) -> tuple[int, int] | None:
        """Pair off the groups of the smallest size, if such a pair gains: as many pairs as
        the need takes (each gains the same). The pairs made and each one's gain."""
        size, bucket = self._smallest()
        delta = capacity.tokens(2 * size) - 2 * capacity.tokens(size)
        if len(bucket) < 2 or delta <= 0:
            return None
        pairs = min(len(bucket) // 2, -(-need // delta))
        taken = bucket[:2 * pairs]
        del bucket[:2 * pairs]
        # what a merged group still lacks orders it among its size (negative: lacks nothing)
        merged = [(2 * size, a[1] + b[1] + delta, seq, a[3] + b[3])
                  for seq, a, b in zip(range(self.seq, self.seq + pairs), taken[::2],
                                       taken[1::2], strict=True)]
        self.seq += pairs
        self.buckets[2 * size].extend(merged)
        self._unsorted.add(2 * size)
        self.count -= pairs
        return pairs, delta

    def merge_smallest(self, capacity: GroupCapacity) -> tuple[int, int] | None:
        """One step: the two smallest groups, and the next smallest while that gains nothing
        (an uneven split); (1, its gain), or None (the queue as it was) when no merge within
        the layer count gains."""
        parts = [self._pop()]
        size, held = parts[0][0], capacity.tokens(parts[0][0])
        while self.count > 0:
            parts.append(self._pop())
            size += parts[-1][0]
            held += capacity.tokens(parts[-1][0])
            if size > capacity.num_layers:
                break
            delta = capacity.tokens(size) - held
            if delta > 0:
                members = tuple(m for part in parts for m in part[3])
                deficit = sum(part[1] for part in parts) + delta
                self._add([(size, deficit, self.seq, members)])
                self.seq += 1
                self.count += 1
                return 1, delta
        self._add(parts)
        self.count += len(parts)
        return None

    def _smallest(self) -> tuple[int, list[_Entry]]:
        size = next(s for s, bucket in enumerate(self.buckets) if bucket)
        if size in self._unsorted:
            self.buckets[size].sort()
            self._unsorted.discard(size)
        return size, self.buckets[size]

    def _pop(self) -> _Entry:
        self.count -= 1
        return self._smallest()[1].pop(0)

    def _add(self, entries: list[_Entry]) -> None:
        for entry in entries:
            self.buckets[entry[0]].append(entry)
            self._unsorted.add(entry[0])
