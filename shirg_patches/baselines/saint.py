"""SAINT-style pruning (after Jeddi et al., 2025): drop the most redundant tokens of a
cosine-similarity graph built on the vision-encoder side.

Redundancy of a token = the sum of its cosine similarities to all still-alive tokens. Tokens
are dropped a chunk at a time from the top of that ranking and the sums are updated, so the
graph adapts as redundant neighbours disappear. It runs once on SigLIP outputs, before the LM,
so the prefix K/V cache stays valid for every diffusion step.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava.errors import InputError
from shirg_patches.context import PruneContext
from shirg_patches.registry import BudgetOptions, PruneMethod, option, register


@dataclass(frozen=True)
class SaintOptions(BudgetOptions):
    iters: int = option(8, "SAINT: rounds of redundancy-graph pruning", flag="saint_iters")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise InputError(f"--saint_iters must be a positive integer, got {self.iters!r}")


def select_saint(ctx: PruneContext) -> torch.Tensor:
    """Keep `budget` tokens after removing the most redundant ones in `iters` rounds.

    Graph nodes are ctx.keys (last SigLIP layer), or ctx.vision_features when keys are None.
    The row sums come from one [N, D] product (sim_i = k_i . sum_j k_j), so no N x N matrix is
    built. Ties drop the higher index first. Within a round a token is spared when its nearest
    alive neighbour is dropped ahead of it, so both halves of a duplicate pair never vanish
    together (that can add rounds beyond `iters`; each round drops at least one token).
    """
    k = ctx.keys if ctx.keys is not None else ctx.vision_features
    k = F.normalize(k.float(), dim=-1)
    opts = ctx.options or SaintOptions(budget=ctx.budget)
    n, iters = ctx.num_tokens, opts.iters
    alive = torch.ones(n, dtype=torch.bool, device=k.device)
    steps = torch.arange(n, device=k.device)
    redundancy = k @ k.sum(0)
    excess, rounds = n - ctx.budget, 0
    while excess > 0:
        chunk = math.ceil(excess / max(iters - rounds, 1))
        score = redundancy.masked_fill(~alive, -math.inf).flip(0)
        cand = n - 1 - torch.sort(score, descending=True, stable=True).indices[:chunk]
        sim = k[cand] @ k.T
        sim[:, ~alive] = -math.inf
        sim[steps[:chunk], cand] = -math.inf
        rank = torch.full((n,), n, device=k.device)
        rank[cand] = steps[:chunk]
        drop = cand[rank[sim.argmax(1)] >= steps[:chunk]]
        alive[drop] = False
        redundancy -= k @ k[drop].sum(0)
        excess -= drop.numel()
        rounds += 1
    return alive.nonzero().squeeze(1)


register(PruneMethod("saint", "drop the most redundant tokens of the SigLIP-key cosine graph", SaintOptions,
                     select=select_saint, needs_keys=True))
