"""What a prune method may look at.

A prune method is a pure function ``select(ctx: PruneContext) -> LongTensor`` returning the
indices (into ``ctx.features``' token axis) it keeps, sorted ascending. Candidate tokens are
laid out view after view, each view in raster order, so ascending indices are raster order
within every view. Nothing here holds the model: methods that must act inside the LM (TopV)
get a narrow callback instead (`lm_hook`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch


@dataclass
class PruneContext:
    """Inputs for one image.

    features:        [N, D_lm]  candidate tokens after the projector (LM space).
    vision_features: [N, D_vis] the same tokens before the projector (SigLIP output).
    view_shapes:     (rows, cols) of each view's token grid, in order; sum(r*c) == N.
    budget:          how many tokens to keep (1 <= budget <= N).
    attn_received:   [N] attention each token receives in the last kept SigLIP layer
                     (mean over heads and queries, computed within its own view), or None.
    keys:            [N, D_vis] SigLIP keys of the last kept layer (heads concatenated), or None.
    question_embedding: [D_lm] mean LM input embedding of the question tokens, or None
                     when there is no question.
    seed:            seed for any randomness; methods must be deterministic given it.
    """

    features: torch.Tensor
    vision_features: torch.Tensor
    view_shapes: Sequence[tuple[int, int]]
    budget: int
    attn_received: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    question_embedding: Optional[torch.Tensor] = None
    seed: int = 0
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        n = self.features.shape[0]
        total = sum(r * c for r, c in self.view_shapes)
        if total != n:
            raise ValueError(f"view_shapes cover {total} tokens but features has {n}")
        if not 1 <= self.budget <= n:
            raise ValueError(f"budget must be in [1, {n}], got {self.budget}")

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    def view_offsets(self) -> list[int]:
        """Start index of each view in the flat token axis."""
        offsets, start = [], 0
        for r, c in self.view_shapes:
            offsets.append(start)
            start += r * c
        return offsets

    def positions(self) -> torch.Tensor:
        """[N, 2] (row, col) of each token normalised to [0, 1] within its own view."""
        out = []
        for r, c in self.view_shapes:
            rr, cc = torch.meshgrid(torch.arange(r), torch.arange(c), indexing="ij")
            pos = torch.stack([rr.flatten() / max(r - 1, 1), cc.flatten() / max(c - 1, 1)], dim=-1)
            out.append(pos)
        return torch.cat(out).float()

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.seed))


@dataclass
class Selection:
    """What a method keeps. Index-style methods set only `indices`; merge-style methods
    (VisionZip's contextual tokens) also give the replacement `tokens` [len(indices), D_lm],
    placed at the kept positions so raster order still holds."""

    indices: torch.Tensor
    tokens: Optional[torch.Tensor] = None


SelectFn = Callable[[PruneContext], "torch.Tensor | Selection"]


def finalize_indices(indices: torch.Tensor, budget: int, num_tokens: int) -> torch.Tensor:
    """Sort into raster order and check the contract every method promises."""
    indices = torch.as_tensor(indices, dtype=torch.long).flatten()
    indices, _ = torch.sort(indices)
    if indices.numel() != budget:
        raise RuntimeError(f"prune method returned {indices.numel()} tokens, budget is {budget}")
    if indices.numel() and (indices[0] < 0 or indices[-1] >= num_tokens):
        raise RuntimeError("prune method returned an index out of range")
    if torch.unique(indices).numel() != indices.numel():
        raise RuntimeError("prune method returned duplicate indices")
    return indices


def run_select(select: SelectFn, ctx: PruneContext) -> Selection:
    """Call a method and hold it to the contract: a Selection whose indices are checked and sorted."""
    sel = select(ctx)
    sel = sel if isinstance(sel, Selection) else Selection(sel)
    return Selection(finalize_indices(sel.indices, ctx.budget, ctx.num_tokens), sel.tokens)


def complement(indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The indices in [0, num_tokens) not in `indices`, ascending."""
    keep = torch.ones(num_tokens, dtype=torch.bool, device=indices.device)
    keep[indices] = False
    return keep.nonzero().squeeze(1)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic top-k: ties broken by the lower index. Returns indices sorted ascending."""
    # stable sort on -score keeps lower index first among equal scores
    order = torch.sort(-scores.float(), stable=True).indices
    return torch.sort(order[:k]).values
