"""The caching allocator's granularity and the Phase/StepModel containers every rule fills."""

from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.categories import ALLOCATED, Category
from vramplan.memory.types import LayerPoint, MeasuredPhase, PhaseKind

MiB = 2**20
BLOCK = 512  # torch's CUDA caching allocator rounds every allocation up to 512 B


def alloc(n: float) -> int:
    """Bytes of one allocation of n bytes: rounded up to the allocator's 512 B blocks."""
    n = int(n)
    return -(-n // BLOCK) * BLOCK


@dataclass
class Phase:
    """What is alive at one modelled moment of the step, by category. Its display name
    is derived from its kind (and, for a layer's backward, the layer and the point)."""

    kind: PhaseKind
    layer: int | None = None
    point: LayerPoint | None = None
    parts: dict[Category, int] = field(default_factory=dict)

    def add(self, cat: Category, nbytes: float) -> Phase:
        self.parts[cat] = self.parts.get(cat, 0) + int(nbytes)
        return self

    @property
    def name(self) -> str:
        if self.kind is PhaseKind.LAYER_BACKWARD:
            return self.kind.label.format(layer=self.layer, point=self.point.value if self.point else "")
        return self.kind.label

    @property
    def measured(self) -> MeasuredPhase:
        """The measured phase this moment falls in (verify's probes, the CPU trace)."""
        return self.kind.measured

    @property
    def allocated(self) -> int:
        return sum(v for c, v in self.parts.items() if c in ALLOCATED)


@dataclass
class StepModel:
    phases: list[Phase]
    host_pinned: int
    notes: list[str]

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.allocated)
