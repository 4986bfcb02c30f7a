"""The module a rewritten graph calls in place of a whole attention block (see passes/compact_heads).

Per call it asks the gate in how many KV groups (heads, for MHA) the call's kept heads lie at
most (``HeadGate.compact_plan``: a host-side bound from the budget and the batch size, never a
device sync). Below the group count, the block runs on those groups alone
(``kernels/compact_heads.py``). Rows that decide apart may each run their own groups
(``kernels/compact_rows.py``) where that pays (``kernels/row_cost.py``). Otherwise, or when the gate
left work that needs every head's q, k and v (calibration, attention maps, straight-through
training), it runs the head ops the graph held before and calls the gate's tap; when the gate
kept every head (host state: the budget, the straight-through estimator), the dense originals
(F.linear, SDPA) instead, which compute the same faster; and on a CPU, for rows that decide
apart, the dense originals with the pruned heads' outputs zeroed (MASKED_DENSE_DEVICES).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn

import torch.nn.functional as F

from .kernels.compact_heads import (GatheredHeads, HeadProjection, compact_attention_block, compact_core,
                                    dense_attention, gather_block_weights, gather_query_heads, query_heads_core,
                                    role_widths)
from .cuda_graphs import freeze_for_capture, tensor_state
from .kernels import row_cost
from .kernels.compact_rows import compact_rows_block, gather_rows, project_rows, rows_core
from .kernels.head_runs import head_bands
from .passes.compact_chain import FUSED_PER_HEAD, FUSED_QKV
from .passes.compact_heads import RECIPE, replay_flags

# Devices on which per-sample decisions run each row's own kept heads (kernels/compact_rows)
# where a row's tokens pay for its weight gather (kernels/row_cost): on a CPU the gather is
# small next to the GEMMs of long rows but, at large batch, a GPU's whole budget (BERT-base, 32
# rows, p = .5: 75 MB a layer). Untimed on a GPU; there per-sample decisions keep the union
# compaction and the head ops.
ROWS_DEVICES = ("cpu",)

# Devices on which rows that decide apart, where no compaction pays, run the dense block with the
# pruned heads' outputs zeroed (exact: their share of the output projection is then zero) rather
# than the head ops: on a CPU the per-sample head ops cost more than the dense GEMMs they thin
# (MiniLM 32 × 48, p = .7: 1.35× the dense block). A GPU keeps the head ops, whose grouped GEMMs
# skip each row's pruned heads.
MASKED_DENSE_DEVICES = ("cpu",)


class CompactBlock(nn.Module):
    """``out = block(keep, attn_mask, dropout_p, is_causal, scale, projections=..., roles=...,
    out_projection=..., geometry=...)``.

    - projections: per head op the graph held, (x as that op read it, weight, bias, flags, unit,
      in_out, x as [B, L, d_in]); flags are "keep" (the gate's mask), "any" (its union over the
      batch) or a tensor;
    - roles: (projection index, first feature) of q, k and v;
    - out_projection: (weight, bias, flags, unit, in_out, flat), flat = rows arrive as [B*L, .];
    - geometry: (heads, KV heads, head dim, value head dim);
    - qk_factors: constant factors the graph applied to q and k between projection and attention
      (OPT and Whisper scale q): folded into the attention scale on the kept heads, applied to
      q and k where every head runs (the gate's tap reads them).

    Holds its gate without registering it (the gate owns the block, as it owns its tap).
    """

    def __init__(self, gate: nn.Module):
        super().__init__()
        object.__setattr__(self, "gate", gate)
        self.calls_compact = 0  # how many calls ran the kept heads alone (reports, tests)
        self.calls_rows = 0  # how many of them ran each row's own kept heads (compact_rows)
        self.calls_every_head = 0  # how many calls ran every head: the head ops, or ...
        self.calls_dense = 0  # ... the dense originals, the gate having kept every head
        self.calls_masked = 0  # ... or the dense originals with pruned heads' outputs zeroed
        self.calls_query_heads = 0  # compact calls that ran every KV group and the kept query heads (GQA)
        self.gathers = 0  # how many of them gathered weights (the rest reused the last gather)
        self._last: Optional[tuple] = None  # (key tensors, key values, GatheredHeads, CPU decision's copy)

    def forward(self, keep, attn_mask, dropout_p, is_causal, scale, *, projections, roles, out_projection, geometry,
                qk_factors=(1.0, 1.0)):
        heads, kv_heads, head_dim, v_head_dim = geometry
        w_o, b_o, flags_o, unit_o, in_out_o, flat = out_projection
        plan = self.gate.compact_plan(keep.shape[0])
        row_plan = self._row_plan(keep, plan, kv_heads, projections[roles[0][0]][6].shape[1])
        if row_plan is not None or (plan is not None and plan[0] < kv_heads):
            factor = qk_factors[0] * qk_factors[1]
            if factor != 1.0:
                scale = (head_dim ** -0.5 if scale is None else scale) * factor
            q, k, v = (HeadProjection(projections[i][6], projections[i][1], projections[i][2], projections[i][5], start)
                       for i, start in roles)
            if row_plan is not None:
                cap, whole = row_plan
                gathered = self._gathered(q, k, v, w_o, in_out_o, keep, cap, head_dim, v_head_dim, kv_heads,
                                          gather_rows)
                out = compact_rows_block(q, k, v, w_o, b_o, in_out_o, keep, cap, head_dim, v_head_dim, attn_mask,
                                         dropout_p, is_causal, scale, whole, kv_heads, gathered)
                self.calls_rows += 1
            else:
                cap, rows_shared = plan
                gathered = self._gathered(q, k, v, w_o, in_out_o, keep, cap, head_dim, v_head_dim, kv_heads)
                out = compact_attention_block(q, k, v, w_o, b_o, in_out_o, keep, cap, head_dim, v_head_dim,
                                              attn_mask, dropout_p, is_causal, scale, rows_shared, kv_heads, gathered)
            self.calls_compact += 1
            return out.flatten(0, 1) if flat else out
        return self._every_head(keep, attn_mask, dropout_p, is_causal, scale, projections, roles, out_projection,
                                geometry, qk_factors)

    def _row_plan(self, keep: torch.Tensor, plan, kv_heads: int, tokens: Optional[int]):
        """(cap, whole) when each row should compute its own kept groups (kernels/compact_rows):
        rows decide apart, a row keeps fewer groups than the union bound would compute for every
        row, enough so for rows of ``tokens`` tokens (``kernels/row_cost.py``; None: unknown,
        assumed to), and the block runs on a device in ROWS_DEVICES."""
        if keep.shape[0] < 2 or keep.device.type not in ROWS_DEVICES or (plan is not None and plan[1]):
            return None
        row_plan = self.gate.compact_row_plan()
        union = kv_heads if plan is None else min(plan[0], kv_heads)
        if row_plan is None or row_plan[0] >= union:
            return None
        if tokens is not None and not row_cost.rows_pay(tokens, row_plan[0], union):
            return None
        return row_plan

    def _every_head_plan(self, keep: torch.Tensor) -> Optional[str]:
        """How a call that computes every head runs, counted: DENSE (the gate kept every head),
        MASKED (rows decide apart on a device in MASKED_DENSE_DEVICES: the dense originals, the
        pruned heads' outputs zeroed) or None (the head ops)."""
        self.calls_every_head += 1
        if self.gate.keeps_every_head():
            self.calls_dense += 1
            return DENSE
        if (keep.dim() == 2 and keep.shape[0] > 1 and keep.device.type in MASKED_DENSE_DEVICES
                and self.gate.decides_rows_apart()):
            self.calls_masked += 1
            return MASKED
        return None

    def _gathered(self, q, k, v, w_o, in_out_o, keep, cap, head_dim, v_head_dim, kv_heads,
                  gather=gather_block_weights):
        """The gathered weights: the last call's when the decision and the weights are the same
        tensors, unmodified. A static decision is one tensor handed to every call, so eager calls
        skip the gather (on CPU most of a compact block's host time); a per-input decision is a
        new tensor each call and gathers each time. Never reused under autograd (the gather must
        be differentiated). Inside a CUDA-graph capture the graph reads the warm-up's gather only
        under a :class:`~dhp_fx.cuda_graphs.CUDAGraphRunner`, which checks the weights before each
        replay and captures again when one changed; otherwise it gathers at every replay."""
        weights = [t for t in (q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, w_o) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in weights):
            return None
        decision = keep if keep._base is None else keep._base
        tensors = (decision, *weights)
        values = (gather, cap, tensor_state(tensors))
        last = self._last
        hit = last is not None and last[1] == values and all(a is b for a, b in zip(last[0], tensors))
        if not hit and last is not None and last[3] is not None:
            # A new tensor with the last decision's values: a per-input router repeating itself
            # (consecutive decoding steps often keep the same heads), or a traced graph's copy of
            # a decision that more than its block reads (dhp::run_gate). On a CPU the compare
            # needs no sync and is far cheaper than the gather it saves.
            hit = (last[1][:2] == values[:2] and last[1][2][1:] == values[2][1:]
                   and all(a is b for a, b in zip(last[0][1:], tensors[1:])) and torch.equal(last[3], keep))
            if hit:  # the next call of this decision tensor then hits by identity, with no compare
                self._last = last = (tensors, values, last[2], last[3])
        if _capturing(keep):
            # A static decision was gathered by the warm-up calls: the graph may read that copy
            # if its runner re-checks the weights before each replay; otherwise (a per-input
            # decision, a capture outside a runner) the graph gathers at every replay.
            if hit and freeze_for_capture(tensors, last[2]):
                return last[2]
            self._last = None
            return None
        if hit:
            return last[2]
        gathered = gather(q, k, v, w_o, in_out_o, keep, cap, head_dim, v_head_dim, kv_heads)
        self.gathers += 1
        self._last = (tensors, values, gathered, keep.clone() if keep.device.type == "cpu" else None)
        return gathered

    def _every_head(self, keep, attn_mask, dropout_p, is_causal, scale, projections, roles, out_projection, geometry,
                    qk_factors=(1.0, 1.0)):
        """What the graph computed before the block replaced it: the head ops, H heads wide."""
        heads, kv_heads, head_dim, v_head_dim = geometry
        w_o, b_o, flags_o, unit_o, in_out_o, flat = out_projection
        union = None
        originals = self._every_head_plan(keep)  # DENSE or MASKED: F.linear and SDPA, not the head ops

        def flags(spec):
            nonlocal union
            if spec == "any" and union is None:
                union = keep.any(0)
            return _flags(spec, keep, union)

        if originals:
            features = [_linear(p[0], p[1], p[2], p[5]) for p in projections]
        else:
            features = [torch.ops.dhp.head_linear_out(*p[:3], flags(p[3]), *p[4:6]) for p in projections]

        def role(index: int, n: int, dim: int):
            i, start = roles[index]
            x3 = projections[i][6]
            B, L = x3.shape[:2]
            y = features[i].view(B, L, -1)[..., start:start + n * dim]
            return y.view(B, L, n, dim).transpose(1, 2)

        q, k, v = role(0, heads, head_dim), role(1, kv_heads, head_dim), role(2, kv_heads, v_head_dim)
        q, k = (t if f == 1.0 else t * f for t, f in zip((q, k), qk_factors))
        if originals:
            o = dense_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, heads // kv_heads)
            if originals is MASKED:
                o = zero_pruned(o, keep)
        else:
            o = torch.ops.dhp.gated_attention(q, k, v, keep, attn_mask, dropout_p, is_causal, scale)
        o = self.gate.tap_module(o, q, k, v, attn_mask)
        B, _, L, _ = o.shape
        o = o.transpose(1, 2).reshape(B, L, heads * v_head_dim)
        o = o.flatten(0, 1) if flat else o
        if originals:
            return _linear(o, w_o, b_o, in_out_o)
        return torch.ops.dhp.head_linear_in(o, w_o, b_o, flags(flags_o), unit_o, in_out_o)


class CompactChain(CompactBlock):
    """The calls ``passes/compact_chain.py`` puts in place of a block's head ops when the graph's
    own ops (RoPE) stay between projections and attention. One module, six kinds of call:

    - ``chain(keep, x, kind="plan", weights=(wq, bq, wk, bk, wv, bv, wo), starts, geometry)``:
      (cap, rows_shared or whole, gathered, per_row) when this call runs its kept KV groups alone
      (per_row: each row its own, kernels/compact_rows), a QueryHeads under GQA when the kept
      heads touch every group (the kept query heads over every group's K/V), else DENSE, MASKED
      or None (the head ops); x, the first projection's input, gives the rows' token count.
      ``query_only=True`` (a query chain: K/V are the graph's own, every head's; wk, bk, wv, bv
      are None, or q's own weight where one projection computes all three; ``in_out``: whether
      q's and W_o's weights are HF Conv1D's [in, out]): a QueryHeads or one of the last three;
    - ``chain(keep, x, w, b, flags, unit, in_out, kind="proj", plan, role, geometry)``: the
      role's features, [B, L, cap · group · D] from the gathered rows, or the head op's; role -1:
      one projection of q, k and v, whose features are q's, k's, then v's; role -2: the same,
      [q_h, k_h, v_h] head by head;
    - ``chain(t, kind="role", plan, role, geometry)``: role's features of a role -1 projection's
      output t, for a graph that slices them at fixed widths (Phi-3);
    - ``chain(t, kind="role_heads", plan, role, geometry)``: role's heads of a role -2
      projection's output in a query chain (GPT-NeoX with a KV cache);
    - ``chain(q, k, v, keep, mask, dropout_p, is_causal, scale, kind="core", plan, geometry)``;
    - ``chain(keep, o, w, b, flags, unit, in_out, kind="out", plan, geometry)``.
    """

    def __init__(self, gate: nn.Module):
        super().__init__(gate)
        self._per_head_last: Optional[tuple] = None  # (gathered, its rows head by head)
        self._bands_last: Optional[tuple] = None  # (gathered, group, its bands)
        # Under a traced compiler, the graphs this chain runs in as one opaque op, by call id
        # (dhp_fx/opaque.py); the op holds them weakly, so they live as long as the chain.
        self.opaque_graphs: dict[int, nn.Module] = {}

    def forward(self, *args, kind: str, **kwargs):
        return getattr(self, "_" + kind)(*args, **kwargs)

    def _plan(self, keep, x=None, *, weights, starts, geometry, periods=(None, None, None), query_only=False,
              in_out=(False, False)):
        heads, kv_heads, head_dim, v_head_dim = geometry
        if query_only:  # K and V are the graph's own, every head's: only query heads can be left out
            query = self._query_heads_plan(keep, weights, starts, geometry, in_out, periods)
            return self._every_head_plan(keep) if query is None else query
        plan = self.gate.compact_plan(keep.shape[0])
        tokens = None if x is None else row_cost.tokens_per_row(x, keep.shape[0])
        row_plan = self._row_plan(keep, plan, kv_heads, tokens)
        if row_plan is None and (plan is None or plan[0] >= kv_heads):
            query = None
            if plan is not None and heads > kv_heads and all(p is None for p in periods):
                query = self._query_heads_plan(keep, weights, starts, geometry)
            return self._every_head_plan(keep) if query is None else query
        cap, shared_or_whole = row_plan if row_plan is not None else plan
        gather = gather_rows if row_plan is not None else gather_block_weights
        wq, bq, wk, bk, wv, bv, wo = weights
        q, k, v = (HeadProjection(None, w, b, False, start, period)
                   for (w, b), start, period in zip(((wq, bq), (wk, bk), (wv, bv)), starts, periods))
        gathered = self._gathered(q, k, v, wo, False, keep, cap, head_dim, v_head_dim, kv_heads, gather)
        if gathered is None:  # under autograd: gathered by torch ops, every call
            gathered = gather(q, k, v, wo, False, keep, cap, head_dim, v_head_dim, kv_heads)
        self.calls_compact += 1
        self.calls_rows += row_plan is not None
        return cap, shared_or_whole, gathered, row_plan is not None

    def _query_heads_plan(self, keep, weights, starts, geometry, in_out=(False, False),
                          periods=(None, None, None)) -> Optional["QueryHeads"]:
        """Under GQA, when the kept heads touch every KV group, or in a query chain: the kept
        query heads alone (their Q rows and W_o columns gathered) over every group's K and V, if
        the gate bounds them below every head."""
        heads, kv_heads, head_dim, v_head_dim = geometry
        head_plan = self.gate.compact_head_plan(keep.shape[0])
        if head_plan is None:
            return None
        cap, rows_same = head_plan
        if not rows_same and keep.device.type in MASKED_DENSE_DEVICES and self.gate.decides_rows_apart():
            return None  # the masked dense block, as where the head ops would run (see MASKED_DENSE_DEVICES)
        wq, bq, wk, bk, wv, bv, wo = weights
        # in_out: HF Conv1D weights, [in, out], of the q (and fused k/v) projection and W_o
        q, k, v = (HeadProjection(None, w, b, in_out[0], start, period)
                   for (w, b), start, period in zip(((wq, bq), (wk, bk), (wv, bv)), starts, periods))
        gathered = self._gathered(q, k, v, wo, in_out[1], keep, cap, head_dim, v_head_dim, kv_heads,
                                  gather_query_heads)
        if gathered is None:  # under autograd: gathered by torch ops, every call
            gathered = gather_query_heads(q, k, v, wo, in_out[1], keep, cap, head_dim, v_head_dim, kv_heads)
        self.calls_compact += 1
        self.calls_query_heads += 1
        return QueryHeads(cap, rows_same, gathered)

    def _proj(self, keep, x, w, b, flags, unit, in_out, *, plan, role, geometry):
        if isinstance(plan, QueryHeads):  # w_qkv: the gathered Q rows (then every K/V row, fused)
            if role in (0, FUSED_QKV, FUSED_PER_HEAD):
                return F.linear(x, plan.gathered.w_qkv, plan.gathered.b_qkv)
            return _linear(x, w, b, in_out)
        if plan is None:
            return torch.ops.dhp.head_linear_out(x, w, b, _flags(flags, keep), unit, in_out)
        if plan is DENSE or plan is MASKED:
            return _linear(x, w, b, in_out)
        heads, kv_heads, head_dim, v_head_dim = geometry
        cap, _, gathered, per_row = plan
        if role == FUSED_QKV:  # one projection of q, k and v, laid out as the gathered rows are
            if per_row:
                w = torch.cat(gathered.weights, -1)
                b = None if gathered.biases[0] is None else torch.cat(gathered.biases, -1)
                return _per_row(x, keep.shape[0], lambda x3: project_rows(x3, w, b))
            return F.linear(x, gathered.w_qkv, gathered.b_qkv)
        if role == FUSED_PER_HEAD:  # ... laid out [q_h, k_h, v_h] head by head
            dims = (head_dim, head_dim, v_head_dim)
            if per_row:
                w = _per_head(gathered.weights, dims, cap, -1)
                b = None if gathered.biases[0] is None else _per_head(gathered.biases, dims, cap, -1)
                return _per_row(x, keep.shape[0], lambda x3: project_rows(x3, w, b))
            w, b = self._per_head_rows(gathered, dims, cap)
            return F.linear(x, w, b)
        widths = role_widths(cap, heads // kv_heads, head_dim, v_head_dim)
        lo = sum(widths[:role])
        if per_row:
            return _per_row(x, keep.shape[0],
                            lambda x3: project_rows(x3, gathered.weights[role], gathered.biases[role]))
        rows = slice(lo, lo + widths[role])
        return F.linear(x, gathered.w_qkv[rows], None if gathered.b_qkv is None else gathered.b_qkv[rows])

    def _role(self, t, *, plan, role, geometry):
        heads, kv_heads, head_dim, v_head_dim = geometry
        if isinstance(plan, QueryHeads):  # the kept query heads, every group's K and V
            widths = [plan.cap * head_dim, kv_heads * head_dim, kv_heads * v_head_dim]
        else:  # every head's features unless this call computes its kept groups alone
            cap = plan[0] if isinstance(plan, tuple) else kv_heads
            widths = role_widths(cap, heads // kv_heads, head_dim, v_head_dim)
        lo = sum(widths[:role])
        return t[..., lo:lo + widths[role]]

    def _role_heads(self, t, *, plan, role, geometry):
        """Role's heads [.., n, dim] of a per-head projection's output t, for a query chain whose
        graph cut [q_h, k_h, v_h] head by head: laid out q's, k's, then v's when the kept query
        heads' rows were gathered (fewer q heads than k/v heads), else the graph's own layout."""
        heads, kv_heads, head_dim, v_head_dim = geometry
        dims = (head_dim, head_dim, v_head_dim)
        if isinstance(plan, QueryHeads):
            return self._role(t, plan=plan, role=role, geometry=geometry).unflatten(-1, (-1, dims[role]))
        offset = sum(dims[:role])
        return t.unflatten(-1, (heads, sum(dims)))[..., offset:offset + dims[role]]

    def _bands(self, plan: "QueryHeads", group: int, q: torch.Tensor) -> Optional[list]:
        """The gathered heads' bands for a CPU core (kernels/head_runs.py), once per gather: a
        static decision's gather serves call after call, and planning them reads the index
        back (a device sync anywhere but on a CPU)."""
        if not plan.rows_same or q.device.type != "cpu":
            return None
        last = self._bands_last
        if last is None or last[0] is not plan.gathered or last[1] != group:
            gathered = plan.gathered
            last = self._bands_last = (gathered, group, head_bands(gathered.idx.tolist(), gathered.valid.tolist(), group))
        return last[2]

    def _per_head_rows(self, gathered, dims, cap):
        """The gathered q, k, v rows reordered head by head: once per gather (a static decision's
        gather is reused call after call, so is this)."""
        last = self._per_head_last
        if last is not None and last[0] is gathered:
            return last[1]
        widths = [cap * d for d in dims]
        w = _per_head(gathered.w_qkv.split(widths), dims, cap, 0)
        b = None if gathered.b_qkv is None else _per_head(gathered.b_qkv.split(widths), dims, cap, 0)
        self._per_head_last = (gathered, (w, b))
        return w, b

    def _core(self, q, k, v, keep, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *, plan, geometry):
        if isinstance(plan, QueryHeads):
            heads, kv_heads, _, _ = geometry
            group = heads // kv_heads
            return query_heads_core(q, k, v, keep, plan.gathered, group, attn_mask, dropout_p, is_causal,
                                    scale, plan.rows_same, self._bands(plan, group, q))
        if plan is None:
            return torch.ops.dhp.gated_attention(q, k, v, keep, attn_mask, dropout_p, is_causal, scale)
        heads, kv_heads, _, _ = geometry
        if plan is DENSE:
            return dense_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, heads // kv_heads)
        if plan is MASKED:
            return zero_pruned(dense_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, heads // kv_heads),
                               keep)
        cap, shared_or_whole, gathered, per_row = plan
        core = rows_core if per_row else compact_core
        return core(q, k, v, keep, gathered, heads // kv_heads, attn_mask, dropout_p, is_causal, scale,
                    shared_or_whole)

    def _out(self, keep, o, w, b, flags, unit, in_out, *, plan, role, geometry):
        if isinstance(plan, QueryHeads):
            return F.linear(o, plan.gathered.w_o, b)
        if plan is None:
            return torch.ops.dhp.head_linear_in(o, w, b, _flags(flags, keep), unit, in_out)
        if plan is DENSE or plan is MASKED:
            return _linear(o, w, b, in_out)
        w_o = plan[2].w_o
        if plan[3]:
            out = _per_row(o, keep.shape[0], lambda o3: torch.bmm(o3, w_o))
            return out if b is None else out + b
        return F.linear(o, w_o, b)


def _per_head(parts, dims, cap: int, axis: int) -> torch.Tensor:
    """q, k and v features of ``cap`` heads, each role's heads adjacent along ``axis`` (as
    gathered), interleaved into [q_h, k_h, v_h] head by head along that axis."""
    axis = axis % parts[0].dim()
    split = [p.unflatten(axis, (cap, d)) for p, d in zip(parts, dims)]
    return torch.cat(split, axis + 1).flatten(axis, axis + 1)


def _capturing(keep: torch.Tensor) -> bool:
    return keep.is_cuda and torch.cuda.is_current_stream_capturing()


class QueryHeads(NamedTuple):
    """The chain's plan for a GQA call whose kept heads touch every KV group: ``cap`` query heads
    gathered (their Q rows, then every K/V row for a fused projection; their W_o columns), every
    group's K and V computed. rows_same: every row keeps the same heads (dense attention on the
    gathered heads); otherwise the gated op zeroes each row's own pruned heads among them."""

    cap: int
    rows_same: bool
    gathered: GatheredHeads


# The chain's plan when the gate kept every head: each call runs its dense original.
DENSE = "dense"
# ... and when rows decide apart and nothing compacts (see MASKED_DENSE_DEVICES): the same, with
# the pruned heads' attention outputs zeroed.
MASKED = "masked"


def zero_pruned(o: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """o [B, H, L, D] with the heads keep [B, H] prunes set to zero. A select, not a product:
    a pruned head's row that is NaN (every key masked) must come out zero, as from the gated op."""
    return o.masked_fill(~keep[..., None, None], 0)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_out: bool) -> torch.Tensor:
    """The projection a head op stands for, every head computed: weight [out, in], or [in, out]
    for an HF Conv1D (in_out)."""
    return F.linear(x, weight.t() if in_out else weight, bias)


def _per_row(x: torch.Tensor, batch: int, fn) -> torch.Tensor:
    """fn on x as [batch, L, features] (rows may arrive flattened to [batch * L, features])."""
    if x.dim() == 3:
        return fn(x)
    y = fn(x.reshape(batch, -1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _flags(spec, keep, union: Optional[torch.Tensor] = None):
    """A head op's flags from the pass's name for them (see passes/compact_heads._flags_spec);
    ``union``: keep.any(0) where the caller has it already."""
    if isinstance(spec, torch.Tensor):
        return spec
    if isinstance(spec, tuple) and spec and spec[0] == RECIPE:
        return replay_flags(spec, keep)
    if spec == "keep":
        return keep
    return keep.any(0) if union is None else union
