"""LLaDA-8B language model: a LLaMA-style pre-norm transformer with fully bidirectional attention.

Parameter names follow the checkpoint (`transformer.wte`, `transformer.blocks.N.q_proj`, ...), so a
state dict loads without renaming. Besides the plain forward there is a prompt-only `prefill` that
returns a `PrefixCache`: the diffusion sampler re-runs only the response slots every step while the
prompt's keys/values stay fixed ("Prefix-DLM"), optionally after pruning prompt tokens inside the LM.

Ragged batches (prompts of different lengths, `lengths=`): prompts are RIGHT-padded to the longest,
so every real token keeps the slot and RoPE position it has when run alone (prompt 0..P_b-1, answer
P_b..P_b+L-1, per sample). Linears and norms run on the whole padded batch (row-independent: the
part whose weight reads batching amortises); attention runs per sample on exactly its own real keys
(no padding keys at all), i.e. with the shapes of its batch-1 run. A boolean key mask over padded
keys was measured to change SDPA's output by ~1e-7 (the softmax reduction sees a different key
count), which can flip a near-tie greedy choice; per-sample attention keeps every sample
bit-identical to its batch-1 run on CPU. Padded query rows produce zeros and are never read. When
every prompt has the same length there is no padding and attention runs batched.
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
    # ragged batch: real prompt length of each sample (slots past it are padding); None = all fill prefix_length
    lengths: Optional[list[int]] = None

    def clone(self) -> "PrefixCache":
        return PrefixCache([k.clone() for k in self.keys], [v.clone() for v in self.values], self.prefix_length,
                           None if self.lengths is None else list(self.lengths))

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


def rope_tables_from(
    starts: list[int], length: int, head_dim: int, theta: float, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cos/sin [B, 1, T, head_dim] for positions starts[b] .. starts[b]+T-1, each row built by the
    very call a batch-1 run makes (`rope_tables(arange(start, start + T))`), so the values are identical."""
    tables = [rope_tables(torch.arange(s, s + length, device=device), head_dim, theta) for s in starts]
    return torch.stack([c for c, _ in tables]).unsqueeze(1), torch.stack([s for _, s in tables]).unsqueeze(1)


def ragged_lengths(lengths, batch: int, length: int) -> Optional[list[int]]:
    """Validated per-sample real lengths of a right-padded batch, or None when nothing is padded."""
    if lengths is None:
        return None
    lengths = [int(n) for n in lengths]
    if len(lengths) != batch or any(not 1 <= n <= length for n in lengths):
        raise InputError(f"lengths {lengths} must give one value in [1, {length}] per sample of a batch of {batch}")
    return None if all(n == length for n in lengths) else lengths


def ragged_attention(q, k, v, past_kv=None, lengths=None, past_lengths=None) -> torch.Tensor:
    """Attention of a right-padded batch, one sample at a time on exactly its real tokens.

    Sample b's first lengths[b] queries (all T when None) attend to its first past_lengths[b] cached keys
    (all when None) followed by its first lengths[b] new keys: the same tensors, in the same order, as
    its batch-1 run. Padded query rows get zeros."""
    B, H, T, hd = q.shape
    y = q.new_zeros(B, H, T, hd)
    for b in range(B):
        n = T if lengths is None else lengths[b]
        kb, vb = k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        if past_kv is not None:
            p = past_kv[0].shape[2] if past_lengths is None else past_lengths[b]
            kb = torch.cat([past_kv[0][b : b + 1, :, :p], kb], dim=2)
            vb = torch.cat([past_kv[1][b : b + 1, :, :p], vb], dim=2)
        y[b : b + 1, :, :n] = attention(q[b : b + 1, :, :n], kb, vb)
    return y


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

    def forward(self, x, cos, sin, past_kv=None, attn_mask=None, lengths=None, past_lengths=None):
        """x [B, T, D] -> (y [B, T, D], (k, v) of these T tokens post-RoPE). `past_kv` is prepended to the
        keys/values so the T tokens also attend to cached prompt tokens. `lengths` / `past_lengths` describe a
        right-padded ragged batch (see `ragged_attention`); cos/sin are then [T, hd] or per sample [B, 1, T, hd]."""
        B, T, D = x.shape
        n1 = self.attn_norm(x)
        q = self.q_proj(n1).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(n1).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n1).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if lengths is not None or past_lengths is not None:
            if attn_mask is not None:
                raise InputError("give either attention_mask or ragged lengths, not both")
            y = ragged_attention(q, k, v, past_kv, lengths, past_lengths)
        else:
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

    def lm_logits(self, hidden: torch.Tensor, at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final norm + head on `hidden` [..., D], or only on its rows where the bool mask `at` is True ([N, D])."""
        head = self.transformer.wte if self.config.weight_tying else self.transformer.ff_out
        return F.linear(self.transformer.ln_f(hidden if at is None else hidden[at]), head.weight)

    def _block(self, block, x, cos, sin, past_kv=None, attn_mask=None, lengths=None, past_lengths=None):
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, x, cos, sin, past_kv, attn_mask, lengths, past_lengths, use_reentrant=False)
        return block(x, cos, sin, past_kv, attn_mask, lengths, past_lengths)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        prefix_cache: Optional[PrefixCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        lengths: Optional[list[int]] = None,
        logits_at: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """inputs_embeds [B, T, D] -> logits [B, T, embedding_size].

        `logits_at` (bool [B, T]): run the head only there and return [N, embedding_size] for the N True slots in
        row-major order. The training loss reads only its supervised slots; the full [2B, T, vocab] logits would
        be its largest transient tensor at 8B (126k vocabulary, 0.5 GB per sample in bf16).

        With `prefix_cache` the T tokens sit at positions P..P+T-1 and attend to [cached prompt; themselves];
        the prompt itself is not recomputed. `attention_mask` (bool, True = may attend) has shape
        [B or 1, 1, T, T_total] with T_total = cached length + T, so it needs equal cache lengths per layer.

        Ragged batches: a cache from `prefill(..., lengths=)` puts sample b's T tokens at positions
        lengths[b].. and lets them see only its real prompt keys; without a cache, `lengths[b]` says how many
        leading tokens of sample b are real (right padding; logits of padded slots are meaningless).
        """
        if lengths is not None or (prefix_cache is not None and prefix_cache.lengths is not None):
            return self._forward_ragged(inputs_embeds, prefix_cache, attention_mask, lengths, logits_at)
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
        return self.lm_logits(x, logits_at)

    def _forward_ragged(self, inputs_embeds, prefix_cache, attention_mask, lengths, logits_at=None) -> torch.Tensor:
        B, T, _ = inputs_embeds.shape
        if attention_mask is not None:
            raise InputError("give either attention_mask or ragged lengths, not both")
        if prefix_cache is not None:
            if lengths is not None:
                raise InputError("a ragged prefix cache carries its own lengths; do not pass lengths too")
            if len(set(prefix_cache.layer_lengths())) != 1:
                raise InputError("ragged batches do not support in-LM pruning (unequal cached lengths per layer)")
            past_lengths = prefix_cache.lengths
            cos, sin = rope_tables_from(past_lengths, T, self.config.head_dim, self.config.rope_theta,
                                        inputs_embeds.device)
        else:
            past_lengths = None
            lengths = ragged_lengths(lengths, B, T)
            positions = torch.arange(T, device=inputs_embeds.device)
            cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        x = inputs_embeds
        for i, block in enumerate(self.transformer.blocks):
            past_kv = (prefix_cache.keys[i], prefix_cache.values[i]) if prefix_cache is not None else None
            x, _ = self._block(block, x, cos, sin, past_kv, None, lengths, past_lengths)
        return self.lm_logits(x, logits_at)

    def prefill(
        self, inputs_embeds: torch.Tensor, prune_hook: Optional[PruneHook] = None, lengths: Optional[list[int]] = None
    ) -> PrefixCache:
        """Prompt-only bidirectional pass that keeps every layer's K/V and computes no logits.

        After each block, `prune_hook(layer_idx, hidden_in, hidden_out, positions)` may return indices into
        the current token axis (shared by the batch); later layers then see only those tokens, at their
        original RoPE positions. Layers up to and including `layer_idx` keep the full K/V.

        `lengths`: real prompt length of each sample of a right-padded batch (see the module doc); the cache
        records them so steps place each sample's answer right after its own prompt. Not combinable with
        `prune_hook` (in-LM pruning runs one prompt at a time).
        """
        B, P, _ = inputs_embeds.shape
        lengths = ragged_lengths(lengths, B, P)
        if lengths is not None and prune_hook is not None:
            raise InputError("in-LM pruning (prune_hook) runs one prompt at a time, not on a ragged batch")
        positions = torch.arange(P, device=inputs_embeds.device)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        keys, values = [], []
        x = inputs_embeds
        for i, block in enumerate(self.transformer.blocks):
            out, (k, v) = self._block(block, x, cos, sin, lengths=lengths)
            keys.append(k)
            values.append(v)
            keep = prune_hook(i, x, out, positions) if prune_hook is not None else None
            if keep is not None:
                keep = _check_keep(keep, out.shape[1]).to(out.device)
                out, positions, cos, sin = out[:, keep], positions[keep], cos[keep], sin[keep]
            x = out
        return PrefixCache(keys, values, prefix_length=P, lengths=lengths)


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
