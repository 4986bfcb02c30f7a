"""The torch.compile backend: capture → rewrite attention → hand the graph to a downstream compiler.

Registered under the entry point group ``torch_dynamo_backends`` as "dhp_fx", so
``torch.compile(model, backend="dhp_fx", options={"keep_ratio": 0.7})`` works after
``pip install`` without importing dhp_fx first.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from . import kernels as _kernels  # noqa: F401  (registers dhp::gated_attention)
from .config import DHPConfig
from .opaque import make_opaque
from .passes import AttentionSite, SkippedSite, rewrite_attention

log = logging.getLogger("dhp_fx")

# gate_builder(site, config, params): params maps qualified parameter names of the captured
# model (e.g. "encoder.layer.0.attention.self.query.weight") to the live tensors.
GateBuilder = Callable[[AttentionSite, DHPConfig, dict], nn.Module]


def default_gate_builder(site: AttentionSite, config: DHPConfig, params: dict) -> nn.Module:
    from .gates import build_gate

    return build_gate(site, config, params)


def graph_parameters(gm: fx.GraphModule, example_inputs) -> dict[str, torch.Tensor]:
    """Qualified name -> tensor for the module state Dynamo lifted into graph inputs."""
    from .passes.graph_utils import parameter_name

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = {}
    for node, value in zip(placeholders, example_inputs):
        name = parameter_name(node)
        if name is not None and isinstance(value, torch.Tensor):
            params[name] = value
    for name, value in gm.named_parameters():
        params.setdefault(name, value)
    return params


class DHPCompiler:
    """A Dynamo backend with memory: every graph it sees is rewritten, its sites and gates kept.

    Gates are keyed by site name, so the graphs of one model (graph breaks, recompiles for new
    shapes) share one gate per attention site.
    """

    def __init__(
        self,
        config: Optional[DHPConfig] = None,
        gates: Optional[nn.ModuleDict] = None,
        gate_builder: Optional[GateBuilder] = None,
        root: Optional[nn.Module] = None,
    ):
        self.config = config or DHPConfig()
        self.gates = gates if gates is not None else nn.ModuleDict()
        self.gate_builder = gate_builder or default_gate_builder
        self.sites: dict[str, AttentionSite] = {}
        self.skipped: list[SkippedSite] = []
        self.graphs_compiled = 0
        self.counters: dict[str, int] = {}
        self._params: dict[str, torch.Tensor] = {}
        # Pins set through DHPModel.set_keep_mask; gates created later (a new graph after a
        # graph break or recompile) must obey them too. Key None = every site.
        self.pinned_masks: dict[Optional[str], torch.Tensor] = {}
        self._root_names: dict[int, str] = {}
        if root is not None:
            named = list(root.named_parameters(remove_duplicate=False)) + list(root.named_buffers(remove_duplicate=False))
            self._root_names = {id(t): name for name, t in named}

    @staticmethod
    def gate_key(site_name: str) -> str:
        # ModuleDict keys may not contain "."; "#" marks a module owning several cores.
        return site_name.replace(".", "__").replace("#", "_core")

    def _make_gate(self, site: AttentionSite) -> nn.Module:
        key = self.gate_key(site.name)
        if key in self.gates:
            known = self.sites.get(site.name)
            if known is not None and (known.num_heads, known.num_kv_heads) != (site.num_heads, site.num_kv_heads):
                raise RuntimeError(
                    f"site {site.name!r} was captured with {known.num_heads} heads before and "
                    f"{site.num_heads} now; the model changed under dhp_fx"
                )
        else:
            gate = self.gate_builder(site, self.config, self._params)
            pinned = self.pinned_masks.get(site.name, self.pinned_masks.get(None))
            if pinned is not None:
                gate.set_keep_mask(pinned)
            self.gates[key] = gate
        self.sites[site.name] = site
        return self.gates[key]

    def _frame_prefix(self, gm: fx.GraphModule, example_inputs) -> str:
        """Where the captured frame's ``self`` sits in the root model ("" for the root itself).

        After a graph break Dynamo captures inner frames (e.g. BertModel.forward inside
        BertForMaskedLM) with names relative to that submodule; parameter identity tells where.
        """
        if not self._root_names:
            return ""
        from .passes.graph_utils import parameter_name

        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, example_inputs):
            relative = parameter_name(node)
            root_name = self._root_names.get(id(value)) if relative else None
            if root_name and root_name.endswith(relative):
                return root_name[: len(root_name) - len(relative)]
        return ""

    def __call__(self, gm: fx.GraphModule, example_inputs) -> Callable:
        prefix = self._frame_prefix(gm, example_inputs)
        self._params = {prefix + name: t for name, t in graph_parameters(gm, example_inputs).items()}
        make_gate = (lambda site: self._make_gate(prefixed_site(site, prefix))) if prefix else self._make_gate
        traced = self.config.compiler != "eager"
        # A traced graph runs compact blocks as opaque ops, which have no autograd formula: a
        # graph traced for training keeps the head ops. Dynamo guards on grad mode, so the
        # inference and training graphs of one model are separate calls here.
        training = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
        result = rewrite_attention(gm, make_gate, taken_names=set(), skip_projections=self.config.skip_projections,
                                    compact_heads=self.config.compact_heads and not (traced and training),
                                    opaque_blocks=traced)
        if traced and training and self.config.compact_heads:
            for site in result.sites:
                if set(site.skipped_projections) == {"q", "k", "v", "out"}:
                    site.declined += ("no_compact_block:traced_training",)
        result.sites = [prefixed_site(site, prefix) for site in result.sites]
        for skip in result.skipped:
            skip.module_path = _join(prefix, skip.module_path)
        self.graphs_compiled += 1
        for key, value in result.counters.items():
            self.counters[key] = self.counters.get(key, 0) + value
        known_skips = {(s.module_path, s.reason) for s in self.skipped}
        self.skipped += [s for s in result.skipped if (s.module_path, s.reason) not in known_skips]
        for skip in result.skipped:
            log.info("dhp_fx left %s unchanged (%s): %s", skip.module_path or "<root>", skip.pattern, skip.reason)
        if traced:
            if not training:
                for key, value in make_opaque(gm).items():
                    self.counters[key] = self.counters.get(key, 0) + value
            _freeze_gates(gm)
        return downstream_compile(gm, example_inputs, self.config.compiler)


class _FrozenGate(nn.Module):
    """Calls a gate without registering it, so AOTAutograd sees no gate state as graph inputs.

    Tracing then bakes the gate's current tensors in as constants; DHPModel re-traces when a
    gate changes.
    """

    def __init__(self, gate: nn.Module):
        super().__init__()
        object.__setattr__(self, "gate", gate)

    def forward(self, *args, **kwargs):
        return self.gate(*args, **kwargs)


def _freeze_gates(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("dhp_gate_"):
            gate = gm.get_submodule(node.target)
            if not isinstance(gate, _FrozenGate):
                setattr(gm, node.target, _FrozenGate(gate))


def _join(prefix: str, path: str) -> str:
    return (prefix + path) if path else prefix.rstrip(".")


def prefixed_site(site: AttentionSite, prefix: str) -> AttentionSite:
    """The site with its module path and parameter names made relative to the root model."""
    if not prefix:
        return site
    path = _join(prefix, site.module_path)
    suffix = site.name[site.name.index("#"):] if "#" in site.name else ""
    projections = {
        role: None if ref is None else dataclasses.replace(
            ref, weight=prefix + ref.weight, bias=None if ref.bias is None else prefix + ref.bias
        )
        for role, ref in (("q_proj", site.q_proj), ("k_proj", site.k_proj), ("v_proj", site.v_proj), ("out_proj", site.out_proj))
    }
    return dataclasses.replace(site, name=(path or "<root>") + suffix, module_path=path, **projections)


def downstream_compile(gm: fx.GraphModule, example_inputs, compiler: str) -> Callable:
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    if compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    raise ValueError(f"unknown downstream compiler {compiler!r}")


def dhp_fx_backend(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None) -> Callable:
    """Entry point for ``torch.compile(backend="dhp_fx", options={...})``.

    options are DHPConfig fields; the downstream compiler defaults to inductor here so that
    users lose nothing against plain torch.compile.
    """
    options = dict(options or {})
    options.setdefault("compiler", "inductor")
    compiler = DHPCompiler(DHPConfig.from_dict(options))
    compiled = compiler(gm, example_inputs)
    # Let callers that hold the compiled function find what was rewritten.
    LAST_COMPILED.append(compiler)
    del LAST_COMPILED[:-8]
    return compiled


LAST_COMPILED: list[DHPCompiler] = []
