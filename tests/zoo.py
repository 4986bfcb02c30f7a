"""Tiny random-init models for the zoo tests: each with its inputs and true attention-site count."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 64


@dataclass
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    sites: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int = 2
    keep_reference: bool = True  # the zeroed-head reference needs module-called output projections


def _ids(batch=2, seq=7, pad_last=True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        mask[-1, -2:] = 0
    return ids, mask


def _hf(config_cls, model_cls, attn, **cfg):
    def build():
        config = config_cls(**cfg)
        config._attn_implementation = attn
        torch.manual_seed(0)
        return model_cls(config).eval()

    return build


def hf_entries(attn: str) -> list[ZooEntry]:
    from transformers import (
        AlbertConfig, AlbertModel, BartConfig, BartModel, BertConfig, BertModel, BloomConfig, BloomModel,
        DistilBertConfig, DistilBertModel, FalconConfig, FalconModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
        LlamaForCausalLM, OPTConfig, OPTModel, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
        Qwen3Config, Qwen3ForCausalLM, RobertaConfig, RobertaModel, T5Config,
        T5Model, ViTConfig, ViTModel,
    )

    def text(pad=True):
        def make():
            ids, mask = _ids(pad_last=pad)
            return {"input_ids": ids, "attention_mask": mask}
        return make

    def seq2seq():
        ids, mask = _ids()
        dec, _ = _ids(seq=5, pad_last=False)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}

    def image():
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}

    bert_like = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return [
        ZooEntry(f"gpt2-{attn}", _hf(GPT2Config, GPT2LMHeadModel, attn, vocab_size=VOCAB, n_embd=32, n_layer=2,
                 n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2), text(), 2, 4, 4, 8),
        ZooEntry(f"bert-{attn}", _hf(BertConfig, BertModel, attn, **bert_like), text(), 2, 4, 4, 8),
        ZooEntry(f"roberta-{attn}", _hf(RobertaConfig, RobertaModel, attn, pad_token_id=1, **bert_like), text(), 2, 4, 4, 8),
        ZooEntry(f"distilbert-{attn}", _hf(DistilBertConfig, DistilBertModel, attn, vocab_size=VOCAB, dim=32,
                 n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64), text(), 2, 4, 4, 8),
        ZooEntry(f"llama-{attn}", _hf(LlamaConfig, LlamaForCausalLM, attn, vocab_size=VOCAB, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                 max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0), text(), 2, 4, 2, 8),
        ZooEntry(f"qwen2-{attn}", _hf(Qwen2Config, Qwen2ForCausalLM, attn, vocab_size=VOCAB, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, intermediate_size=64,
                 max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0), text(), 2, 4, 1, 8),
        ZooEntry(f"t5-{attn}", _hf(T5Config, T5Model, attn, vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                 num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0), seq2seq, 6, 4, 4, 8),
        ZooEntry(f"bart-{attn}", _hf(BartConfig, BartModel, attn, vocab_size=VOCAB, d_model=32, encoder_layers=2,
                 decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                 decoder_ffn_dim=64, max_position_embeddings=64), seq2seq, 6, 4, 4, 8),
        ZooEntry(f"vit-{attn}", _hf(ViTConfig, ViTModel, attn, image_size=16, patch_size=4, num_channels=3,
                 hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64), image, 2, 4, 4, 8),
        # RMSNorm over each head's q and k (a mean over the head dim) before RoPE
        ZooEntry(f"qwen3-{attn}", _hf(Qwen3Config, Qwen3ForCausalLM, attn, vocab_size=VOCAB, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
                 max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0), text(), 2, 4, 2, 8),
        # one fused qkv_proj sliced into q, k, v by constant last-dim ranges
        ZooEntry(f"phi3-{attn}", _hf(Phi3Config, Phi3ForCausalLM, attn, vocab_size=VOCAB, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                 max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0), text(), 2, 4, 2, 8),
        # q scaled by a constant before the head split (folded into the attention scale)
        ZooEntry(f"opt-{attn}", _hf(OPTConfig, OPTModel, attn, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32), text(),
                 2, 4, 4, 8),
        # one attention module shared by every layer: two sites, one output projection
        ZooEntry(f"albert-{attn}", _hf(AlbertConfig, AlbertModel, attn, embedding_size=16, **bert_like), text(),
                 2, 4, 4, 8),
    ] + ([
        # ALiBi through keyword baddbmm(batch1=, batch2=); transformers has no SDPA BLOOM
        ZooEntry("bloom-eager", _hf(BloomConfig, BloomModel, attn, vocab_size=VOCAB, hidden_size=32, n_layer=2,
                 n_head=4, pad_token_id=0, bos_token_id=1, eos_token_id=2), text(), 2, 4, 4, 8),
    ] if attn == "eager" else [
        # multi-query SDPA with one kv head broadcast over the query heads, no enable_gqa; its
        # projections are matmuls by weight.T (FalconLinear), read as F.linear
        ZooEntry("falcon-mqa-sdpa", _hf(FalconConfig, FalconModel, attn, vocab_size=VOCAB, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, multi_query=True, new_decoder_architecture=False,
                 alibi=False, bias=True), text(), 2, 4, 1, 8),
    ])


class EinsumFreeCausalSelfAttention(nn.Module):
    """nanoGPT style: fused qkv linear, split, masked_fill with a tril buffer, explicit softmax."""

    def __init__(self, d=32, heads=4, ctx=16):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.register_buffer("bias", torch.tril(torch.ones(ctx, ctx)).view(1, 1, ctx, ctx))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class BmmCrossAttention(nn.Module):
    """Old fairseq style: heads folded into the batch, bmm, pre-scaled q, padding mask on keys."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x, mem, mem_pad):
        B, T, C = x.shape
        S = mem.shape[1]
        q = (self.q(x) * self.hd ** -0.5).view(B, T, self.heads, self.hd).transpose(1, 2).reshape(B * self.heads, T, self.hd)
        k = self.k(mem).view(B, S, self.heads, self.hd).transpose(1, 2).reshape(B * self.heads, S, self.hd)
        v = self.v(mem).view(B, S, self.heads, self.hd).transpose(1, 2).reshape(B * self.heads, S, self.hd)
        w = torch.bmm(q, k.transpose(1, 2)).view(B, self.heads, T, S)
        w = w.masked_fill(mem_pad[:, None, None, :], float("-inf")).view(B * self.heads, T, S)
        w = torch.softmax(w, dim=-1)
        out = torch.bmm(w, v).view(B, self.heads, T, self.hd).transpose(1, 2).reshape(B, T, C)
        return self.o(out)


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return torch.softmax(self.net(x), dim=-1)


def _seeded(factory):
    def build():
        torch.manual_seed(0)
        return factory().eval()
    return build


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def torch_entries() -> list[ZooEntry]:
    def enc_layer():
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True), 2,
                                     enable_nested_tensor=False)

    def enc_inputs():
        pad = torch.zeros(2, 6, dtype=torch.bool)
        pad[1, -2:] = True
        return {"src": _randn(2, 6, 32), "src_key_padding_mask": pad}

    def dec_layer():
        return nn.TransformerDecoder(nn.TransformerDecoderLayer(32, 4, 64, dropout=0.1, batch_first=True), 2)

    def dec_inputs():
        return {"tgt": _randn(2, 5, 32), "memory": _randn(2, 6, 32),
                "tgt_mask": nn.Transformer.generate_square_subsequent_mask(5), "tgt_is_causal": True}

    def bmm_inputs():
        pad = torch.zeros(2, 6, dtype=torch.bool)
        pad[0, -1] = True
        return {"x": _randn(2, 5, 32), "mem": _randn(2, 6, 32), "mem_pad": pad}

    return [
        ZooEntry("torch-encoder", _seeded(enc_layer), enc_inputs, 2, 4, 4, 8, keep_reference=False),
        ZooEntry("torch-decoder", _seeded(dec_layer), dec_inputs, 4, 4, 4, 8, keep_reference=False),
        ZooEntry("nanogpt-attention", _seeded(EinsumFreeCausalSelfAttention), lambda: {"x": _randn(2, 7, 32)}, 1, 4, 4, 8),
        ZooEntry("bmm-cross-attention", _seeded(BmmCrossAttention), bmm_inputs, 1, 4, 4, 8),
        ZooEntry("no-attention", _seeded(NoAttention), lambda: {"x": _randn(3, 8)}, 0, 0, 0, 0),
    ]


def all_entries() -> list[ZooEntry]:
    return hf_entries("sdpa") + hf_entries("eager") + torch_entries()
