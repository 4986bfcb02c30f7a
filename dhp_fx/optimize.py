"""``dhp_fx.optimize``: the two-line entry point."""
from __future__ import annotations

import copy
import itertools
import logging
import types
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn as nn

from .backend import DHPCompiler
from .config import DHPConfig
from .passes import AttentionSite, SkippedSite

log = logging.getLogger("dhp_fx")


class DHPModel(nn.Module):
    """A model whose attention runs through gated ops; called exactly like the original.

    Attributes the wrapper does not have (``generate``, ``config``, ...) come from the wrapped
    model, whose own calls (as in ``generate``) also go through the rewritten graph. Weights are
    shared with the model passed to ``optimize``, as with ``torch.compile``.
    """

    def __init__(self, model: nn.Module, config: DHPConfig):
        super().__init__()
        self.model = model
        self.gates = nn.ModuleDict()
        # dhp_config, not config: HF code reads ``.config`` and must find the model's own.
        object.__setattr__(self, "dhp_config", config)
        object.__setattr__(self, "_compiler", DHPCompiler(config, self.gates, root=model))
        # A shallow copy owns its call path: compiling it leaves the caller's model untouched,
        # while parameters and submodules stay shared.
        inner = copy.copy(model)
        compiled = torch.compile(
            _private_entry(inner), backend=self._compiler, dynamic=config.dynamic, fullgraph=config.fullgraph
        )

        def call_compiled(*args, **kwargs):
            # Past Dynamo's recompile limit the model would silently run ungated: fail instead.
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, **_recompile_limits()):
                return compiled(*args, **kwargs)

        # What nn.Module.compile() sets; routes every call of inner (generate's too) through Dynamo.
        inner._compiled_call_impl = call_compiled
        object.__setattr__(self, "_inner", inner)
        global _models_created
        _models_created += 1

    def forward(self, *args, **kwargs):
        return self._inner(*args, **kwargs)

    def cuda_graphed(self, warmup: int = 2, clone_outputs: bool = True):
        """This model's inference calls replayed as CUDA graphs, one per input signature
        (:class:`dhp_fx.cuda_graphs.CUDAGraphRunner`): at short sequences the host, not the GPU,
        bounds a gated forward. Changing the gates (``set_keep_ratio``, ``set_keep_mask``,
        ``calibrate``) drops the captures; the next call captures again. Calibrate, count FLOPs
        and train through the model itself: a replay runs no Python, so nothing is recorded."""
        from .cuda_graphs import CUDAGraphRunner

        if self.dhp_config.scoring == "lagged":
            # Its refresh is a Python call counter, which a replay never advances: the entropy
            # captured first would be reused forever.
            raise ValueError('cuda_graphed: scoring="lagged" refreshes on a Python call counter that CUDA graph '
                             'replays do not run; use "probe", "router" or "static"')
        runner = CUDAGraphRunner(self, warmup=warmup, clone_outputs=clone_outputs)
        self.__dict__.setdefault("_graph_runners", []).append(runner)
        return runner

    def _drop_cuda_graphs(self) -> None:
        for runner in self.__dict__.get("_graph_runners", []):
            runner.reset()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    # ----------------------------------------------------------------- what was found
    @property
    def sites(self) -> list[AttentionSite]:
        return list(self._compiler.sites.values())

    @property
    def skipped(self) -> list[SkippedSite]:
        return list(self._compiler.skipped)

    @property
    def graphs_compiled(self) -> int:
        return self._compiler.graphs_compiled

    def gate(self, site: Union[str, AttentionSite]) -> nn.Module:
        name = site.name if isinstance(site, AttentionSite) else site
        key = DHPCompiler.gate_key(name)
        if key not in self.gates:
            raise KeyError(f"no attention site named {name!r}; known sites: {[s.name for s in self.sites]}")
        return self.gates[key]

    def report(self, stats=None) -> str:
        """Sites table, then keep frequencies, params and FLOPs when calibration stats exist."""
        from .report import model_report

        return model_report(self, stats)

    def heatmap(self, path: str) -> str:
        """PNG of keep frequency per layer x head (needs calibration stats)."""
        from .report import heatmap

        return heatmap(self, path)

    # ----------------------------------------------------------------- gate control
    def set_keep_ratio(self, keep_ratio: float, min_heads: Optional[int] = None) -> None:
        """Change the keep budget of every site; takes effect on the next call."""
        self._require_sites()
        self._drop_cuda_graphs()
        for gate in self.gates.values():
            gate.set_keep_ratio(keep_ratio, min_heads)
        # Gates created later (new graphs after graph breaks or recompiles) start from the config.
        changes = {"keep_ratio": keep_ratio} if min_heads is None else {"keep_ratio": keep_ratio, "min_heads": min_heads}
        config = self.dhp_config.replace(**changes)
        object.__setattr__(self, "dhp_config", config)
        self._compiler.config = config

    def set_keep_mask(self, masks: Union[None, torch.Tensor, dict]) -> None:
        """Pin gates: one bool mask for every site, a {site name: mask} dict, or None to unpin all."""
        self._require_sites()
        self._drop_cuda_graphs()
        pinned = self._compiler.pinned_masks
        if isinstance(masks, dict):
            for name, mask in masks.items():
                self.gate(name).set_keep_mask(mask)
                pinned[name] = mask
        else:
            for gate in self.gates.values():
                gate.set_keep_mask(masks)
            pinned.clear()
            if masks is not None:
                pinned[None] = masks

    def _require_sites(self) -> None:
        if not self._compiler.graphs_compiled:
            raise RuntimeError("no graph captured yet: call the model once (or pass example_inputs to optimize)")


_entry_ids = itertools.count()
_models_created = 0
_BASE_LIMITS = {"recompile_limit": torch._dynamo.config.recompile_limit,
                "accumulated_recompile_limit": torch._dynamo.config.accumulated_recompile_limit}


def _recompile_limits() -> dict:
    """Dynamo's limits, scaled by the number of live optimized models.

    Only the entry frame is private to a model. After a graph break (HF's logger.warning_once in
    the loss, a .item(), ...) Dynamo compiles the frames that follow — Module._call_impl, the
    model's forward, resume functions — whose code objects every instance shares, each instance
    adding cache entries guarded on its own identity. With the stock limit of 8 the ninth
    optimized model of a class would fail (or, without fail_on_recompile_limit_hit, silently run
    those frames ungated). Counted over every model created, not the live ones: a freed model's
    entries still count against the shared code objects' limits.
    """
    return {name: base * max(1, _models_created) for name, base in _BASE_LIMITS.items()}


def _private_entry(dhp_fx_root: nn.Module):
    """A function calling ``module`` whose code object belongs to it alone.

    Dynamo keeps compiled code, and counts recompiles, per code object; compiling
    nn.Module._call_impl (as Module.compile does) would make every optimized model share one
    cache and its recompile limit.
    """

    def entry(*args, **kwargs):
        return dhp_fx_root._call_impl(*args, **kwargs)

    code = entry.__code__.replace(co_name=f"dhp_fx_entry_{next(_entry_ids)}")
    return types.FunctionType(code, entry.__globals__, code.co_name, entry.__defaults__, entry.__closure__)


def optimize(
    model: nn.Module,
    config: Optional[DHPConfig] = None,
    example_inputs: Optional[Union[tuple, dict, Iterable]] = None,
) -> DHPModel:
    """Rewrite every attention site of ``model`` into a gated op.

    ``example_inputs`` (a tuple of positional args or a dict of keyword args) captures the graph
    now, so ``sites`` and ``report()`` are ready before the first real call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, DHPModel):
        raise ValueError("model is already optimized by dhp_fx; pass the original model")
    if config is None:
        config = DHPConfig()
    elif isinstance(config, dict):
        config = DHPConfig.from_dict(config)
    elif not isinstance(config, DHPConfig):
        raise TypeError(f"config must be a DHPConfig or a dict, got {type(config).__name__}")
    optimized = DHPModel(model, config)
    if example_inputs is not None:
        with torch.no_grad():
            if isinstance(example_inputs, dict):
                optimized(**example_inputs)
            else:
                optimized(*example_inputs)
        if not optimized.sites and optimized.skipped:
            log.warning("dhp_fx rewrote none of the %d attention core(s) it found in %s (see report()); it runs "
                        "unchanged", len(optimized.skipped), type(model).__name__)
        elif not optimized.sites:
            log.warning("dhp_fx found no attention in %s; it runs unchanged", type(model).__name__)
    return optimized
