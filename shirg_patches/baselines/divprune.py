"""DivPrune-style pruning (after Alvar et al., CVPR 2025): keep the most diverse subset by
greedy max-min selection on cosine distance of the LM-space tokens (ctx.features).

It runs once on the projector outputs, before the LM, so the prefix K/V cache stays valid for
every diffusion step.
"""
import math

import torch
import torch.nn.functional as F

from shirg_patches.context import PruneContext
from shirg_patches.registry import BudgetOptions, PruneMethod, register


def select_divprune(ctx: PruneContext) -> torch.Tensor:
    """Keep `budget` tokens chosen greedily: start from the token with the largest summed cosine
    distance to all tokens (the most atypical one; computed as argmin x_i . sum_j x_j), then
    repeatedly add the token whose distance to its nearest selected token is largest.

    Tracks each token's highest similarity to the selected set (distance = 1 - similarity), so
    each step is one [N, D] x [D] product; no N x N matrix and no host sync per step. Ties go
    to the lower index."""
    x = F.normalize(ctx.features.detach().float(), dim=-1)  # indices carry no gradient; out= needs none
    picks = torch.empty(ctx.budget, dtype=torch.long, device=x.device)
    picks[0] = torch.argmin(x @ x.sum(0))
    nearest_sim = x @ x[picks[0]]
    nearest_sim[picks[0]] = math.inf
    for s in range(1, ctx.budget):
        picks[s] = torch.argmin(nearest_sim)
        torch.maximum(nearest_sim, x @ x[picks[s]], out=nearest_sim)
        nearest_sim[picks[s]] = math.inf
    return picks


register(PruneMethod("divprune", "greedy max-min diversity of the projected tokens", BudgetOptions,
                     select=select_divprune))
