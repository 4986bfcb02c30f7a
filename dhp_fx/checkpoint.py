"""Saving and loading optimized models and training checkpoints: safetensors + JSON, never pickle.

``dhp_fx.save(model, dir)`` writes::

    model.safetensors   the DHPModel state_dict (model.* weights and gates.* router/static state)
    gate_masks.safetensors   pinned keep masks (set_keep_mask), if any
    dhp_config.json     the DHPConfig
    sites.json          the attention sites and each gate's run-time budget (keep ratio, ...)
    pruning.json        static pruning records (dhp_fx.static_prune format), if heads were cut

``dhp_fx.load(dir, base)`` needs the architecture as code (a model or a factory): it re-applies
static pruning cuts, wraps the model with ``optimize``, rebuilds the gates from sites.json and
loads the tensors, so the result gives the same outputs as the saved model.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

log = logging.getLogger("dhp_fx")

FORMAT = "dhp_fx.model/1"
MODEL_FILE = "model.safetensors"
MASKS_FILE = "gate_masks.safetensors"
CONFIG_FILE = "dhp_config.json"
SITES_FILE = "sites.json"
PRUNING_FILE = "pruning.json"


# ----------------------------------------------------------------------------- atomic writes
def write_json_atomic(path: str, data: Any) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file

    out, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().contiguous()
        ptr = value.untyped_storage().data_ptr()
        # safetensors refuses tensors that share storage (views, tied weights): give those their own
        out[key] = value.clone() if _shares(value) or ptr in seen else value
        seen.add(ptr)
    save_file(out, path)


def _shares(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def load_tensors(path: str, device: Union[str, torch.device] = "cpu") -> dict:
    from safetensors.torch import load_file

    return load_file(path, device=str(device))


def save_module(module: nn.Module, path: str) -> None:
    from safetensors.torch import save_model

    # save_model drops duplicate names of tied weights; load_model knows to expect that
    save_model(module, path)


def load_module(module: nn.Module, path: str) -> None:
    from safetensors.torch import load_model

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    missing, unexpected = load_model(module, path, strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")


# ----------------------------------------------------------------------------- gates
def gate_runtime_state(gate: nn.Module) -> dict:
    """The budget a gate holds as Python state (not in its state_dict)."""
    state = {}
    for attr in ("keep_ratio", "min_heads", "score_threshold", "granularity", "union_cap"):
        if hasattr(gate, attr):
            state[attr] = getattr(gate, attr)
    return state


def apply_gate_runtime_state(gate: nn.Module, state: dict, mask: Optional[torch.Tensor]) -> None:
    if "keep_ratio" in state and hasattr(gate, "set_keep_ratio"):
        gate.set_keep_ratio(state["keep_ratio"], state.get("min_heads"))
    if hasattr(gate, "set_score_threshold"):
        gate.set_score_threshold(state.get("score_threshold"))
    for attr in ("granularity", "union_cap"):
        if attr in state:
            setattr(gate, attr, state[attr])
    if hasattr(gate, "set_keep_mask"):
        gate.set_keep_mask(mask)


def _gate_masks(model) -> dict:
    masks = {}
    for key, gate in model.gates.items():
        fixed = getattr(gate, "fixed_keep", None)
        if isinstance(fixed, torch.Tensor) and fixed.numel():
            masks[key] = fixed
    return masks


# ----------------------------------------------------------------------------- save / load
def save(model, directory: str, pruning: Any = None) -> str:
    """Save an optimized (possibly distilled) model to ``directory``; returns the directory.

    ``pruning``: the ``PruneResult`` (or its ``records``) of ``dhp_fx.static_prune`` when the
    wrapped model had heads removed, so ``load`` can cut a freshly built base model the same way.
    The directory is written next to its final place and renamed into it, so a crash never
    leaves a half-written save under ``directory`` (an older save being replaced is moved aside
    first and deleted after). Gates with per-call Python state (``lagged``) restart their
    refresh cycle after loading.
    """
    from .optimize import DHPModel

    if not isinstance(model, DHPModel):
        raise TypeError(f"dhp_fx.save expects what dhp_fx.optimize returned, got {type(model).__name__}")
    records = getattr(pruning, "records", pruning)
    if records is None:
        records = getattr(model.model, "dhp_fx_pruning", None)
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        save_module(model, os.path.join(tmp, MODEL_FILE))
        masks = _gate_masks(model)
        if masks:
            save_tensors(masks, os.path.join(tmp, MASKS_FILE))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(model.dhp_config.to_json())
        by_key = {_gate_key(site.name): site for site in model.sites}
        gates = []
        for key, gate in model.gates.items():
            site = by_key.get(key) or getattr(gate, "site", None)
            if site is None:
                raise ValueError(f"gate {key!r} has no attention site to record")
            gates.append({"key": key, "site": site.to_dict(), "gate_class": type(gate).__name__,
                          "runtime": gate_runtime_state(gate), "pinned_mask": key in masks})
        with open(os.path.join(tmp, SITES_FILE), "w") as f:
            json.dump({"format": FORMAT, "gates": gates}, f, indent=1)
        if records:
            from .static_prune import FORMAT as PRUNE_FORMAT

            with open(os.path.join(tmp, PRUNING_FILE), "w") as f:
                json.dump({"format": PRUNE_FORMAT, "records": list(records)}, f, indent=1)
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _gate_key(site_name: str) -> str:
    from .backend import DHPCompiler

    return DHPCompiler.gate_key(site_name)


def _swap_in(tmp: str, directory: str) -> None:
    if os.path.isdir(directory):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=os.path.dirname(directory))
        os.rmdir(old)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)


def load(directory: str, model: Union[nn.Module, Callable[[], nn.Module]], device=None,
         example_inputs=None):
    """Load what ``dhp_fx.save`` wrote onto ``model`` (the base architecture, or a factory).

    Only safetensors and JSON are read. Returns a DHPModel whose outputs equal the saved one's.
    The base model's own weights are overwritten (it becomes the DHPModel's ``.model``).
    """
    from .config import DHPConfig
    from .optimize import optimize

    with open(os.path.join(directory, SITES_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a dhp_fx model save (format {meta.get('format')!r})")
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = DHPConfig.from_json(f.read())
    base = model if isinstance(model, nn.Module) else model()
    if not isinstance(base, nn.Module):
        raise TypeError(f"the model factory returned {type(base).__name__}, not an nn.Module")
    if device is not None:
        base = base.to(device)
    pruning_path = os.path.join(directory, PRUNING_FILE)
    if os.path.exists(pruning_path):
        _apply_saved_pruning(base, pruning_path)
    optimized = optimize(base, config)
    _rebuild_gates(optimized, meta["gates"], config)
    load_module(optimized, os.path.join(directory, MODEL_FILE))
    masks_path = os.path.join(directory, MASKS_FILE)
    masks = load_tensors(masks_path, next((p.device for p in base.parameters()), "cpu")) \
        if os.path.exists(masks_path) else {}
    for entry in meta["gates"]:
        apply_gate_runtime_state(optimized.gates[entry["key"]], entry["runtime"], masks.get(entry["key"]))
    optimized.train(base.training)
    if example_inputs is not None:
        with torch.no_grad():
            optimized(**example_inputs) if isinstance(example_inputs, dict) else optimized(*example_inputs)
    return optimized


def _apply_saved_pruning(base: nn.Module, path: str) -> None:
    from .passes import AttentionSite
    from .static_prune import FORMAT as PRUNE_FORMAT, apply_pruning
    from .scoring import _feature_axis, head_slices

    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != PRUNE_FORMAT:
        raise ValueError(f"{path}: unknown pruning format {meta.get('format')!r}")
    records = meta["records"]
    # A base model that is already cut (the caller passed the pruned model) is left alone.
    params = dict(base.named_parameters(remove_duplicate=False))
    site = AttentionSite.from_dict(records[0]["site"]) if records else None
    if site is not None and site.q_proj is not None and site.q_proj.weight in params:
        w = params[site.q_proj.weight]
        width = w.shape[_feature_axis("q", site.q_proj.layout)]
        if head_slices(site, "q", width) is None:
            log.info("dhp_fx.load: %s already has its heads cut", type(base).__name__)
            base.dhp_fx_pruning = records
            return
    apply_pruning(base, records)
    base.dhp_fx_pruning = records


def _rebuild_gates(optimized, entries: list, config) -> None:
    """Create the saved gates before any capture; a later capture reuses them by key."""
    from .gates import build_gate
    from .passes import AttentionSite

    params = dict(optimized.model.named_parameters(remove_duplicate=False))
    params.update(dict(optimized.model.named_buffers()))
    compiler = optimized._compiler
    for entry in entries:
        site = AttentionSite.from_dict(entry["site"])
        gate = build_gate(site, config, _site_params(site, params))
        if type(gate).__name__ != entry["gate_class"]:
            raise ValueError(f"gate {entry['key']!r} was a {entry['gate_class']} when saved but "
                             f"DHPConfig(scoring={config.scoring!r}) builds a {type(gate).__name__}")
        optimized.gates[entry["key"]] = gate
        compiler.sites[site.name] = site


def _site_params(site, params: dict) -> dict:
    """params, plus aliases for projection names captured relative to a submodule."""
    out = dict(params)
    for ref in (site.q_proj, site.k_proj, site.v_proj, site.out_proj):
        if ref is None or ref.weight in out:
            continue
        hits = [n for n in params if n.endswith("." + ref.weight)]
        if len(hits) == 1:
            out[ref.weight] = params[hits[0]]
    return out


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> tuple[dict, dict]:
    """(tensors, json) holding the torch, CUDA, Python and NumPy generators."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    meta = {"python_version": version, "python_gauss": gauss}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
        meta.update(numpy_name=name, numpy_pos=int(pos), numpy_has_gauss=int(has_gauss), numpy_cached=float(cached))
    except ImportError:
        pass
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8).cpu())
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k].to(torch.uint8).cpu() for k in cuda])
    random.setstate((meta["python_version"], tuple(int(x) for x in tensors["python"].tolist()), meta["python_gauss"]))
    if "numpy_keys" in tensors:
        import numpy as np

        np.random.set_state((meta["numpy_name"], tensors["numpy_keys"].numpy().astype(np.uint32),
                             meta["numpy_pos"], meta["numpy_has_gauss"], meta["numpy_cached"]))


# ----------------------------------------------------------------------------- optimizer state
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, json) of an optimizer's state_dict."""
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value
            else:
                plain.setdefault(str(idx), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "plain_state": plain}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["plain_state"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- training checkpoints
def step_dir(step: int) -> str:
    return f"step-{step:08d}"


def write_training_checkpoint(root: str, step: int, module: nn.Module, files: dict, state: dict, keep: int) -> str:
    """root/step-NNNNNNNN/{model.safetensors, <files>, state.json}, then root/latest.json.

    The step directory is assembled under a temporary name and renamed into place, and
    latest.json is replaced atomically after it: a crash at any point leaves the previous
    checkpoint complete and latest.json pointing at a complete one.
    """
    final = os.path.join(root, step_dir(step))
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        save_module(module, os.path.join(tmp, MODEL_FILE))
        for name, tensors in files.items():
            save_tensors(tensors, os.path.join(tmp, name))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(os.path.join(root, "latest.json"), {"step": step, "dir": os.path.basename(final)})
    kept = sorted(d for d in os.listdir(root) if d.startswith("step-") and os.path.isdir(os.path.join(root, d)))
    for old in kept[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def find_training_checkpoint(root: str, which: Union[bool, str] = True) -> Optional[str]:
    """The checkpoint ``which`` names (a path), else the one latest.json names, else the newest complete one."""
    if isinstance(which, str):
        if not os.path.exists(os.path.join(which, "state.json")):
            raise FileNotFoundError(f"{which} is not a distillation checkpoint (no state.json)")
        return which
    latest = os.path.join(root, "latest.json")
    if os.path.exists(latest):
        with open(latest) as f:
            path = os.path.join(root, json.load(f)["dir"])
        if os.path.exists(os.path.join(path, "state.json")):
            return path
    found = sorted(d for d in os.listdir(root) if d.startswith("step-")
                   and os.path.exists(os.path.join(root, d, "state.json")))
    return os.path.join(root, found[-1]) if found else None
