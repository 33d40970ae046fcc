"""Which slice of the model's layers one worker holds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerRange:
    """Decoder layers ``[start, end)`` of a model with ``num_layers`` layers.

    The first stage also holds the token embedding; the last stage the final norm and LM head.
    """

    start: int
    end: int
    num_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.num_layers:
            raise ValueError(
                f"layer range [{self.start}, {self.end}) is not inside [0, {self.num_layers})")

    @classmethod
    def full(cls, num_layers: int) -> LayerRange:
        return cls(0, num_layers, num_layers)

    @classmethod
    def for_stage(cls, rank: int, group_size: int, num_layers: int) -> LayerRange:
        """Stage ``rank`` of ``group_size`` stages: an even split, earlier stages take the
        remainder, so ``[r·L/g, (r+1)·L/g)`` when ``g`` divides ``L``."""
        if not 0 <= rank < group_size <= num_layers:
            raise ValueError(f"cannot split {num_layers} layers into {group_size} stages")
        base, extra = divmod(num_layers, group_size)
        start = rank * base + min(rank, extra)
        return cls(start, start + base + (1 if rank < extra else 0), num_layers)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_layers

    @property
    def size(self) -> int:
        return self.end - self.start

    def __contains__(self, layer: int) -> bool:
        return self.start <= layer < self.end
