"""What ``dhp_fx.distill`` needs around the loss: batches in, model calls, outputs out.

Kept apart from the training loop so the rules for "what is a batch", "what does this model
accept" and "where are the logits" live in one place and can be read on their own.
"""
from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

log = logging.getLogger("dhp_fx")

LABEL_PAD = -100  # what HF losses ignore


# ----------------------------------------------------------------------------- data
def is_example_dataset(data: Any) -> bool:
    """Map-style dataset of single examples (HF datasets.Dataset, torch Dataset), not a list of batches."""
    if isinstance(data, (list, tuple, torch.utils.data.DataLoader, Mapping, torch.Tensor)):
        return False
    try:
        import datasets  # optional

        if isinstance(data, datasets.Dataset):
            return True
    except ImportError:
        pass
    return hasattr(data, "__len__") and hasattr(data, "__getitem__")


class BatchStream:
    """Epochs of batches with a resumable position (epoch, batches consumed in it).

    Example datasets are batched here: order from a generator seeded by (seed, epoch), so a
    position is reached by index arithmetic. Other iterables (lists of batches, DataLoaders,
    generators) are replayed and skipped; the caller restores the global RNG an epoch started
    with, so a shuffling DataLoader draws the same order again.
    """

    def __init__(self, data: Any, batch_size: int, shuffle: bool, seed: int, name: str = "data"):
        self.data, self.batch_size, self.shuffle, self.seed, self.name = data, batch_size, shuffle, seed, name
        self.indexed = is_example_dataset(data)
        self.one_shot = not self.indexed and iter_is_self(data)
        self._head: list = []  # a batch first() took from a one-shot iterator, to be served again

    def first(self) -> Any:
        """The first batch of epoch 0 (None if there is none), without losing it from a one-shot iterator."""
        batch = next(self.epoch(0), _END)
        if batch is _END:
            return None
        if self.one_shot:
            self._head = [batch]
        return batch

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        if self.indexed:
            return self._indexed(epoch, skip)
        if self.one_shot and epoch > 0:
            return iter(())
        if self.one_shot and self._head:
            it, self._head = itertools.chain(self._head, self.data), []
        else:
            it = iter(self.data)
        for _ in range(skip):
            if next(it, _END) is _END:
                break
        return it

    def _indexed(self, epoch: int, skip: int) -> Iterator[Any]:
        n = len(self.data)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).tolist()
        else:
            order = list(range(n))
        for start in range(skip * self.batch_size, n, self.batch_size):
            yield collate([self.data[i] for i in order[start:start + self.batch_size]])


_END = object()


def iter_is_self(data: Any) -> bool:
    if isinstance(data, (Mapping, torch.Tensor)):
        raise TypeError(f"data must be an iterable of batches or a dataset, got a {type(data).__name__} "
                        "(wrap a single batch in a list)")
    try:
        return iter(data) is data
    except TypeError as e:
        raise TypeError(f"data must be an iterable of batches or a dataset, got {type(data).__name__}") from e


def collate(examples: list) -> Any:
    """Stack examples; ragged sequences are right-padded (labels with -100, the rest with 0)."""
    first = examples[0]
    if isinstance(first, Mapping):
        return {k: _stack([ex[k] for ex in examples], k) for k in first}
    if isinstance(first, (tuple, list)):
        return tuple(_stack(list(col), None) for col in zip(*examples))
    return _stack(examples, None)


def _stack(values: list, key: Optional[str]) -> Any:
    if isinstance(values[0], str) or values[0] is None:
        return values
    tensors = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in values]
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    pad = LABEL_PAD if key == "labels" else 0
    return nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad)


# ----------------------------------------------------------------------------- model calls
@dataclass
class CallSpec:
    """How to call one model: the keyword inputs it names, whether it is an HF model."""

    accepted: Optional[frozenset]  # None: takes any keyword
    is_hf: bool
    encoder_decoder: bool
    takes_labels: bool

    @classmethod
    def of(cls, module: nn.Module) -> "CallSpec":
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            params = {}
        named = frozenset(n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        config = getattr(module, "config", None)
        is_hf = config is not None and hasattr(module, "main_input_name")
        # HF forwards take **kwargs for attention options; unknown batch keys must not reach them
        accepted = named if (is_hf or not var_kw) else None
        return cls(accepted, is_hf, bool(getattr(config, "is_encoder_decoder", False)), "labels" in named)


@dataclass
class Call:
    args: tuple
    kwargs: dict
    labels: Optional[torch.Tensor]
    keys: list  # what the batch held, for error messages


def split_batch(batch: Any, spec: CallSpec, tuple_labels: bool, model_name: str) -> Call:
    """Batch -> positional args, keyword inputs the model accepts, labels."""
    if isinstance(batch, Mapping):
        keys = list(batch)
        labels = batch.get("labels")
        kwargs = {k: v for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)
                  and (spec.accepted is None or k in spec.accepted)}
        if not kwargs:
            accepted = sorted(spec.accepted) if spec.accepted is not None else "any keyword"
            raise ValueError(f"batch has keys {keys}, but none is an input {model_name} accepts "
                             f"(it takes {accepted})")
        return Call((), kwargs, labels, keys)
    if isinstance(batch, (tuple, list)):
        if tuple_labels:
            if len(batch) < 2:
                raise ValueError("DistillConfig.tuple_labels=True needs batches of (inputs..., labels)")
            return Call(tuple(batch[:-1]), {}, batch[-1], [f"[{i}]" for i in range(len(batch))])
        if not batch:
            raise ValueError("an empty tuple is not a batch")
        return Call(tuple(batch), {}, None, [f"[{i}]" for i in range(len(batch))])
    if isinstance(batch, torch.Tensor):
        return Call((batch,), {}, None, ["[0]"])
    raise TypeError(f"a batch must be a dict, a tuple/list or a tensor, got {type(batch).__name__}")


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x) if type(x) in (tuple, list) else tuple(to_device(v, device) for v in x)
    return x


def run_model(model: nn.Module, call: Call, spec: CallSpec, device: torch.device, pass_labels: bool,
              extra: Optional[dict] = None) -> Any:
    kwargs = dict(call.kwargs)
    if extra:
        kwargs.update(extra)
    if spec.accepted is not None and "use_cache" in spec.accepted:
        # Nothing reads a KV cache back here, and a returned one reads every head's K and V: HF
        # decoders build one by default, which would keep their K/V projections whole.
        kwargs.setdefault("use_cache", False)
    if pass_labels and call.labels is not None and spec.takes_labels:
        kwargs["labels"] = call.labels
    return model(*to_device(call.args, device), **to_device(kwargs, device))


def needs_labels_to_decode(spec: CallSpec, call: Call) -> bool:
    """Encoder-decoder models make their decoder inputs from labels when none are given."""
    return spec.encoder_decoder and "decoder_input_ids" not in call.kwargs and call.labels is not None


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DHPModel (whose signature says what the model accepts)."""
    from .optimize import DHPModel

    return model.model if isinstance(model, DHPModel) else model


def device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- outputs
@dataclass
class Outputs:
    logits: Optional[torch.Tensor]
    hidden: Optional[torch.Tensor]
    loss: Optional[torch.Tensor]


def extract(out: Any, target: str, who: str) -> Outputs:
    """Pull logits / hidden states / model-computed loss out of a model output.

    target "auto": an output with ``logits`` distils on them, else on ``last_hidden_state``;
    a bare tensor counts as hidden states (say target="logits" to distil it as logits).
    """
    loss = None
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        get = out.get if hasattr(out, "get") else (lambda k: getattr(out, k, None))
        logits, loss = get("logits"), get("loss")
        hidden = get("last_hidden_state")
        if hidden is None and get("hidden_states") is not None:
            hidden = get("hidden_states")[-1]
        if target == "logits" and logits is None:
            raise ValueError(f"DistillConfig.target='logits' but the {who} output has no logits "
                             f"(keys: {list(out.keys())})")
        if target == "hidden" and hidden is None:
            raise ValueError(f"DistillConfig.target='hidden' but the {who} output has no last_hidden_state "
                             f"(keys: {list(out.keys())}); use align_modules to distil inner layers")
        if target == "hidden" or (target == "auto" and logits is None):
            logits = None
        else:
            hidden = None
        if logits is None and hidden is None:
            raise ValueError(f"the {who} output has neither logits nor last_hidden_state (keys: {list(out.keys())})")
        return Outputs(logits, hidden, loss)
    if isinstance(out, (tuple, list)):
        tensors = [t for t in out if isinstance(t, torch.Tensor)]
        if not tensors:
            raise ValueError(f"the {who} returned a {type(out).__name__} without tensors")
        out = tensors[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cannot distil on a {who} output of type {type(out).__name__}")
    if target == "logits":
        if out.dim() == 0 or out.shape[-1] < 2:
            raise ValueError(f"target='logits' needs a last dim > 1; the {who} returned shape {tuple(out.shape)}")
        return Outputs(out, None, None)
    return Outputs(None, out, None)


def check_shapes(s: Outputs, t: Outputs) -> None:
    if s.logits is not None:
        if t.logits is None:
            raise ValueError("the student returned logits but the teacher did not")
        if s.logits.shape != t.logits.shape:
            what = "vocabularies differ" if s.logits.shape[:-1] == t.logits.shape[:-1] else "logit shapes differ"
            raise ValueError(f"teacher and student {what}: teacher logits {tuple(t.logits.shape)}, "
                             f"student logits {tuple(s.logits.shape)}")
    if s.hidden is not None:
        if t.hidden is None:
            raise ValueError("the student returned hidden states but the teacher did not")
        if s.hidden.shape != t.hidden.shape:
            raise ValueError(f"teacher and student hidden states differ in shape: teacher {tuple(t.hidden.shape)}, "
                             f"student {tuple(s.hidden.shape)}")


# ----------------------------------------------------------------------------- taps for alignment
def first_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for v in out:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def auto_align_modules(model: nn.Module) -> list[str]:
    """The blocks of the model's largest nn.ModuleList (by parameters): its transformer layers."""
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise ValueError(f"align_modules='auto' found no list of layers in {type(model).__name__}; name the modules")
    return [f"{best}.{i}" if best else str(i) for i in range(len(model.get_submodule(best)))]


class Taps:
    """Forward hooks keeping the first tensor each named module returns in the current call."""

    def __init__(self, model: nn.Module, names: list[str], who: str):
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError as e:
                raise ValueError(f"align module {name!r} not found in the {who} ({type(model).__name__})") from e
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args, out):
            self.values[name] = first_tensor(out)
        return hook

    def pop(self) -> dict:
        values, self.values = self.values, {}
        return values

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
