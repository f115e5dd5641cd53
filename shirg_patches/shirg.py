"""SHIRG: static selection of foveal tokens next to a pooled global view.

Two views instead of LaViDa's five: the whole image resized to 384² (27x27 SigLIP tokens,
projected, resized to 16x16 = 256) and one 448² fovea (1024 tokens, positions interpolated
27 -> 32). The foveal tokens are scored and the top K = round(keep_ratio·1024) kept in raster
order, so the LM sees [global 256 ∥ fovea 724] = 980 tokens, LaViDa's nominal pooled count.
Everything is chosen once before the LM, so the prefix K/V cache is never invalidated.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from llava.constants import (
    DEFAULT_KEEP_RATIO,
    FOVEA_SIZE,
    FOVEA_TOKENS,
    SCORE_V2_TEMPERATURE,
    SHIRG_GLOBAL_GRID,
    SHIRG_GLOBAL_TOKENS,
    SIGLIP_GRID,
    SIGLIP_IMAGE_SIZE,
)
from llava.errors import InputError
from shirg_patches import foveal
from shirg_patches.context import EncodeRequest, PruneContext, Selection, VisualTokens, run_select
from shirg_patches.ops import top_k_indices
from shirg_patches.registry import MethodOptions, PruneMethod, option, register
from shirg_patches.scoring import SCORE_MODES, check_score_mode, score_tokens


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


def resize_global_tokens(
    tokens: torch.Tensor, side_in: int = SIGLIP_GRID, side_out: int = SHIRG_GLOBAL_GRID
) -> torch.Tensor:
    """[side_in², D] or [1, side_in², D] → [side_out², D] by bilinear resizing of the token grid,
    the same op family as LaViDa's 27→14 pooling, so the LM sees familiar-looking global tokens."""
    if tokens.dim() == 3 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 2 or tokens.shape[0] != side_in * side_in:
        raise ValueError(f"expected [{side_in * side_in}, D] global tokens, got {tuple(tokens.shape)}")
    grid = tokens.T.reshape(1, -1, side_in, side_in)
    out = F.interpolate(grid, size=(side_out, side_out), mode="bilinear", align_corners=False, antialias=False)
    return out.reshape(-1, side_out * side_out).T.contiguous()


@dataclass(frozen=True)
class ShirgOptions(MethodOptions):
    keep_ratio: float = option(DEFAULT_KEEP_RATIO, "SHIRG: share of the 1024 foveal tokens kept (default 724/1024)")
    fovea: str = option("center", "SHIRG: fovea placement", choices=foveal.FOVEA_MODES)
    score: str = option("v1", "SHIRG: token score", flag="shirg_score", choices=SCORE_MODES)
    temperature: float = option(SCORE_V2_TEMPERATURE, "SHIRG v2: softmax temperature", flag="shirg_temperature")

    def validate(self) -> None:
        keep_count(self.keep_ratio)
        foveal.check_fovea_mode(self.fovea)
        check_score_mode(self.score)
        if not (isinstance(self.temperature, numbers.Real) and self.temperature > 0):
            raise InputError(f"--shirg_temperature must be > 0, got {self.temperature!r}")


def select_shirg(ctx: PruneContext) -> Selection:
    """Keep ctx.budget foveal tokens by static top-K of the SHIRG score, in raster order; the
    scores and any fallback note are returned in `info` for the CLI and heat-map."""
    opts = ctx.options or ShirgOptions()
    result = score_tokens(ctx.features, ctx.attn_received, ctx.question_embedding, mode=opts.score,
                          k=ctx.budget, seed=ctx.seed, temperature=opts.temperature)
    info = {"scores": result.scores}
    if result.note:
        info["shirg_note"] = result.note
    return Selection(indices=top_k_indices(result.scores, ctx.budget), info=info)


def encode_shirg(model, method: PruneMethod, request: EncodeRequest, timer) -> VisualTokens:
    """Global 384² view -> 256 tokens, 448² fovea -> 1024 scored tokens -> keep K; LaViDa's
    pooling does not apply to these views."""
    opts, image = request.options, request.image
    k = keep_count(opts.keep_ratio, FOVEA_TOKENS)
    tower = model.model.vision_tower
    with timer("preprocess"):
        global_pixels = foveal.to_pixel_values(image, tower.image_size)
    with timer("vision"):
        g = model.vision_features(global_pixels, opts.fovea == "saliency")
    with timer("preprocess"):
        saliency = None
        if opts.fovea == "saliency":
            side = tower.num_patches_per_side
            saliency = g.attn_received[0].float().view(side, side).cpu()
        box = foveal.fovea_box(image.size, opts.fovea, saliency, FOVEA_SIZE)
        fovea_pixels = foveal.to_pixel_values(foveal.fovea_view(image, box, FOVEA_SIZE), FOVEA_SIZE)
    with timer("vision"):
        f = model.vision_features(fovea_pixels, True)
    with timer("projector"):
        g_proj = model.project(g.features)[0]
        f_proj = model.project(f.features)[0]
    with timer("selection"):
        side = math.isqrt(f_proj.shape[0])
        ctx = PruneContext(
            features=f_proj,
            vision_features=f.features[0],
            view_shapes=[(side, side)],
            budget=k,
            attn_received=f.attn_received[0],
            keys=f.keys[0] if f.keys is not None else None,
            question_embedding=model.question_embedding(request.question_ids),
            seed=request.seed,
            options=opts,
        )
        sel = run_select(method.select, ctx)
        global_tokens = resize_global_tokens(g_proj)
        tokens = assemble_tokens(global_tokens, f_proj, sel.indices)
    info = {"fovea_box": box, "fovea": opts.fovea, "keep_ratio": opts.keep_ratio, "score": opts.score,
            "global_tokens": global_tokens.shape[0], "pooling": "pooling off (SHIRG views)", **sel.info}
    return VisualTokens(tokens, method.name, global_tokens.shape[0] + ctx.num_tokens,
                        [(SHIRG_GLOBAL_GRID, SHIRG_GLOBAL_GRID), (side, side)], kept=sel.indices, info=info)


def draw_heatmap(path, image, visual: VisualTokens) -> None:
    """`--save_heatmap`: the image, the fovea box and the dropped foveal tokens shaded."""
    from shirg_patches.heatmap import save_heatmap

    save_heatmap(path, image, visual.info["fovea_box"], visual.kept, scores=visual.info.get("scores"),
                 title=f"SHIRG: {visual.lm_token_count} tokens")


def assemble_tokens(
    global_tokens: torch.Tensor,
    fovea_tokens: torch.Tensor,
    kept: torch.Tensor,
    expected_total: Optional[int] = None,
) -> torch.Tensor:
    """[global ∥ fovea[kept]] → [G + K, D]. The count is checked because a wrong visual-token
    count silently shifts every text position in the LM."""
    if expected_total is None:
        expected_total = SHIRG_GLOBAL_TOKENS + kept.numel()
    if global_tokens.shape[-1] != fovea_tokens.shape[-1]:
        raise RuntimeError(f"global tokens have dim {global_tokens.shape[-1]}, fovea tokens {fovea_tokens.shape[-1]}")
    out = torch.cat([global_tokens, fovea_tokens[kept]], dim=0)
    if out.shape[0] != expected_total:
        raise RuntimeError(
            f"SHIRG assembled {out.shape[0]} visual tokens (global {global_tokens.shape[0]} + "
            f"fovea {kept.numel()}), expected {expected_total}"
        )
    return out


register(PruneMethod(
    "shirg", "SHIRG: global 384² -> 256 tokens + top-724 of a 448² fovea (1024) = 980", ShirgOptions,
    select=select_shirg, encode=encode_shirg, needs_attention=True,
    tower_views=((1, SIGLIP_IMAGE_SIZE), (1, FOVEA_SIZE)), accepts_empty_question=True, heatmap=draw_heatmap))
