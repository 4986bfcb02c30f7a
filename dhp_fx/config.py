"""DHPConfig: every knob of dhp_fx in one validated, JSON-serialisable dataclass."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

COMPILERS = ("eager", "aot_eager", "inductor")
GRANULARITIES = ("sample", "batch")


@dataclass
class DHPConfig:
    """How to optimize a model.

    keep_ratio: fraction of each site's heads that run (1.0 = all gates open, exact).
    min_heads: never fewer heads than this per site.
    granularity: "sample" gates each batch row on its own; "batch" keeps the union that the
        batch needs, so heads can be skipped in projections too (see README).
    compiler: what runs the rewritten graph: "eager" (no compilation, cheapest to start),
        "aot_eager", or "inductor" (what plain torch.compile uses).
    dynamic: passed to torch.compile; None lets Dynamo mark dims dynamic after the first change.
    fullgraph: passed to torch.compile; True raises on graph breaks instead of splitting.
    """

    keep_ratio: float = 1.0
    min_heads: int = 1
    granularity: str = "sample"
    compiler: str = "eager"
    dynamic: Optional[bool] = None
    fullgraph: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.keep_ratio, (int, float)) and 0.0 < self.keep_ratio <= 1.0,
               "keep_ratio", self.keep_ratio, "a number in (0, 1]")
        _check(isinstance(self.min_heads, int) and not isinstance(self.min_heads, bool) and self.min_heads >= 1,
               "min_heads", self.min_heads, "an int >= 1")
        _check(self.granularity in GRANULARITIES, "granularity", self.granularity, f"one of {GRANULARITIES}")
        _check(self.compiler in COMPILERS, "compiler", self.compiler, f"one of {COMPILERS}")
        _check(self.dynamic in (None, True, False), "dynamic", self.dynamic, "None, True or False")
        _check(isinstance(self.fullgraph, bool), "fullgraph", self.fullgraph, "a bool")

    def replace(self, **changes: Any) -> "DHPConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "DHPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"DHPConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "DHPConfig":
        return cls.from_dict(json.loads(text))


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"DHPConfig.{field} must be {expected}, got {value!r}")
