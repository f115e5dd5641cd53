"""VisionZip-style pruning (after Yang et al., 2024): keep the tokens that receive the most
attention (dominant) and fold the rest into a few contextual tokens.

Unlike the paper, which merges inside the vision encoder before the projector, the merge here
happens after the projector (averages of ctx.features), because the prune hook sits there.
Everything is decided once, before the LM, so the prefix K/V cache stays valid for every
diffusion step.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava.errors import InputError
from shirg_patches.context import PruneContext, Selection
from shirg_patches.ops import complement, spread, top_k_indices
from shirg_patches.registry import BudgetOptions, PruneMethod, option, register


@dataclass(frozen=True)
class VisionZipOptions(BudgetOptions):
    dominant_ratio: float = option(0.85, "VisionZip: share of the budget kept as top-attention tokens")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.dominant_ratio <= 1:
            raise InputError(f"--dominant_ratio must be in [0, 1], got {self.dominant_ratio}")


def select_visionzip(ctx: PruneContext) -> Selection:
    """Dominant: the round(dominant_ratio * budget) tokens with the highest ctx.attn_received,
    kept as they are. Contextual: the remaining slots, evenly strided over the non-dominant
    tokens (raster order); every other non-dominant token is averaged into its most similar
    target (cosine on ctx.keys, else ctx.vision_features). When no slot is left (tiny budget)
    the non-dominant tokens are simply dropped."""
    if ctx.attn_received is None:
        raise InputError("visionzip needs attention-received scores (ctx.attn_received)")
    opts = ctx.options or VisionZipOptions(budget=ctx.budget)
    n_dom = round(opts.dominant_ratio * ctx.budget)
    dominant = top_k_indices(ctx.attn_received, n_dom)
    rest = complement(dominant, ctx.num_tokens)
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
    is_target[spread(ctx.budget - n_dom, rest.numel())] = True
    targets, merged = rest[is_target], rest[~is_target]

    feats = ctx.features.float()
    sums, counts = feats[targets], feats.new_ones(targets.numel())
    if targets.numel() and merged.numel():
        k = ctx.keys if ctx.keys is not None else ctx.vision_features
        k = F.normalize(k.float(), dim=-1)
        nearest = (k[merged] @ k[targets].T).argmax(1)
        sums.index_add_(0, nearest, feats[merged])
        counts.index_add_(0, nearest, feats.new_ones(merged.numel()))

    tokens = torch.cat([feats[dominant], sums / counts[:, None]])
    return Selection(indices=torch.cat([dominant, targets]), tokens=tokens.to(ctx.features.dtype))


register(PruneMethod("visionzip", "top attention-received tokens + merged contextual tokens", VisionZipOptions,
                     select=select_visionzip, needs_attention=True, needs_keys=True))
