"""Replaying a model's forward as CUDA graphs: one capture per input signature.

At short sequences a gated model is bound by the host, not the GPU: each layer launches its gate,
four head-skipping projections and the attention kernel, each with Python, dispatcher and Triton
launch costs (on an H100 a BERT-base forward at batch 32 x 128 took 17.6-25 ms eager against 2.75-3.9
ms replayed; dense took 5.1 ms). A CUDA graph replays every launch of the forward
from one host call. The gated ops read their keep masks on the device and never synchronise with
the host, which is what makes the forward capturable at all.

Inference only: under autograd, on CPU tensors, or when the capture fails (an op that synchronises,
say), the call runs as it would without graphs, with a warning for the failure. Captured graphs
hold the gate configuration of their capture: :class:`DHPModel` drops them when its gates change.
A capture may also read copies made before it (a static decision's gathered weights,
:func:`freeze_for_capture`); each replay first checks their source tensors and captures again
when one changed.
"""
from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

log = logging.getLogger("dhp_fx")


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: list  # static copies of the call's tensor leaves, in flatten order
    output: Any
    frozen: list = field(default_factory=list)  # (tensors, their state, what the graph reads instead)


# Copies a capture may read in place of the tensors they were made from (a static decision's
# gathered weights: dhp_fx.compact_block), noted while a runner captures. A replay first checks
# that those tensors are unchanged (version counter and storage), else captures again: without the
# check a graph would go on reading weights from before an in-place update.
_capture_notes = threading.local()


def tensor_state(tensors) -> tuple:
    """What an in-place update or a new storage changes: (version, data pointer) per tensor.
    (Writes through ``.data`` bypass the version counter, as they bypass autograd's checks.)"""
    return tuple((t._version, t.data_ptr()) for t in tensors)


def freeze_for_capture(tensors: tuple, derived: Any) -> bool:
    """Called during a capture by code that wants the graph to read ``derived`` (made from
    ``tensors``) rather than recompute it: True when a runner's capture is under way and will
    check ``tensors`` before each replay (and hold ``derived`` alive), False otherwise (then the
    caller must recompute inside the graph)."""
    notes = getattr(_capture_notes, "items", None)
    if notes is None:
        return False
    notes.append((tensors, tensor_state(tensors), derived))
    return True


def _frozen_unchanged(frozen: list) -> bool:
    return all(tensor_state(tensors) == state for tensors, state, _ in frozen)


def _signature(leaves) -> Optional[tuple]:
    """What a replay must match: every tensor's shape, strides, dtype and device, every other
    leaf's value (a different int or flag may take another path through the model). None when
    a leaf has no value to compare (a KV cache object, say): such calls are not replayable."""
    sig = [torch.is_inference_mode_enabled()]  # inference tensors cannot be refilled outside it
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            sig.append(("T", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            sig.append(("V", type(leaf), leaf))
    return tuple(sig)


class CUDAGraphRunner:
    """Calls ``fn`` through CUDA graphs where it can, else directly (see the module docstring).

    ``warmup`` eager calls precede each capture, on a side stream: they compile, autotune and
    allocate what the captured call will reuse. Outputs are copies (``clone_outputs``), so a
    result survives the next replay; pass False to get the graph's own buffers, which the next
    call overwrites.
    """

    def __init__(self, fn: Callable, warmup: int = 2, clone_outputs: bool = True, max_graphs: int = 16):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (autotuning cannot run inside a capture), got {warmup}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.fn = fn
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        # Each capture holds its own memory pool: shapes that keep changing (a growing KV cache)
        # run uncaptured past this many instead of filling the card.
        self.max_graphs = max_graphs
        self._graphs: dict = {}
        self._failed: set = set()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Forget every capture (the next call of each signature captures again)."""
        self._graphs.clear()
        self._failed.clear()

    def __call__(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if (not tensors or not all(t.is_cuda for t in tensors) or torch.is_grad_enabled()
                or torch.cuda.is_current_stream_capturing()):
            return self.fn(*args, **kwargs)
        sig = _signature(leaves)
        key = (spec, sig)
        if sig is None or key in self._failed:
            return self.fn(*args, **kwargs)
        captured = self._graphs.get(key)
        if captured is not None and not _frozen_unchanged(captured.frozen):
            del self._graphs[key]  # a tensor the graph read a copy of has changed: capture again
            captured = None
        if captured is None:
            if len(self._graphs) >= self.max_graphs:
                if not self._failed:
                    warnings.warn(f"dhp_fx: {self.max_graphs} CUDA graphs held; new input signatures run "
                                  "without graphs", RuntimeWarning, stacklevel=2)
                self._failed.add(key)
                return self.fn(*args, **kwargs)
            captured = self._capture(key, leaves, spec)
            if captured is None:
                return self.fn(*args, **kwargs)
        for static, t in zip(captured.inputs, tensors):
            static.copy_(t)
        captured.graph.replay()
        if not self.clone_outputs:
            return captured.output
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, captured.output)

    def _capture(self, key, leaves, spec):
        static_leaves = [t.clone() if isinstance(t, torch.Tensor) else t for t in leaves]
        args, kwargs = tree_unflatten(static_leaves, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            _capture_notes.items = frozen = []
            try:
                with torch.cuda.graph(graph):
                    output = self.fn(*args, **kwargs)
            finally:
                _capture_notes.items = None
        except Exception as e:  # a synchronising op, a CPU fallback path, ...: run uncaptured
            torch.cuda.synchronize()
            self._failed.add(key)
            warnings.warn(f"dhp_fx: CUDA graph capture failed, running this input signature without graphs "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})", RuntimeWarning, stacklevel=3)
            return None
        captured = _Captured(graph, [t for t in static_leaves if isinstance(t, torch.Tensor)], output, frozen)
        self._graphs[key] = captured
        log.info("dhp_fx: captured a CUDA graph (%d held)", len(self._graphs))
        return captured
