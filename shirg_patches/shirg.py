"""SHIRG: static selection of foveal tokens next to a pooled global view (design §2).

The LM sees [global 256 ∥ top-K foveal tokens], chosen once before the LM so the prefix
KV-cache is never invalidated. With K = 724 that is 980 tokens, LaViDa's nominal pooled count.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from llava.errors import InputError
from shirg_patches.context import PruneContext, Selection, finalize_indices, top_k_indices
from shirg_patches.scoring import score_tokens

GLOBAL_SIDE = 16
GLOBAL_TOKENS = GLOBAL_SIDE * GLOBAL_SIDE  # 256
FOVEA_TOKENS = 32 * 32  # 1024
DEFAULT_KEEP_RATIO = 724 / 1024


def keep_count(keep_ratio: float, num_tokens: int = FOVEA_TOKENS) -> int:
    """K = round(keep_ratio · num_tokens); the ratio is the ablation flag (0.40 / 0.707 / 0.766 / 0.80)."""
    if not isinstance(keep_ratio, numbers.Real) or isinstance(keep_ratio, bool) or math.isnan(keep_ratio):
        raise InputError(f"keep ratio must be a number in (0, 1], got {keep_ratio!r}")
    if not 0 < keep_ratio <= 1:
        raise InputError(f"keep ratio must be in (0, 1], got {keep_ratio}")
    k = round(keep_ratio * num_tokens)
    if k < 1:
        raise InputError(f"keep ratio {keep_ratio} keeps no token out of {num_tokens}")
    return k


def resize_global_tokens(tokens: torch.Tensor, side_in: int = 27, side_out: int = GLOBAL_SIDE) -> torch.Tensor:
    """[side_in², D] or [1, side_in², D] → [side_out², D] by bilinear resizing of the token grid,
    the same op family as LaViDa's 27→14 pooling, so the LM sees familiar-looking global tokens."""
    if tokens.dim() == 3 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 2 or tokens.shape[0] != side_in * side_in:
        raise ValueError(f"expected [{side_in * side_in}, D] global tokens, got {tuple(tokens.shape)}")
    grid = tokens.T.reshape(1, -1, side_in, side_in)
    out = F.interpolate(grid, size=(side_out, side_out), mode="bilinear", align_corners=False, antialias=False)
    return out.reshape(-1, side_out * side_out).T.contiguous()


def select_shirg(ctx: PruneContext) -> Selection:
    """Keep ctx.budget foveal tokens by static top-K of the SHIRG score, in raster order.

    Reads ctx.options "score" (default "v1") and "temperature" (0.15); leaves the score note
    and the scores in ctx.options["shirg_note"] / ["shirg_scores"] for the CLI and heat-map.
    """
    result = score_tokens(
        ctx.features,
        ctx.attn_received,
        ctx.question_embedding,
        mode=ctx.options.get("score", "v1"),
        k=ctx.budget,
        seed=ctx.seed,
        temperature=ctx.options.get("temperature", 0.15),
    )
    ctx.options["shirg_note"] = result.note
    ctx.options["shirg_scores"] = result.scores
    kept = top_k_indices(result.scores, ctx.budget)
    return Selection(indices=finalize_indices(kept, ctx.budget, ctx.num_tokens))


def assemble_tokens(
    global_tokens: torch.Tensor,
    fovea_tokens: torch.Tensor,
    kept: torch.Tensor,
    expected_total: Optional[int] = None,
) -> torch.Tensor:
    """[global ∥ fovea[kept]] → [G + K, D]. The count is checked because a wrong visual-token
    count silently shifts every text position in the LM."""
    if expected_total is None:
        expected_total = GLOBAL_TOKENS + kept.numel()
    if global_tokens.shape[-1] != fovea_tokens.shape[-1]:
        raise RuntimeError(f"global tokens have dim {global_tokens.shape[-1]}, fovea tokens {fovea_tokens.shape[-1]}")
    out = torch.cat([global_tokens, fovea_tokens[kept]], dim=0)
    if out.shape[0] != expected_total:
        raise RuntimeError(
            f"SHIRG assembled {out.shape[0]} visual tokens (global {global_tokens.shape[0]} + "
            f"fovea {kept.numel()}), expected {expected_total}"
        )
    return out
