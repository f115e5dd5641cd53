"""LLaDA-8B language model: a LLaMA-style pre-norm transformer with fully bidirectional attention.

Parameter names follow the checkpoint (`transformer.wte`, `transformer.blocks.N.q_proj`, ...), so a
state dict loads without renaming. Besides the plain forward there is a prompt-only `prefill` that
returns a `PrefixCache`: the diffusion sampler re-runs only the response slots every step while the
prompt's keys/values stay fixed ("Prefix-DLM"), optionally after pruning prompt tokens inside the LM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llava.errors import InputError

from .configuration_llada import LLaDAConfig

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

# prune_hook(layer_idx, hidden_in, hidden_out, positions) -> indices of the tokens later layers keep, or None
PruneHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


@dataclass
class PrefixCache:
    """Per-layer prompt keys (post-RoPE) and values, each [B, H_kv, P_l, head_dim].

    P_l can be smaller than `prefix_length` for layers after an in-LM prune; `prefix_length` stays the
    original prompt length so response positions do not depend on pruning. Steps never modify these
    tensors; they concatenate into new ones.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    prefix_length: int

    def clone(self) -> "PrefixCache":
        return PrefixCache([k.clone() for k in self.keys], [v.clone() for v in self.values], self.prefix_length)

    def layer_lengths(self) -> list[int]:
        return [k.shape[2] for k in self.keys]


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then scale: the weight multiply happens in the activation dtype,
    as in the checkpoint's training code (matters for bf16 parity)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] in fp32 for rotate-half RoPE. Computed per call rather than kept in a buffer
    so that casting the model to bf16 cannot lower their precision."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / theta**exponent
    freqs = torch.outer(positions.float(), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]: rotate halves (a, b) -> (a cos - b sin, b cos + a sin) in fp32."""
    x32 = x.float()
    a, b = x32.chunk(2, dim=-1)
    rotated = torch.cat([-b, a], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def use_flash_attn(q: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> bool:
    """flash_attn only runs fp16/bf16 on CUDA and takes no boolean mask; everything else uses SDPA."""
    return (
        flash_attn_func is not None
        and attn_mask is None
        and q.device.type == "cuda"
        and q.dtype in (torch.float16, torch.bfloat16)
    )


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Bidirectional attention. q [B, H, T, hd], k/v [B, H_kv, S, hd] -> [B, H, T, hd].
    attn_mask (bool, True = may attend) broadcasts to [B, H, T, S]."""
    if use_flash_attn(q, attn_mask):
        # flash_attn wants [B, T, H, hd] and handles grouped K/V heads itself
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
        return out.transpose(1, 2)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)


class LLaDABlock(nn.Module):
    """Pre-norm attention + SiLU-gated MLP. `ff_proj` is the gate, `up_proj` the multiplier, `ff_out` the
    down projection (checkpoint naming); no biases anywhere."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x, cos, sin, past_kv=None, attn_mask=None):
        """x [B, T, D] -> (y [B, T, D], (k, v) of these T tokens post-RoPE). `past_kv` is prepended to the
        keys/values so the T tokens also attend to cached prompt tokens."""
        B, T, D = x.shape
        n1 = self.attn_norm(x)
        q = self.q_proj(n1).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(n1).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n1).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = k, v
        if past_kv is not None:
            k_all, v_all = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        y = attention(q, k_all, v_all, attn_mask)
        h = x + self.attn_out(y.transpose(1, 2).reshape(B, T, D))
        n2 = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(n2)) * self.up_proj(n2)), (k, v)


class LLaDAModel(nn.Module):
    """Token embedding, blocks, final norm and LM head under `transformer.*` (checkpoint layout).
    Subclasses add modules (vision tower, projector) after calling `super().__init__(config)`."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        modules = dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
        )
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.transformer = nn.ModuleDict(modules)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        """Small normal init so a freshly built (test / from-scratch) model has sane logits; real runs
        overwrite everything from the checkpoint."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(input_ids)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.transformer.wte if self.config.weight_tying else self.transformer.ff_out
        return F.linear(self.transformer.ln_f(hidden), head.weight)

    def _block(self, block, x, cos, sin, past_kv=None, attn_mask=None):
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, x, cos, sin, past_kv, attn_mask, use_reentrant=False)
        return block(x, cos, sin, past_kv, attn_mask)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        prefix_cache: Optional[PrefixCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """inputs_embeds [B, T, D] -> logits [B, T, embedding_size].

        With `prefix_cache` the T tokens sit at positions P..P+T-1 and attend to [cached prompt; themselves];
        the prompt itself is not recomputed. `attention_mask` (bool, True = may attend) has shape
        [B or 1, 1, T, T_total] with T_total = cached length + T, so it needs equal cache lengths per layer.
        """
        B, T, _ = inputs_embeds.shape
        start = prefix_cache.prefix_length if prefix_cache is not None else 0
        cached = prefix_cache.layer_lengths() if prefix_cache is not None else [0] * self.config.n_layers
        if attention_mask is not None and any(attention_mask.shape[-1] != n + T for n in cached):
            raise InputError(
                f"attention_mask covers {attention_mask.shape[-1]} keys "
                f"but the layers see {sorted({n + T for n in cached})}"
            )
        positions = torch.arange(start, start + T, device=inputs_embeds.device)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        x = inputs_embeds
        for i, block in enumerate(self.transformer.blocks):
            past_kv = (prefix_cache.keys[i], prefix_cache.values[i]) if prefix_cache is not None else None
            x, _ = self._block(block, x, cos, sin, past_kv, attention_mask)
        return self.lm_logits(x)

    def prefill(self, inputs_embeds: torch.Tensor, prune_hook: Optional[PruneHook] = None) -> PrefixCache:
        """Prompt-only bidirectional pass that keeps every layer's K/V and computes no logits.

        After each block, `prune_hook(layer_idx, hidden_in, hidden_out, positions)` may return indices into
        the current token axis (shared by the batch); later layers then see only those tokens, at their
        original RoPE positions. Layers up to and including `layer_idx` keep the full K/V.
        """
        B, P, _ = inputs_embeds.shape
        positions = torch.arange(P, device=inputs_embeds.device)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        keys, values = [], []
        x = inputs_embeds
        for i, block in enumerate(self.transformer.blocks):
            out, (k, v) = self._block(block, x, cos, sin)
            keys.append(k)
            values.append(v)
            keep = prune_hook(i, x, out, positions) if prune_hook is not None else None
            if keep is not None:
                keep = _check_keep(keep, out.shape[1]).to(out.device)
                out, positions, cos, sin = out[:, keep], positions[keep], cos[keep], sin[keep]
            x = out
        return PrefixCache(keys, values, prefix_length=P)


def _check_keep(keep: torch.Tensor, length: int) -> torch.Tensor:
    """A prune hook is code, not user input: a bad index set is a bug, so fail loudly."""
    if keep.dim() != 1 or keep.dtype not in (torch.int32, torch.int64) or keep.numel() == 0:
        raise RuntimeError(
            f"prune_hook must return a non-empty 1-D integer tensor, got {tuple(keep.shape)} {keep.dtype}"
        )
    if keep.min() < 0 or keep.max() >= length:
        raise RuntimeError(f"prune_hook returned an index outside [0, {length})")
    if torch.unique(keep).numel() != keep.numel():
        raise RuntimeError("prune_hook returned duplicate indices")
    return keep.long()
