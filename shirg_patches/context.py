"""The contract between the core and a prune method: what a method may look at, what it returns.

A prune method's `select(ctx: PruneContext)` returns the indices (into ``ctx.features``' token
axis) it keeps, or a `Selection` with replacement tokens and diagnostics; `run_select` is the one
place that sorts them into raster order and checks the contract. Candidate tokens are laid out
view after view, each view in raster order, so ascending indices are raster order within every
view. Nothing here holds the model: methods that act inside the LM get a narrow prefill callback.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image


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
    options:         the method's own options dataclass (read-only for the method).
    lm_hidden_in / lm_hidden_out: [N, D_lm] hidden states of the candidates entering / leaving
                     the LM layer a method prunes at (only for methods that act inside the LM).
    """

    features: torch.Tensor
    vision_features: torch.Tensor
    view_shapes: Sequence[tuple[int, int]]
    budget: int
    attn_received: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    question_embedding: Optional[torch.Tensor] = None
    seed: int = 0
    options: Any = None
    lm_hidden_in: Optional[torch.Tensor] = None
    lm_hidden_out: Optional[torch.Tensor] = None

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
    paired with `indices` element by element. `info` carries diagnostics (scores, notes) for
    the CLI and heat-map: methods report there, never by writing into their inputs."""

    indices: torch.Tensor
    tokens: Optional[torch.Tensor] = None
    info: dict = field(default_factory=dict)


SelectFn = Callable[[PruneContext], "torch.Tensor | Selection"]
# prune_hook(layer_idx, hidden_in, hidden_out, positions) -> indices later layers keep, or None
PruneHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


def run_select(select: SelectFn, ctx: PruneContext) -> Selection:
    """Call a method and hold it to the contract: exactly `budget` distinct in-range indices,
    returned sorted (raster order) with any replacement tokens permuted alongside."""
    sel = select(ctx)
    sel = sel if isinstance(sel, Selection) else Selection(sel)
    indices = torch.as_tensor(sel.indices, dtype=torch.long).flatten()
    indices, order = torch.sort(indices)
    if indices.numel() != ctx.budget:
        raise RuntimeError(f"prune method returned {indices.numel()} tokens, budget is {ctx.budget}")
    if indices.numel() and (indices[0] < 0 or indices[-1] >= ctx.num_tokens):
        raise RuntimeError("prune method returned an index out of range")
    if torch.unique(indices).numel() != indices.numel():
        raise RuntimeError("prune method returned duplicate indices")
    tokens = None if sel.tokens is None else sel.tokens[order]
    return Selection(indices, tokens, sel.info)


@dataclass
class EncodeRequest:
    """One image to encode, with everything a method's view encoder may need besides the model."""

    image: Image.Image
    question_ids: Optional[Sequence[int]]
    options: Any  # the method's options dataclass
    seed: int = 0
    pool: Optional[bool] = None  # the explicit --pool/--no-pool flag (LaViDa's own path only)


@dataclass
class VisualTokens:
    """The tokens one image contributes to the prompt, and how they were chosen.

    Methods that prune inside the LM put all candidates in `tokens`, their `PruneContext` in
    `context`, the count the LM keeps in `lm_tokens`, and a `prefill_hook(start, end, n_layers)`
    factory that the model calls with the image's span in the prompt.
    """

    tokens: torch.Tensor  # [T, D_lm] spliced into the prompt
    method: str
    candidates: int  # tokens available before selection (equal to T for pool/full)
    view_shapes: list = field(default_factory=list)
    kept: Optional[torch.Tensor] = None  # indices into the candidates, raster order
    info: dict = field(default_factory=dict)
    context: Optional[PruneContext] = None
    lm_tokens: Optional[int] = None
    prefill_hook: Optional[Callable[[int, int, int], PruneHook]] = None

    @property
    def lm_token_count(self) -> int:
        """Visual tokens the LM keeps past any in-LM pruning (= T otherwise)."""
        return self.tokens.shape[0] if self.lm_tokens is None else self.lm_tokens
