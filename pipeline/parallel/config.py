"""Sequence-parallel degrees: one frozen, validated dataclass.

Degrees are checked where they are declared (positive integers here; the head count in
`check`, the world size when the process groups are made), so a bad value fails before any
model work and the error names the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import InvalidRequest


@dataclass(frozen=True)
class ParallelConfig:
    """How the video tokens of one sample are split over ranks.

    Args:
        ulysses_degree: ranks that exchange heads for tokens with all-to-all (DeepSpeed-Ulysses);
            must divide the attention head count. Consecutive ranks form a Ulysses group.
        ring_degree: ranks that pass key/value chunks round a ring (ring attention); any value.
            Ulysses runs inside, the ring across: world size = ulysses_degree * ring_degree.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1

    def __post_init__(self) -> None:
        for name in ("ulysses_degree", "ring_degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(name, value, "expected a positive integer")

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def check(self, num_heads: int) -> None:
        """Raise if Ulysses cannot split `num_heads` attention heads evenly."""
        if num_heads % self.ulysses_degree:
            raise InvalidRequest("ulysses_degree", self.ulysses_degree,
                                 f"must divide the attention head count ({num_heads})")

    def check_world(self, world_size: int) -> None:
        """Raise if the degrees do not multiply to the number of ranks."""
        if self.world_size != world_size:
            raise InvalidRequest("ulysses_degree * ring_degree", f"{self.ulysses_degree} * {self.ring_degree}",
                                 f"must equal the world size ({world_size})")
