"""What the compiler did with each attention region, in a form users can read."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RegionReport:
    output: str                       # the graph node the region ends at (the ·V product)
    fused: bool
    reason: str | None = None         # why not fused
    kernel_source: str | None = None
    matched: dict = field(default_factory=dict)
    backward_fused: bool | None = None   # training graphs: was a fused backward generated
    backward_reason: str | None = None   # why not
    backward_source: str | None = None


    def __str__(self):
        head = f"region ending at {self.output}: " + ("FUSED" if self.fused else f"not fused — {self.reason}")
        lines = [head] + [f"    {k}: {v}" for k, v in self.matched.items()]
        if self.backward_fused is not None:
            lines.append("    backward: " + ("fused (generated)" if self.backward_fused else
                                             f"not fused — {self.backward_reason}"))
        return "\n".join(lines)


@dataclass
class Report:
    regions: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def fused(self) -> bool:
        return any(r.fused for r in self.regions)

    def __str__(self):
        lines = [f"flashlight: {sum(r.fused for r in self.regions)}/{len(self.regions)} attention region(s) fused"]
        lines += [str(r) for r in self.regions]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
