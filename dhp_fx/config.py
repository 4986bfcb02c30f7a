"""DHPConfig: every knob of dhp_fx in one validated, JSON-serialisable dataclass."""
from __future__ import annotations

import dataclasses
import json
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Optional

COMPILERS = ("eager", "aot_eager", "inductor")
GRANULARITIES = ("sample", "batch")
SCORINGS = ("probe", "router", "lagged", "static")


@dataclass
class DHPConfig:
    """How to optimize a model.

    keep_ratio: fraction of each site's heads that run (1.0 = all gates open, exact).
    min_heads: never fewer heads than this per site.
    granularity: "sample" gates each batch row on its own; "batch" keeps the union that the
        batch needs, so heads can be skipped in projections too (trade-off: dhp_fx.gates).
    compiler: what runs the rewritten graph: "eager" (no compilation, cheapest to start),
        "aot_eager", or "inductor" (what plain torch.compile uses). The two that trace the graph
        run compact blocks as opaque ops in inference graphs, and no compact chains.
    dynamic: passed to torch.compile; None lets Dynamo mark dims dynamic after the first change.
    fullgraph: passed to torch.compile; True raises on graph breaks instead of splitting.

    Head scoring (dhp_fx.scoring; S = alpha * weight norm + (1 - alpha) * (1 - entropy)):
    scoring: "probe" (entropy from a strided subset of query rows), "router" (learned per-site
        predictor from the pooled layer input), "lagged" (entropy of an earlier call, refreshed
        every lag_refresh calls; for decoding), "static" (calibration ranking, no per-call cost).
    alpha: weight of the weight-norm term, in [0, 1] (1 = static norm ranking, 0 = entropy only).
    probe_fraction: share of query rows the probe scores, in (0, 1]; at least one row.
    sink_weight: β in [0, 1]: the probe's Ĥ becomes (1 − β)·Ĥ + β·M, M = the attention mass a
        head puts on the first key (an attention sink: low entropy, little contribution). 0 is the
        paper's rule; on MiniLM / ASDiv β = 1 kept far more of the output (benchmarks/RESULTS.md).
    lag_refresh: "lagged" recomputes entropy every this many calls.
    router_hidden: width of the router MLP; 0 makes it linear.
    keep_ratios: {fnmatch pattern of site names: keep ratio} overriding keep_ratio per site, e.g.
        {"encoder.layer.1[01].*": 0.5}; the longest matching pattern wins.
    score_threshold: if set, keep heads with S >= threshold (keep_ratio then caps the count).
    prune_kv_groups: decide per KV group (group score = mean of its heads), so a pruned group's
        K/V projections can be skipped too.
    union_cap: with granularity "batch", at most this share of heads survives the union.
    skip_projections: also skip pruned heads' work in the output projection (always exact: those
        inputs are zeros) and, for gates deciding from the layer input alone (router, static), in
        the Q/K/V projections. Off = only the attention core skips heads.
    compact_heads: where all four projections are skipped, run the whole block as one call that,
        whenever the gate's budget bounds a call's kept heads below the head count (batch-shared
        gates, static gates, batches of one), gathers the kept heads' weights and runs dense
        GEMMs and attention on those heads only (dhp_fx.compact_block). Exact either way.
    """

    keep_ratio: float = 1.0
    min_heads: int = 1
    granularity: str = "sample"
    compiler: str = "eager"
    dynamic: Optional[bool] = None
    fullgraph: bool = False
    scoring: str = "probe"
    alpha: float = 0.5
    probe_fraction: float = 1.0 / 16
    sink_weight: float = 0.0
    lag_refresh: int = 8
    router_hidden: int = 32
    keep_ratios: dict = field(default_factory=dict)
    score_threshold: Optional[float] = None
    prune_kv_groups: bool = False
    union_cap: Optional[float] = None
    skip_projections: bool = True
    compact_heads: bool = True

    def __post_init__(self) -> None:
        _check(isinstance(self.keep_ratio, (int, float)) and 0.0 < self.keep_ratio <= 1.0,
               "keep_ratio", self.keep_ratio, "a number in (0, 1]")
        _check(isinstance(self.min_heads, int) and not isinstance(self.min_heads, bool) and self.min_heads >= 1,
               "min_heads", self.min_heads, "an int >= 1")
        _check(self.granularity in GRANULARITIES, "granularity", self.granularity, f"one of {GRANULARITIES}")
        _check(isinstance(self.skip_projections, bool), "skip_projections", self.skip_projections, "a bool")
        _check(isinstance(self.compact_heads, bool), "compact_heads", self.compact_heads, "a bool")
        _check(self.compiler in COMPILERS, "compiler", self.compiler, f"one of {COMPILERS}")
        _check(self.dynamic in (None, True, False), "dynamic", self.dynamic, "None, True or False")
        _check(isinstance(self.fullgraph, bool), "fullgraph", self.fullgraph, "a bool")
        _check(self.scoring in SCORINGS, "scoring", self.scoring, f"one of {SCORINGS}")
        _check(_is_num(self.alpha) and 0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "a number in [0, 1]")
        _check(_is_num(self.sink_weight) and 0.0 <= self.sink_weight <= 1.0, "sink_weight", self.sink_weight,
               "a number in [0, 1]")
        _check(_is_num(self.probe_fraction) and 0.0 < self.probe_fraction <= 1.0,
               "probe_fraction", self.probe_fraction, "a number in (0, 1]")
        _check(_is_int(self.lag_refresh) and self.lag_refresh >= 1, "lag_refresh", self.lag_refresh, "an int >= 1")
        _check(_is_int(self.router_hidden) and self.router_hidden >= 0,
               "router_hidden", self.router_hidden, "an int >= 0")
        _check(isinstance(self.keep_ratios, dict) and all(
            isinstance(k, str) and _is_num(v) and 0.0 < v <= 1.0 for k, v in self.keep_ratios.items()),
            "keep_ratios", self.keep_ratios, "a dict {site pattern (str): number in (0, 1]}")
        _check(self.score_threshold is None or (_is_num(self.score_threshold) and 0.0 <= self.score_threshold <= 1.0),
               "score_threshold", self.score_threshold, "None or a number in [0, 1]")
        _check(isinstance(self.prune_kv_groups, bool), "prune_kv_groups", self.prune_kv_groups, "a bool")
        _check(self.union_cap is None or (_is_num(self.union_cap) and 0.0 < self.union_cap <= 1.0),
               "union_cap", self.union_cap, "None or a number in (0, 1]")

    def keep_ratio_for(self, site_name: str) -> float:
        """keep_ratio of one site: the longest matching keep_ratios pattern, else keep_ratio."""
        hits = [p for p in self.keep_ratios if fnmatch.fnmatchcase(site_name, p)]
        return float(self.keep_ratios[max(hits, key=len)]) if hits else float(self.keep_ratio)

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


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"DHPConfig.{field} must be {expected}, got {value!r}")
