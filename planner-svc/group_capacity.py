"""How many tokens of KV cache a pipeline group of ``g`` alike instances holds: the estimate
the drop plan works with. Pure arithmetic (no torch, NATS, Redis).

Every instance has the same budget ``B``, activation reserve ``R`` and, solo, the whole
model's parameters ``P`` over ``L`` layers; a KV block of one layer takes ``b`` bytes (a solo
instance's ``kv_bytes / blocks_total / L``). Member ``r`` of a group of ``g`` holds
``l_r = LayerRange.for_stage(r, g, L).size`` layers and keeps about ``P·l_r/L`` parameter bytes
(the estimate: embedding and LM head count as if spread over the layers), so its budget holds

    blocks_r = (B − R − P·l_r/L) // (l_r · b)

blocks of its layers. The worker gives every member the group's block count, the smallest
``blocks_r``: the member with the most layers, ``ceil(L/g)``, bounds it. A group block holds
``block_size`` tokens of every layer, so the group holds ``min_r blocks_r · block_size``
tokens. With ``g`` dividing ``L`` that is ``(g·(B − R) − P) / (L·b)`` blocks: each merge of
two groups turns one model copy's parameters into KV. When it does not divide, a merge can
gain nothing (3 layers over 2 members, 5 over 4 at usual budgets); the worker refuses such a
group ("gains no KV cache"), and the plan does not make one.

Where its job ends: an estimate. The worker's own arithmetic (exact parameter bytes per stage,
its reserved range) decides, and refuses a group that would not gain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kunserve.protocol import InstanceLoad


@dataclass(frozen=True)
class GroupCapacity:
    num_layers: int
    budget_bytes: int
    reserve_bytes: int
    parameter_bytes: int  # the whole model's, as a solo instance holds it
    layer_block_bytes: int  # one KV block of one layer
    block_size: int  # tokens per block
    _tokens: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.layer_block_bytes < 1 or self.block_size < 1:
            raise ValueError(f"not a usable memory description: {self}")
        table = tuple(self._estimate(size) for size in range(self.num_layers + 1))
        object.__setattr__(self, "_tokens", table)

    @classmethod
    def from_solo_load(cls, load: InstanceLoad, num_layers: int) -> GroupCapacity | None:
        """The estimate for instances like this solo one; None when its load lacks the
        memory figures (an old or fake worker)."""
        known = (load.blocks_total, load.kv_bytes, load.budget_bytes, load.parameter_bytes)
        if num_layers < 1 or min(known) <= 0 or load.block_size <= 0:
            return None
        return cls(num_layers=num_layers, budget_bytes=load.budget_bytes,
                   reserve_bytes=load.reserve_bytes, parameter_bytes=load.parameter_bytes,
                   layer_block_bytes=max(1, load.kv_bytes // load.blocks_total // num_layers),
                   block_size=load.block_size)

    def tokens(self, size: int) -> int:
        """KV tokens a group of ``size`` members holds (0 when it cannot exist: more members
        than layers)."""
        return self._tokens[size] if 0 < size <= self.num_layers else 0

    def gain(self, size: int, part_sizes: list[int]) -> int:
        """Tokens a group of ``size`` members holds beyond the groups it is made of."""
        return self.tokens(size) - sum(self.tokens(s) for s in part_sizes)

    def _estimate(self, size: int) -> int:
        if size == 0:
            return 0
        layers = -(-self.num_layers // size)  # the member with the most layers bounds it
        kept = self.parameter_bytes * layers // self.num_layers
        free = self.budget_bytes - self.reserve_bytes - kept
        return max(0, free // (layers * self.layer_block_bytes)) * self.block_size
